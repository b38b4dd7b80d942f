"""Layer maps of many images, batch by batch: every weighting from one pass, and lwcam's fused explanation.

:func:`layer_maps_all_weightings` and :func:`raw_layer_maps` run :class:`~lwcam.cam.layerwise.LayerwiseGradCAM`
over chunks of images and keep each layer's map at its own resolution; :func:`layer_maps_batched` stacks the
upsampled maps; :func:`explain_lwcam` is the method lwcam adds to the registry of :mod:`lwcam.baselines`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import track
from .fusion import CLASS_PRESERVING_MODES, fuse
from .layerwise import LayerwiseGradCAM
from .maps import LayerMaps

__all__ = ["layer_maps_batched", "layer_maps_all_weightings", "raw_layer_maps", "explain_lwcam"]


# ---------------------------------------------------------------------- many images
def _chunks(student: nn.Module, images: Tensor, targets: Tensor, weightings: Sequence[str], batch_size: int,
            layers: Any, progress: bool | None) -> Iterator[dict[str, LayerMaps]]:
    """weighting -> :class:`LayerMaps` per chunk of ``batch_size`` images, one forward and one backward pass each."""
    with LayerwiseGradCAM(student, layers=layers, weighting=tuple(weightings), verbose=False) as cam:
        starts = range(0, len(images), batch_size)
        for s in track(starts, total=len(starts), desc="layer-wise CAM", enabled=progress):
            by_weighting = cam(images[s : s + batch_size], targets[s : s + batch_size])
            assert isinstance(by_weighting, dict)  # a tuple of weightings gives one LayerMaps each
            yield by_weighting


def layer_maps_all_weightings(student: nn.Module, images: Tensor, targets: Tensor,
                              weightings: Sequence[str] = ("gradcam", "layercam"), *, batch_size: int = 64,
                              layers: Any = "auto", progress: bool | None = None
                              ) -> tuple[list[str], dict[str, Tensor], dict[str, tuple[int, int]]]:
    """Per-layer maps of several weightings from the same passes: ``(names, weighting -> (B,L,H,W), resolutions)``.

    One forward and one backward pass per chunk of ``batch_size`` images, all layers at once; the
    stacks are on the CPU.
    """
    parts: dict[str, list[Tensor]] = {w: [] for w in weightings}
    names: list[str] = []
    resolutions: dict[str, tuple[int, int]] = {}
    for by_weighting in _chunks(student, images, targets, weightings, batch_size, layers, progress):
        for w, lm in by_weighting.items():
            names, resolutions = lm.names, lm.resolutions
            parts[w].append(lm.stack().cpu())
    return names, {w: torch.cat(p) for w, p in parts.items()}, resolutions


def raw_layer_maps(student: nn.Module, images: Tensor, targets: Tensor,
                   weightings: Sequence[str] = ("gradcam", "layercam"), *, batch_size: int = 64,
                   layers: Any = "auto", progress: bool | None = None) -> tuple[list[str], dict[str, list[Tensor]]]:
    """Per-layer maps at each layer's own resolution: ``(names, weighting -> [(B,h_l,w_l) shallow to deep])``.

    The same passes as :func:`layer_maps_all_weightings` (one forward and one backward pass per
    chunk, every weighting and layer at once), without the upsampling, for the class-preserving
    fusions (:func:`lwcam.cam.fusion.fuse` with ``size=images.shape[-2:]``). Tensors are on the CPU.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        ...                     nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                     nn.Linear(4, 3))
        >>> x, t = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1])
        >>> names, raw = raw_layer_maps(net, x, t, ("gradcam", "hirescam"), batch_size=2)
        >>> names, [tuple(m.shape) for m in raw["hirescam"]]
        (['1', '3'], [(5, 16, 16), (5, 8, 8)])
        >>> tuple(fuse(raw["hirescam"], mode="recursive", size=(16, 16), gate=raw["gradcam"][-1]).shape)
        (5, 16, 16)
    """
    parts: dict[str, list[dict[str, Tensor]]] = {w: [] for w in weightings}
    names: list[str] = []
    for by_weighting in _chunks(student, images, targets, weightings, batch_size, layers, progress):
        for w, lm in by_weighting.items():
            names = lm.names
            parts[w].append({n: lm.raw[n].cpu() for n in names})
    return names, {w: [torch.cat([c[n] for c in chunks]) for n in names] for w, chunks in parts.items()}


def layer_maps_batched(student: nn.Module, images: Tensor, targets: Tensor, *, batch_size: int = 64,
                       layers: Any = "auto", weighting: str = "gradcam", progress: bool | None = None
                       ) -> tuple[list[str], Tensor, dict[str, tuple[int, int]]]:
    """Upsampled per-layer maps for many images: ``(names, (B,L,H,W), native resolutions)``.

    ``weighting`` is ``"gradcam"`` or ``"layercam"`` (see :class:`LayerwiseGradCAM`).
    """
    names, stacks, resolutions = layer_maps_all_weightings(student, images, targets, (weighting,),
                                                           batch_size=batch_size, layers=layers,
                                                           progress=progress)
    return names, stacks[weighting], resolutions


def explain_lwcam(student: nn.Module, images: Tensor, targets: Tensor, *, batch_size: int = 64,
                  layers: Any = "auto", weighting: str = "gradcam", mode: str = "sum", normalize: str = "minmax",
                  weights: Sequence[float] | Tensor | Mapping[str, float] | None = None,
                  gate_weighting: str | None = None, eps: float | None = None, alpha: float | None = None
                  ) -> Tensor:
    """lwcam's saliency: the fused layer-wise CAM of the student, (B,H,W) on the CPU.

    The defaults are ``lwcam (paper)``: Grad-CAM per layer, per-layer min-max, sum, min-max
    (:func:`lwcam.cam.fusion.fuse`). ``weights`` given as a dict ``layer -> weight`` weigh a layer left
    out 0. A class-preserving ``mode`` (:data:`lwcam.cam.fusion.CLASS_PRESERVING_MODES`) fuses the maps
    at their own resolutions (:func:`raw_layer_maps`) into the input size; ``gate_weighting`` then
    names the weighting whose deepest map is the gate (e.g. ``"gradcam"`` under LayerCAM maps,
    from the same passes), and ``eps``/``alpha`` go to :func:`~lwcam.cam.fusion.fuse`.
    """
    if mode in CLASS_PRESERVING_MODES:
        return _explain_class_preserving(student, images, targets, batch_size, layers, weighting, mode, normalize,
                                         weights, gate_weighting, eps, alpha)
    if gate_weighting is not None:
        raise ValueError(f"gate_weighting is only used by the class-preserving modes {CLASS_PRESERVING_MODES}, "
                         f"not mode={mode!r}")
    names, stack, _ = layer_maps_batched(student, images, targets, batch_size=batch_size, layers=layers,
                                         weighting=weighting)
    w: Sequence[float] | Tensor | None
    if isinstance(weights, Mapping):
        w = [float(weights.get(n, 0.0)) for n in names]
    else:
        w = weights
    return fuse(stack, mode=mode, normalize=normalize, weights=w)


def _explain_class_preserving(student: nn.Module, images: Tensor, targets: Tensor, batch_size: int, layers: Any,
                              weighting: str, mode: str, normalize: str, weights: Any, gate_weighting: str | None,
                              eps: float | None, alpha: float | None) -> Tensor:
    """:func:`explain_lwcam` for a class-preserving mode: native-resolution maps, gated, fused at the input size."""
    # a dry run on one 1x1 map refuses bad options before the passes
    fuse(torch.zeros(1, 1, 1, 1), mode=mode, normalize=normalize, weights=weights, eps=eps, alpha=alpha)
    wanted = (weighting,) if gate_weighting in (None, weighting) else (weighting, gate_weighting)
    _, raw = raw_layer_maps(student, images, targets, wanted, batch_size=batch_size, layers=layers)
    gate = None if gate_weighting is None else raw[gate_weighting][-1]
    return fuse(raw[weighting], mode=mode, normalize=normalize, weights=weights,
                size=(int(images.shape[-2]), int(images.shape[-1])), gate=gate, eps=eps, alpha=alpha)
