"""Deep-to-shallow refinement of a class map by shallower layer maps: Poly-CAM and its mass-preserving variant.

The layer maps :math:`S_1, \\dots, S_L` (shallow to deep, each at its own resolution, clamped at
0 as Grad-CAM maps are) are combined from the deepest one down:

.. math::

    P_L = S_L, \\qquad P_l = f\\big(S_l, P_{l+1}\\big), \\quad l = L-1, \\dots, 1,

and the fusion returns :math:`P_1` at the output size, min-max normalised
(:func:`lwcam.cam.fusion.fuse`, modes ``"polycam"`` and ``"recursive"``).

``"polycam"`` (Poly-CAM, Englebert et al., ICPR 2022):

.. math::

    P_l = \\mathrm{ReLU}\\big(\\mathrm{LNorm}(S_l, h_{l+1} \\times w_{l+1}) \\odot
          \\mathrm{bilinear}(P_{l+1})\\big), \\qquad
    \\mathrm{LNorm}(S, hw) = \\frac{S}{\\max\\big(\\mathrm{bilinear}(\\mathrm{block\\,mean}_{hw}(S)),
          10^{-12}\\big)},

where the block mean averages ``S`` over the pixels of each cell of the coarser grid and the
bilinear upsamplings (``align_corners=False``) are the reference code's; :math:`P_1` is
upsampled to the output size bilinearly too. The reference downsamples ``S`` bilinearly, which at
the 2× steps between the stages of the networks it was written for *is* the 2×2 block mean; at
other ratios it samples only the pixels next to each cell's centre, where the block mean takes
all of them. The reference then scales by percentiles (0.1 and 99.9); the fusion min-max scales.
Bilinear upsampling of the running map lets a cell spill into its neighbours' border pixels.

``"recursive"`` (mass-preserving gated refinement) upsamples by nearest and divides by the
exact block mean:

.. math::

    N_l = \\frac{S_l}{\\mathrm{up}(\\mathrm{block\\,mean}(S_l))}\\ (N_l = 1 \\text{ on a block whose mean is 0}),
    \\qquad P_l = \\mathrm{up}(P_{l+1}) \\odot \\big(\\alpha + (1-\\alpha) N_l\\big),

with ``up`` and ``block mean`` the pair of :func:`lwcam._ops.area_resize` (nearest upsampling;
the mean over the pixels that nearest upsampling fills from a cell). Each block of :math:`N_l`
averages to 1, so the block mean of :math:`P_l` on the grid of :math:`P_{l+1}` *is*
:math:`P_{l+1}`: the shallow map moves mass only inside each deep cell, for any resolution
ratio (with ratios that divide evenly, the blocks are ``avg_pool2d``'s; otherwise an adaptive
average pool's bins can overlap by a pixel and the property holds for those only
approximately). ``α`` mixes in the deep map itself: ``α = 1`` is the deep map, nearest-upsampled.

Everything runs in float64 and the running map stays in the deep map's units; each shallower
map is first divided by a power of two near its peak (exact; the refinement is scale-free in
:math:`S_l`, and Poly-CAM's ``1e-12`` floor then applies relative to that peak). Each step
multiplies by at most a block's pixel count (``recursive``) or a few times that (``polycam``),
so maps up to ``±3.4e38`` give finite results.

Example:
    >>> import torch
    >>> deep = torch.tensor([[[4., 0.], [0., 2.]]], dtype=torch.float64)
    >>> shallow = torch.tensor([[[3., 1., 5., 5.], [0., 0., 5., 5.],
    ...                          [5., 5., 0., 0.], [5., 5., 0., 0.]]], dtype=torch.float64)
    >>> chain = refine([shallow, deep], "recursive", alpha=0.5)
    >>> chain[-1]   # the top-left cell's mass is moved after the shallow map; an empty block keeps it flat
    tensor([[[8., 4., 0., 0.],
             [2., 2., 0., 0.],
             [0., 0., 2., 2.],
             [0., 0., 2., 2.]]], dtype=torch.float64)
    >>> area_resize(chain[-1], (2, 2)) == deep   # each deep cell keeps its mass
    tensor([[[True, True],
             [True, True]]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._ops import area_resize, pow2_scale

__all__ = ["refine", "smooth_resize", "REFINEMENTS", "LNORM_FLOOR"]

REFINEMENTS = ("polycam", "recursive")

#: Poly-CAM's floor on the local normaliser (the reference code's ``1e-12``).
LNORM_FLOOR = 1e-12


def smooth_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (B,h,w) maps (``align_corners=False``; antialiased where a dimension shrinks).

    Example:
        >>> smooth_resize(torch.tensor([[[0., 4.]]]), (1, 4))
        tensor([[[0., 1., 3., 4.]]])
    """
    h, w = int(size[0]), int(size[1])
    shrink = h < x.shape[-2] or w < x.shape[-1]
    return F.interpolate(x[:, None], size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)[:, 0]


def _local_norm(s: Tensor, grid: tuple[int, int]) -> Tensor:
    """Poly-CAM's LNorm: ``s`` over its block mean on ``grid``, upsampled back bilinearly, floored at 1e-12."""
    back = smooth_resize(area_resize(s, grid), (s.shape[-2], s.shape[-1]))
    return s / back.clamp_min(LNORM_FLOOR)


def _block_ratio(s: Tensor, grid: tuple[int, int]) -> Tensor:
    """``N = s / up(block mean(s))`` on the blocks of ``grid``, 1 where a block's mean is 0."""
    mean = area_resize(area_resize(s, grid), (s.shape[-2], s.shape[-1]))
    full = mean > 0
    return torch.where(full, s / torch.where(full, mean, torch.ones_like(mean)), torch.ones_like(s))


def refine(levels: Sequence[Tensor], mode: str, alpha: float = 0.1) -> list[Tensor]:
    """The running maps ``[P_L, ..., P_1]`` (deep to shallow) at their own resolutions.

    Args:
        levels: (B,h_l,w_l) maps shallow to deep, resolutions not growing with depth; each is
            clamped at 0 (the shallower ones also divided by a power of two near their peak).
        mode: ``"polycam"`` or ``"recursive"`` (see the module's formulas).
        alpha: ``"recursive"`` only: the share of the deep map kept as it is, in [0, 1].

    Returns:
        The float64 maps ``P_L, ..., P_1``, unnormalised, in the units of the deepest map.
    """
    if mode not in REFINEMENTS:
        raise ValueError(f"unknown refinement {mode!r}; choose one of {REFINEMENTS}")
    scaled = []
    for s in levels:
        s = torch.relu(s.to(torch.float64))
        scaled.append(s / pow2_scale(s, dim=(-2, -1)))
    p = torch.relu(levels[-1].to(torch.float64))  # in the deep map's own units
    chain = [p]
    for s in reversed(scaled[:-1]):
        hw = (s.shape[-2], s.shape[-1])
        grid = (p.shape[-2], p.shape[-1])
        if mode == "polycam":
            p = torch.relu(_local_norm(s, grid) * smooth_resize(p, hw))
        else:
            p = area_resize(p, hw) * (alpha + (1.0 - alpha) * _block_ratio(s, grid))
        chain.append(p)
    return chain
