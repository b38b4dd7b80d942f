"""The training loop: batches, optimiser steps, epochs, and the checkpoint after each.

One epoch (:func:`train_epoch`) walks the training share of the transfer images in a seeded random order.
Each global batch is drawn the same on every rank; :func:`batch` takes this rank's contiguous share and
augments it, and :func:`train_step` makes one optimiser step on it. :func:`end_epoch` measures the held-out
fidelity, appends the history entry and writes the checkpoint (:func:`save_checkpoint`, rank 0 only).

Per image the loss is ``T² · KL(p_T^T ‖ p_S^T)`` for soft answers and cross-entropy for labels; the loss
backpropagated is their sum times ``world / len(global batch)``, so that DistributedDataParallel's average
over ranks is the mean over the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .._utils import eval_mode, track
from .access import answer_targets, cat_answers
from .augment import apply_augment, augment_params
from .checkpoint import DistillCheckpoint
from .ddp import all_finite
from .evaluate import holdout_fidelity
from .losses import kd_loss, label_loss
from .state import Answers, Learner, Progress, Run
from .student import as_logits, train_mode

__all__ = ["batch", "end_epoch", "save_checkpoint", "train_epoch", "train_step"]


def save_checkpoint(run: Run, learner: Learner, answers: Answers, progress: Progress, epoch: int) -> None:
    """Write the checkpoint after ``epoch`` epochs (rank 0 writes; every rank contributes its RNG state)."""
    if run.ckpt_path is None:
        return
    ctx, device = run.ctx, run.ctx.device
    rngs = ctx.gather(torch.get_rng_state())
    cuda_rngs = ctx.gather(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None
    if ctx.rank != 0:
        return
    DistillCheckpoint(
        fingerprint=run.fingerprint, epoch=epoch,
        student={k: v.detach().cpu() for k, v in learner.model.state_dict().items()},
        optimizer=learner.opt.state_dict(), scheduler=learner.sched.state_dict(),
        order_rng=progress.order_gen.get_state(), aug_rng=progress.aug_gen.get_state(), torch_rng=rngs,
        cuda_rng=cuda_rngs, history=progress.history, answers=answers.transfer, eval_answers=answers.evals,
        queries=answers.spent, seconds=progress.elapsed(), holdout_indices=run.holdout_idx,
        train_indices=run.train_idx,
    ).save(run.ckpt_path)


def _ask_views(run: Run, answers: Answers, gidx: torch.Tensor, flips: torch.Tensor,
               shifts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """With ``augment="query"``: the black box's answers for the augmented views of a global batch (as
    far as the budget pays; the rest keep their original image's answer) and the queries they cost."""
    views = apply_augment(run.plan.source.get(gidx).cpu(), flips, shifts, run.pad)
    batch_t = answers.targets[gidx].clone()
    budget = run.config.query_budget
    room = len(views) if budget is None else max(0, budget - answers.spent)
    m = min(room, len(views))
    if m == 0:
        return batch_t, 0
    blackbox, output = answers.blackbox, run.plan.output
    before = blackbox.queries
    fresh, _ = answer_targets(cat_answers([blackbox(views[:m])], output), output, run.plan.num_classes)
    batch_t[:m] = fresh
    return batch_t, blackbox.queries - before


def batch(run: Run, answers: Answers, aug_gen: torch.Generator, gidx: torch.Tensor,
          mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch ``gidx``: images (augmented) on the device, and their targets.

    With ``augment="query"`` rank 0 asks the black box about the views and the queries are added to
    ``answers.spent`` on every rank.
    """
    mode, device = run.config.aug_mode, run.ctx.device
    if mode == "none":
        return run.plan.source.get(gidx[mine]).to(device), answers.targets[gidx[mine]]
    flips, shifts = augment_params(len(gidx), run.pad, aug_gen)
    if mode == "query":
        batch_targets, paid = run.ctx.rank0(lambda: _ask_views(run, answers, gidx, flips, shifts))
        answers.spent += paid
        tgt = batch_targets[mine]
    else:
        tgt = answers.targets[gidx[mine]]
    x = apply_augment(run.plan.source.get(gidx[mine]).to(device), flips[mine], shifts[mine], run.pad)
    return x, tgt


def train_step(run: Run, learner: Learner, x: torch.Tensor, tgt: torch.Tensor, n_global: int, epoch: int,
               step: int) -> torch.Tensor:
    """One optimiser step on this rank's images ``x`` and targets ``tgt`` of a global batch of ``n_global``;
    returns this rank's summed per-image loss (float64).

    ``FloatingPointError`` when the loss is not finite on some rank (every rank raises it).
    """
    config, ctx = run.config, run.ctx
    out = as_logits(learner.net(x.contiguous(memory_format=learner.layout)))
    tgt = tgt.to(ctx.device)
    if run.soft:
        per = kd_loss(out, tgt, float(config.temperature), reduction="none")
    else:
        per = label_loss(out, tgt, float(config.label_smoothing), reduction="none")
    loss = per.sum() * (ctx.world / n_global)
    if not all_finite(loss, ctx):
        raise FloatingPointError(
            f"distillation diverged: the training loss is not finite at epoch {epoch + 1}, step {step + 1} "
            f"of {run.steps_per_epoch} (lr={config.peak_lr:g}, temperature={config.temperature:g}); the student "
            f"was not saved" + (f" and the last good checkpoint (epoch {epoch}) stays in {run.ckpt_path}"
                                if run.ckpt_path else "") + "; lower lr and pass resume=False")
    learner.opt.zero_grad(set_to_none=True)
    loss.backward()
    learner.opt.step()
    learner.sched.step()
    return per.detach().sum().double()


def train_epoch(run: Run, learner: Learner, answers: Answers, progress: Progress, epoch: int, show: bool) -> float:
    """One pass over the training share in a seeded random order; returns the mean training loss."""
    train_mode(learner.model, learner.frozen)
    order = run.train_idx[torch.randperm(run.plan.n_train, generator=progress.order_gen)]
    mine = run.ctx.shard(run.global_batch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.ctx.device)
    steps = track(range(run.steps_per_epoch), total=run.steps_per_epoch,
                  desc=f"distil {epoch + 1}/{run.config.epochs}", enabled=show)
    for step in steps:
        gidx = order[step * run.global_batch : (step + 1) * run.global_batch]
        x, tgt = batch(run, answers, progress.aug_gen, gidx, mine)
        loss_sum += train_step(run, learner, x, tgt, len(gidx), epoch, step)
    loss_sum = run.ctx.all_reduce(loss_sum.cpu())
    return float(loss_sum) / (run.steps_per_epoch * run.global_batch)


def end_epoch(run: Run, learner: Learner, answers: Answers, progress: Progress, epoch: int, loss: float,
              on_epoch_end: Callable[[int, nn.Module], None] | None) -> None:
    """Held-out fidelity, the history entry, the checkpoint and the caller's ``on_epoch_end``."""
    run.ctx.sync_module(learner.model)  # BatchNorm statistics are per rank: take rank 0's
    ev = holdout_fidelity(run, learner.model, answers)
    if ev["kl"] is not None and not math.isfinite(ev["kl"]):
        raise FloatingPointError(f"distillation diverged: the held-out KL is {ev['kl']} after epoch {epoch + 1}; "
                                 f"the student was not saved; lower lr and pass resume=False")
    progress.history.append({"epoch": epoch + 1, "loss": loss, "agreement": ev["agreement"], "kl": ev["kl"],
                             "queries": answers.spent, "lr": float(learner.opt.param_groups[0]["lr"]),
                             "seconds": progress.elapsed()})
    save_checkpoint(run, learner, answers, progress, epoch + 1)
    if on_epoch_end is not None and run.ctx.rank == 0:
        with eval_mode(learner.model):
            on_epoch_end(epoch + 1, learner.model)
