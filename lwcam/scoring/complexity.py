"""Complexity: how concentrated a map is.

:func:`sparseness` is the Gini index of the map (Chalasani et al., ICML 2020); an all-zero map scores
``0.0``, the Gini index of a uniform map.
"""

from __future__ import annotations

import torch

from .._ops import pow2_scale
from ._inputs import _saliency
from ._meta import score

__all__ = ["sparseness"]


# --------------------------------------------------------------------------- complexity
@score("complexity", "higher", needs=())
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
