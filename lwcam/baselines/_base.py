"""What every baseline shares: access checks, seeding, devices, resizing and the return format.

Every baseline returns its saliency as a plain ``(B,H,W)`` float32 CPU tensor. Input checks live in
:mod:`lwcam._checks`, the blur and the min-max in :mod:`lwcam._ops`; what a call costs (seconds,
black-box queries) is measured by the method registry (:class:`lwcam.baselines.Method`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..blackbox import BlackBox

__all__ = [
    "Targets",
    "check_seed",
    "require_blackbox",
    "require_module",
    "generator",
    "module_device",
    "upsample",
    "finish",
]

Targets = int | Sequence[int] | torch.Tensor


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


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(B,h,w)`` maps to ``size`` (``align_corners=False``)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def finish(maps: torch.Tensor) -> torch.Tensor:
    """The common return format: a contiguous float32 CPU ``(B,H,W)`` tensor without grad."""
    return maps.detach().to("cpu", torch.float32).contiguous()
