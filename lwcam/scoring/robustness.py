"""Robustness: does a map stay put when the input barely moves?

:func:`max_sensitivity` (Yeh et al., NeurIPS 2019): the largest relative change of the map over random
perturbations within a radius.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Literal

import torch

from .._checks import check_images, check_positive_int, check_real, check_targets
from .._ops import pow2_scale
from .._utils import track
from ._inputs import _saliency
from ._meta import score
from .games import (
    Targets,
)

__all__ = ["max_sensitivity", "ExplainFn"]

ExplainFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- robustness
def _norms(x: torch.Tensor, norm: str) -> torch.Tensor:
    flat = x.flatten(1)
    if norm == "fro":
        return torch.linalg.vector_norm(flat, ord=2, dim=1)
    if norm == "l1":
        return flat.abs().sum(dim=1)
    return flat.abs().amax(dim=1)


@score("robustness", "lower", needs=("explainer",))
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
    :func:`lwcam.scoring.stats.bootstrap_ci` drops). Maps are divided by a power of two near ``max|Φ(x_i)|`` first,
    so extreme finite values cannot overflow.

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
