"""Occlusion (Zeiler & Fergus 2014) through captum's ``Occlusion``, scored by the black box."""

from __future__ import annotations

import math

import torch
from captum.attr import Occlusion

from .._checks import check_images, check_targets
from .._utils import progress_enabled
from ..blackbox import BlackBox, as_prob_fn
from ._base import Targets, finish, require_blackbox

__all__ = ["occlusion", "occlusion_queries"]


def _positions(size: int, window: int, stride: int) -> int:
    # captum: ceil((size - window) / stride) + 1 window positions per dimension
    return math.ceil((size - window) / stride) + 1


def occlusion_queries(height: int, width: int, window: int = 8, stride: int = 4) -> int:
    """Black-box queries :func:`occlusion` spends per image: one per window position, plus the unoccluded image.

    Example:
        >>> occlusion_queries(64, 64, window=8, stride=4)  # 15 x 15 windows + 1
        226
    """
    return _positions(height, window, stride) * _positions(width, window, stride) + 1


def occlusion(
    blackbox: BlackBox,
    images: torch.Tensor,
    targets: Targets,
    *,
    window: int = 8,
    stride: int = 4,
    batch_size: int = 256,
    progress: bool | None = None,
) -> torch.Tensor:
    """Occlusion sensitivity: how much the target probability drops when a square patch is zeroed.

    A ``window × window`` patch (all channels) slides with step ``stride``; at each position
    the patch is set to 0 (the dataset mean in the model's normalised space). A pixel's
    attribution is the mean over the windows covering it of
    ``P_c(x) − P_c(x with the window zeroed)``, with ``P_c`` the black box's probability of
    the target class (captum ``Occlusion`` with sliding window ``(3,w,w)``, strides ``(3,s,s)``
    and baseline 0); the three channels' equal attributions are summed.

    Cost: ``occlusion_queries(H, W, window, stride)`` black-box queries per image
    (``(ceil((H−w)/s)+1)·(ceil((W−w)/s)+1) + 1``; 226 at 64×64 with the defaults).

    Args:
        blackbox: the model, reachable only through a :class:`~lwcam.BlackBox`.
        images: ``(B,3,H,W)`` images in the model's normalised space.
        targets: the class to explain per image: an int, a sequence or a ``(B,)`` tensor.
        window: side of the occluding square in pixels.
        stride: step between window positions (at most ``window``).
        batch_size: about how many occluded images go to the black box per call
            (captum's ``perturbations_per_eval`` is ``max(1, batch_size // B)``).
        progress: show captum's progress bar (``None``: only on a TTY).

    Returns:
        ``(B,H,W)`` float32 attribution in probability units (positive: occluding hurts the class).

    Example:
        >>> from torch import nn
        >>> bb = BlackBox(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)), num_classes=10)
        >>> s = occlusion(bb, torch.rand(2, 3, 16, 16), 0, window=8, stride=4)
        >>> s.shape, bb.queries == 2 * occlusion_queries(16, 16, 8, 4)
        (torch.Size([2, 16, 16]), True)
    """
    bb = require_blackbox(blackbox, "occlusion")
    images = check_images(images, channels=bb.channels)
    b, c, h, w = images.shape
    targets = check_targets(targets, b, bb.num_classes)
    for name, v in (("window", window), ("stride", stride), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if window > min(h, w):
        raise ValueError(f"window={window} is larger than the image ({h}x{w})")
    if stride > window:
        raise ValueError(f"stride={stride} must not exceed window={window}")
    prob_fn = as_prob_fn(bb)
    attr = Occlusion(prob_fn).attribute(
        images.cpu().float(),
        sliding_window_shapes=(c, window, window),
        strides=(c, stride, stride),
        baselines=0.0,
        target=targets.tolist(),
        perturbations_per_eval=max(1, batch_size // b),
        show_progress=progress_enabled(progress),
    )
    return finish(attr.sum(dim=1))
