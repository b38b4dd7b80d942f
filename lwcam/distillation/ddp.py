"""The ``torch.distributed`` parts of distillation: the world, rank 0's answers broadcast, sharding, reductions.

:class:`Dist` reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (as ``torchrun`` sets them), creates a process
group when there is more than one process and none exists (``nccl`` on CUDA, ``gloo`` on CPU) and destroys it
in :meth:`Dist.close`. In a single process every collective is a no-op, so the training code reads the same
with one process or many.

Example:
    >>> import torch
    >>> ctx = Dist("cpu")  # one process: no process group
    >>> ctx.world, ctx.rank, ctx.active, ctx.rank0(lambda: 3), ctx.shard(4).tolist()
    (1, 0, False, 3, [0, 1, 2, 3])
    >>> all_finite(torch.tensor(1.5), ctx), all_finite(torch.tensor(float("nan")), ctx)
    (True, False)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .._utils import resolve_device

__all__ = ["Dist", "all_finite"]


class Dist:
    """World size, rank and the collectives distill needs (no-ops in a single process)."""

    def __init__(self, device_arg: str | torch.device | None) -> None:
        self.created = False
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        initialised = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if initialised else env_world
        self.rank = dist.get_rank() if initialised else int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank if initialised else 0)))
        device = resolve_device(device_arg)
        if device.type == "cuda" and self.world > 1 and device.index is None:
            device = torch.device("cuda", self.local_rank)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        self.device = device
        if self.world > 1 and not initialised:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.created = True

    @property
    def active(self) -> bool:
        return self.world > 1

    def broadcast(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def rank0(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and broadcast its value; an error there is raised on every rank."""
        if not self.active:
            return fn()
        payload: Any = None
        error: Exception | None = None
        if self.rank == 0:
            try:
                payload = ("ok", fn())
            except Exception as err:
                error = err
                payload = ("error", f"{type(err).__name__}: {err}")
        payload = self.broadcast(payload)
        if payload[0] == "error":
            if error is not None:
                raise error
            raise RuntimeError(f"rank 0 failed: {payload[1]}")
        return payload[1]

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dev = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            buf = t.to(dev)
            dist.all_reduce(buf)
            return buf.to(t.device)
        return t

    def sync_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        if not self.active:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)

    def shard(self, n: int) -> torch.Tensor:
        """This rank's contiguous share of positions ``0..n-1``."""
        return torch.tensor_split(torch.arange(n), self.world)[self.rank]

    def close(self) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()


def all_finite(loss: torch.Tensor, ctx: Dist) -> bool:
    """Whether ``loss`` is finite on every rank (one small all-reduce under ``torchrun``, so all ranks agree)."""
    ok = torch.isfinite(loss.detach()).to(torch.float64).reshape(1).cpu()
    return bool(ctx.all_reduce(ok).item() == ctx.world)
