"""What every baseline shares: input checks, access checks, seeding, cost records, resizing.

Every baseline returns its saliency as a plain ``(B,H,W)`` float32 CPU tensor and, when the
caller passes a dict as ``stats``, writes its cost into that dict (see :class:`Recorder`).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._utils import eval_mode
from ..blackbox import BlackBox

__all__ = [
    "Targets",
    "Recorder",
    "check_images",
    "check_targets",
    "check_seed",
    "require_blackbox",
    "require_module",
    "generator",
    "upsample",
    "gaussian_blur",
    "minmax",
    "eval_mode",
]

Targets = int | Sequence[int] | torch.Tensor


def check_images(images: Any, channels: int | None = 3) -> torch.Tensor:
    """Validate a batch ``(B,channels,H,W)`` of finite floating-point images; return it detached, as float32.

    The one image rule of lwcam: any floating dtype is accepted and converted to float32; any other
    dtype raises ``TypeError`` naming it.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B,3,H,W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor (any float dtype is converted to float32), "
                        f"got dtype {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B,3,H,W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B=0); expected at least one image")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"images must have {channels} channels, got shape {tuple(images.shape)}")
    if images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"images must have a positive height and width, got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or Inf pixels")
    if images.dtype != torch.float32:
        images = images.to(torch.float32)
        if not torch.isfinite(images).all():
            raise ValueError("images hold values too large for float32 (they become Inf)")
    return images.detach()


def check_targets(targets: Any, batch: int, num_classes: int | None) -> torch.Tensor:
    """Turn ``targets`` (an int, a sequence or a tensor of B ints) into a ``(B,)`` int64 tensor.

    Raises:
        TypeError: a target that is not an integer (bools and floats included).
        ValueError: the wrong number of targets, or a class outside ``[0, num_classes)``.
    """
    if isinstance(targets, bool | np.bool_):
        raise TypeError("targets must be class indices (int, sequence or tensor), got a bool")
    if isinstance(targets, np.ndarray):
        targets = torch.from_numpy(targets)
    if isinstance(targets, numbers.Integral):
        out = torch.full((batch,), int(targets), dtype=torch.long)
    elif isinstance(targets, torch.Tensor):
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise TypeError(f"targets must be an integer tensor, got dtype {targets.dtype}")
        out = targets.detach().to("cpu", torch.long).reshape(-1)
        if targets.dim() == 0:
            out = out.expand(batch).clone()
        elif targets.dim() != 1:
            raise ValueError(f"targets must have shape (B,), got {tuple(targets.shape)}")
    elif isinstance(targets, Sequence) and not isinstance(targets, str | bytes):
        items = list(targets)
        for t in items:
            if isinstance(t, bool | np.bool_) or not isinstance(t, numbers.Integral | torch.Tensor) or (
                isinstance(t, torch.Tensor) and (t.numel() != 1 or t.is_floating_point() or t.dtype == torch.bool)
            ):
                raise TypeError(f"targets must be integer class indices, got {t!r}")
        out = torch.tensor([int(t) for t in items], dtype=torch.long)
    else:
        raise TypeError(f"targets must be an int, a sequence of ints or a tensor, got {type(targets).__name__}")
    if out.numel() != batch:
        raise ValueError(f"got {out.numel()} targets for a batch of {batch} images")
    if num_classes is not None and ((out < 0).any() or (out >= num_classes).any()):
        bad = out[(out < 0) | (out >= num_classes)][0].item()
        raise ValueError(f"target class {bad} is outside [0, {num_classes}) for a model with {num_classes} classes")
    return out


def check_seed(seed: Any) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return seed


def generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``; the global random state is left alone."""
    g = torch.Generator()
    g.manual_seed(check_seed(seed))
    return g


def require_blackbox(model: Any, method: str) -> BlackBox:
    """Black-box methods see the model only through a :class:`~lwcam.BlackBox`."""
    if not isinstance(model, BlackBox):
        raise TypeError(
            f"{method} is a black-box method: pass the model wrapped in lwcam.BlackBox "
            f"(query access only), got {type(model).__name__}"
        )
    if model.output == "label":
        raise ValueError(f"{method} needs class scores, but this BlackBox only reveals labels (output='label')")
    return model


def require_module(model: Any, method: str) -> nn.Module:
    """White-box methods need the ``nn.Module`` itself (its weights and gradients)."""
    if isinstance(model, BlackBox):
        raise TypeError(
            f"{method} is a white-box method and needs the nn.Module (e.g. the distilled student); "
            "a BlackBox only answers queries"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"{method} needs an nn.Module, got {type(model).__name__}")
    return model


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


class Recorder:
    """Measure the cost of one baseline call and write it into ``stats``.

    On exit, a ``stats`` dict (when one was given) receives:

    * ``"queries"``: images sent to the black box during the call (``BlackBox.queries``
      difference, so cache hits are free); 0 for methods that never query it;
    * ``"seconds"``: wall-clock seconds of the call;
    * ``"images"``: the batch size B;
    * ``"queries_per_image"`` and ``"seconds_per_image"``: the two above divided by B;
    * any extra entries the method set with :meth:`note`.
    """

    def __init__(self, stats: dict | None, images: int, blackbox: BlackBox | None = None) -> None:
        if stats is not None and not isinstance(stats, dict):
            raise TypeError(f"stats must be a dict or None, got {type(stats).__name__}")
        self.stats = stats
        self.images = images
        self.blackbox = blackbox
        self.extra: dict[str, Any] = {}

    def note(self, **items: Any) -> None:
        self.extra.update(items)

    def __enter__(self) -> Recorder:
        self.q0 = self.blackbox.queries if self.blackbox is not None else 0
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        seconds = time.perf_counter() - self.t0
        if self.stats is None or exc_type is not None:
            return
        queries = (self.blackbox.queries - self.q0) if self.blackbox is not None else 0
        self.stats.update(
            queries=int(queries),
            seconds=float(seconds),
            images=int(self.images),
            queries_per_image=queries / self.images,
            seconds_per_image=seconds / self.images,
            **self.extra,
        )


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(B,h,w)`` maps to ``size`` (``align_corners=False``)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def gaussian_kernel1d(sigma: float, radius: int | None = None) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma)) if radius is None else radius
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B,C,H,W)`` images with replicate padding (radius ``ceil(3σ)``)."""
    if sigma <= 0:
        return images.clone()
    k = gaussian_kernel1d(sigma).to(images)
    r = k.numel() // 2
    c = images.shape[1]
    x = F.pad(images, (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, r, r), mode="replicate")
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each ``(H,W)`` map of a ``(B,H,W)`` batch to [0,1]; a constant map gives zeros."""
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(flat))
    return out.reshape(maps.shape)


def finish(maps: torch.Tensor) -> torch.Tensor:
    """The common return format: a contiguous float32 CPU ``(B,H,W)`` tensor without grad."""
    return maps.detach().to("cpu", torch.float32).contiguous()
