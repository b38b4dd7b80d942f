"""What every sharded stage shares: the process count checked, each rank's slice of the images, the ranks'
results gathered on rank 0, and a stage's result saved for the process that launched it.

Without a ``torch.distributed`` process group every function acts as rank 0 of one process.
"""

from __future__ import annotations

import io
import numbers
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .._utils import atomic_write_bytes

__all__ = ["LAYOUT_METHODS", "check_nproc", "shard_positions", "rank_and_world", "gather_to_rank0",
           "merge_method_runs", "save_result"]

T = TypeVar("T")

#: T3 methods whose maps depend on where an image lies in its chunk (one noise draw per chunk).
LAYOUT_METHODS = ("random",)


def check_nproc(nproc: Any, n_images: int | None = None, name: str = "nproc") -> int:
    """``nproc`` as an int: at least 1 and, given ``n_images``, at most one process per image.

    >>> check_nproc(2, 16)
    2
    >>> check_nproc(3, 2)
    Traceback (most recent call last):
    ...
    ValueError: nproc=3 processes for 2 images: at most one process per image
    """
    if isinstance(nproc, bool) or not isinstance(nproc, numbers.Integral):
        raise TypeError(f"{name} must be an int (the number of processes), got {nproc!r}")
    count = int(nproc)
    if count < 1:
        raise ValueError(f"{name} must be at least 1, got {count}")
    if n_images is not None and count > n_images:
        raise ValueError(f"{name}={count} processes for {n_images} images: at most one process per image")
    return count


def shard_positions(n: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of the positions ``0..n-1`` among ``world`` ranks.

    >>> [shard_positions(5, r, 2).tolist() for r in range(2)]
    [[0, 1, 2], [3, 4]]
    """
    world = check_nproc(world, n, name="world size")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, {world}), got {rank!r}")
    return torch.tensor_split(torch.arange(n), world)[int(rank)]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_to_rank0(mine: T) -> list[T] | None:
    """Every rank's ``mine`` on rank 0, in rank order (``gather_object``); ``None`` on the other ranks.

    Without a process group (one process) the list is ``[mine]``. Every rank must call it.
    """
    rank, world = rank_and_world()
    if world == 1:
        return [mine]
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered


def merge_method_runs(parts: Sequence[Any]) -> Any:
    """One method's :class:`~lwcam.scoring.evaluation.MethodRun` of each rank (in rank order) as one: maps and indices
    concatenated, seconds and queries per image averaged over every image."""
    n = sum(len(r.indices) for r in parts)
    seconds = sum(r.seconds_per_image * len(r.indices) for r in parts) / n
    queries = sum(r.queries_per_image * len(r.indices) for r in parts) / n
    return replace(parts[0], indices=torch.cat([r.indices for r in parts]),
                   saliency=torch.cat([r.saliency for r in parts]), seconds_per_image=seconds,
                   queries_per_image=queries)


def save_result(value: Any, path: Path) -> list[Path]:
    """``torch.save`` of a stage's result to ``path``, atomically (a reader never sees half a file)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    atomic_write_bytes(buffer.getvalue(), Path(path))
    return [Path(path)]
