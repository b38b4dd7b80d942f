"""The default augmentation: a random horizontal flip and a translation with zero padding, per image.

It is label preserving, so a view reuses its original image's answer (no query) unless ``augment="query"``
sends every view to the black box. The parameters are drawn from the run's own generator, the same on every
rank, so each rank can augment its own share of a global batch.

Example:
    >>> import torch
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> apply_augment(x, torch.tensor([True]), torch.tensor([[0, 0]]), pad=1)[0, 0, 0].tolist()  # flipped
    [3.0, 2.0, 1.0, 0.0]
    >>> apply_augment(x, torch.tensor([False]), torch.tensor([[1, 0]]), pad=1)[0, 0, :, 0].tolist()  # one row up
    [4.0, 8.0, 12.0, 0.0]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["apply_augment", "augment_params"]


def augment_params(n: int, pad: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` flips (bool) and shifts (n,2) of at most ``pad`` pixels, drawn from ``gen``."""
    flips = torch.rand(n, generator=gen) < 0.5
    shifts = torch.randint(-pad, pad + 1, (n, 2), generator=gen)
    return flips, shifts


def apply_augment(x: torch.Tensor, flips: torch.Tensor, shifts: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-image horizontal flip and translation by ``shifts`` (dy, dx) with zero padding."""
    b, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    flips, shifts = flips.to(dev), shifts.to(dev)
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + pad + shifts[:, 1:2]
    rows = torch.arange(h, device=dev).expand(b, h) + pad + shifts[:, 0:1]
    bidx = torch.arange(b, device=dev)[:, None, None]
    out = padded[bidx, :, rows[:, :, None], cols[:, None, :]]  # (B,H,W,C)
    return out.permute(0, 3, 1, 2).contiguous()
