"""Small shared helpers: seeding, progress bars, atomic file writes, devices."""

from __future__ import annotations

import io
import os
import random
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

T = TypeVar("T")

__all__ = [
    "seed_everything",
    "track",
    "progress_enabled",
    "atomic_save",
    "atomic_write_bytes",
    "resolve_device",
    "eval_mode",
]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch, and return a fresh ``torch.Generator`` seeded with ``seed``.

    Args:
        seed: any non-negative integer.

    Example:
        >>> g = seed_everything(0)
        >>> torch.rand(1, generator=g).item() == torch.rand(1, generator=seed_everything(0)).item()
        True
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def progress_enabled(progress: bool | None = None) -> bool:
    """Decide whether to draw a progress bar.

    ``progress=False`` always disables, ``True`` always enables. ``None`` (the default
    everywhere in lwcam) enables the bar only when stderr is a TTY and the environment
    variable ``LWCAM_PROGRESS`` is not ``0``.
    """
    if progress is not None:
        return bool(progress)
    env = os.environ.get("LWCAM_PROGRESS")
    if env is not None:
        return env not in ("0", "false", "False", "")
    return sys.stderr.isatty()


def track(iterable: Iterable[T], *, total: int | None = None, desc: str = "",
             enabled: bool | None = None, **kwargs: Any) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar when :func:`progress_enabled` says so."""
    if not progress_enabled(enabled):
        return iter(iterable)
    return iter(tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, **kwargs))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, then rename.

    The file gets the mode a plain ``open(path, "w")`` would give (``0o666`` less the umask), not
    the temporary file's private ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (serialised in memory, then :func:`atomic_write_bytes`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(buf.getvalue(), path)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def is_cpu_convnet(module: object) -> bool:
    """Whether ``module`` is an ``nn.Module`` with a 2-D convolution whose parameters live on the CPU.

    Example:
        >>> is_cpu_convnet(nn.Conv2d(3, 4, 3)), is_cpu_convnet(nn.Linear(2, 2)), is_cpu_convnet(len)
        (True, False, False)
    """
    if not isinstance(module, nn.Module):
        return False
    first = next(module.parameters(), None)
    on_cpu = first is None or first.device.type == "cpu"
    return on_cpu and any(isinstance(m, nn.Conv2d) for m in module.modules())


@contextmanager
def training_layout(module: nn.Module, enabled: bool = True) -> Iterator[torch.memory_format]:
    """Context manager: lay a CPU convnet's weights out ``channels_last`` while it trains, and give
    it back in the contiguous layout; yields the memory format to lay its input batches out in.

    On the CPU, training the package's networks runs 1.2-1.5x faster in ``channels_last``; each step
    differs from the contiguous one by float rounding only, but over many steps the two runs drift apart
    as two seeds would (``benchmarks/bench_train_layout.py``).
    With ``enabled=False``, or for a module that is not a CPU convnet, nothing changes and the yielded
    format is ``torch.contiguous_format``. Parameters stay the same objects, so an optimiser made
    before or inside the block keeps working.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
        >>> with training_layout(net) as fmt:
        ...     fmt, net[0].weight.is_contiguous(memory_format=torch.channels_last)
        (torch.channels_last, True)
        >>> net[0].weight.is_contiguous()
        True
    """
    fmt = torch.channels_last if enabled and is_cpu_convnet(module) else torch.contiguous_format
    module.to(memory_format=fmt)
    try:
        yield fmt
    finally:
        module.to(memory_format=torch.contiguous_format)


class eval_mode:  # noqa: N801 - used like a function
    """Context manager: put a module in eval mode, then give every submodule its own training flag back.

    ``model.train(was)`` would reset every submodule to one flag, so a frozen BatchNorm inside a
    training model would come back in training mode; this restores each flag as it was.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
        >>> _ = net[1].eval()
        >>> with eval_mode(net):
        ...     net.training, net[1].training
        (False, False)
        >>> net.training, net[0].training, net[1].training
        (True, True, False)
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.flags = [(m, m.training) for m in module.modules()]

    def __enter__(self) -> nn.Module:
        self.module.eval()
        return self.module

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag
