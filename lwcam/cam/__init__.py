"""Class activation maps of a white-box model: every layer's map in one pass, the layers to use, and their fusion.

* :mod:`~lwcam.cam.layerwise`: :class:`LayerwiseGradCAM`, the engine (hooks, one forward and one backward
  pass, every weighting at once).
* :mod:`~lwcam.cam.maps`: one layer's map from its activations and gradients, and :class:`LayerMaps`.
* :mod:`~lwcam.cam.locate`: which layers ``layers="auto"`` picks.
* :mod:`~lwcam.cam.fusion` and :mod:`~lwcam.cam.recursive`: the layer maps fused into one map.
* :mod:`~lwcam.cam.batched`: many images batch by batch, and lwcam's explanation for the method registry.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lwcam.cam import LayerwiseGradCAM
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ...                     nn.Linear(4, 2))
    >>> with LayerwiseGradCAM(net, verbose=False) as cam:
    ...     maps = cam(torch.rand(1, 3, 8, 8), targets=1)
    >>> tuple(maps.fuse().shape)
    (1, 8, 8)
"""

from __future__ import annotations

from .batched import explain_lwcam, layer_maps_all_weightings, layer_maps_batched, raw_layer_maps
from .fusion import CLASS_PRESERVING_MODES, MODES, fuse, minmax_normalize
from .layerwise import LayerwiseGradCAM, auto_layers
from .maps import WEIGHTINGS, ClassifierOutputTarget, LayerMaps, upsample_layers

__all__ = ["LayerwiseGradCAM", "LayerMaps", "ClassifierOutputTarget", "WEIGHTINGS", "auto_layers", "upsample_layers",
           "layer_maps_batched", "layer_maps_all_weightings", "raw_layer_maps", "explain_lwcam",
           "fuse", "minmax_normalize", "MODES", "CLASS_PRESERVING_MODES"]
