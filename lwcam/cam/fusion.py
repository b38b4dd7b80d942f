"""Fusing per-layer saliency maps into one map (the paper: pixel-wise summation).

With upsampled layer maps :math:`M_1, \\dots, M_L` of one image and the per-image min-max
normalisation :math:`N(X) = (X - \\min X) / (\\max X - \\min X)` (a constant map gives zeros),
the default fusion is

.. math::

    S = N\\Big(\\sum_{l=1}^{L} N(M_l)\\Big).

``normalize="none"`` skips both normalisations: :math:`S = \\sum_l M_l`, the paper's words read
literally (the deepest, largest-valued layers then dominate). The ``mode`` replaces the sum:

=============  ============================================
mode           combination of the (normalised) layer maps
=============  ============================================
``"sum"``      :math:`\\sum_l M_l`
``"mean"``     :math:`\\frac{1}{L}\\sum_l M_l` (same result as ``"sum"`` once normalised)
``"max"``      :math:`\\max_l M_l`, pixel-wise
``"weighted"`` :math:`\\sum_l w_l M_l`, weights finite, ≥ 0, not all zero
=============  ============================================

These four modes give every layer an equal say: a shallow map that lights up every object in
the image (it does not know the class yet) pulls the fused map onto the wrong object as
strongly as the deep map pulls it onto the right one.

**Class-preserving modes** (:data:`CLASS_PRESERVING_MODES`) let the shallow maps move mass
only *inside* the deepest map's support. They take the maps at their own resolutions
:math:`S_1, \\dots, S_L` (shallow fine to deep coarse: a LayerMaps' ``.raw``, a dict, a list)
and an output ``size`` (default: a LayerMaps' input size, else the finest map's size). The
deepest map :math:`D = S_L` (or ``gate``, which then replaces it) is brought to ``size`` by
nearest upsampling (:func:`lwcam._ops.area_resize`): a bilinear one would spill a coarse cell
into the neighbouring object. Shallower maps are resized bilinearly. With :math:`N` the min-max
normalisation after resizing to ``size``:

================  ==========================================================================
mode              fused map, then min-max normalised
================  ==========================================================================
``"deep_gated"``  :math:`N(D) \\cdot \\sum_{l<L} N(S_l)` (just :math:`N(D)` for one map)
``"product"``     :math:`\\big(\\prod_{l} (ε + (1-ε) N(S_l))\\big)^{1/L}` with :math:`S_L = D`, a
                  geometric mean whose floor ``eps`` (default 0.05) keeps one shallow zero from
                  erasing a small object
``"polycam"``     Poly-CAM (Englebert et al., 2022): :math:`P_L = D`, :math:`P_l = \\mathrm{ReLU}(
                  \\mathrm{LNorm}(S_l) \\odot \\mathrm{bilinear}(P_{l+1}))`, output :math:`P_1`;
                  LNorm divides :math:`S_l` by its block mean on :math:`P_{l+1}`'s grid
``"recursive"``   :math:`P_l = \\mathrm{nearest}(P_{l+1}) \\odot (α + (1-α) N_l)`, :math:`N_l` the map
                  over its exact block mean on :math:`P_{l+1}`'s grid, ``alpha`` default 0.1
================  ==========================================================================

(:mod:`lwcam.cam.recursive` has the two recursions in full; ``"recursive"`` keeps each deep
cell's total mass exactly, ``"polycam"`` follows the reference code, bilinear upsampling
included.) They compute in float64, so maps up to ±3.4e38 give finite results; they always
min-max normalise (``normalize="none"`` is refused). ``polycam`` and ``recursive`` clamp the
maps at 0 and need resolutions that do not grow with depth.

Example:
    >>> import torch
    >>> a = torch.tensor([[[0., 2.], [4., 4.]]])      # one image, 2x2, layer 1
    >>> b = torch.tensor([[[1., 1.], [1., 3.]]])      # layer 2
    >>> fuse([a, b])
    tensor([[[0.0000, 0.2500],
             [0.5000, 1.0000]]])
    >>> fuse([a, b], normalize="none")
    tensor([[[1., 3.],
             [5., 7.]]])
    >>> fuse({"a": a, "b": b}, mode="weighted", weights={"a": 1.0})  # b left out: weight 0
    tensor([[[0.0000, 0.5000],
             [1.0000, 1.0000]]])

    Class-preserving: a class-blind 4x4 map lights two objects, the 2x2 class map only the first:

    >>> blind = torch.tensor([[[1., 1., 0., 0.], [1., 1., 0., 0.], [0., 0., 1., 1.], [0., 0., 1., 1.]]])
    >>> deep = torch.tensor([[[1., 0.], [0., 0.]]])
    >>> fuse([blind, torch.nn.functional.interpolate(deep[None], size=(4, 4))[0]])[0, 3]  # sum: both
    tensor([0.0000, 0.0000, 0.5000, 0.5000])
    >>> fuse([blind, deep], mode="deep_gated")[0]
    tensor([[1., 1., 0., 0.],
            [1., 1., 0., 0.],
            [0., 0., 0., 0.],
            [0., 0., 0., 0.]])
    >>> fuse([blind, deep], mode="product", eps=0.25)[0]  # (0.25 · 1)^(1/2) = 0.5 on the other object
    tensor([[1.0000, 1.0000, 0.0000, 0.0000],
            [1.0000, 1.0000, 0.0000, 0.0000],
            [0.0000, 0.0000, 0.3333, 0.3333],
            [0.0000, 0.0000, 0.3333, 0.3333]])
    >>> fuse([blind, deep], mode="polycam")[0]  # the reference's bilinear upsampling spills a little
    tensor([[1.0000, 1.0000, 0.0000, 0.0000],
            [1.0000, 0.9000, 0.0000, 0.0000],
            [0.0000, 0.0000, 0.1000, 0.0000],
            [0.0000, 0.0000, 0.0000, 0.0000]])
    >>> fuse([blind, deep], mode="recursive")[0]
    tensor([[1., 1., 0., 0.],
            [1., 1., 0., 0.],
            [0., 0., 0., 0.],
            [0., 0., 0., 0.]])
    >>> fuse([blind, deep], mode="recursive", size=(2, 2))  # block means: the deep map's own mass
    tensor([[[1., 0.],
             [0., 0.]]])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from .._ops import area_resize, minmax_normalize
from .recursive import REFINEMENTS, refine, smooth_resize

__all__ = ["fuse", "minmax_normalize", "MODES", "CLASS_PRESERVING_MODES", "NORMALIZE", "NamedMaps"]

#: The modes that let shallow maps move mass only inside the deepest map's support.
CLASS_PRESERVING_MODES = ("deep_gated", "product", "polycam", "recursive")
MODES = ("sum", "mean", "max", "weighted", *CLASS_PRESERVING_MODES)
NORMALIZE = ("minmax", "none")

#: The options each class-preserving mode reads (``size`` and ``gate``: all of them).
_OPTIONS = {"deep_gated": ("size", "gate"), "product": ("size", "gate", "eps"),
            "polycam": ("size", "gate"), "recursive": ("size", "gate", "alpha")}
PRODUCT_EPS = 0.05
RECURSIVE_ALPHA = 0.1


@runtime_checkable
class NamedMaps(Protocol):
    """Named per-layer maps, as a :class:`~lwcam.cam.maps.LayerMaps` holds them."""

    names: list[str]
    maps: dict[str, Tensor]


def _items(maps: Any, raw: bool = False) -> tuple[list[Any], list[str] | None]:
    """The maps as a list and their layer names (None when the input carries none).

    With ``raw``, a LayerMaps gives its native-resolution ``.raw`` maps, else its upsampled ``.maps``.
    """
    names: list[str] | None = None
    if isinstance(maps, NamedMaps):
        names = list(maps.names)
        source = getattr(maps, "raw", None) if raw else None
        source = source if isinstance(source, Mapping) else maps.maps
        items = [source[n] for n in names]
    elif isinstance(maps, Mapping):
        names = [str(k) for k in maps]
        items = list(maps.values())
    elif isinstance(maps, (Tensor, np.ndarray)):
        t = torch.as_tensor(maps)
        if t.ndim != 4:
            raise ValueError(f"a tensor of maps must be (B,L,H,W), got shape {tuple(t.shape)}")
        items = list(t.unbind(1))
    elif isinstance(maps, Sequence) and not isinstance(maps, (str, bytes)):
        items = list(maps)
    else:
        raise TypeError("maps must be a LayerMaps, a dict name -> (B,H,W), a list of (B,H,W) "
                        f"or a (B,L,H,W) tensor; got {type(maps).__name__}")
    if not items:
        raise ValueError("no maps to fuse")
    return items, names


def _checked(items: list[Any], names: list[str] | None, same_shape: bool) -> tuple[list[Tensor], list[str]]:
    """The maps as real, finite (B,h,w) tensors: one shape (``same_shape``) or one batch size; and their labels."""
    tensors = [torch.as_tensor(m) for m in items]
    labels = names if names is not None else [f"#{i}" for i in range(len(tensors))]
    shape = tuple(tensors[0].shape)
    for lab, t in zip(labels, tensors, strict=True):
        if t.ndim != 3:
            raise ValueError(f"map {lab} must be (B,H,W), got shape {tuple(t.shape)}")
        if same_shape and tuple(t.shape) != shape:
            raise ValueError(f"maps have mismatched shapes: {labels[0]} is {shape}, {lab} is {tuple(t.shape)} "
                             "(upsample every map to the input size first)")
        if t.shape[0] != shape[0]:
            raise ValueError(f"maps have mismatched batch sizes: {labels[0]} has {shape[0]} images, "
                             f"{lab} has {t.shape[0]}")
        if t.is_complex():
            raise TypeError(f"map {lab} is complex")
        if not bool(torch.isfinite(t.float()).all()):
            raise ValueError(f"map {lab} contains NaN or infinite values")
    return tensors, labels


def _as_stack(maps: Any) -> tuple[Tensor, list[str] | None]:
    """(B,L,H,W) float tensor and layer names (None when the input carries none)."""
    items, names = _items(maps)
    tensors, _ = _checked(items, names, same_shape=True)
    stack = torch.stack([t.float() for t in tensors], dim=1)
    return stack, names


def _weight_values(weights: Any, names: list[str] | None) -> Any:
    """The weights in layer order: a dict ``name -> weight`` becomes a list (a layer left out weighs 0)."""
    if weights is None:
        raise ValueError("mode='weighted' needs weights (one per layer)")
    if isinstance(weights, Mapping):
        if names is None:
            raise ValueError("weights given as a dict need named maps (a LayerMaps or a dict of maps)")
        unknown = [k for k in weights if k not in names]
        if unknown:
            raise ValueError(f"weights name unknown layers {unknown}; the layers are {names}")
        values = [weights.get(n, 0.0) for n in names]  # a layer left out weighs 0
    elif isinstance(weights, (str, bytes)):
        raise TypeError(f"weights must be numbers, one per layer, got {weights!r}")
    else:
        values = weights
    return values


def _weights(weights: Any, names: list[str] | None, n_layers: int, device: torch.device) -> Tensor:
    """Validate the per-layer weights of ``mode="weighted"`` and return them as an (L,) tensor."""
    values = _weight_values(weights, names)
    try:
        w = torch.as_tensor(values.detach() if isinstance(values, Tensor) else values)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"weights must be numbers, one per layer, got {weights!r}") from None
    if w.dtype == torch.bool or w.is_complex():
        raise TypeError(f"weights must be real numbers, got dtype {w.dtype}")
    w = w.to(dtype=torch.float32)
    if w.ndim != 1:
        raise ValueError(f"weights must be 1-D, one number per layer, got shape {tuple(w.shape)}")
    if w.numel() != n_layers:
        raise ValueError(f"got {w.numel()} weights for {n_layers} layer maps (weights needs one per layer)")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"weights must be finite (no NaN or inf), got {w.tolist()}")
    if bool((w < 0).any()):
        raise ValueError(f"weights must be >= 0, got {w.tolist()}")
    if not bool((w > 0).any()):
        raise ValueError("weights are all zero: at least one weight must be positive")
    return w.to(device=device)


def _refuse_unused(mode: str, **options: Any) -> None:
    """Refuse, by name, an option that ``mode`` does not read."""
    for name, value in options.items():
        if value is None or name in _OPTIONS.get(mode, ()):
            continue
        users = [m for m, used in _OPTIONS.items() if name in used]
        which = f"mode={users[0]!r}" if len(users) == 1 else f"the class-preserving modes {tuple(users)}"
        raise ValueError(f"{name} is only used by {which}, not mode={mode!r}")


def _check_size(size: Any) -> tuple[int, int]:
    """``size`` as (H, W): an int or a pair of ints, all ≥ 1."""
    pair = (size, size) if isinstance(size, numbers.Integral) else size
    try:
        values = [int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else 0 for v in pair]
    except TypeError:
        values = []
    if len(values) != 2 or min(values) < 1:
        raise ValueError(f"size must be a positive int or a pair (H, W) of positive ints, got {size!r}")
    return values[0], values[1]


def _check_fraction(name: str, value: Any, low: float, high: float, open_ends: bool) -> float:
    """A real number in [low, high] (in (low, high) when ``open_ends``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = low < value < high if open_ends else low <= value <= high
    if not ok:
        span = f"({low:g}, {high:g})" if open_ends else f"[{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a number in {span}, got {value!r}")
    return float(value)


def _check_gate(gate: Any, batch: int, device: torch.device) -> Tensor:
    """The gate as a real, finite (B,h,w) tensor on ``device``, B the maps' batch size."""
    try:
        g = torch.as_tensor(gate)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"gate must be a (B,h,w) tensor, got {type(gate).__name__}") from None
    if g.ndim != 3 or g.shape[0] != batch or g.numel() == 0:
        raise ValueError(f"gate must be a (B,h,w) tensor with B={batch} (the maps' batch size) and at "
                         f"least one pixel, got shape {tuple(g.shape)}")
    if g.is_complex() or g.dtype == torch.bool:
        raise TypeError(f"gate must be real, got dtype {g.dtype}")
    if not bool(torch.isfinite(g.float()).all()):
        raise ValueError("gate contains NaN or infinite values")
    return g.to(device)


def _default_size(maps: Any, tensors: list[Tensor]) -> tuple[int, int]:
    """A LayerMaps' input size, else the finest map's (its largest height and width)."""
    if isinstance(maps, NamedMaps) and isinstance(getattr(maps, "raw", None), Mapping):
        h, w = maps.maps[maps.names[0]].shape[-2:]
        return int(h), int(w)
    return max(int(t.shape[-2]) for t in tensors), max(int(t.shape[-1]) for t in tensors)


def _check_coarsening(mode: str, levels: list[Tensor], labels: list[str]) -> None:
    """``polycam``/``recursive`` refine deep to shallow: resolutions must not grow with depth."""
    for i in range(1, len(levels)):
        (h0, w0), (h1, w1) = levels[i - 1].shape[-2:], levels[i].shape[-2:]
        if h1 > h0 or w1 > w0:
            raise ValueError(f"mode={mode!r} needs maps shallow to deep whose resolution does not grow: "
                             f"{labels[i]} is {h1}x{w1}, finer than {labels[i - 1]} ({h0}x{w0}) before it")


def _on_grid(levels: list[Tensor], size: tuple[int, int]) -> list[Tensor]:
    """Each map min-max normalised at ``size``: the deepest resized by nearest/block mean, the others bilinearly."""
    shallow = [minmax_normalize(smooth_resize(t, size)) for t in levels[:-1]]
    return [*shallow, minmax_normalize(area_resize(levels[-1], size))]


def _combine(levels: list[Tensor], mode: str, size: tuple[int, int], eps: float, alpha: float) -> Tensor:
    """The unnormalised fused (B,H,W) float64 map of a class-preserving mode."""
    if mode == "recursive":  # nearest up (or block means down) keeps each cell's mass
        return area_resize(refine(levels, mode, alpha)[-1], size)
    if mode == "polycam":  # the reference upsamples its last map bilinearly
        return smooth_resize(refine(levels, mode)[-1], size)
    grid = _on_grid(levels, size)
    if mode == "product":
        return torch.stack([torch.log(eps + (1.0 - eps) * m) for m in grid]).mean(0).exp()
    return grid[-1] * torch.stack(grid[:-1]).sum(0) if len(grid) > 1 else grid[-1]


def _fuse_class_preserving(maps: Any, mode: str, normalize: str, size: Any, gate: Any, eps: Any,
                           alpha: Any) -> Tensor:
    """:func:`fuse` for the :data:`CLASS_PRESERVING_MODES`."""
    if normalize != "minmax":
        raise ValueError(f"mode={mode!r} always min-max normalises its output; normalize={normalize!r} "
                         "is only available to the modes ('sum', 'mean', 'max', 'weighted')")
    _refuse_unused(mode, size=size, gate=gate, eps=eps, alpha=alpha)
    e = PRODUCT_EPS if eps is None else _check_fraction("eps", eps, 0.0, 1.0, open_ends=True)
    a = RECURSIVE_ALPHA if alpha is None else _check_fraction("alpha", alpha, 0.0, 1.0, open_ends=False)
    items, names = _items(maps, raw=True)
    tensors, labels = _checked(items, names, same_shape=False)
    if any(t.numel() == 0 for t in tensors):
        raise ValueError(f"maps must hold at least one image of at least one pixel, got shapes "
                         f"{[tuple(t.shape) for t in tensors]}")
    out_size = _default_size(maps, tensors) if size is None else _check_size(size)
    if gate is not None:  # the gate replaces the deepest map
        tensors = [*tensors[:-1], _check_gate(gate, tensors[0].shape[0], tensors[0].device)]
        labels = [*labels[:-1], "gate"]
    if mode in REFINEMENTS:
        _check_coarsening(mode, tensors, labels)
    out = _combine([t.to(torch.float64) for t in tensors], mode, out_size, e, a)
    return minmax_normalize(out).float()


def fuse(maps: NamedMaps | Mapping[str, Tensor] | Sequence[Tensor] | Tensor, mode: str = "sum",
         normalize: str = "minmax", weights: Sequence[float] | Tensor | Mapping[str, float] | None = None,
         *, size: int | tuple[int, int] | None = None, gate: Tensor | None = None, eps: float | None = None,
         alpha: float | None = None) -> Tensor:
    """Fuse L per-layer maps of B images into one (B,H,W) saliency map.

    Args:
        maps: a :class:`~lwcam.cam.maps.LayerMaps` (its upsampled ``.maps``; its native ``.raw``
            for the class-preserving modes), a dict ``name -> (B,H,W)``, a list of (B,H,W)
            tensors, or a (B,L,H,W) tensor, shallow to deep. All maps must be finite and, except
            for the class-preserving modes, share one shape.
        mode: ``"sum"`` (default, the paper's pixel-wise summation), ``"mean"``, ``"max"``,
            ``"weighted"``, or a class-preserving mode: ``"deep_gated"``, ``"product"``,
            ``"polycam"``, ``"recursive"`` (see the module's table).
        normalize: ``"minmax"`` (default): min-max normalise each layer map per image, combine,
            min-max normalise the result, so the output lies in [0, 1]. ``"none"``: combine the
            raw maps, no normalisation at all (not for the class-preserving modes).
        weights: for ``mode="weighted"`` only: L non-negative finite weights, not all zero: a
            1-D sequence or tensor in layer order, or, for named maps, a dict ``name -> weight``
            (a layer left out of the dict weighs 0; a name that is not a layer raises). A weight
            of 0 drops its layer, so a layer subset is a 0/1 weight vector.
        size: class-preserving modes only: the output (H, W) (or an int for H = W). Default: a
            LayerMaps' input size, else the finest map's size.
        gate: class-preserving modes only: a (B,h,w) class map that replaces the deepest of
            ``maps`` as :math:`D` / :math:`P_L` (e.g. last-layer Grad-CAM gating LayerCAM's
            shallower maps; that deepest map is then not used).
        eps: ``mode="product"`` only: the floor per map, in (0, 1); default 0.05.
        alpha: ``mode="recursive"`` only: the share of the deep map kept as it is, in [0, 1]
            (0 to 0.3 keeps the shallow maps' detail; 1 is the deep map alone); default 0.1.

    Returns:
        (B,H,W) float32 tensor on the maps' device.

    Raises:
        ValueError: unknown mode/normalize; ``weights`` missing, of the wrong length or shape,
            negative, NaN or infinite, all zero, naming unknown layers, or given for a mode that
            does not use them; ``size``, ``gate``, ``eps`` or ``alpha`` out of range, of the wrong
            shape or batch size, or given for a mode that does not use them; mismatched shapes
            (batch sizes for the class-preserving modes); NaN/inf in the maps; resolutions that
            grow with depth (``polycam``, ``recursive``).
        TypeError: ``weights`` or ``gate`` that are not real numbers.
    """
    if mode not in MODES:
        raise ValueError(f"unknown fusion mode {mode!r}; choose one of {MODES}")
    if normalize not in NORMALIZE:
        raise ValueError(f"unknown normalize {normalize!r}; choose one of {NORMALIZE}")
    if mode != "weighted" and weights is not None:
        raise ValueError(f"weights are only used by mode='weighted', not mode={mode!r}")
    if mode in CLASS_PRESERVING_MODES:
        return _fuse_class_preserving(maps, mode, normalize, size, gate, eps, alpha)
    _refuse_unused(mode, size=size, gate=gate, eps=eps, alpha=alpha)
    stack, names = _as_stack(maps)
    if stack.numel() == 0:
        raise ValueError(f"maps must hold at least one image of at least one pixel, got (B,L,H,W) {tuple(stack.shape)}")
    if normalize == "minmax":
        stack = minmax_normalize(stack)
    if mode == "sum":
        out = stack.sum(dim=1)
    elif mode == "mean":
        out = stack.mean(dim=1)
    elif mode == "max":
        out = stack.amax(dim=1)
    else:
        w = _weights(weights, names, stack.shape[1], stack.device)
        out = torch.einsum("blhw,l->bhw", stack, w)
    if normalize == "minmax":
        out = minmax_normalize(out)
    return out
