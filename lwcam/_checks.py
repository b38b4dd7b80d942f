"""Input checks shared by every module: images, targets and per-pixel maps.

One rule for each input, so that a batch accepted by a baseline is accepted by the games, the
black box and the layer-wise CAM, and every error names the argument:

* images: a 4-D floating-point tensor ``(B,C,H,W)``, at least one image, finite; any float dtype is
  accepted (and, by default, converted to float32); any other dtype raises ``TypeError``;
* targets: class indices, one per image (an int, a sequence, an array or a tensor of B ints; a
  0-d tensor or an int stands for every image); bools and floats raise ``TypeError``;
* maps: ``(B,H,W)`` (or ``(B,1,H,W)``) matching the images, finite.

Example:
    >>> check_targets(2, 3)
    tensor([2, 2, 2])
    >>> check_images(torch.zeros(1, 3, 2, 2, dtype=torch.float64)).dtype
    torch.float32
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["check_images", "check_targets", "check_classes", "check_map", "check_positive_int", "check_real"]


def check_images(images: Any, channels: int | None = None, *, name: str = "images",
                 dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Validate a batch ``(B,channels,H,W)`` of finite floating-point images; return it detached.

    Args:
        images: the batch.
        channels: the required channel count (``None``: any).
        name: the argument's name, for the error messages.
        dtype: convert to this dtype (default float32); ``None`` keeps the images' float dtype.

    Raises:
        TypeError: not a tensor, or not a floating-point dtype.
        ValueError: not 4-D, an empty batch, no pixels, the wrong channel count, NaN or Inf.
    """
    c = "C" if channels is None else str(channels)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B,{c},H,W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (any float dtype is converted to float32), "
                        f"got dtype {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions (a 4-D batch of shape (B,{c},H,W)), got {images.dim()} "
                         f"with shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (B=0); expected at least one image")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels, got shape {tuple(images.shape)}")
    if images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"{name} must have a positive height and width, got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contain NaN or Inf pixels")
    if dtype is not None and images.dtype != dtype:
        images = images.to(dtype)
        if not torch.isfinite(images).all():
            raise ValueError(f"{name} hold values too large for {dtype} (they become Inf)")
    return images.detach()


def _from_sequence(items: Sequence[Any], name: str) -> torch.Tensor:
    for t in items:
        if isinstance(t, bool | np.bool_) or not isinstance(t, numbers.Integral | torch.Tensor) or (
            isinstance(t, torch.Tensor) and (t.numel() != 1 or t.is_floating_point() or t.dtype == torch.bool)
        ):
            raise TypeError(f"{name} must be integer class indices, got {t!r}")
    return torch.tensor([int(t) for t in items], dtype=torch.long)


def check_targets(targets: Any, batch: int, num_classes: int | None = None, *, name: str = "targets"
                  ) -> torch.Tensor:
    """Turn ``targets`` (an int, a sequence, an array or a tensor of B ints) into a ``(B,)`` int64 CPU tensor.

    Negative classes always raise; with ``num_classes``, so do classes ``>= num_classes`` (see
    :func:`check_classes`). Without it, the caller checks the upper bound against the model's output.

    Raises:
        TypeError: a target that is not an integer (bools and floats included).
        ValueError: the wrong number or shape of targets, or a class out of range.
    """
    if isinstance(targets, bool | np.bool_):
        raise TypeError(f"{name} must be class indices (int, sequence or tensor), got a bool")
    if isinstance(targets, np.ndarray):
        targets = torch.from_numpy(targets)
    if isinstance(targets, numbers.Integral):
        out = torch.full((batch,), int(targets), dtype=torch.long)
    elif isinstance(targets, torch.Tensor):
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise TypeError(f"{name} must be integer class indices, got dtype {targets.dtype}")
        if targets.dim() > 1:
            raise ValueError(f"{name} must be one class index per image, shape (B,), got shape {tuple(targets.shape)}")
        out = targets.detach().to("cpu", torch.long).reshape(-1)
        if targets.dim() == 0:
            out = out.expand(batch).clone()
    elif isinstance(targets, Sequence) and not isinstance(targets, str | bytes):
        out = _from_sequence(list(targets), name)
    else:
        raise TypeError(f"{name} must be an int, a sequence of ints or a tensor, got {type(targets).__name__}")
    if out.numel() != batch:
        raise ValueError(f"got {out.numel()} {name} for a batch of {batch} images: shape ({out.numel()},), "
                         f"expected ({batch},)")
    check_classes(out, num_classes, name=name)
    return out


def check_classes(idx: torch.Tensor, num_classes: int | None, *, name: str = "targets") -> None:
    """Raise ``ValueError`` naming the first class index of ``idx`` outside ``[0, num_classes)``.

    With ``num_classes=None`` only negative indices raise.
    """
    bad = idx < 0 if num_classes is None else (idx < 0) | (idx >= num_classes)
    if bool(bad.any()):
        first = int(idx[bad][0])
        if num_classes is None:
            raise ValueError(f"{name}: target {first} is out of range (class indices are >= 0)")
        raise ValueError(f"{name}: target {first} is out of range for a model with num_classes={num_classes}, "
                         f"outside [0, {num_classes})")


def check_map(values: Any, b: int | None = None, h: int | None = None, w: int | None = None,
              name: str = "saliency") -> torch.Tensor:
    """Validate a (B,H,W) or (B,1,H,W) per-pixel map; return it as (B,H,W), detached.

    ``b``, ``h``, ``w`` are the expected sizes; with all three ``None`` any (B,H,W) shape is taken.
    The dtype is kept (a bool mask stays bool); floating maps must be finite.
    """
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B,H,W), got {type(values).__name__}")
    if values.dim() == 4 and values.shape[1] == 1:
        values = values[:, 0]
    if b is None and h is None and w is None:
        if values.dim() != 3:
            raise ValueError(f"{name} must have shape (B,H,W) or (B,1,H,W), got {tuple(values.shape)}")
    elif tuple(values.shape) != (b, h, w):
        raise ValueError(f"{name} must have shape (B,H,W)=({b},{h},{w}) or (B,1,H,W), got {tuple(values.shape)}")
    if values.is_floating_point() and not torch.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return values.detach()


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` when it is an int (not a bool) ``>= minimum``; ``ValueError`` naming ``name`` if not."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` when it is a bool; ``ValueError`` naming ``name`` if not (``1`` or ``"yes"`` are refused)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def check_real(value: Any, name: str, low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False) -> float:
    """``value`` as a float when it is a finite real number in the interval; ``ValueError`` naming ``name`` if not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    number = float(value)
    if number < low or (low_open and number == low) or number > high or (high_open and number == high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return number
