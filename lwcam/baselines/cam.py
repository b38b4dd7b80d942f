"""CAM: class activation mapping (Zhou et al., CVPR 2016) for networks ending in GAP + one linear layer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._checks import check_images, check_targets
from .._utils import eval_mode
from ._base import Targets, finish, module_device, require_module, upsample

__all__ = ["cam", "find_cam_head"]

_HEAD_ATTRS = ("fc", "classifier", "head", "heads", "last_linear")
_PASS_THROUGH = (nn.Dropout, nn.Identity, nn.Flatten)
_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d)


def _resolve(model: nn.Module, ref: str | nn.Module, what: str) -> tuple[str, nn.Module]:
    modules = dict(model.named_modules())
    if isinstance(ref, str):
        if ref not in modules:
            raise ValueError(f"{what} {ref!r} is not a submodule of {type(model).__name__}")
        return ref, modules[ref]
    for name, mod in modules.items():
        if mod is ref:
            return name, mod
    raise ValueError(f"the {what} module given is not part of {type(model).__name__}")


def _find_fc(model: nn.Module) -> tuple[str, nn.Linear]:
    """The final linear layer, refusing heads that do more than GAP -> (dropout) -> Linear."""
    head_name: str = ""
    head: nn.Module | None = None
    for attr in _HEAD_ATTRS:
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Module):
            head_name, head = attr, sub
            break
    if head is None:  # fall back on the last Linear registered
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not found:
            raise ValueError(f"{type(model).__name__} has no nn.Linear classifier: CAM needs a GAP + linear head")
        return found[-1]
    if isinstance(head, nn.Linear):
        return head_name, head
    if isinstance(head, nn.Sequential):
        layers = list(head.named_children())
        linears = [(n, m) for n, m in layers if isinstance(m, nn.Linear)]
        others = [m for _, m in layers if not isinstance(m, (nn.Linear, *_PASS_THROUGH))]
        if len(linears) == 1 and not others and isinstance(layers[-1][1], nn.Linear):
            return f"{head_name}.{linears[0][0]}", linears[0][1]
        raise ValueError(
            f"CAM does not apply to {type(model).__name__}: its head is not global average pooling + one "
            f"linear layer (model.{head_name} = {' -> '.join(type(m).__name__ for _, m in layers)}); "
            "use gradcam instead, or pass features= and fc= explicitly"
        )
    raise ValueError(
        f"CAM does not apply to {type(model).__name__}: cannot read model.{head_name} "
        f"({type(head).__name__}) as a linear layer; pass fc= explicitly"
    )


def find_cam_head(model: nn.Module, images: torch.Tensor, features: str | nn.Module | None = None,
                  fc: str | nn.Module | None = None) -> tuple[str, str]:
    """Names ``(features, fc)`` of the feature layer and final linear layer CAM uses for ``model``.

    The final linear layer is ``model.fc`` / ``model.classifier`` (a Linear, or a Sequential of
    dropouts ending in one Linear) / ``model.head``, else the last ``nn.Linear``. The feature
    layer is the last module run before it whose output ``A`` (B,K,h,w) satisfies
    ``mean_{h,w} A = input of the linear layer``: this checks on ``images`` that the head
    really is global average pooling + linear, so that CAM's identity holds.

    Raises:
        ValueError: the head is not GAP + linear (e.g. MobileNetV3: Linear-Hardswish-Dropout-Linear).

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> find_cam_head(net, torch.rand(1, 3, 64, 64))
        ('layer4', 'fc')
    """
    model = require_module(model, "cam")
    _, feat_name, fc_name, _ = _run(model, check_images(images, channels=3), features, fc)
    return feat_name, fc_name


def _resolve_fc(model: nn.Module, fc: str | nn.Module | None) -> tuple[str, nn.Linear]:
    """The final linear layer: ``fc`` when given (a name or a module), else found by :func:`_find_fc`."""
    if fc is None:
        return _find_fc(model)
    fc_name, fc_mod = _resolve(model, fc, "fc")
    if not isinstance(fc_mod, nn.Linear):
        raise ValueError(f"fc must be an nn.Linear, got {type(fc_mod).__name__} at {fc_name!r}")
    return fc_name, fc_mod


def _record(model: nn.Module, images: torch.Tensor, fc_mod: nn.Linear, feat_name: str | None
            ) -> tuple[list[tuple[str, torch.Tensor]], list[torch.Tensor]]:
    """One forward pass: every 4-D output with ``fc``'s input width until ``fc`` runs, and ``fc``'s input."""
    k = fc_mod.in_features
    records: list[tuple[str, torch.Tensor]] = []
    fc_input: list[torch.Tensor] = []
    handles = []

    def make_hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_m: nn.Module, _inp: object, out: object) -> None:
            if fc_input or not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[1] != k:
                return
            records.append((name, out.detach()))

        return hook

    def fc_hook(_m: nn.Module, inp: tuple) -> None:
        if not fc_input:
            fc_input.append(inp[0].detach())

    try:
        for name, mod in model.named_modules():
            if mod is model or isinstance(mod, _POOLS) or (feat_name is not None and name != feat_name):
                continue
            handles.append(mod.register_forward_hook(make_hook(name)))
        handles.append(fc_mod.register_forward_pre_hook(fc_hook))
        with eval_mode(model), torch.no_grad():
            model(images.to(module_device(model)))
    finally:
        for hd in handles:
            hd.remove()
    return records, fc_input


def _run(model: nn.Module, images: torch.Tensor, features: str | nn.Module | None,
         fc: str | nn.Module | None) -> tuple[torch.Tensor, str, str, nn.Linear]:
    """One forward pass: the feature map A, its layer's name, the final linear layer's name and module."""
    fc_name, fc_mod = _resolve_fc(model, fc)
    k = fc_mod.in_features
    feat_name = None if features is None else _resolve(model, features, "features")[0]
    records, fc_input = _record(model, images, fc_mod, feat_name)
    if not fc_input:
        raise ValueError(f"the linear layer {fc_name!r} was not called in the forward pass")
    pooled = fc_input[0].reshape(fc_input[0].shape[0], -1)
    if pooled.shape[1] != k:
        raise ValueError(f"CAM does not apply: the input of {fc_name!r} is not a pooled (B,{k}) feature vector")
    for name, a in reversed(records):
        gap = a.mean(dim=(2, 3))
        if torch.allclose(gap, pooled, rtol=1e-4, atol=1e-5 * (1 + pooled.abs().max().item())):
            return a, name, fc_name, fc_mod
    where = f"the features {feat_name!r}" if feat_name is not None else "no earlier layer"
    raise ValueError(
        f"CAM does not apply to {type(model).__name__}: the input of {fc_name!r} is not the global average "
        f"pool of {where} ({k} channels); the head is not GAP + linear"
    )


def cam(
    model: nn.Module,
    images: torch.Tensor,
    targets: Targets,
    *,
    features: str | nn.Module | None = None,
    fc: str | nn.Module | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """Class activation map of a network whose head is global average pooling + linear.

    With ``A`` (K,h,w) the last convolutional feature map and ``w_{c,k}`` the final linear
    layer's weights, ``M_c = Σ_k w_{c,k} A_k``; the class logit is ``mean(M_c) + b_c``. The
    map is upsampled bilinearly (``align_corners=False``) to the input size. It is returned
    unrectified and unnormalised, as in the paper (it ranks pixels the same either way);
    ``relu=True`` clips negative evidence, and :func:`lwcam.baselines.minmax` scales a map
    to [0,1] for display.

    The layers are found automatically for ResNet, ShuffleNetV2, RegNet, MobileNetV2,
    EfficientNet and similar (see :func:`find_cam_head`), and the GAP identity is checked
    on the images themselves. Heads with hidden layers (MobileNetV3, VGG, AlexNet) raise a
    ``ValueError``. White-box: needs the module's weights; 0 black-box queries.

    Args:
        model: an ``nn.Module`` with a GAP + linear head (e.g. the distilled student).
        images: ``(B,3,H,W)`` images in the model's normalised space.
        targets: the class to explain per image: an int, a sequence or a ``(B,)`` tensor.
        features: the feature layer (name or module) to use instead of the detected one.
        fc: the final linear layer (name or module) to use instead of the detected one.
        relu: apply a ReLU to the map.

    Returns:
        ``(B,H,W)`` float32 maps in logit units.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
        >>> cam(net, torch.rand(2, 3, 64, 64), [3, 7]).shape
        torch.Size([2, 64, 64])
    """
    model = require_module(model, "cam")
    images = check_images(images, channels=3)
    b, _, h, w = images.shape
    fc_name, fc_mod = _resolve_fc(model, fc)
    targets = check_targets(targets, b, fc_mod.out_features)
    a, feat_name, fc_name, fc_mod = _run(model, images, features, fc_mod)
    weights = fc_mod.weight.detach()[targets.to(fc_mod.weight.device)]  # (B,K)
    maps = torch.einsum("bk,bkhw->bhw", weights.to(a), a)
    if relu:
        maps = maps.clamp_min(0)
    maps = upsample(maps.float().cpu(), (h, w))
    return finish(maps)
