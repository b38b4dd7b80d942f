"""Grad-CAM++ (Chattopadhay et al., WACV 2018) on one layer of the white-box student."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_images, check_targets
from .._utils import eval_mode
from ._base import Targets, finish, module_device, require_module, upsample
from .gradcam import last_layer

__all__ = ["gradcampp", "layer_activations", "resolve_layer", "to_model"]

EPS = 1e-6  # added to the denominator of α, as pytorch-grad-cam does


def resolve_layer(model: nn.Module, layer: str | nn.Module, image_shape: tuple[int, ...]
                   ) -> tuple[str, nn.Module]:
    """(name, module) of ``layer``: ``"last"``, a name from ``model.named_modules()`` or a submodule."""
    modules = dict(model.named_modules())
    if isinstance(layer, str):
        name = last_layer(model, image_shape) if layer == "last" else layer
        if name not in modules:
            raise ValueError(f"unknown layer {name!r}: pass 'last', a name from model.named_modules() or a module")
        return name, modules[name]
    if isinstance(layer, nn.Module):
        for name, mod in modules.items():
            if mod is layer:
                return name, mod
        raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model")
    raise TypeError(f"layer must be 'last', a layer name or an nn.Module, got {type(layer).__name__}")


def to_model(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``images`` on the model's device, in its floating-point dtype."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else images.dtype
    return images.detach().to(module_device(model), dtype)


def layer_activations(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, module: nn.Module,
                      grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One forward (and, with ``grad``, one backward) pass in eval mode.

    Returns ``(A, ∂y/∂A or None, logits)``: the (B,K,h,w) output of ``module`` and the gradient
    of each image's target logit ``y`` with respect to it. Parameters' ``.grad`` stay untouched
    (the gradient is taken with ``torch.autograd.grad``); the hook is removed on return.
    ``targets`` are checked against the number of classes the model returns.
    """
    store: list[torch.Tensor] = []

    def hook(_m: nn.Module, _inp: object, out: object) -> object:
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise ValueError(f"the layer must output a (B,K,h,w) tensor, got {type(out).__name__}"
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
        store.append(out)
        return out.clone()  # in-place operations further on cannot alter the stored activation

    handle = module.register_forward_hook(hook)
    try:
        with eval_mode(model), torch.inference_mode(False), torch.set_grad_enabled(grad):
            x = to_model(model, images).clone().requires_grad_(grad)
            logits = model(x)
            if not store:
                raise ValueError("the layer did not run in the forward pass")
            check_targets(targets, x.shape[0], logits.shape[1])
            act = store[-1]
            idx = targets.to(logits.device).clone()  # a normal tensor even if made in inference mode
            score = logits.gather(1, idx[:, None]).sum()
            g = torch.autograd.grad(score, act, allow_unused=True)[0] if grad else None
            if grad and g is None:
                g = torch.zeros_like(act)
    finally:
        handle.remove()
    return act.detach().float(), None if g is None else g.detach().float(), logits.detach().float()


def gradcampp(
    model: nn.Module,
    images: torch.Tensor,
    targets: Targets,
    *,
    layer: str | nn.Module = "last",
) -> torch.Tensor:
    """Grad-CAM++ of one layer, upsampled to the input size.

    With ``A`` (K,h,w) the layer's activations and ``g = ∂y/∂A`` the gradient of the target
    logit ``y``, the closed form of the paper's Eq. 19 (exponential of a piecewise-linear score,
    so that higher derivatives are powers of ``g``) gives per position

    ``α_kij = g_kij² / (2 g_kij² + Σ_ab A_kab · g_kij³ + ε)`` (0 where ``g_kij = 0``),
    ``w_k = Σ_ij α_kij · ReLU(g_kij)``, ``map = ReLU(Σ_k w_k A_k)``,

    with ``ε = 1e-6``, upsampled bilinearly (``align_corners=False``). This is exactly
    pytorch-grad-cam's ``GradCAMPlusPlus`` (1.5.7), which the tests cross-check. torchcam's
    ``GradCAMpp`` (0.5.0) differs: its in-place division of α acts on a copy, so its weights are
    ``Σ_ij g² · ReLU(g)``. White-box: one forward and one backward pass on the student;
    0 black-box queries.

    Args:
        model: an ``nn.Module`` returning logits (the distilled student).
        images: ``(B,3,H,W)`` images in the model's normalised space.
        targets: the class to explain per image: an int, a sequence or a ``(B,)`` tensor.
        layer: ``"last"`` (the same default layer as :func:`~lwcam.baselines.gradcam`), or a
            layer name / module.

    Returns:
        ``(B,H,W)`` float32 non-negative maps.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> gradcampp(net, torch.rand(2, 3, 64, 64), [1, 2]).shape
        torch.Size([2, 64, 64])
    """
    model = require_module(model, "gradcampp")
    images = check_images(images, channels=3)
    b, _, h, w = images.shape
    targets = check_targets(targets, b, None)  # the class range is checked against the logits
    name, module = resolve_layer(model, layer, tuple(images.shape[1:]))
    act, g, _ = layer_activations(model, images, targets, module)
    assert g is not None
    g2 = g.pow(2)
    sum_act = act.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_act * g2 * g + EPS)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    weights = (alpha * torch.relu(g)).sum(dim=(2, 3))
    cam = torch.relu(torch.einsum("bk,bkhw->bhw", weights, act))
    if not bool(torch.isfinite(cam).all()):
        raise ValueError(f"Grad-CAM++ of layer {name!r} is not finite (a zero denominator in α)")
    out = upsample(cam.cpu(), (h, w))
    return finish(out)
