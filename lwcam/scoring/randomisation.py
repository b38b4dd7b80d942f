"""Randomisation: does a map change when the model's weights are randomised?

:func:`model_randomisation` re-initialises the layers in cascade, top layer first (Adebayo et al.,
NeurIPS 2018), and reports the rank correlation of each map with the trained model's.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .._checks import check_images, check_targets
from .._utils import track
from ..blackbox import BlackBox
from ._inputs import _saliency
from ._meta import score
from .correlation import map_rank_correlation
from .games import (
    Targets,
)

if TYPE_CHECKING:  # pandas is imported only by the functions that make a table
    import pandas as pd

__all__ = ["model_randomisation", "ModelExplainFn"]

ModelExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


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


@score("randomisation", "lower", needs=("explainer",))
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
    import pandas as pd
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
