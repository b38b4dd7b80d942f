"""Statistics that turn per-image scores into a report: a mean with its bootstrap confidence interval, and a
paired comparison of two methods on the same images.

Example:
    >>> lo_hi = bootstrap_ci([0.1, 0.2, 0.3, 0.4], n_boot=200)
    >>> round(lo_hi[0], 2)
    0.25
"""

from __future__ import annotations

import numbers
import warnings
from typing import Literal, NamedTuple

import numpy as np
import torch
from scipy import stats

__all__ = ["PairedResult", "bootstrap_ci", "paired_test"]


class PairedResult(NamedTuple):
    """A paired comparison of two methods on the same images (see :func:`paired_test`)."""

    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    test: str = "wilcoxon"
    alternative: str = "two-sided"


# --------------------------------------------------------------------------- statistics
def _as_1d_float(values: object, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if np.isinf(arr).any():
        raise ValueError(f"{name} contains Inf")
    finite = arr[~np.isnan(arr)]
    if finite.size and float(np.abs(finite).max()) > np.finfo(np.float64).max / finite.size:
        raise ValueError(f"{name}: values too large to average in float64 (max |value| "
                         f"{np.abs(finite).max():.4g} over {finite.size} values overflows a sum); rescale them")
    return arr


def _bootstrap_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` means of resamples of ``x`` with replacement, vectorised in bounded chunks."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    out = np.empty(n_boot, dtype=np.float64)
    per = max(1, 4_000_000 // n)
    for lo in range(0, n_boot, per):
        hi = min(lo + per, n_boot)
        idx = rng.integers(0, n, size=(hi - lo, n))
        out[lo:hi] = x[idx].mean(axis=1)
    return out


def _check_boot_args(n_boot: int, ci: float, seed: int) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def bootstrap_ci(values: object, n_boot: int = 10000, ci: float = 0.95, seed: int = 0
                 ) -> tuple[float, float, float]:
    """Mean with a percentile bootstrap confidence interval.

    Resample the values with replacement ``n_boot`` times, take each resample's mean, and report
    the ``(1 - ci) / 2`` and ``(1 + ci) / 2`` quantiles of those means. NaN values (for example
    images a metric does not apply to) are dropped first; Inf raises. Deterministic given ``seed``.

    Args:
        values: 1-D array-like or tensor of per-image scores.
        n_boot: number of bootstrap resamples.
        ci: confidence level in (0, 1).
        seed: seed of the resampling generator.

    Returns:
        ``(mean, low, high)`` as floats; ``low <= mean <= high`` up to resampling noise.

    Raises:
        ValueError: no values, or only NaN values.

    Example:
        >>> m, lo, hi = bootstrap_ci([0.2, 0.4, 0.6, 0.8], n_boot=2000)
        >>> round(m, 2), lo < m < hi
        (0.5, True)
    """
    _check_boot_args(n_boot, ci, seed)
    x = _as_1d_float(values, "values")
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value, got an empty input")
    x = x[~np.isnan(x)]
    if x.size == 0:
        raise ValueError("bootstrap_ci got only NaN values")
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    means = _bootstrap_means(x, int(n_boot), int(seed))
    low, high = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])
    return mean, float(low), float(high)


def paired_test(a: object, b: object, *, n_boot: int = 10000, ci: float = 0.95, seed: int = 0,
                alternative: Literal["two-sided", "less", "greater"] = "two-sided") -> PairedResult:
    """Compare two methods scored on the same images.

    ``d_i = a_i - b_i``. The result holds ``mean(d)`` with a paired percentile bootstrap CI
    (images resampled together, see :func:`bootstrap_ci`) and the p-value of a Wilcoxon
    signed-rank test of ``d`` (``scipy.stats.wilcoxon``, zero differences dropped, its default
    ``zero_method="wilcox"``). ``alternative="less"`` tests whether ``a`` tends to be below ``b``
    (e.g. a lower deletion AUC), ``"greater"`` the reverse.

    Pairs in which either value is NaN are dropped. When every difference is zero there is no
    evidence of a difference and the p-value is ``1.0``.

    Args:
        a: 1-D per-image scores of the first method.
        b: 1-D per-image scores of the second method, same length and order.
        n_boot: bootstrap resamples for the CI.
        ci: confidence level of the CI.
        seed: seed of the resampling generator.
        alternative: ``"two-sided"``, ``"less"`` or ``"greater"``.

    Returns:
        A :class:`PairedResult` ``(mean_diff, ci_low, ci_high, p_value, n, test, alternative)``.

    Raises:
        ValueError: ``a`` and ``b`` differ in shape, or no complete pair is left.

    Example:
        >>> r = paired_test([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.3, 0.5, 0.4, 0.6, 0.9, 0.7])
        >>> round(r.mean_diff, 3), r.p_value < 0.05, r.n
        (-0.217, True, 6)
    """
    if alternative not in ("two-sided", "less", "greater"):
        raise ValueError(f"alternative must be 'two-sided', 'less' or 'greater', got {alternative!r}")
    _check_boot_args(n_boot, ci, seed)
    xa, xb = _as_1d_float(a, "a"), _as_1d_float(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must have the same shape (paired per image), got {xa.shape} and {xb.shape}")
    keep = ~(np.isnan(xa) | np.isnan(xb))
    with np.errstate(over="ignore"):
        d = _as_1d_float(xa[keep] - xb[keep], "a - b")  # Inf where a and b near ±1.8e308 differ past float64
    if d.size == 0:
        raise ValueError("paired_test needs at least one pair without NaN")
    mean, low, high = bootstrap_ci(d, n_boot=n_boot, ci=ci, seed=seed)
    if not np.any(d != 0):
        p = 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            p = float(stats.wilcoxon(d, zero_method="wilcox", alternative=alternative).pvalue)
    return PairedResult(mean_diff=mean, ci_low=low, ci_high=high, p_value=p, n=int(d.size),
                        test="wilcoxon", alternative=alternative)
