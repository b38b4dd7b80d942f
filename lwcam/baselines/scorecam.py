"""Score-CAM (Wang et al., CVPR-W 2020) on one layer of the white-box student."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_bool, check_images, check_targets
from .._ops import minmax_normalize
from .._utils import eval_mode
from ..fast import accelerate
from ._base import Targets, finish, require_module, upsample
from .gradcampp import layer_activations, resolve_layer, to_model

__all__ = ["scorecam"]

EPS = 1e-8  # in the per-channel min-max normalisation, as torchcam does


def _channel_masks(act: torch.Tensor) -> torch.Tensor:
    """Per-channel min-max normalised activations ``(A - min) / (max - min + ε)``, (B,K,h,w).

    :func:`~lwcam._ops.minmax_normalize` with ``eps=ε``, which keeps activations whose range
    overflows the dtype finite.
    """
    return minmax_normalize(act, eps=EPS)


def _masked_scores(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, masks: torch.Tensor,
                   targets: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B,K) target logits of ``images[b] ⊙ upsample(masks[b,k])``, in batches of masked images."""
    b, k = masks.shape[:2]
    size = tuple(images.shape[-2:])
    flat = masks.reshape(b * k, 1, *masks.shape[2:]).to(images)
    owner = torch.arange(b, device=images.device).repeat_interleave(k)
    tgt = targets.to(images.device)
    scores = torch.empty(b * k, device=images.device)
    with torch.no_grad():
        for start in range(0, b * k, batch_size):
            idx = slice(start, min(start + batch_size, b * k))
            m = F.interpolate(flat[idx], size=size, mode="bilinear", align_corners=False)
            logits = forward(images[owner[idx]] * m)
            scores[idx] = logits.gather(1, tgt[owner[idx]][:, None].to(logits.device))[:, 0].to(scores)
    return scores.reshape(b, k)


def scorecam(
    model: nn.Module,
    images: torch.Tensor,
    targets: Targets,
    *,
    layer: str | nn.Module = "last",
    batch_size: int = 256,
    fast: bool = False,
) -> torch.Tensor:
    """Score-CAM of one layer, upsampled to the input size.

    With ``A`` (K,h,w) the layer's activations on the image ``x``, each channel becomes a mask
    ``M_k = U((A_k − min A_k) / (max A_k − min A_k + ε))`` (min-max normalised at the layer's
    resolution, ``ε = 1e-8``, then ``U`` = bilinear upsampling to the input size,
    ``align_corners=False``). With ``y(·)`` the target logit,

    ``w = softmax_k( y(x ⊙ M_k) − y(x_b) )``, ``map = ReLU(Σ_k w_k A_k)``,

    upsampled bilinearly to the input size. This is torchcam's ``ScoreCAM`` (0.5.0), which the
    tests cross-check, and pytorch-grad-cam's up to its mask upsampling (``align_corners=True``,
    normalised after upsampling). The baseline image ``x_b`` of the paper's channel-wise
    increase of confidence does not matter here: its score is one constant per image and the
    softmax over channels cancels it (torchcam uses ``x_b = x``, pytorch-grad-cam none). The
    authors' code instead weighs by each masked input's softmax *probability* of the target
    class, without a softmax over channels; we follow the two libraries.

    White-box: one forward pass, then ``K`` forward passes per image on masked inputs, sent
    ``batch_size`` at a time; 0 black-box queries.

    Args:
        model: an ``nn.Module`` returning logits (the distilled student).
        images: ``(B,3,H,W)`` images in the model's normalised space.
        targets: the class to explain per image: an int, a sequence or a ``(B,)`` tensor.
        layer: ``"last"`` (the same default layer as :func:`~lwcam.baselines.gradcam`), or a
            layer name / module.
        batch_size: masked images per forward pass.
        fast: run the masked forward passes on :func:`lwcam.fast.accelerate` (set up once per model and
            weights in a process, its set-up time part of this call's; logits equal eager's within 1e-5 in
            probability); the first forward pass, which gives the activations, stays eager.

    Returns:
        ``(B,H,W)`` float32 non-negative maps.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> scorecam(net, torch.rand(2, 3, 32, 32), [1, 2], layer="layer2").shape  # 128 forwards per image
        torch.Size([2, 32, 32])
    """
    model = require_module(model, "scorecam")
    images = check_images(images, channels=3)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_bool(fast, "fast")
    b, _, h, w = images.shape
    targets = check_targets(targets, b, None)  # the class range is checked against the logits
    name, module = resolve_layer(model, layer, tuple(images.shape[1:]))
    act, _, _ = layer_activations(model, images, targets, module, grad=False)
    if fast:
        forward = accelerate(model, tuple(images.shape[1:]), reuse=True)
        scores = _masked_scores(forward, to_model(model, images), _channel_masks(act), targets, int(batch_size))
    else:
        with eval_mode(model):
            scores = _masked_scores(model, to_model(model, images), _channel_masks(act), targets, int(batch_size))
    weights = torch.softmax(scores.float(), dim=1)
    cam = torch.relu(torch.einsum("bk,bkhw->bhw", weights.to(act), act))
    out = upsample(cam.cpu(), (h, w))
    return finish(out)
