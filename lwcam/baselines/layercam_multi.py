"""The LayerCAM baseline (Jiang et al., IEEE TIP 2021): LayerCAM maps of several layers, fused as torchcam does."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_images, check_targets
from .._ops import minmax_normalize
from ..cam.layerwise import LayerSpec, LayerwiseGradCAM
from ._base import Targets, finish, require_module, upsample

__all__ = ["layercam", "fuse_layercam"]

EPS = 1e-8  # in the per-layer min-max normalisation, as torchcam does


def fuse_layercam(cams: list[torch.Tensor], gamma: float = 2.0) -> torch.Tensor:
    """Fuse per-layer (B,h_l,w_l) LayerCAM maps the way torchcam's ``LayerCAM.fuse_cams`` does.

    Each map is min-max normalised per image at its own resolution,
    ``N(M) = (M − min M) / (max M − min M + ε)`` with ``ε = 1e-8``, then scaled by
    ``tanh(γ·N(M))`` (the paper's Eq. 9, ``γ = 2``), upsampled bilinearly
    (``align_corners=False``) to the largest layer resolution, and fused by an element-wise
    maximum over layers. (torchcam returns a lone map unscaled; here every map is scaled, which
    does not change how a lone map ranks pixels.)

    Returns:
        (B,h,w) maps in [0, tanh(γ)] at the largest resolution among ``cams``.

    Example:
        >>> a = torch.tensor([[[0., 1.], [2., 4.]]])
        >>> b = torch.zeros(1, 4, 4)
        >>> out = fuse_layercam([a, b])
        >>> out.shape, round(float(out.max()), 4), round(math.tanh(2.0), 4)
        (torch.Size([1, 4, 4]), 0.964, 0.964)
    """
    if not cams:
        raise ValueError("cams is empty: nothing to fuse")
    shape = tuple(max(c.shape[d] for c in cams) for d in (-2, -1))
    fused = None
    for cam in cams:
        scaled = torch.tanh(gamma * minmax_normalize(cam, eps=EPS))  # finite even where a range overflows
        up = F.interpolate(scaled[:, None], size=shape, mode="bilinear", align_corners=False)[:, 0]
        fused = up if fused is None else torch.maximum(fused, up)
    assert fused is not None
    return fused


def layercam(
    model: nn.Module,
    images: torch.Tensor,
    targets: Targets,
    *,
    layers: LayerSpec = "auto",
    gamma: float = 2.0,
) -> torch.Tensor:
    """LayerCAM on the same layers as lwcam, fused by scaling and an element-wise maximum.

    Each layer's map is ``ReLU(Σ_k ReLU(∂y/∂A_k) ⊙ A_k)`` at the layer's own resolution,
    from :class:`lwcam.LayerwiseGradCAM` with ``weighting="layercam"`` (one forward and one
    backward pass for all layers). The maps are fused as torchcam's ``LayerCAM.fuse_cams``
    does (see :func:`fuse_layercam`): per-layer min-max normalisation, ``tanh(γ·map)``,
    bilinear upsampling to the largest layer resolution, element-wise maximum. The fused map
    is then upsampled bilinearly (``align_corners=False``) to the input size. White-box: uses
    the student's gradients; 0 black-box queries.

    Args:
        model: an ``nn.Module`` returning logits (the distilled student).
        images: ``(B,3,H,W)`` images in the model's normalised space.
        targets: the class to explain per image: an int, a sequence or a ``(B,)`` tensor.
        layers: ``"auto"`` (the layers lwcam uses) or a sequence of layer names / modules.
        gamma: the scaling factor γ of ``tanh(γ·map)``, positive (2 in the paper and torchcam).

    Returns:
        ``(B,H,W)`` float32 maps in [0, tanh(γ)].

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> layercam(net, torch.rand(2, 3, 64, 64), [1, 2]).shape
        torch.Size([2, 64, 64])
    """
    model = require_module(model, "layercam")
    images = check_images(images, channels=3)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")
    b, _, h, w = images.shape
    targets = check_targets(targets, b, None)  # the class range is checked against the logits
    with LayerwiseGradCAM(model, layers=layers, weighting="layercam", verbose=False) as lw:
        lm = lw(images, targets)
    fused = fuse_layercam([lm.raw[n] for n in lm.names], float(gamma))
    out = upsample(fused.cpu(), (h, w))
    return finish(out)
