"""Reference maps that look at no model: random noise, a centre bias, and the ground-truth mask.

They bound the benchmark from both sides: a method should beat :func:`random_saliency`
and :func:`center_saliency`, and :func:`mask_saliency` (the oracle) shows what a map that
points exactly at the object reaches.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._checks import check_images
from ._base import finish, generator

__all__ = ["random_saliency", "center_saliency", "mask_saliency"]


def random_saliency(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Uniform noise in [0,1), one independent map per image.

    Deterministic: the same ``seed`` and batch shape give identical maps, and the global
    random state is left alone.

    Args:
        images: ``(B,3,H,W)`` images; only their shape is used.
        seed: seed of the noise.

    Returns:
        ``(B,H,W)`` float32 maps.

    Example:
        >>> m = random_saliency(torch.zeros(2, 3, 8, 8), seed=1)
        >>> m.shape, torch.equal(m, random_saliency(torch.zeros(2, 3, 8, 8), seed=1))
        (torch.Size([2, 8, 8]), True)
    """
    images = check_images(images, channels=3)
    b, _, h, w = images.shape
    out = torch.rand(b, h, w, generator=generator(seed))
    return finish(out)


def center_saliency(images: torch.Tensor, sigma: float = 0.25) -> torch.Tensor:
    """Centre bias: an isotropic Gaussian bump at the image centre, the same for every image.

    ``map(y, x) = exp(-((y - cy)² + (x - cx)²) / (2 (σ · min(H, W))²))`` with pixel centres
    ``y + 0.5``, ``x + 0.5`` and ``(cy, cx) = (H/2, W/2)``.

    Args:
        images: ``(B,3,H,W)`` images; only their shape is used.
        sigma: the standard deviation as a fraction of the shorter side.

    Returns:
        ``(B,H,W)`` float32 maps in (0,1].

    Example:
        >>> m = center_saliency(torch.zeros(1, 3, 9, 9))
        >>> divmod(int(m[0].argmax()), 9)
        (4, 4)
    """
    images = check_images(images, channels=3)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    b, _, h, w = images.shape
    ys = torch.arange(h, dtype=torch.float32) + 0.5 - h / 2
    xs = torch.arange(w, dtype=torch.float32) + 0.5 - w / 2
    s = sigma * min(h, w)
    if not 0 < float(torch.tensor(2 * s * s, dtype=torch.float32)) < math.inf:  # 0 would give 0/0 at the centre
        raise ValueError(f"sigma={sigma!r} is too small or too large: 2(σ·min(H, W))² must be a positive finite "
                         f"float32")
    bump = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * s**2))
    out = bump.expand(b, h, w)
    return finish(out)


def mask_saliency(masks: Any) -> torch.Tensor:
    """The oracle: the ground-truth object mask itself as a float map (1 inside, 0 outside).

    Args:
        masks: ``(B,H,W)`` or ``(H,W)`` bool / 0-1 masks (tensor or NumPy array).

    Returns:
        ``(B,H,W)`` float32 maps.

    Example:
        >>> mask_saliency(torch.tensor([[True, False]])).tolist()
        [[[1.0, 0.0]]]
    """
    if isinstance(masks, np.ndarray):
        masks = torch.from_numpy(masks)
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a tensor or array of shape (B,H,W), got {type(masks).__name__}")
    if masks.dim() == 2:
        masks = masks.unsqueeze(0)
    if masks.dim() != 3 or masks.shape[0] == 0:
        raise ValueError(f"masks must have shape (B,H,W) or (H,W), got {tuple(masks.shape)}")
    out = masks.detach().float()
    if not torch.isfinite(out).all():
        raise ValueError("masks contain NaN or Inf values")
    out = out.clone()
    return finish(out)
