"""Atomic checkpoints: what a run writes after the queries and after every epoch, and how it resumes.

A :class:`DistillCheckpoint` holds everything a run needs to continue bit for bit. :func:`resume_point` reads
it on rank 0 and checks it on every rank against the run's fingerprint, its hold-out split and the sanity of
what it takes from it (the black box's answers checked like fresh ones, the student's weights finite), each
fault a ``ValueError`` naming the file. :func:`prepare_checkpoint_dir` proves the folder writable before
anything is paid for.

Example:
    >>> import tempfile
    >>> folder = prepare_checkpoint_dir(tempfile.mkdtemp())
    >>> folder.is_dir(), CHECKPOINT_NAME
    (True, 'distill_checkpoint.pt')
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils import atomic_save
from .access import answers_problem
from .config import Plan
from .ddp import Dist

__all__ = ["CHECKPOINT_NAME", "DistillCheckpoint", "prepare_checkpoint_dir", "resume_point"]

CHECKPOINT_NAME = "distill_checkpoint.pt"


def prepare_checkpoint_dir(checkpoint_dir: str | os.PathLike | None) -> Path | None:
    """Create ``checkpoint_dir`` and prove it writable (a test file), before anything is paid for."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"checkpoint_dir {str(path)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"checkpoint_dir {str(path)!r} is not a writable folder: {err}") from err
    return path


#: The entries a resumed run takes from a checkpoint file; a file without one of them is damaged.
_CHECKPOINT_NEEDS = ("epoch", "student", "optimizer", "scheduler", "order_rng", "aug_rng", "torch_rng", "history",
                     "answers", "eval_answers", "queries", "seconds", "holdout_indices", "train_indices")


def _mine(states: list[torch.Tensor], rank: int, world: int) -> torch.Tensor:
    """This rank's RNG state from a per-rank list (rank 0's when the world size has changed)."""
    return states[rank] if len(states) == world else states[0]


@dataclass
class DistillCheckpoint:
    """Everything :func:`~lwcam.distillation.distill` needs to continue a run bit for bit (``distill_checkpoint.pt``).

    Written atomically (:func:`lwcam._utils.atomic_save`) by rank 0 after the queries (``epoch=0``) and
    after every epoch; read with ``torch.load(..., weights_only=True)``. It holds the student, optimiser
    and scheduler states, every random state (the data-order and augmentation generators, and torch's
    CPU and CUDA generators of every rank), the history, the black box's answers (so a resumed run never
    asks again), the queries paid, the wall time so far, the hold-out split and the ``fingerprint`` of
    the arguments (:meth:`DistillConfig.fingerprint`, which holds the epoch count). A resumed run must
    match the fingerprint and draw the same hold-out and training indices (``ValueError`` otherwise).
    """

    fingerprint: dict[str, Any]
    epoch: int
    student: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    order_rng: torch.Tensor
    aug_rng: torch.Tensor
    torch_rng: list[torch.Tensor]
    cuda_rng: list[torch.Tensor] | None
    history: list[dict[str, Any]]
    answers: dict[str, torch.Tensor]
    eval_answers: dict[str, torch.Tensor] | None
    queries: int
    seconds: float
    holdout_indices: torch.Tensor
    train_indices: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        """The plain dict that is written to the file (tensors, numbers, strings: ``weights_only``-safe)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the checkpoint atomically (a temporary file, then a rename)."""
        return atomic_save(self.to_dict(), path)

    @staticmethod
    def read(path: Path) -> dict[str, Any]:
        """The raw content of a checkpoint file; ``ValueError`` naming the file if it is unreadable or not a dict."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"the checkpoint {path} cannot be read ({type(err).__name__}: {err}); delete it or "
                             f"pass resume=False to start afresh") from err
        if not isinstance(ckpt, dict):
            raise ValueError(f"the checkpoint {path} holds a {type(ckpt).__name__}, not a distillation checkpoint; "
                             f"delete it or pass resume=False to start afresh")
        return ckpt

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: Path | None, *, fingerprint: dict[str, Any], plan: Plan,
                  epochs: int, atol: float, split: tuple[torch.Tensor, torch.Tensor]) -> DistillCheckpoint:
        """Check ``raw`` against the run's ``fingerprint`` (``ValueError`` listing what differs), validate
        what a resumed run takes from it (``ValueError`` naming the file and the damage), then check that
        it was written with the run's ``split`` (hold-out and training indices; ``ValueError`` if not)."""
        old = raw.get("fingerprint", {})
        diff = [f"{k}: {old.get(k)!r} != {v!r}" for k, v in fingerprint.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"the checkpoint {path} was written by a run with other arguments "
                             f"({'; '.join(diff)[:800]}); pass resume=False to start afresh or use another "
                             f"checkpoint_dir")
        _check_content(raw, path, plan=plan, epochs=epochs, atol=atol)
        _check_split(raw, path, split)
        entries: dict[str, Any] = {f.name: raw.get(f.name) for f in fields(cls)}
        return cls(**entries)

    def restore(self, model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                order_gen: torch.Generator, aug_gen: torch.Generator, ctx: Dist) -> None:
        """Load the student, optimiser and scheduler states, then every random state."""
        model.load_state_dict(self.student)
        opt.load_state_dict(self.optimizer)
        sched.load_state_dict(self.scheduler)
        self.restore_rng(order_gen, aug_gen, ctx)

    def restore_rng(self, order_gen: torch.Generator, aug_gen: torch.Generator, ctx: Dist) -> None:
        """Data-order and augmentation generators, and this rank's torch CPU (and CUDA) generator."""
        order_gen.set_state(self.order_rng)
        aug_gen.set_state(self.aug_rng)
        torch.set_rng_state(_mine(self.torch_rng, ctx.rank, ctx.world))
        if ctx.device.type == "cuda" and self.cuda_rng is not None:
            torch.cuda.set_rng_state(_mine(self.cuda_rng, ctx.rank, ctx.world), ctx.device)


def _damaged(path: Path | None, what: str) -> ValueError:
    return ValueError(f"the checkpoint {path} is damaged: {what}; delete it or pass resume=False to start afresh")


def _check_split(ckpt: dict[str, Any], path: Path | None, split: tuple[torch.Tensor, torch.Tensor]) -> None:
    """``ValueError`` unless the checkpoint's hold-out and training indices are the run's ``split``.

    The split is a seeded draw (:func:`~lwcam.distillation.state.split_indices`); a run that draws another one
    (other arguments slipped past the fingerprint, another torch version's random stream) would train on images
    it measures agreement on.
    """
    for name, mine in zip(("holdout_indices", "train_indices"), split, strict=True):
        theirs = ckpt[name]
        if not isinstance(theirs, torch.Tensor) or not torch.equal(theirs.to(mine.dtype), mine):
            raise ValueError(f"the checkpoint {path} was written with other {name} than this run draws (a different "
                             f"hold-out split of the transfer images); pass resume=False to start afresh or use "
                             f"another checkpoint_dir")


def _check_content(ckpt: dict[str, Any], path: Path | None, *, plan: Plan, epochs: int, atol: float) -> None:
    """Validate what a resumed run takes from a checkpoint; ``ValueError`` naming the file and the fault."""
    missing = [k for k in _CHECKPOINT_NEEDS if k not in ckpt]
    if missing:
        raise _damaged(path, f"missing entries {missing}")
    problem = answers_problem(ckpt["answers"], plan.output, plan.num_classes, plan.n_used, atol)
    if problem is not None:
        raise _damaged(path, f"its black-box answers: {problem}")
    if (ckpt["eval_answers"] is None) != (plan.n_eval == 0):
        raise _damaged(path, "eval_answers do not match eval_images")
    if plan.n_eval and (problem := answers_problem(ckpt["eval_answers"], plan.output, plan.num_classes,
                                                    plan.n_eval, atol)):
        raise _damaged(path, f"its eval_images answers: {problem}")
    epoch, queries = ckpt["epoch"], ckpt["queries"]
    if not isinstance(epoch, int) or not 0 <= epoch <= epochs or len(ckpt["history"]) != epoch:
        raise _damaged(path, f"epoch={epoch!r} must be an int in [0, {epochs}] with one history entry per epoch")
    if not isinstance(queries, int) or queries < 0:
        raise _damaged(path, f"queries={queries!r} must be an int >= 0")
    bad = [k for k, v in ckpt["student"].items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not torch.isfinite(v).all()]
    if bad:
        raise _damaged(path, f"the student's {bad[:3]} hold NaN or Inf")


def resume_point(ctx: Dist, path: Path | None, resume: bool, fingerprint: dict[str, Any], plan: Plan,
                 epochs: int, atol: float, split: tuple[torch.Tensor, torch.Tensor]) -> DistillCheckpoint | None:
    """The checkpoint to continue from: read on rank 0, checked on every rank; ``None`` to start afresh."""
    raw = ctx.rank0(lambda: DistillCheckpoint.read(path) if path is not None and resume and path.exists() else None)
    if raw is None:
        return None
    return DistillCheckpoint.from_dict(raw, path, fingerprint=fingerprint, plan=plan, epochs=epochs, atol=atol,
                                       split=split)
