"""The scorecard's measures beyond the deletion game: class conflict, ROAD, randomisation, robustness, complexity.

Every measure returns one value per image, a 1-D tensor ``(B,)`` (ROAD: ``(B, P)``, one column per
percentage), so that :func:`lwcam.metrics.bootstrap_ci` and :func:`lwcam.metrics.paired_test`
apply. Maps are ``(B,H,W)`` (or ``(B,1,H,W)``) real tensors, masks ``(B,H,W)`` bool (or 0/1) tensors,
images ``(B,3,H,W)`` in the model's normalised input space. Probabilities come from the model being
explained through :func:`lwcam.blackbox.as_prob_fn` (a BlackBox, an ``nn.Module`` or a callable).

* Localisation on class-conflict scenes (two objects of different classes, one map per asked class):
  :func:`targeted_pointing`, :func:`targeted_mass`, :func:`class_sensitivity`, :func:`targeted_deletion`.
* Faithfulness beyond the zero substrate: :func:`road` (Rong et al., ICML 2022) and :func:`road_score`.
* Randomisation: :func:`model_randomisation` (cascading, top layer first; Adebayo et al., NeurIPS 2018).
* Robustness: :func:`max_sensitivity` (Yeh et al., NeurIPS 2019); :func:`map_rank_correlation` between
  two students' maps.
* Complexity: :func:`sparseness` (Gini index; Chalasani et al., ICML 2020).

Conventions for maps that rank nothing (so no measure returns NaN):

* Spearman correlation (:func:`map_rank_correlation`, :func:`class_sensitivity`, randomisation): two
  constant maps score ``1.0`` (neither ranks the pixels, so they agree); one constant map against a
  non-constant one scores ``0.0`` (no association).
* :func:`targeted_mass` with no positive saliency on either object scores the asked object's share
  of the two objects' area, the score of a uniform map.
* :func:`sparseness` of an all-zero map is ``0.0``, the Gini index of a uniform map.

Example:
    >>> a = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    >>> map_rank_correlation(a, -a).tolist(), sparseness(torch.ones(1, 2, 2)).tolist()
    ([-1.0], [0.0])
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import splu
from torch import nn

from ._checks import check_images, check_map, check_positive_int, check_real, check_targets
from ._ops import pow2_scale
from ._utils import track
from .blackbox import BlackBox
from .metrics import (
    Canvas,
    Model,
    Targets,
    _checked_probs,
    _evaluation_prob_fn,
    _pixel_ranks,
    _play_targets,
)

__all__ = [
    "targeted_pointing",
    "targeted_mass",
    "class_sensitivity",
    "targeted_deletion",
    "road",
    "road_score",
    "ROAD_PERCENTAGES",
    "model_randomisation",
    "max_sensitivity",
    "map_rank_correlation",
    "sparseness",
]

#: ROAD's default removal percentages, as in Rong et al. and pytorch-grad-cam.
ROAD_PERCENTAGES: tuple[float, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)

#: The noisy linear imputation's neighbour weights (Rong et al.): 1/6 for the four edge
#: neighbours, 1/12 for the four diagonal ones, as (row offset, column offset, weight).
_NEIGHBOURS: tuple[tuple[int, int, float], ...] = (
    (1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12),
    (0, -1, 1 / 6), (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6),
)

ExplainFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModelExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- input checks
def _saliency(values: object, name: str, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """A finite (B,H,W) map with at least one image and one pixel, as float64."""
    m = check_map(values, name=name) if shape is None else check_map(values, *shape, name=name)
    if m.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(m.shape)}); expected at least one image of at least one pixel")
    if m.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {m.dtype}")
    return m.to(torch.float64)


def _mask(values: object, name: str, shape: tuple[int, int, int], *, nonempty: bool = True) -> torch.Tensor:
    """A (B,H,W) bool mask of the given shape (0/1 values accepted); with ``nonempty``, one pixel per image at least."""
    m = check_map(values, *shape, name=name)
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"{name} must be boolean or contain only 0 and 1")
        m = m != 0
    if nonempty:
        empty = ~m.flatten(1).any(dim=1)
        if bool(empty.any()):
            raise ValueError(f"{name} is empty on image {int(torch.nonzero(empty)[0])}: every image needs the object's "
                             f"pixels")
    return m.cpu()


def _conflict_inputs(saliency: object, mask_asked: object, mask_other: object
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sal = _saliency(saliency, "saliency").cpu()
    shape = (sal.shape[0], sal.shape[1], sal.shape[2])
    return sal, _mask(mask_asked, "mask_asked", shape), _mask(mask_other, "mask_other", shape)


# --------------------------------------------------------------------------- rank correlation
def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """(B, N) float64 average ranks (1-based) of each row; ties share the mean of their ranks (scipy's ``rankdata``).

    Example:
        >>> _average_ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0]])).tolist()
        [[3.5, 1.0, 3.5, 2.0]]
    """
    b, n = x.shape
    vals, order = torch.sort(x, dim=1, stable=True)
    new = torch.ones(b, n, dtype=torch.long)
    new[:, 1:] = (vals[:, 1:] != vals[:, :-1]).long()
    group = new.cumsum(dim=1) - 1  # (B, N) group index of each sorted position
    pos = torch.arange(n, dtype=torch.float64).expand(b, n)
    first = torch.full((b, n), float(n), dtype=torch.float64).scatter_reduce(1, group, pos, "amin")
    last = torch.full((b, n), -1.0, dtype=torch.float64).scatter_reduce(1, group, pos, "amax")
    ranks_sorted = (first.gather(1, group) + last.gather(1, group)) / 2 + 1
    return torch.empty_like(ranks_sorted).scatter_(1, order, ranks_sorted)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) Pearson correlation of paired rows; both rows constant → 1.0, exactly one constant → 0.0.

    Example:
        >>> _pearson_rows(torch.tensor([[1.0, 2.0], [1.0, 1.0], [1.0, 1.0]]),
        ...               torch.tensor([[2.0, 1.0], [5.0, 5.0], [1.0, 2.0]])).tolist()
        [-1.0, 1.0, 0.0]
    """
    da = a - a.mean(dim=1, keepdim=True)
    db = b - b.mean(dim=1, keepdim=True)
    va, vb = (da * da).sum(dim=1), (db * db).sum(dim=1)
    both = (va > 0) & (vb > 0)
    denom = torch.where(both, (va * vb).sqrt(), torch.ones_like(va))
    r = torch.where(both, (da * db).sum(dim=1) / denom, torch.zeros_like(va))
    r = torch.where((va == 0) & (vb == 0), torch.ones_like(r), r)
    return r.clamp(-1.0, 1.0)


def map_rank_correlation(saliency_a: torch.Tensor, saliency_b: torch.Tensor, *, mask: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """Per-image Spearman rank correlation of two maps, over all pixels or over ``mask``'s pixels.

    ``ρ_i = corr(rank(a_i[M_i]), rank(b_i[M_i]))``: the Pearson correlation of average ranks (ties
    share the mean of their ranks), which is ``scipy.stats.spearmanr``. Two constant maps (on the
    pixels compared) score ``1.0`` and one constant map against a non-constant one ``0.0``, where
    scipy returns NaN. Ranks ignore the values' scale, so any finite map works.

    Args:
        saliency_a: (B,H,W) or (B,1,H,W) real maps.
        saliency_b: maps of the same shape.
        mask: optional (B,H,W) bool (or 0/1) pixels to compare, at least one per image.

    Returns:
        (B,) float64 in [-1, 1].

    Example:
        >>> a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
        >>> map_rank_correlation(a, a ** 3).tolist(), map_rank_correlation(a, torch.zeros(1, 2, 2)).tolist()
        ([1.0], [0.0])
    """
    a = _saliency(saliency_a, "saliency_a").cpu()
    shape = (a.shape[0], a.shape[1], a.shape[2])
    b = _saliency(saliency_b, "saliency_b", shape).cpu()
    if mask is None:
        return _pearson_rows(_average_ranks(a.flatten(1)), _average_ranks(b.flatten(1)))
    m = _mask(mask, "mask", shape)
    out = torch.empty(shape[0], dtype=torch.float64)
    for i in range(shape[0]):
        pa, pb = a[i][m[i]].unsqueeze(0), b[i][m[i]].unsqueeze(0)
        out[i] = _pearson_rows(_average_ranks(pa), _average_ranks(pb))[0]
    return out


# --------------------------------------------------------------------------- class-conflict scenes
def targeted_pointing(saliency: torch.Tensor, mask_asked: torch.Tensor, mask_other: torch.Tensor) -> torch.Tensor:
    """Targeted pointing game: the map's maximum lies in the asked object and not in the other one.

    ``hit_i = A_i[j*] ∧ ¬O_i[j*]`` with ``j* = argmax saliency_i``; ties go to the lowest flat
    (row-major) index, as in :func:`lwcam.metrics.pointing_game`. A constant map therefore points at
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


def targeted_deletion(model: Model, images: torch.Tensor, saliency: torch.Tensor, asked: Targets, other: Targets, *,
                      step: int | None = None, substrate: Canvas = "zeros", blur_kernel: int = 11,
                      blur_sigma: float = 5.0, batch_size: int = 256, progress: bool | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Targeted deletion: one deletion game by the map for the asked class, scored for both classes.

    The step images are those of :func:`lwcam.metrics.deletion_game` (same ranking, step and
    substrate), each sent to the model once; ``auc_asked`` is the AUC of ``p(asked | x_t)`` (equal to
    ``deletion_game(...).auc``, lower is better) and ``auc_other`` that of ``p(other | x_t)`` under the
    same deletion (higher is better: deleting A's evidence should spare B). The gap
    ``auc_other - auc_asked`` sums both up.

    Args:
        model: the model being explained (BlackBox, ``nn.Module`` returning logits, or a callable
            returning probabilities).
        images: (B,C,H,W) images in the model's input space.
        saliency: (B,H,W) maps explaining the asked classes.
        asked: the asked class of each image (an int or B ints).
        other: the other object's class of each image; must differ from ``asked`` on every image.
        step, substrate, blur_kernel, blur_sigma, batch_size, progress: as in :func:`lwcam.metrics.deletion_game`.

    Returns:
        ``(auc_asked, auc_other)``, two (B,) float32 tensors in [0, 1].

    Example:
        >>> probs = lambda x: torch.stack([x[:, 0, 0, 0], 1 - x[:, 0, 0, 0]], 1)  # class 0 lives in pixel (0, 0)
        >>> s = torch.tensor([[[1.0, 0.0]]])
        >>> auc_a, auc_o = targeted_deletion(probs, torch.ones(1, 3, 1, 2), s, 0, 1, step=1)
        >>> auc_a.tolist(), auc_o.tolist()
        ([0.25], [0.75])
    """
    n = int(images.shape[0]) if isinstance(images, torch.Tensor) and images.dim() == 4 else 0
    if n:
        t_a, t_o = check_targets(asked, n, name="asked"), check_targets(other, n, name="other")
        same = t_a == t_o
        if bool(same.any()):
            raise ValueError(f"asked and other name the same class ({int(t_a[same][0])}) on image "
                             f"{int(torch.nonzero(same)[0])}; a class-conflict scene has two different classes")
    res_a, res_o = _play_targets("deletion", model, images, saliency, [asked, other], step=step, canvas=substrate,
                                 blur_kernel=blur_kernel, blur_sigma=blur_sigma, batch_size=batch_size,
                                 progress=progress, names=["asked", "other"])
    return res_a.auc, res_o.auc


# --------------------------------------------------------------------------- ROAD
def _imputation_system(removed: np.ndarray) -> tuple[coo_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """The linear system of the noisy linear imputation for one (H, W) bool mask of removed pixels.

    Returns ``(A, rows, cols, weights)``: ``A`` (n×n, n removed pixels) holds ``-Σ w`` over each removed
    pixel's in-image neighbours on the diagonal and ``w`` for each removed neighbour; ``(rows, cols,
    weights)`` list each (removed pixel, kept neighbour, weight) whose value moves to the right-hand side.
    """
    h, w = removed.shape
    flat = removed.reshape(-1)
    idx = np.flatnonzero(flat)
    var = np.full(h * w, -1, dtype=np.int64)
    var[idx] = np.arange(idx.size)
    r0, c0 = idx // w, idx % w
    diag = np.zeros(idx.size)
    a_rows, a_cols, a_vals, b_rows, b_cols, b_vals = [], [], [], [], [], []
    for dr, dc, wt in _NEIGHBOURS:
        r, c = r0 + dr, c0 + dc
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        diag[inside] += wt
        src, nb = np.flatnonzero(inside), (r * w + c)[inside]
        unknown = flat[nb]
        a_rows.append(src[unknown])
        a_cols.append(var[nb[unknown]])
        a_vals.append(np.full(int(unknown.sum()), wt))
        b_rows.append(src[~unknown])
        b_cols.append(nb[~unknown])
        b_vals.append(np.full(int((~unknown).sum()), wt))
    ar = np.concatenate([*a_rows, np.arange(idx.size)])
    ac = np.concatenate([*a_cols, np.arange(idx.size)])
    av = np.concatenate([*a_vals, -diag])
    system = coo_matrix((av, (ar, ac)), shape=(idx.size, idx.size))
    return system, np.concatenate(b_rows), np.concatenate(b_cols), np.concatenate(b_vals)


def _impute(image: torch.Tensor, removed: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Noisy linear imputation of one (C,H,W) image: each removed pixel becomes the weighted mean of its
    in-image neighbours (solved jointly, a sparse linear system per channel), plus ``noise · N(0, 1)``."""
    c, h, w = image.shape
    rm = removed.numpy()
    n = int(rm.sum())
    if n == 0:
        return image.clone()
    system, rows, cols, wts = _imputation_system(rm)
    flat = image.detach().cpu().reshape(c, h * w).numpy().astype(np.float64)
    rhs = np.zeros((n, c))
    np.subtract.at(rhs, rows, wts[:, None] * flat[:, cols].T)
    # -system is symmetric and diagonally dominant: no pivoting, a symmetric fill-reducing ordering
    # (1.7x faster than spsolve's defaults at 64x64; equal to 1e-10).
    lu = splu(system.tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    sol = lu.solve(rhs).reshape(n, c)
    filled = torch.tensor(sol, dtype=image.dtype).t()
    if noise > 0:
        filled = filled + noise * torch.randn(filled.shape, generator=generator, dtype=image.dtype)
        if not bool(torch.isfinite(filled).all()):
            raise ValueError(f"noise={noise:g} makes imputed pixels overflow {image.dtype}; use a smaller noise")
    out = image.detach().cpu().reshape(c, h * w).clone()
    out[:, torch.from_numpy(np.flatnonzero(rm.reshape(-1)))] = filled
    return out.reshape(c, h, w).to(image.device)


def _check_percentages(percentages: Sequence[float] | np.ndarray) -> list[float]:
    if isinstance(percentages, np.ndarray | torch.Tensor):
        percentages = percentages.tolist()
    if isinstance(percentages, str | bytes) or not isinstance(percentages, Sequence) or len(percentages) == 0:
        raise ValueError(f"percentages must be a non-empty sequence of numbers in [0, 100), got {percentages!r}")
    return [check_real(q, "percentages", 0.0, 100.0, high_open=True) for q in percentages]


def road(model: Model, images: torch.Tensor, saliency: torch.Tensor, targets: Targets,
         percentages: Sequence[float] = ROAD_PERCENTAGES, order: Literal["morf", "lerf"] = "morf", *,
         noise: float = 0.01, seed: int = 0, batch_size: int = 256, progress: bool | None = None) -> torch.Tensor:
    """ROAD, remove and debias (Rong et al., ICML 2022): the target's probability after noisy linear imputation.

    For each percentage ``q`` the ``k = min(⌊q/100 · H·W + 1/2⌋, H·W − 1)`` pixels ranked first are
    removed (MoRF: most relevant first, by descending saliency; LeRF: least relevant first, by
    ascending saliency; ties by lower flat index, as in the games) and imputed, all channels:
    each removed pixel ``x_u`` solves ``Σ_v w_v (x_v − x_u) = 0`` over its in-image 8-neighbours ``v``
    (weight 1/6 edge, 1/12 diagonal; removed neighbours are unknowns of the same sparse system, kept
    ones known), then gets ``noise · ε``, ``ε ~ N(0, 1)``, added. The score is ``p(target | x̃_q)``,
    the softmax probability from ``model``. MoRF: lower is better; LeRF: higher is better. Noise is
    drawn from a generator seeded by ``seed``, percentage by percentage, image by image.

    Cost: one sparse solve per (image, percentage), about 6 ms for 64×64 images on one core
    (0.05 s per image for the nine default percentages, per order), plus ``B·P`` model queries.

    Deliberate differences from pytorch-grad-cam's ``ROADMostRelevantFirst(Average)`` and
    ``ROADLeastRelevantFirst(Average)`` (grad-cam 1.5.7), which are otherwise the same computation:

    * ``q`` is the share of pixels *removed*, as in the paper's plots; pytorch-grad-cam's
      ``percentile=p`` removes the pixels at or above the map's p-th percentile (MoRF) or at or below
      its (100 − p)-th (LeRF), i.e. keeps p %; our ``q`` matches its ``100 − q``.
    * The count is exact (``k`` as above, ties by index) instead of a threshold on ``np.percentile``,
      which removes ``⌊(H·W − 1)·q/100⌋ + 1`` pixels on distinct values and any number on ties;
      at least one pixel is kept, so the system always has a known value to anchor it.
    * The score is the probability itself, like the games; pytorch-grad-cam returns its change from
      the unperturbed image (``return_diff=True``).
    * The noise comes from a seeded generator, not torch's global one; it is drawn in the same order
      and shapes, so seeding the global generator with ``seed`` reproduces pytorch-grad-cam's draws.
      The default magnitude 0.01 (in the model's normalised input space) is the same.

    Args:
        model: the model being explained (BlackBox, ``nn.Module`` returning logits, or a callable
            returning probabilities).
        images: (B,C,H,W) images in the model's input space.
        saliency: (B,H,W) maps.
        targets: the class scored on each image (an int or B ints).
        percentages: shares of pixels removed, each in [0, 100).
        order: ``"morf"`` or ``"lerf"``.
        noise: standard deviation of the Gaussian noise added to imputed values (0 disables it); a
            noise that makes an imputed pixel overflow the images' dtype is refused.
        seed: seed of the noise generator.
        batch_size: images sent to the model at once.
        progress: show a progress bar (``None``: only on a TTY).

    Returns:
        (B, len(percentages)) float32 probabilities, one column per percentage.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
        >>> road(net, torch.rand(2, 3, 4, 4), torch.rand(2, 4, 4), [0, 1], percentages=(25, 50)).shape
        torch.Size([2, 2])
    """
    images = check_images(images)
    b, c, h, w = images.shape
    sal = check_map(saliency, b, h, w)
    tgt = check_targets(targets, b, model.num_classes if isinstance(model, BlackBox) else None)
    qs = _check_percentages(percentages)
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    noise = check_real(noise, "noise", 0.0, float(torch.finfo(images.dtype).max))
    check_positive_int(batch_size, "batch_size")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    s64 = sal.cpu().to(torch.float64)
    ranks = _pixel_ranks(s64 if order == "morf" else -s64).view(b, h, w)
    gen = torch.Generator().manual_seed(int(seed))
    prob_fn, num_classes = _evaluation_prob_fn(model), None
    out = torch.empty(b, len(qs), dtype=torch.float32)
    for j in track(range(len(qs)), total=len(qs), desc=f"ROAD {order}", enabled=progress):
        k = min(math.floor(qs[j] / 100 * h * w + 0.5), h * w - 1)
        imputed = torch.stack([_impute(images[i], ranks[i] < k, noise, gen) for i in range(b)])
        for lo in range(0, b, batch_size):
            hi = min(lo + batch_size, b)
            probs, num_classes = _checked_probs(prob_fn, imputed[lo:hi], model, tgt, num_classes)
            out[lo:hi, j] = probs.gather(1, tgt[lo:hi].to(probs.device).unsqueeze(1)).squeeze(1).float().cpu()
    return out


def road_score(scores: torch.Tensor) -> torch.Tensor:
    """Per-image summary of a ROAD curve: the mean probability over the percentages.

    ``score_i = (1/P) Σ_j p_ij``, the curve's area in the way pytorch-grad-cam's
    ``ROAD*Average`` summarises it (an unweighted mean over equally spaced percentages). MoRF:
    lower is better; LeRF: higher is better; ``(road_score(lerf) − road_score(morf)) / 2`` is
    pytorch-grad-cam's ``ROADCombined`` up to its subtraction of the unperturbed probability, which
    cancels in the difference.

    Args:
        scores: (B, P) output of :func:`road`: probabilities in [0, 1].

    Returns:
        (B,) float64.

    Example:
        >>> road_score(torch.tensor([[0.75, 0.5, 0.25]])).tolist()
        [0.5]
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or 0 in scores.shape:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a non-empty (B, P) tensor from road(), got {shape}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contains NaN or Inf")
    if bool(((scores < 0) | (scores > 1)).any()):
        raise ValueError(f"scores must be probabilities in [0, 1], got values in [{float(scores.min()):.4g}, "
                         f"{float(scores.max()):.4g}]")
    return scores.to(torch.float64).mean(dim=1)


# --------------------------------------------------------------------------- randomisation
def _resettable(model: nn.Module, layers: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """The modules to randomise, top (last registered) first: those with a ``reset_parameters`` method."""
    found = [(n, m) for n, m in model.named_modules() if callable(getattr(m, "reset_parameters", None))][::-1]
    if not found:
        raise ValueError("model has no module with a reset_parameters() method to randomise")
    if layers is None:
        return found
    if isinstance(layers, str) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(f"layers must be a non-empty sequence of module names, got {layers!r}")
    names = {n for n, _ in found}
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise ValueError(f"layers names {unknown} that are not modules with reset_parameters(); "
                         f"choose from {[n for n, _ in found]}")
    wanted = set(layers)
    return [(n, m) for n, m in found if n in wanted]


def _explain_checked(explain_fn: ModelExplainFn, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                     shape: tuple[int, int, int]) -> torch.Tensor:
    return _saliency(explain_fn(model, images, targets), "explain_fn's output", shape).cpu()


def model_randomisation(model: nn.Module | Callable[[], nn.Module], explain_fn: ModelExplainFn,
                        images: torch.Tensor, targets: Targets, *, layers: Sequence[str] | None = None,
                        seed: int = 0, progress: bool | None = None) -> pd.DataFrame:
    """Cascading model parameter randomisation, top layer first (Adebayo et al., NeurIPS 2018).

    The maps ``Φ⁰ = explain_fn(f, x, y)`` of the trained model are compared with ``Φᵏ``, those of the
    model whose top ``k`` layers are re-initialised (cumulatively): ``ρ_ik = spearman(Φ⁰_i, Φᵏ_i)``
    over all pixels (:func:`map_rank_correlation`). A map that depends on what the model learned
    falls towards 0 as layers are randomised; one that only detects edges stays high.

    The layers are the modules with a ``reset_parameters()`` method (convolutions, linear and
    normalisation layers), top = last registered; each is reset right after
    ``torch.manual_seed(seed + 1)``, which is Quantus' ``MPRT(layer_order="top_down", seed=seed)``
    (0.6.0), so both randomise the same weights. Differences from Quantus' MPRT: the maps are
    compared as returned (Quantus takes ``abs`` and divides by the maximum by default, which changes
    nothing for non-negative maps); constant maps get the conventions of :func:`map_rank_correlation`
    instead of NaN; the caller's global torch RNG state is restored afterwards.

    The caller's model is never touched: a module is deep-copied, a factory (a callable returning a
    fresh module) is called once. ``explain_fn`` should seed itself if it is stochastic.

    Args:
        model: an ``nn.Module``, or a zero-argument callable that builds one.
        explain_fn: ``(model, images, targets) -> (B,H,W)`` maps; it gets the targets as a (B,) int64 tensor.
        images: (B,C,H,W) images.
        targets: the class explained on each image (kept fixed while the model is randomised).
        layers: optional subset of module names to randomise (still top first); default all.
        seed: seed of the re-initialisations.
        progress: show a progress bar (``None``: only on a TTY).

    Returns:
        A DataFrame with one row per (step, image): ``step`` (1 = top layer randomised, ...),
        ``layer`` (the module randomised at that step), ``image`` (index in the batch) and
        ``rank_correlation``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> _ = net[0].weight.data.copy_(torch.arange(16.0).view(4, 4))
        >>> explain = lambda m, x, y: m[0].weight.abs().sum(0).view(1, 2, 2).expand(len(x), 2, 2)  # reads layer 0
        >>> df = model_randomisation(net, explain, torch.rand(1, 3, 2, 2), [0])
        >>> df[["step", "layer", "rank_correlation"]].values.tolist()
        [[1, '2', 1.0], [2, '0', -0.8]]
    """
    images = check_images(images)
    b, _, h, w = images.shape
    tgt = check_targets(targets, b)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(model, BlackBox) or not (isinstance(model, nn.Module) or callable(model)):
        raise TypeError(f"model must be an nn.Module or a callable returning one, got {type(model).__name__} "
                        f"(to randomise a black box the benchmark owns, pass the module it wraps)")
    work = copy.deepcopy(model) if isinstance(model, nn.Module) else model()
    if not isinstance(work, nn.Module):
        raise TypeError(f"model must be an nn.Module or a callable returning one, got {type(work).__name__}")
    todo = _resettable(work, layers)
    original = _explain_checked(explain_fn, work, images, tgt, (b, h, w))
    devices = sorted({p.device.index or 0 for p in work.parameters() if p.device.type == "cuda"})
    rows: list[pd.DataFrame] = []
    for step, (name, module) in enumerate(track(todo, total=len(todo), desc="randomisation", enabled=progress), 1):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed) + 1)
            module.reset_parameters()
        rho = map_rank_correlation(original, _explain_checked(explain_fn, work, images, tgt, (b, h, w)))
        rows.append(pd.DataFrame({"step": step, "layer": name, "image": range(b), "rank_correlation": rho.numpy()}))
    return pd.concat(rows, ignore_index=True)


# --------------------------------------------------------------------------- robustness
def _norms(x: torch.Tensor, norm: str) -> torch.Tensor:
    flat = x.flatten(1)
    if norm == "fro":
        return torch.linalg.vector_norm(flat, ord=2, dim=1)
    if norm == "l1":
        return flat.abs().sum(dim=1)
    return flat.abs().amax(dim=1)


def max_sensitivity(explain_fn: ExplainFn, images: torch.Tensor, targets: Targets, *, radius: float = 0.02,
                    n_samples: int = 10, seed: int = 0, norm: Literal["fro", "l1", "inf"] = "fro",
                    saliency: torch.Tensor | None = None, on_zero: Literal["raise", "nan"] = "raise",
                    progress: bool | None = None) -> torch.Tensor:
    """Max-sensitivity (Yeh et al., NeurIPS 2019): the largest relative change of the map under small input noise.

    ``MS_i = max_{j=1..n} ‖Φ(x_i + δ_ij) − Φ(x_i)‖ / ‖Φ(x_i)‖`` with ``δ_ij ~ U[−r, r]`` drawn
    independently for every pixel and channel, in the model's normalised input space (no clipping),
    and ``‖·‖`` the Frobenius norm of the (H,W) map by default (``"l1"``, ``"inf"`` also). That is
    Quantus' ``MaxSensitivity`` with its default difference, norms and no normalisation (its default
    ``lower_bound=0.2`` and 200 samples are ours ``radius``, ``n_samples``), except that Quantus can
    also set to NaN the samples whose predicted class changed, which needs the model; here
    ``explain_fn`` is the only access. Lower is better.

    A map that is zero on ``x`` has no scale: its score is ``0.0`` when every perturbed map is zero
    too, and otherwise a ``ValueError`` naming the image (``on_zero="nan"`` gives NaN instead, which
    :func:`lwcam.metrics.bootstrap_ci` drops). Maps are divided by a power of two near ``max|Φ(x_i)|`` first, so extreme
    finite values cannot overflow.

    Args:
        explain_fn: ``(images, targets) -> (B,H,W)`` maps (the model is bound inside); it gets the
            targets as a (B,) int64 tensor.
        images: (B,C,H,W) images.
        targets: the class explained on each image.
        radius: half-width ``r`` of the uniform noise, > 0, small enough that ``x + δ`` stays finite
            in the images' dtype.
        n_samples: number of perturbations per image.
        seed: seed of the noise generator (the noise is drawn on the CPU in float64).
        norm: ``"fro"`` (default), ``"l1"`` or ``"inf"``.
        saliency: the maps on the clean images, if already computed (else ``explain_fn`` is called).
        on_zero: ``"raise"`` or ``"nan"``, for a zero map whose perturbed maps are not zero.
        progress: show a progress bar (``None``: only on a TTY).

    Returns:
        (B,) float64, ≥ 0.

    Example:
        >>> explain = lambda x, y: x.mean(1)  # the map is the image's mean channel
        >>> ms = max_sensitivity(explain, torch.ones(2, 3, 4, 4), [0, 0], radius=0.1, n_samples=3)
        >>> bool((ms > 0).all() and (ms < 0.1).all())
        True
    """
    images = check_images(images)
    b, _, h, w = images.shape
    tgt = check_targets(targets, b)
    room = float(torch.finfo(images.dtype).max) - float(images.abs().max())  # images + noise stay finite
    radius = check_real(radius, "radius", 0.0, room, low_open=True)
    check_positive_int(n_samples, "n_samples")
    if norm not in ("fro", "l1", "inf"):
        raise ValueError(f"norm must be 'fro', 'l1' or 'inf', got {norm!r}")
    if on_zero not in ("raise", "nan"):
        raise ValueError(f"on_zero must be 'raise' or 'nan', got {on_zero!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    base = _saliency(explain_fn(images, tgt) if saliency is None else saliency,
                     "explain_fn's output" if saliency is None else "saliency", (b, h, w)).cpu()
    scale = pow2_scale(base.flatten(1)).view(b, 1, 1)
    gen = torch.Generator().manual_seed(int(seed))
    worst = torch.zeros(b, dtype=torch.float64)
    for _ in track(range(n_samples), total=n_samples, desc="max-sensitivity", enabled=progress):
        delta = (torch.rand(images.shape, generator=gen, dtype=torch.float64) * 2 - 1) * radius
        moved = _saliency(explain_fn(images + delta.to(images.device, images.dtype), tgt), "explain_fn's output",
                          (b, h, w)).cpu()
        worst = torch.maximum(worst, _norms(moved / scale - base / scale, norm))
    denom = _norms(base / scale, norm)
    undefined = (denom == 0) & (worst > 0)
    if bool(undefined.any()) and on_zero == "raise":
        raise ValueError(f"the map of image {int(torch.nonzero(undefined)[0])} is zero, so its change under noise has "
                         f"no scale; pass on_zero='nan' to score such images NaN")
    out = torch.where(denom > 0, worst / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(worst))
    return torch.where(undefined, torch.full_like(out, math.nan), out)


# --------------------------------------------------------------------------- complexity
def sparseness(saliency: torch.Tensor) -> torch.Tensor:
    """Sparseness: the Gini index of the map's absolute values (Chalasani et al. 2020; Quantus' ``Sparseness``).

    With ``a_(1) ≤ … ≤ a_(N)`` the sorted ``|s_i|`` over the N pixels,
    ``G = Σ_k (2k − N − 1) a_(k) / (N Σ_k a_(k))``. A uniform map scores 0, a one-hot map
    ``(N − 1)/N``; higher is sparser. An all-zero map is uniform and scores ``0.0``. Quantus adds
    ``1e-7`` to every value after dividing by the maximum (so an all-zero map scores 0 there too);
    here the index is exact, which differs from Quantus by at most about ``1e-7 · N / Σ a``.

    Args:
        saliency: (B,H,W) or (B,1,H,W) real maps.

    Returns:
        (B,) float64 in [0, 1).

    Example:
        >>> sparseness(torch.tensor([[[0.0, 0.0], [0.0, 5.0]]])).tolist()
        [0.75]
    """
    flat = _saliency(saliency, "saliency").cpu().flatten(1).abs()
    a = torch.sort(flat / pow2_scale(flat), dim=1).values
    n = a.shape[1]
    k = torch.arange(1, n + 1, dtype=torch.float64)
    total = a.sum(dim=1)
    gini = ((2 * k - n - 1) * a).sum(dim=1) / (n * torch.where(total > 0, total, torch.ones_like(total)))
    return torch.where(total > 0, gini, torch.zeros_like(gini)).clamp_min(0.0)
