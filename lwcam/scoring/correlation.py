"""Spearman's rank correlation of two maps, pixel by pixel: the similarity behind class sensitivity,
randomisation and the two-run robustness check.

Two constant maps score ``1.0`` (neither ranks the pixels, so they agree); one constant map against a
non-constant one scores ``0.0`` (no association).
"""

from __future__ import annotations

import torch

from ._inputs import _mask, _saliency

__all__ = ["map_rank_correlation"]


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
