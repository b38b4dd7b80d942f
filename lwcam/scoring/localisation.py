"""Localisation: does a map point at the object (ground-truth masks)?

* One object per image: :func:`pointing_game` (Zhang et al., 2018) and :func:`relevance_mass`
  (Arras et al., 2022).
* Class-conflict scenes (two objects of different classes, one map per asked class):
  :func:`targeted_pointing`, :func:`targeted_mass` and :func:`class_sensitivity`.

:func:`targeted_mass` with no positive saliency on either object scores the asked object's share of the
two objects' area, the score of a uniform map.
"""

from __future__ import annotations

import torch

from .._checks import check_map
from .._ops import pow2_scale
from ._inputs import _mask, _saliency
from ._meta import score
from .correlation import map_rank_correlation

__all__ = ["pointing_game", "relevance_mass", "targeted_pointing", "targeted_mass", "class_sensitivity"]


# --------------------------------------------------------------------------- ground truth
def _check_pair(saliency: object, masks: object) -> tuple[torch.Tensor, torch.Tensor]:
    sal = check_map(saliency)
    b, h, w = sal.shape
    m = check_map(masks, b, h, w, name="masks")
    if m.dtype != torch.bool:
        if not ((m == 0) | (m == 1)).all():
            raise ValueError("masks must be boolean or contain only 0 and 1")
        m = m != 0
    return sal, m.to(sal.device)


@score("localisation", "higher", needs=("mask",))
def pointing_game(saliency: torch.Tensor, masks: torch.Tensor, *, return_valid: bool = False
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pointing game: does the saliency maximum fall inside the object mask?

    ``hit_i = masks_i[argmax(saliency_i)]``, where ties go to the lowest flat (row-major) index.

    An image whose mask is empty has no object to point at: its ``hit`` is ``False`` and its
    ``valid`` flag is ``False``. Average ``hit[valid]`` to score a method; pass
    ``return_valid=True`` to get the flag.

    Args:
        saliency: (B, H, W) or (B, 1, H, W) real-valued maps (no NaN/Inf).
        masks: (B, H, W) or (B, 1, H, W) bool (or 0/1) object masks.
        return_valid: also return ``valid = masks.any()`` per image.

    Returns:
        ``hit`` (B,) bool, or ``(hit, valid)`` when ``return_valid``.

    Example:
        >>> s = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
        >>> pointing_game(s, torch.tensor([[[False, True], [False, False]]])).tolist()
        [True]
    """
    sal, m = _check_pair(saliency, masks)
    idx = sal.flatten(1).argmax(dim=1)  # first maximal index
    valid = m.flatten(1).any(dim=1)
    hit = m.flatten(1).gather(1, idx.unsqueeze(1)).squeeze(1) & valid
    return (hit, valid) if return_valid else hit


@score("localisation", "higher", needs=("mask",))
def relevance_mass(saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Relevance mass accuracy (Arras et al., CLEVR-XAI): the share of positive saliency inside the mask.

    ``mass_i = sum(relu(s_i) * mask_i) / sum(relu(s_i))``, in ``[0, 1]``. A map with no positive
    value (all zeros or negative) has no mass to place and scores ``0.0`` (never NaN).

    Args:
        saliency: (B, H, W) or (B, 1, H, W) real-valued maps (no NaN/Inf).
        masks: (B, H, W) or (B, 1, H, W) bool (or 0/1) object masks.

    Returns:
        (B,) float64.

    Example:
        >>> s = torch.tensor([[[3.0, 1.0], [-2.0, 0.0]]])
        >>> relevance_mass(s, torch.tensor([[[True, False], [True, False]]])).tolist()
        [0.75]
    """
    sal, m = _check_pair(saliency, masks)
    pos = sal.to(torch.float64).clamp_min(0).flatten(1)
    total = pos.sum(dim=1)
    if not bool(torch.isfinite(total).all()):  # float64 maps near 1e308: their sum overflows, a share does not
        pos = pos / pow2_scale(pos)
        total = pos.sum(dim=1)
    inside = (pos * m.flatten(1)).sum(dim=1)
    return torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(total))


def _conflict_inputs(saliency: object, mask_asked: object, mask_other: object
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sal = _saliency(saliency, "saliency").cpu()
    shape = (sal.shape[0], sal.shape[1], sal.shape[2])
    return sal, _mask(mask_asked, "mask_asked", shape), _mask(mask_other, "mask_other", shape)


# --------------------------------------------------------------------------- class-conflict scenes
@score("localisation", "higher", needs=("mask",))
def targeted_pointing(saliency: torch.Tensor, mask_asked: torch.Tensor, mask_other: torch.Tensor) -> torch.Tensor:
    """Targeted pointing game: the map's maximum lies in the asked object and not in the other one.

    ``hit_i = A_i[j*] ∧ ¬O_i[j*]`` with ``j* = argmax saliency_i``; ties go to the lowest flat
    (row-major) index, as in :func:`lwcam.scoring.localisation.pointing_game`. A constant map therefore points at
    pixel (0, 0). A pixel in both masks counts as not targeted.

    Args:
        saliency: (B,H,W) or (B,1,H,W) real maps for the asked class.
        mask_asked: (B,H,W) bool mask of the asked object (non-empty on every image).
        mask_other: (B,H,W) bool mask of the other object (non-empty on every image).

    Returns:
        (B,) float64 of 1.0 (hit) and 0.0.

    Example:
        >>> s = torch.tensor([[[0.0, 2.0], [1.0, 0.0]]])
        >>> asked = torch.tensor([[[False, True], [False, False]]])
        >>> other = torch.tensor([[[False, False], [True, False]]])
        >>> targeted_pointing(s, asked, other).tolist(), targeted_pointing(s, other, asked).tolist()
        ([1.0], [0.0])
    """
    sal, asked, other = _conflict_inputs(saliency, mask_asked, mask_other)
    idx = sal.flatten(1).argmax(dim=1, keepdim=True)  # first maximal index
    hit = asked.flatten(1).gather(1, idx) & ~other.flatten(1).gather(1, idx)
    return hit.squeeze(1).to(torch.float64)


@score("localisation", "higher", needs=("mask",))
def targeted_mass(saliency: torch.Tensor, mask_asked: torch.Tensor, mask_other: torch.Tensor) -> torch.Tensor:
    """Targeted relevance mass: positive saliency in the asked object over that in both objects.

    ``mass_i = Σ_{A_i} s⁺ / Σ_{A_i ∪ O_i} s⁺`` with ``s⁺ = max(s, 0)``. A class-blind uniform map
    scores the asked object's area share ``|A_i| / |A_i ∪ O_i|``; so does a map with no positive
    saliency on either object (all zeros, say): it prefers neither object, and the value is the limit
    of adding a small constant to it. Pixels in both masks count for the asked object. The map is
    divided by a power of two near its largest magnitude first, so extreme finite values cannot overflow.

    Args:
        saliency: (B,H,W) or (B,1,H,W) real maps for the asked class.
        mask_asked: (B,H,W) bool mask of the asked object (non-empty on every image).
        mask_other: (B,H,W) bool mask of the other object (non-empty on every image).

    Returns:
        (B,) float64 in [0, 1].

    Example:
        >>> s = torch.tensor([[[3.0, 1.0], [-2.0, 5.0]]])
        >>> asked = torch.tensor([[[True, False], [False, False]]])
        >>> other = torch.tensor([[[False, True], [True, False]]])
        >>> targeted_mass(s, asked, other).tolist(), targeted_mass(torch.zeros(1, 2, 2), asked, other).tolist()
        ([0.75], [0.3333333333333333])
    """
    sal, asked, other = _conflict_inputs(saliency, mask_asked, mask_other)
    flat = sal.flatten(1)
    pos = (flat / pow2_scale(flat)).clamp_min(0)
    a, both = asked.flatten(1), (asked | other).flatten(1)
    inside, total = (pos * a).sum(dim=1), (pos * both).sum(dim=1)
    share = a.sum(dim=1).double() / both.sum(dim=1).double()
    return torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)), share)


@score("localisation", "lower", needs=("mask",))
def class_sensitivity(saliency_a: torch.Tensor, saliency_b: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor
                      ) -> torch.Tensor:
    """Class sensitivity: Spearman correlation of an image's two maps (one per class) over the two objects' pixels.

    ``ρ_i = spearman(a_i[M_i], b_i[M_i])`` with ``M_i = A_i ∪ B_i``, computed by
    :func:`map_rank_correlation`. Lower is better: the mask oracle (``a = A``, ``b = B``, disjoint
    objects) scores ``-1``, a class-blind method (the same map for both classes) ``1``. Two maps
    that are constant on the objects rank nothing and score ``1.0`` (class-blind); one constant and
    one not score ``0.0``.

    Args:
        saliency_a: (B,H,W) maps explaining class A.
        saliency_b: (B,H,W) maps explaining class B, same images.
        mask_a: (B,H,W) bool mask of A's object (non-empty on every image).
        mask_b: (B,H,W) bool mask of B's object (non-empty on every image).

    Returns:
        (B,) float64 in [-1, 1].

    Example:
        >>> ma = torch.tensor([[[True, True, False, False]]])
        >>> mb = torch.tensor([[[False, False, True, False]]])
        >>> class_sensitivity(ma.float(), mb.float(), ma, mb).tolist()
        [-1.0]
    """
    a = _saliency(saliency_a, "saliency_a")
    shape = (a.shape[0], a.shape[1], a.shape[2])
    union = _mask(mask_a, "mask_a", shape) | _mask(mask_b, "mask_b", shape)
    return map_rank_correlation(a, saliency_b, mask=union)
