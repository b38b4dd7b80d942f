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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ._ops import minmax_normalize

__all__ = ["fuse", "minmax_normalize", "MODES", "NORMALIZE", "NamedMaps"]

MODES = ("sum", "mean", "max", "weighted")
NORMALIZE = ("minmax", "none")


@runtime_checkable
class NamedMaps(Protocol):
    """Named per-layer maps, as a :class:`~lwcam.layercam.LayerMaps` holds them."""

    names: list[str]
    maps: dict[str, Tensor]


def _as_stack(maps: Any) -> tuple[Tensor, list[str] | None]:
    """(B,L,H,W) float tensor and layer names (None when the input carries none)."""
    names: list[str] | None = None
    if isinstance(maps, NamedMaps):
        names = list(maps.names)
        items = [maps.maps[n] for n in names]
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
    tensors = [torch.as_tensor(m) for m in items]
    labels = names if names is not None else [f"#{i}" for i in range(len(tensors))]
    shape = tuple(tensors[0].shape)
    for lab, t in zip(labels, tensors, strict=True):
        if t.ndim != 3:
            raise ValueError(f"map {lab} must be (B,H,W), got shape {tuple(t.shape)}")
        if tuple(t.shape) != shape:
            raise ValueError(f"maps have mismatched shapes: {labels[0]} is {shape}, {lab} is {tuple(t.shape)} "
                             "(upsample every map to the input size first)")
        if t.is_complex():
            raise TypeError(f"map {lab} is complex")
        if not bool(torch.isfinite(t.float()).all()):
            raise ValueError(f"map {lab} contains NaN or infinite values")
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


def fuse(maps: NamedMaps | Mapping[str, Tensor] | Sequence[Tensor] | Tensor, mode: str = "sum",
         normalize: str = "minmax", weights: Sequence[float] | Tensor | Mapping[str, float] | None = None
         ) -> Tensor:
    """Fuse L per-layer maps of B images into one (B,H,W) saliency map.

    Args:
        maps: a :class:`~lwcam.layercam.LayerMaps` (its upsampled ``.maps``), a dict
            ``name -> (B,H,W)``, a list of (B,H,W) tensors, or a (B,L,H,W) tensor. All maps must
            share one shape and be finite.
        mode: ``"sum"`` (default, the paper's pixel-wise summation), ``"mean"``, ``"max"`` or
            ``"weighted"``.
        normalize: ``"minmax"`` (default): min-max normalise each layer map per image, combine,
            min-max normalise the result, so the output lies in [0, 1]. ``"none"``: combine the
            raw maps, no normalisation at all.
        weights: for ``mode="weighted"`` only: L non-negative finite weights, not all zero: a
            1-D sequence or tensor in layer order, or, for named maps, a dict ``name -> weight``
            (a layer left out of the dict weighs 0; a name that is not a layer raises). A weight
            of 0 drops its layer, so a layer subset is a 0/1 weight vector.

    Returns:
        (B,H,W) float32 tensor on the maps' device.

    Raises:
        ValueError: unknown mode/normalize; ``weights`` missing, of the wrong length or shape,
            negative, NaN or infinite, all zero, naming unknown layers, or given for a mode that
            does not use them; mismatched shapes; NaN/inf in the maps.
        TypeError: ``weights`` that are not real numbers.
    """
    if mode not in MODES:
        raise ValueError(f"unknown fusion mode {mode!r}; choose one of {MODES}")
    if normalize not in NORMALIZE:
        raise ValueError(f"unknown normalize {normalize!r}; choose one of {NORMALIZE}")
    if mode != "weighted" and weights is not None:
        raise ValueError(f"weights are only used by mode='weighted', not mode={mode!r}")
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
