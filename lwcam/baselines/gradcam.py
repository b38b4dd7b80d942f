"""Single-layer Grad-CAM (Selvaraju et al., ICCV 2017), the usual one-layer comparison."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .._checks import check_images, check_targets
from ..cam.layerwise import LayerwiseGradCAM, auto_layers
from ..cam.maps import LayerMaps
from ._base import Targets, finish, require_module

__all__ = ["gradcam", "last_layer"]

# model -> {(C, H, W): name of its deepest auto layer}; entries go away with the model
_LAST: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], str]] = weakref.WeakKeyDictionary()


def last_layer(model: nn.Module, image_shape: tuple[int, ...]) -> str:
    """The deepest layer ``LayerwiseGradCAM(model, layers="auto")`` picks for ``(C,H,W)`` inputs.

    Found with one probe pass on a single image and remembered per model and input shape.

    Example:
        >>> import torchvision
        >>> last_layer(torchvision.models.shufflenet_v2_x0_5(num_classes=10), (3, 64, 64))
        'conv5'
    """
    cache = _LAST.setdefault(model, {})
    key = tuple(int(v) for v in image_shape)
    if key not in cache:
        c, h, w = key
        cache[key] = auto_layers(model, (h, w), in_channels=c)[-1]
    return cache[key]


def gradcam(
    model: nn.Module,
    images: torch.Tensor,
    targets: Targets,
    *,
    layer: str | nn.Module = "last",
) -> torch.Tensor:
    """Grad-CAM of one layer, upsampled to the input size.

    For the layer's activations ``A`` (K,h,w) and the target logit ``y``:
    ``α_k = mean_{h,w} ∂y/∂A_k`` and ``map = ReLU(Σ_k α_k A_k)``, upsampled bilinearly
    (``align_corners=False``). It is exactly the one-layer case of
    :class:`lwcam.LayerwiseGradCAM` (computed with ``layers=[layer]``).

    Used two ways in the benchmark:

    * on the distilled **student**'s last layer: the paper's single-layer comparison
      (white-box access to the student only, 0 black-box queries);
    * on the **teacher** itself: a white-box *oracle* that a real black-box setting does not
      allow. It is possible here only because the default black box is a model we trained
      ourselves and can open; it shows what Grad-CAM would give with full access.

    Args:
        model: an ``nn.Module`` returning logits (the student, or the teacher as an oracle).
        images: ``(B,3,H,W)`` images in the model's normalised space.
        targets: the class to explain per image: an int, a sequence or a ``(B,)`` tensor.
        layer: ``"last"`` (the deepest of the layers ``LayerwiseGradCAM(layers="auto")``
            picks at this input size, see :func:`last_layer`), or a layer name / module.

    Returns:
        ``(B,H,W)`` float32 non-negative maps.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> gradcam(net, torch.rand(2, 3, 64, 64), [1, 2]).shape, last_layer(net, (3, 64, 64))
        (torch.Size([2, 64, 64]), 'layer4')
    """
    model = require_module(model, "gradcam")
    images = check_images(images, channels=3)
    b, _, h, w = images.shape
    targets = check_targets(targets, b, None)  # the class range is checked against the logits
    if isinstance(layer, str) and layer == "last":
        layer = last_layer(model, tuple(images.shape[1:]))
    with LayerwiseGradCAM(model, layers=[layer], verbose=False) as lw:
        maps = lw(images, targets)
    assert isinstance(maps, LayerMaps)  # one weighting gives one LayerMaps
    name = maps.names[0]
    out = maps.maps[name]
    return finish(out)
