"""The state of one distillation run, in four parts grouped by job, and :func:`setup`, which makes them.

* :class:`Run`: the fixed inputs (settings, data plan, processes, hold-out split, fingerprint, checkpoint file);
* :class:`Learner`: the student being trained, its optimiser and scheduler;
* :class:`Answers`: the black box, its answers (asked once) as training targets, and the queries paid;
* :class:`Progress`: the data-order and augmentation generators, the history and the wall time.

Each training step takes only the parts it reads or advances.

Example:
    >>> progress = Progress.seeded(seed=0, t_start=0.0)
    >>> progress.order_gen.initial_seed(), progress.aug_gen.initial_seed(), progress.history
    (1, 2, [])
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..blackbox import BlackBox
from .access import answer_targets, ask_transfer
from .checkpoint import CHECKPOINT_NAME, DistillCheckpoint, resume_point
from .config import DistillConfig, Plan
from .ddp import Dist
from .student import optimiser, prepare_student

__all__ = ["Answers", "Learner", "Progress", "Run", "setup", "split_indices"]


@dataclass(frozen=True)
class Run:
    """What a run is given and fixes before its first epoch; no step changes it."""

    config: DistillConfig
    plan: Plan
    ctx: Dist
    student_name: str
    holdout_idx: torch.Tensor
    train_idx: torch.Tensor
    fingerprint: dict[str, Any]
    ckpt_path: Path | None

    @property
    def soft(self) -> bool:
        """Whether the black box reveals probabilities (every ``output`` but ``label``)."""
        return self.plan.output != "label"

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.plan.n_train // self.config.batch_size)

    @property
    def global_batch(self) -> int:
        return min(self.config.batch_size, self.plan.n_train)

    @property
    def pad(self) -> int:
        """The augmentation's largest shift: 1/8 of the image height, at least one pixel."""
        return max(1, round(self.plan.source.shape[1] / 8))


@dataclass
class Learner:
    """The student being trained and what trains it."""

    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    frozen: set[str]  # the submodules the caller had put in eval mode
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    layout: torch.memory_format = torch.contiguous_format  # of the training batches (set while training)


@dataclass
class Answers:
    """The black box's answers, asked once, and the queries this distillation paid (over resumed runs)."""

    blackbox: BlackBox
    transfer: dict[str, torch.Tensor]  # for the used transfer images
    evals: dict[str, torch.Tensor] | None  # for the eval images
    spent: int
    targets: torch.Tensor  # log-probabilities (N,C), or labels (N,) for a label black box
    top1: torch.Tensor  # the black box's top-1 class (N,)

    @classmethod
    def of(cls, blackbox: BlackBox, plan: Plan, transfer: dict[str, torch.Tensor],
           evals: dict[str, torch.Tensor] | None, spent: int) -> Answers:
        """The answers with their training targets and top-1 classes."""
        targets, top1 = answer_targets(transfer, plan.output, plan.num_classes)
        return cls(blackbox=blackbox, transfer=transfer, evals=evals, spent=spent, targets=targets, top1=top1)


@dataclass
class Progress:
    """Where the run stands: its own random generators, the history and the wall time."""

    t_start: float
    order_gen: torch.Generator = field(default_factory=torch.Generator)  # the data order
    aug_gen: torch.Generator = field(default_factory=torch.Generator)  # the augmentation parameters
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    seconds_before: float = 0.0  # wall time of the runs this one resumes

    @classmethod
    def seeded(cls, seed: int, t_start: float) -> Progress:
        """A fresh start: the data-order generator seeded with ``seed + 1``, the augmentation's with ``seed + 2``."""
        progress = cls(t_start=t_start)
        progress.order_gen.manual_seed(seed + 1)
        progress.aug_gen.manual_seed(seed + 2)
        return progress

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t_start


def split_indices(plan: Plan, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted hold-out and training indices among the used transfer images (a seeded random split)."""
    perm = torch.randperm(plan.n_used, generator=torch.Generator().manual_seed(seed))
    return perm[: plan.n_hold].sort().values, perm[plan.n_hold :].sort().values


def setup(blackbox: BlackBox, student: str | nn.Module, config: DistillConfig, plan: Plan, ctx: Dist,
          ckpt_dir: Path | None, resume: bool,
          t_start: float) -> tuple[Run, Learner, Answers, Progress, DistillCheckpoint | None]:
    """Split, student, checkpoint, black-box answers and optimiser: a run ready for its first (or next) epoch."""
    holdout_idx, train_idx = split_indices(plan, config.seed)
    model, name, init_hash, frozen = prepare_student(student, plan, config.seed, ctx.device)
    run = Run(config=config, plan=plan, ctx=ctx, student_name=name, holdout_idx=holdout_idx, train_idx=train_idx,
              fingerprint=config.fingerprint(plan, name, init_hash),
              ckpt_path=ckpt_dir / CHECKPOINT_NAME if ckpt_dir is not None else None)
    ckpt = resume_point(ctx, run.ckpt_path, resume, run.fingerprint, plan, config.epochs, blackbox.atol,
                        (holdout_idx, train_idx))
    if ckpt is not None:
        answers = Answers.of(blackbox, plan, ckpt.answers, ckpt.eval_answers, int(ckpt.queries))
    else:  # asked once, on rank 0, then broadcast
        answers = Answers.of(blackbox, plan, *ctx.rank0(lambda: ask_transfer(blackbox, plan.source, plan.n_used,
                                                                             plan.evals)))
    if ctx.active and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt, sched = optimiser(model, config, plan.n_train)
    learner = Learner(model=model, net=model, frozen=frozen, opt=opt, sched=sched)
    progress = Progress.seeded(config.seed, t_start)
    if ckpt is not None:
        ckpt.restore(model, opt, sched, progress.order_gen, progress.aug_gen, ctx)
        progress.history, progress.start_epoch = list(ckpt.history), int(ckpt.epoch)
        progress.seconds_before = float(ckpt.seconds)
    if ctx.active:
        learner.net = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return run, learner, answers, progress, ckpt
