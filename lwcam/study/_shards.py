"""What every sharded stage shares: the process count checked, each rank's slice of the images, the ranks'
results gathered on rank 0, and a stage's result saved for the process that launched it.

Without a ``torch.distributed`` process group every function acts as rank 0 of one process.
"""

from __future__ import annotations

import io
import numbers
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .._utils import atomic_write_bytes

__all__ = ["LAYOUT_METHODS", "check_nproc", "shard_positions", "rank_and_world", "gather_to_rank0",
           "merge_method_runs", "save_result", "ShardedRunError", "launch"]

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


class ShardedRunError(RuntimeError):
    """A sharded run failed: a rank ended with an error or was killed; the message names the rank."""


def _free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _describe(failure: Any) -> str:
    """How one process ended: its exit code or signal, and its error where it reported one."""
    how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"signal {-failure.exitcode}"
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
    message = str(message).strip()
    if failure.exitcode < 0 or not message or message.startswith("To enable traceback"):
        return f"{how}, no error reported: killed, or ended without a Python exception"
    return f"{how}: {message[:1000]}"


def _failure_message(err: Any) -> str:
    """The first rank to fail, how and why; the ranks that failed after it, and those the launcher stopped
    (``SIGTERM``); from ``torch.distributed.elastic``'s ``ChildFailedError``."""
    failures = err.failures
    own = [r for r in failures if failures[r].exitcode != -15] or list(failures)
    first = min(own, key=lambda r: (failures[r].timestamp, r))
    text = f"rank {first} failed ({_describe(failures[first])})"
    for rank in sorted(r for r in own if r != first):
        text += f"; rank {rank} failed too ({_describe(failures[rank])})"
    stopped = sorted(r for r in failures if r not in own)
    if stopped:
        text += f"; rank(s) {', '.join(map(str, stopped))} stopped"
    return text + "; no table was written"


def launch(args: Sequence[str], nproc: int, *, port: int | None = None,
           rendezvous_timeout_s: int = 300) -> None:
    """Run ``python -u <args>`` in ``nproc`` processes on this machine, as ``torchrun`` would start them.

    The processes meet at 127.0.0.1 on ``port`` (default: a free one) and see ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``OMP_NUM_THREADS`` is 1 unless it is set. No
    process is restarted: the first to fail ends the run (the others are stopped) and
    :class:`ShardedRunError` names its rank.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = check_nproc(nproc)
    port = _free_port() if port is None else port
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"lwcam-{os.getpid()}",
                          rdzv_backend="static", rdzv_endpoint=f"127.0.0.1:{port}",
                          rdzv_configs={"rank": 0, "timeout": rendezvous_timeout_s}, max_restarts=0,
                          monitor_interval=0.1, start_method="spawn", shutdown_timeout=10)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        elastic_launch(config, sys.executable)("-u", *args)
    except ChildFailedError as err:
        raise ShardedRunError(_failure_message(err)) from None
