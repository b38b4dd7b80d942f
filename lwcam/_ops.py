"""Tensor operations shared by the games, the fusion and the baselines: Gaussian blur and min-max scaling.

Each exists once; callers pass their own documented settings:

* the insertion game's start image (:func:`lwcam.scoring.games.gaussian_blur`): kernel 11, σ 5, reflect
  border, kernel weights computed in float64;
* Meaningful Perturbation's blurred copy: kernel ``2·ceil(3σ)+1``, replicate border, weights in
  float32;
* the fusion's per-image min-max (a constant map gives zeros), Score-CAM's and LayerCAM's
  torchcam-style min-max with ``ε = 1e-8`` in the denominator;
* :func:`pow2_scale`, the power of two that sums, norms and ranges of extreme but finite values
  are divided by so that they cannot overflow;
* :func:`area_resize`, the class-preserving fusions' resize of a coarse map (nearest up, block
  mean down), which never spills a cell into its neighbours.

Example:
    >>> minmax_normalize(torch.tensor([[1., 3.], [2., 5.]]))
    tensor([[0.0000, 0.5000],
            [0.2500, 1.0000]])
    >>> gaussian_blur(torch.ones(1, 1, 4, 4), 3, 1.0, border="replicate").unique()
    tensor([1.])
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_kernel1d", "gaussian_blur", "minmax_normalize", "pow2_scale", "area_resize", "BORDERS"]

Border = Literal["reflect", "replicate"]
BORDERS = ("reflect", "replicate")


#: The widest blur accepted, in pixels: far past any image, and σ² stays finite in float64.
MAX_BLUR_SIGMA = 1e6


def gaussian_kernel1d(kernel_size: int, sigma: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """The normalised 1-D Gaussian ``g(x) = exp(−x² / (2σ²)) / Σ g`` on ``x = −r .. r``, ``r = (k−1)/2``.

    The weights are computed in ``dtype`` (float64 by default).

    Example:
        >>> gaussian_kernel1d(3, 1.0).sum().item()
        1.0
    """
    r = kernel_size // 2
    x = torch.arange(-r, r + 1, dtype=dtype)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(images: Tensor, kernel_size: int, sigma: float, *, border: Border = "reflect",
                  kernel_dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-channel Gaussian blur of ``(B,C,H,W)`` images, as two 1-D convolutions (along W, then H).

    The kernel is :func:`gaussian_kernel1d` (``kernel_size`` taps, computed in ``kernel_dtype``,
    then cast to the images' dtype). The border is padded by ``kernel_size // 2`` pixels:

    * ``"reflect"``: mirrored without repeating the edge (torchvision's ``gaussian_blur``); an image
      too small for that (``kernel_size // 2 >= min(H, W)``) is padded by replication instead;
    * ``"replicate"``: the edge pixel repeated.

    Args:
        images: (B, C, H, W) float tensor.
        kernel_size: odd positive int (1 returns a copy).
        sigma: positive finite standard deviation in pixels.
        border: ``"reflect"`` or ``"replicate"``.
        kernel_dtype: the dtype the weights are computed in.

    Returns:
        The blurred images, same shape and dtype.
    """
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral) or kernel_size < 1 \
            or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel_size must be an odd positive int, got {kernel_size!r}")
    if not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma <= 0 or sigma > MAX_BLUR_SIGMA:
        raise ValueError(f"blur sigma must be a number in (0, {MAX_BLUR_SIGMA:g}] pixels, got {sigma!r}")
    if border not in BORDERS:
        raise ValueError(f"blur border must be one of {BORDERS}, got {border!r}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a (B,C,H,W) float tensor, got shape {tuple(images.shape)}")
    kernel_size = int(kernel_size)
    if kernel_size == 1:
        return images.clone()
    c, h, w = images.shape[1:]
    pad = kernel_size // 2
    mode = "reflect" if border == "reflect" and pad < min(h, w) else "replicate"
    k = gaussian_kernel1d(kernel_size, float(sigma), kernel_dtype).to(device=images.device, dtype=images.dtype)
    x = F.pad(images, (pad, pad, pad, pad), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)  # along W
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)  # along H


def pow2_scale(x: Tensor, dim: int | tuple[int, ...] = -1) -> Tensor:
    """Powers of two near the largest magnitude of ``x`` over ``dim`` (kept as size-1 dims; 1 where all zero).

    Dividing by a power of two is exact in floating point, so it guards sums, norms and ranges of
    extreme but finite values against overflow without changing any ratio's rounding. The power is
    ``2^e`` with ``max|x| < 2^e``, capped at the dtype's largest finite power of two.

    Example:
        >>> pow2_scale(torch.tensor([[3.0, -5.0], [0.0, 0.0]], dtype=torch.float64)).tolist()
        [[8.0], [1.0]]
        >>> bool(torch.isfinite(pow2_scale(torch.tensor([1e308], dtype=torch.float64))).all())
        True
    """
    top = x.abs().amax(dim=dim, keepdim=True)
    _, exponent = torch.frexp(top)
    exponent = exponent.clamp(max=math.frexp(torch.finfo(top.dtype).max)[1] - 1)
    return torch.where(top > 0, torch.ldexp(torch.ones_like(top), exponent), torch.ones_like(top))


def minmax_normalize(x: Tensor, eps: float = 0.0) -> Tensor:
    """Min-max normalise each map to [0, 1] over its last two dimensions (H, W).

    With ``eps = 0`` (default): :math:`N(X) = (X - \\min X) / (\\max X - \\min X)`, and a constant
    map becomes all zeros (never NaN). With ``eps > 0`` (torchcam's convention):
    :math:`N(X) = (X - \\min X) / (\\max X - \\min X + ε)`. Works for (H,W), (B,H,W), (B,L,H,W), ...
    A map whose range overflows its dtype (``−3e38 .. 3e38`` in float32) is divided by
    :func:`pow2_scale` first, so extreme but finite maps normalise too; other maps are untouched.

    Args:
        x: a real tensor with at least 2 dimensions, all values finite (an integer tensor becomes float32).
        eps: added to the denominator, ≥ 0.

    Returns:
        A float tensor of the same shape with values in [0, 1].

    Example:
        >>> minmax_normalize(torch.full((2, 2), 7.0))
        tensor([[0., 0.],
                [0., 0.]])
        >>> minmax_normalize(torch.tensor([[0., 1.]]), eps=1.0)
        tensor([[0.0000, 0.5000]])
        >>> minmax_normalize(torch.tensor([[-3e38, 0., 3e38]]))
        tensor([[0.0000, 0.5000, 1.0000]])
    """
    x = torch.as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"minmax_normalize needs at least 2 dimensions (..., H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("minmax_normalize got NaN or infinite values")
    if x.numel() == 0:
        return x.clone()
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    rng = hi - lo
    if not bool(torch.isfinite(rng).all()):  # a range past the dtype's (e.g. −3e38 .. 3e38 in float32)
        scale = torch.where(torch.isfinite(rng), torch.ones_like(rng), pow2_scale(x, dim=(-2, -1)))
        x, lo, hi = x / scale, lo / scale, hi / scale
        rng = hi - lo
        if eps > 0:
            return ((x - lo) / (rng + eps / scale)).clamp_(0.0, 1.0)
    if eps > 0:
        return ((x - lo) / (rng + eps)).clamp_(0.0, 1.0)
    safe = torch.where(rng > 0, rng, torch.ones_like(rng))
    out = torch.where(rng > 0, (x - lo) / safe, torch.zeros_like(x))
    return out.clamp_(0.0, 1.0)


def _resize_dim(x: Tensor, n_out: int, dim: int) -> Tensor:
    """:func:`area_resize` along one dimension (``-2`` or ``-1``)."""
    n_in = x.shape[dim]
    if n_out >= n_in:  # nearest: output pixel j copies input cell ⌊j·n_in/n_out⌋ (integer arithmetic)
        return x.index_select(dim, torch.arange(n_out, device=x.device) * n_in // n_out)
    cell = torch.arange(n_in, device=x.device) * n_out // n_in  # the output cell of each input pixel
    m = torch.zeros(n_out, n_in, dtype=x.dtype, device=x.device)
    m[cell, torch.arange(n_in, device=x.device)] = 1.0
    m = m / m.sum(dim=1, keepdim=True)
    return m @ x if dim == -2 else x @ m.T


def area_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize ``(..., h, w)`` maps to ``size = (H, W)`` without spilling a cell into its neighbours.

    Each dimension on its own: growing, output pixel ``j`` copies input cell ``⌊j·n_in/n_out⌋``
    (nearest, in integer arithmetic, so a pixel never mixes two cells); shrinking, output cell
    ``c`` is the mean of the input pixels ``i`` with ``⌊i·n_out/n_in⌋ = c``, the block that
    growing back would fill from ``c``. Hence ``area_resize(area_resize(x, (H, W)), (h, w)) == x``
    for ``H ≥ h, W ≥ w``: a block mean of the nearest-upsampled map is the map itself, for any
    ratio (an even ratio gives ``avg_pool2d``'s blocks). Works for any floating dtype; the
    fusion calls it in float64.

    Example:
        >>> area_resize(torch.tensor([[1., 2.], [3., 4.]]), (4, 4))[0]
        tensor([1., 1., 2., 2.])
        >>> area_resize(torch.arange(16.).reshape(4, 4), (2, 2))
        tensor([[ 2.5000,  4.5000],
                [10.5000, 12.5000]])
    """
    if x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"area_resize needs a floating tensor (..., h, w), got shape {tuple(x.shape)}")
    return _resize_dim(_resize_dim(x, int(size[0]), -2), int(size[1]), -1)
