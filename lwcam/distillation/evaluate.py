"""The student measured against the black box: agreement, KL and accuracy, sharded over ranks.

* :func:`evaluate`: top-1 agreement with the black box, ``KL(black box ‖ student)`` at T=1 and accuracy on
  some images, each rank taking its share and the sums all-reduced;
* :func:`holdout_fidelity`: the held-out transfer images, after every epoch;
* :func:`final_fidelity`: :attr:`~lwcam.distillation.DistillResult.fidelity`, with the ``eval_images``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lwcam.distillation.access import Images
    >>> from lwcam.distillation.ddp import Dist
    >>> images = Images(torch.randn(6, 3, 4, 4), "eval_images", channels=3)
    >>> student = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    >>> top1 = student(images.tensor).argmax(1)  # a black box that answers as the student does
    >>> evaluate(student, images, torch.arange(6), top1, None, None, Dist("cpu"), batch_size=4)
    {'agreement': 1.0, 'kl': None, 'accuracy': None}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._utils import eval_mode
from .access import Images, answer_targets
from .ddp import Dist
from .losses import kd_loss
from .state import Answers, Run
from .student import as_logits

__all__ = ["evaluate", "final_fidelity", "holdout_fidelity"]


@torch.no_grad()
def evaluate(model: nn.Module, images: Images, idx: torch.Tensor, top1: torch.Tensor,
             log_probs: torch.Tensor | None, labels: torch.Tensor | None, ctx: Dist,
             batch_size: int) -> dict[str, float | None]:
    """Agreement with ``top1``, KL(black box ‖ student) at T=1 and accuracy, sharded over ranks."""
    mine = ctx.shard(len(idx))
    acc = torch.zeros(4, dtype=torch.float64)  # agree, kl_sum, correct, n
    with eval_mode(model):
        for s in range(0, len(mine), batch_size):
            sel = idx[mine[s : s + batch_size]]
            out = as_logits(model(images.get(sel).to(ctx.device))).float()
            pred = out.argmax(dim=1).cpu()
            acc[0] += float((pred == top1[sel]).sum())
            if log_probs is not None:
                acc[1] += float(kd_loss(out, log_probs[sel].to(out.device), 1.0, reduction="sum"))
            if labels is not None:
                acc[2] += float((pred == labels[sel]).sum())
            acc[3] += len(sel)
    acc = ctx.all_reduce(acc)
    n = float(acc[3])
    if n == 0:
        return {"agreement": None, "kl": None, "accuracy": None}
    return {"agreement": float(acc[0]) / n,
            "kl": float(acc[1]) / n if log_probs is not None else None,
            "accuracy": float(acc[2]) / n if labels is not None else None}


def holdout_fidelity(run: Run, model: nn.Module, answers: Answers) -> dict[str, float | None]:
    """Top-1 agreement and ``KL(black box ‖ student)`` at T=1 on the held-out transfer images."""
    return evaluate(model, run.plan.source, run.holdout_idx, answers.top1, answers.targets if run.soft else None,
                    None, run.ctx, run.config.batch_size)


def final_fidelity(run: Run, model: nn.Module, answers: Answers, history: list[dict[str, Any]]) -> dict[str, Any]:
    """:attr:`DistillResult.fidelity`: the last epoch's held-out numbers and, with ``eval_images``, the
    student's agreement, KL and accuracy there (and the black box's accuracy when labels are known)."""
    run.ctx.sync_module(model)
    last, plan = history[-1], run.plan
    fidelity: dict[str, Any] = {"agreement": last["agreement"], "kl": last["kl"], "accuracy": None,
                                "n_holdout": plan.n_hold}
    if plan.evals is None or answers.evals is None:
        return fidelity
    ev_targets, ev_top1 = answer_targets(answers.evals, plan.output, plan.num_classes)
    ev = evaluate(model, plan.evals, torch.arange(plan.evals.n), ev_top1, ev_targets if run.soft else None,
                  plan.eval_labels, run.ctx, run.config.batch_size)
    fidelity.update(accuracy=ev["accuracy"], eval_agreement=ev["agreement"], eval_kl=ev["kl"], n_eval=plan.n_eval)
    if plan.eval_labels is not None:
        fidelity["blackbox_accuracy"] = float((ev_top1 == plan.eval_labels).double().mean())
    return fidelity
