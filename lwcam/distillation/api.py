"""The public entry point, :func:`distill`: check the arguments, set the run up, train, measure.

The module docstring of :mod:`lwcam.distillation` says what the losses are, how queries are paid, how a run
resumes from its checkpoint and how it runs under ``torchrun``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from .._utils import progress_enabled, training_layout
from ..blackbox import BlackBox
from .checkpoint import prepare_checkpoint_dir
from .checks import Augment, check_run_options, check_student
from .config import DistillConfig, Plan, make_plan
from .ddp import Dist
from .evaluate import final_fidelity
from .result import DistillResult
from .state import Run, setup
from .training import end_epoch, save_checkpoint, train_epoch

__all__ = ["distill"]


def distill(
    blackbox: BlackBox,
    transfer_images: torch.Tensor | Any,
    student: str | nn.Module = "resnet18",
    temperature: float = 4.0,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float | None = None,
    weight_decay: float | None = None,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    augment: bool | Augment = True,
    query_budget: int | None = None,
    holdout: float | int = 0.1,
    eval_images: torch.Tensor | Any | None = None,
    eval_labels: torch.Tensor | Sequence[int] | None = None,
    label_smoothing: float = 0.0,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool | None = None,
    device: str | torch.device | None = None,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    channels_last: bool = False,
) -> DistillResult:
    """Distil ``blackbox`` into a white-box ``student`` from its answers on ``transfer_images``.

    The loss follows what the black box reveals (see the module docstring): for ``probs``,
    ``logits`` and ``topk`` (completed to a full distribution) it is
    ``τ² · KL(softmax(log p_T / τ) ‖ softmax(z_S / τ))``; for ``label`` it is cross-entropy on
    the black box's labels with ``label_smoothing``. Optimisation: AdamW (or SGD with Nesterov
    momentum 0.9) with a one-epoch linear warm-up and a cosine decay, stepped per batch.

    Args:
        blackbox: the model to explain, reachable only through its answers.
        transfer_images: unlabelled images in the model's normalised space: a float tensor
            (N,3,H,W), or a Dataset whose items are an image (3,H,W) or a tuple starting with one,
            e.g. ``(image, label, mask)``; anything after the image is ignored.
        student: a torchvision classification architecture name (built with random weights and
            ``blackbox.num_classes`` outputs) or an ``nn.Module`` (copied; the argument is left untouched).
        temperature: distillation temperature ``τ > 0`` (soft-label modes).
        epochs: passes over the training share of the transfer images.
        batch_size: global batch size (shared out over ranks under ``torchrun``).
        lr: peak learning rate; ``None``: 2e-3 for AdamW, 0.05 for SGD.
        weight_decay: ``None``: 0.05 for AdamW (decoupled), 5e-4 for SGD.
        optimizer: ``"adamw"`` (default: distils fastest in few epochs) or ``"sgd"``.
        augment: ``True``/``"default"``: random horizontal flip and translation, reusing the original
            image's answer (no query); ``"query"``: the same views, each sent to the black box and
            counted; ``False``/``"none"``: no augmentation.
        query_budget: hard cap on black-box queries (``None``: no cap). If it is smaller than the
            transfer set plus ``eval_images``, only the first ``query_budget − len(eval_images)``
            transfer images are used. It must pay for at least one batch.
        holdout: fraction (float in [0,1)) or count (int) of the used transfer images held out,
            answered but not trained on, to measure fidelity.
        eval_images: optional extra images (tensor or Dataset) answered by the black box (counted)
            to report ``eval_agreement`` and, with labels, student and black-box accuracy.
        eval_labels: true labels of ``eval_images``, for evaluation only; when ``None`` and
            ``eval_images`` is a Dataset of ``(image, label, ...)`` tuples, its labels are used.
        label_smoothing: label smoothing for a ``label`` black box.
        seed: seeds initialisation, split, data order and augmentation.
        checkpoint_dir: folder for an atomically written checkpoint (``distill_checkpoint.pt``)
            after the queries and after every epoch.
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one.
        progress: a progress bar over batches (``None``: only on a TTY).
        device: where the student trains (``None``: CUDA if available).
        on_epoch_end: called on rank 0 as ``on_epoch_end(epoch, student)`` after every epoch
            (``epoch`` counts from 1), with the student in eval mode; use it to keep a snapshot per
            epoch. Epochs restored from a checkpoint are not replayed.
        channels_last: train in the ``channels_last`` layout on the CPU (:func:`~lwcam._utils.training_layout`):
            1.2-1.3x faster steps on 2 cores, but the rounding differences grow over the epochs into
            a different student, as a change of seed would (``benchmarks/bench_train_layout.py``), so
            it is off by default. Your own module's ``forward`` must accept that layout (a ``.view``
            of an activation does not). Ignored under ``torchrun``. The student comes back contiguous.

    Returns:
        a :class:`DistillResult`.

    Raises:
        TypeError: ``blackbox`` is not a :class:`~lwcam.blackbox.BlackBox`, or images are not float tensors.
        ValueError: an unknown ``student`` name, a non-finite or out-of-range number (``temperature``,
            ``lr``, ``weight_decay``, ``label_smoothing``, ``holdout``), a ``query_budget`` smaller than a
            batch, an empty or wrongly shaped ``transfer_images``, a student whose output width differs
            from ``blackbox.num_classes``, a ``checkpoint_dir`` that cannot be created or written, a
            checkpoint written with other arguments, or a checkpoint that cannot be read or whose content
            is damaged (black-box answers checked like fresh ones, the student's weights finite); each
            message names the argument or the file. All of these are raised before the first query.
        FloatingPointError: the training loss (or the held-out KL) became NaN or Inf; the message names
            the epoch and step, and the checkpoint of the last completed epoch is left as it was.

    Example:
        >>> from lwcam import BlackBox
        >>> bb = BlackBox(nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), num_classes=5)
        >>> result = distill(bb, torch.randn(40, 3, 16, 16), student="regnet_x_s8", epochs=1, batch_size=16,
        ...                  query_budget=40, holdout=8, progress=False)
        >>> result.queries, result.fidelity["n_holdout"], type(result.student).__name__
        (40, 8, 'RegNet')
    """
    t_start = time.perf_counter()
    # ---- argument checks (identical on every rank, before any collective and any query)
    if not isinstance(blackbox, BlackBox):
        raise TypeError(f"blackbox must be an lwcam.BlackBox, got {type(blackbox).__name__}")
    config = DistillConfig(temperature=temperature, epochs=epochs, batch_size=batch_size, lr=lr,
                           weight_decay=weight_decay, optimizer=optimizer, augment=augment,
                           query_budget=query_budget, holdout=holdout, label_smoothing=label_smoothing, seed=seed,
                           channels_last=channels_last)
    check_run_options(checkpoint_dir, on_epoch_end)
    check_student(student)
    plan = make_plan(blackbox, transfer_images, eval_images, eval_labels, config)
    ctx = Dist(device)
    try:
        return _run(blackbox, student, config, plan, ctx, checkpoint_dir=checkpoint_dir, resume=resume,
                    progress=progress, on_epoch_end=on_epoch_end, t_start=t_start)
    finally:
        ctx.close()


def _run(blackbox: BlackBox, student: str | nn.Module, config: DistillConfig, plan: Plan, ctx: Dist, *,
         checkpoint_dir: str | os.PathLike | None, resume: bool, progress: bool | None,
         on_epoch_end: Callable[[int, nn.Module], None] | None, t_start: float) -> DistillResult:
    """:func:`distill` once its arguments are checked: set up (or resume), train epoch by epoch, evaluate."""
    if config.batch_size < ctx.world:
        raise ValueError(f"batch_size={config.batch_size} is smaller than the number of processes ({ctx.world})")
    ckpt_dir = ctx.rank0(lambda: prepare_checkpoint_dir(checkpoint_dir))  # before anything is paid for
    run, learner, answers, status, ckpt = setup(blackbox, student, config, plan, ctx, ckpt_dir, resume, t_start)
    if ckpt is None:
        save_checkpoint(run, learner, answers, status, 0)  # the answers are safe before the first epoch
    show = progress_enabled(progress) and ctx.rank == 0
    with training_layout(learner.model, config.channels_last and not ctx.active) as learner.layout:
        for epoch in range(status.start_epoch, config.epochs):
            loss = train_epoch(run, learner, answers, status, epoch, show)
            end_epoch(run, learner, answers, status, epoch, loss, on_epoch_end)
    fidelity = final_fidelity(run, learner.model, answers, status.history)
    seconds = status.elapsed()
    return DistillResult(student=learner.model.cpu().eval(), history=status.history, fidelity=fidelity,
                         queries=answers.spent, seconds=seconds,
                         config=_result_config(run, status.start_epoch if ckpt is not None else None))


def _result_config(run: Run, resumed_from: int | None) -> dict[str, Any]:
    """:attr:`DistillResult.config`: the resolved settings, the data sizes and how the run went."""
    plan = run.plan
    return {"student": run.student_name, **run.config.settings(), **plan.facts(), "n_train": plan.n_train,
            "n_holdout": plan.n_hold, "n_eval": plan.n_eval, "image_shape": tuple(plan.source.shape),
            "steps_per_epoch": run.steps_per_epoch, "world_size": run.ctx.world, "device": str(run.ctx.device),
            "resumed_from_epoch": resumed_from,
            "checkpoint": str(run.ckpt_path) if run.ckpt_path is not None else None}
