"""One layer's class activation map from its activations and gradients, and the maps of many layers.

One function holds the formula of every weighting (``gradcam``, ``layercam``, ``hirescam``; see
:mod:`lwcam.cam.layerwise` for the equations); :class:`LayerMaps` holds one batch's maps of every layer,
raw and upsampled to the input size, and fuses them (:func:`lwcam.cam.fusion.fuse`);
:class:`ClassifierOutputTarget` is the default target, one class's logit.

Example:
    >>> import torch
    >>> ClassifierOutputTarget(1)(torch.tensor([[0.5, 2.0], [1.0, -1.0]])).tolist()
    [2.0, -1.0]
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .fusion import fuse

__all__ = ["LayerMaps", "ClassifierOutputTarget", "WEIGHTINGS", "upsample_layers"]

WEIGHTINGS = ("gradcam", "layercam", "hirescam")


TargetSpec = (None | int | Sequence[int] | Tensor | Callable[[Tensor], Tensor]
              | Sequence[Callable[[Tensor], Tensor]])


class ClassifierOutputTarget:
    """Target score = the logit of one class, for every sample.

    Works on a batch of logits (B,C) (returns (B,)) and on one sample's logits (C,) (returns a
    scalar), so it can be passed as ``targets`` itself or as one element of a per-sample list.

    Args:
        category: the class index.
    """

    category: int

    def __init__(self, category: int) -> None:
        if isinstance(category, bool) or not isinstance(category, numbers.Integral):
            raise TypeError(f"category must be an int, got {category!r}")
        self.category = int(category)

    def __call__(self, logits: Tensor) -> Tensor:
        if logits.ndim == 1:
            return logits[self.category]
        return logits[:, self.category]

    def __repr__(self) -> str:
        return f"ClassifierOutputTarget({self.category})"


@dataclass
class LayerMaps:
    """Per-layer Grad-CAM (or LayerCAM) maps of one batch, as returned by :class:`LayerwiseGradCAM`.

    All tensors are detached and live on the model's device.

    Attributes:
        names: layer names (as in ``model.named_modules()``), shallow to deep.
        raw: ``name -> (B,h,w)`` the map at the layer's own resolution (non-negative).
        maps: ``name -> (B,H,W)`` the raw maps upsampled to the input size (bilinear,
            ``align_corners=False``).
        targets: (B,) long, the explained class per image; ``-1`` where the target was given
            as a callable that is not a :class:`ClassifierOutputTarget`.
        logits: (B,C) the model's output logits.
        probs: (B,) the model's softmax probability of the target class (NaN where the target
            is ``-1``).
        student_pred: (B,) long, the model's own argmax.
        weighting: ``"gradcam"``, ``"layercam"`` or ``"hirescam"``, how the maps were weighted.
    """

    names: list[str]
    raw: dict[str, Tensor]
    maps: dict[str, Tensor]
    targets: Tensor
    logits: Tensor
    probs: Tensor
    student_pred: Tensor
    weighting: str = "gradcam"

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the input images (and of every map in :attr:`maps`)."""
        h, w = self.maps[self.names[0]].shape[-2:]
        return int(h), int(w)

    @property
    def resolutions(self) -> dict[str, tuple[int, int]]:
        """``name -> (h, w)``, each layer's native resolution."""
        return {n: (int(self.raw[n].shape[-2]), int(self.raw[n].shape[-1])) for n in self.names}

    def fuse(self, mode: str = "sum", normalize: str = "minmax",
             weights: Sequence[float] | Tensor | dict[str, float] | None = None, *,
             size: int | tuple[int, int] | None = None, gate: Tensor | None = None, eps: float | None = None,
             alpha: float | None = None) -> Tensor:
        """Fuse the maps into one (B,H,W) saliency map; see :func:`lwcam.cam.fusion.fuse`.

        The sums and the max fuse the upsampled :attr:`maps`; the class-preserving modes
        (``"deep_gated"``, ``"product"``, ``"polycam"``, ``"recursive"``) the native :attr:`raw`
        maps, output at the input size unless ``size`` says otherwise.
        """
        return fuse(self, mode=mode, normalize=normalize, weights=weights, size=size, gate=gate, eps=eps,
                    alpha=alpha)

    def stack(self) -> Tensor:
        """The upsampled maps as one (B,L,H,W) tensor, layers in :attr:`names` order."""
        return torch.stack([self.maps[n] for n in self.names], dim=1)

    def agrees_with(self, labels: int | Sequence[int] | Tensor) -> Tensor:
        """Bool (B,): whether the model's argmax equals ``labels`` (e.g. the black box's labels)."""
        lab = torch.as_tensor(labels, device=self.student_pred.device)
        if lab.is_floating_point() or lab.dtype == torch.bool:
            raise TypeError(f"labels must be integers, got dtype {lab.dtype}")
        lab = lab.long()
        if lab.ndim == 0:
            lab = lab.expand_as(self.student_pred)
        if lab.shape != self.student_pred.shape:
            raise ValueError(f"labels has shape {tuple(lab.shape)}, expected ({len(self)},)")
        return self.student_pred == lab

    def cpu(self) -> LayerMaps:
        """A copy with every tensor moved to the CPU."""
        return LayerMaps(
            names=list(self.names),
            raw={n: t.cpu() for n, t in self.raw.items()},
            maps={n: t.cpu() for n, t in self.maps.items()},
            targets=self.targets.cpu(), logits=self.logits.cpu(), probs=self.probs.cpu(),
            student_pred=self.student_pred.cpu(), weighting=self.weighting,
        )


def _check_weighting(weighting: Any) -> tuple[tuple[str, ...], bool]:
    """(the weightings asked for, whether a single name was given)."""
    if isinstance(weighting, str):
        items, single = [weighting], True
    elif isinstance(weighting, (tuple, list)):
        items, single = list(weighting), False
        if not items:
            raise ValueError(f"weighting is an empty {type(weighting).__name__}; choose from {WEIGHTINGS}")
    else:
        raise TypeError(f"weighting must be one of {WEIGHTINGS} or a tuple/list of them, "
                        f"got {type(weighting).__name__}")
    for w in items:
        if not isinstance(w, str) or w not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {w!r}; choose from {WEIGHTINGS}")
    if len(set(items)) != len(items):
        raise ValueError(f"weighting lists a name twice: {items}")
    return tuple(items), single


def _layer_cam(act: Tensor, grad: Tensor, weighting: str) -> Tensor:
    """The (B,h,w) map of one layer from its activations and gradients (both (B,K,h,w))."""
    if weighting == "gradcam":
        alpha = grad.mean(dim=(2, 3))
        return torch.relu(torch.einsum("bk,bkhw->bhw", alpha, act))
    if weighting == "hirescam":
        return torch.relu((grad * act).sum(dim=1))
    return torch.relu((torch.relu(grad) * act).sum(dim=1))


def _layer_maps(names: list[str], acts: Sequence[Tensor], grads: Sequence[Tensor | None],
                size: tuple[int, int], weighting: str, warn: bool = True
                ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``raw`` (native resolution) and ``maps`` (upsampled to ``size``) of every layer."""
    raw: dict[str, Tensor] = {}
    maps: dict[str, Tensor] = {}
    for name, act, grad in zip(names, acts, grads, strict=True):
        a = act.detach().float()
        if grad is None:
            if warn:
                warnings.warn(f"the target score does not depend on layer {name!r}; its map is zero",
                              stacklevel=3)
            cam = a.new_zeros(a.shape[0], a.shape[2], a.shape[3])
        else:
            cam = _layer_cam(a, grad.float(), weighting)
        if not torch.isfinite(cam).all():
            raise ValueError(f"layer {name!r} produced non-finite {weighting} values "
                             "(non-finite activations or gradients in the model)")
        raw[name] = cam
        maps[name] = _upsample(cam, size)
    return raw, maps


def _upsample(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """A (B,h,w) map at the input size: bilinear, ``align_corners=False``, negatives from overshoot cut to 0."""
    return F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].clamp_min(0.0)


def upsample_layers(raw: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
    """Native-resolution layer maps (:func:`lwcam.cam.batched.raw_layer_maps`) as the (B,L,H,W) stack of upsampled
    maps that :func:`lwcam.cam.batched.layer_maps_all_weightings` returns, so one pass serves both the sums and
    the class-preserving fusions.

    Example:
        >>> upsample_layers([torch.ones(2, 4, 4), torch.zeros(2, 2, 2)], (8, 8)).shape
        torch.Size([2, 2, 8, 8])
    """
    return torch.stack([_upsample(m, size) for m in raw], dim=1)


def _category(target: Any) -> int | None:
    """The class index of a class-logit target callable (ours or pytorch-grad-cam's), else None."""
    if isinstance(target, (Tensor, numbers.Number)) or not callable(target):
        return None
    cat = getattr(target, "category", None)
    if isinstance(cat, numbers.Integral) and not isinstance(cat, bool):
        return int(cat)
    return None
