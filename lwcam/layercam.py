"""Grad-CAM (or LayerCAM) on every layer of a white-box model, from one forward and one backward pass.

For a layer with activations ``A`` of shape (B,K,h,w) and the target score ``y`` (the
*logit* of the target class, before softmax), Grad-CAM (``weighting="gradcam"``, the default) is

.. math::

    \\alpha_k = \\frac{1}{hw} \\sum_{i,j} \\frac{\\partial y}{\\partial A_{k,i,j}}, \\qquad
    M = \\mathrm{ReLU}\\Big(\\sum_k \\alpha_k A_k\\Big) \\in \\mathbb{R}^{h \\times w},

and LayerCAM (``weighting="layercam"``, Jiang et al., IEEE TIP 2021) weighs every position by
its own positive gradient, element-wise:

.. math::

    M = \\mathrm{ReLU}\\Big(\\sum_k \\mathrm{ReLU}\\Big(\\frac{\\partial y}{\\partial A_k}\\Big)
    \\odot A_k\\Big),

and HiResCAM (``weighting="hirescam"``, Draelos & Carin 2020) keeps the gradient's sign,
element-wise (gradient times activation summed over channels, each position's first-order
contribution to ``y``):

.. math::

    M = \\mathrm{ReLU}\\Big(\\sum_k \\frac{\\partial y}{\\partial A_k} \\odot A_k\\Big).

:class:`LayerwiseGradCAM` computes ``M`` for all selected layers at once. Forward hooks keep
the layer outputs in the autograd graph; the selected logits are summed over the batch and
``torch.autograd.grad`` differentiates that sum with respect to every layer output in a single
backward pass. Samples do not interact in ``eval()`` mode, so the gradient of the sum with
respect to sample ``b``'s activations is the gradient of sample ``b``'s own score. Parameter
``.grad`` fields are never touched. Each map is then upsampled to the input size (bilinear,
``align_corners=False``). Every weighting needs only ``A`` and ``∂y/∂A``, so asking for several
(``weighting=("gradcam", "layercam", "hirescam")``) still costs one forward and one backward pass.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    ...                     nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    >>> with LayerwiseGradCAM(net, verbose=False) as cam:
    ...     lm = cam(torch.randn(2, 3, 32, 32), targets=[3, 7])
    >>> lm.names, tuple(lm.raw["4"].shape), tuple(lm.maps["4"].shape)
    (['1', '4'], (2, 16, 16), (2, 32, 32))
    >>> tuple(lm.fuse().shape)
    (2, 32, 32)
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_classes, check_images, check_targets
from ._utils import eval_mode, track
from .fusion import CLASS_PRESERVING_MODES, fuse

__all__ = ["LayerwiseGradCAM", "LayerMaps", "ClassifierOutputTarget", "auto_layers", "WEIGHTINGS",
           "layer_maps_batched", "layer_maps_all_weightings", "raw_layer_maps", "upsample_layers", "explain_lwcam"]

WEIGHTINGS = ("gradcam", "layercam", "hirescam")

TargetSpec = (None | int | Sequence[int] | Tensor | Callable[[Tensor], Tensor]
              | Sequence[Callable[[Tensor], Tensor]])
LayerSpec = str | Sequence[str | nn.Module]


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
        """Fuse the maps into one (B,H,W) saliency map; see :func:`lwcam.fusion.fuse`.

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


def _is_container(m: nn.Module) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList))


def _describe(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    return f"a {type(out).__name__}"


class LayerwiseGradCAM:
    """Grad-CAM (or LayerCAM) of every selected layer of ``model`` from one forward and one backward pass.

    ``weighting`` chooses the map of each layer from its activations ``A`` and the gradient
    ``G = ∂y/∂A`` of the target logit:

    * ``"gradcam"`` (default): ``ReLU(Σ_k mean_{h,w}(G_k) · A_k)``;
    * ``"layercam"`` (Jiang et al., IEEE TIP 2021): ``ReLU(Σ_k ReLU(G_k) ⊙ A_k)``, element-wise;
    * ``"hirescam"`` (Draelos & Carin 2020): ``ReLU(Σ_k G_k ⊙ A_k)``, element-wise, signed gradients;
    * a non-empty tuple or list of these names, e.g. ``("gradcam", "layercam")``: every call
      then returns a ``dict`` weighting ``->`` :class:`LayerMaps`, all computed from the same
      single forward and backward pass.

    Use it as a context manager (hooks stay registered inside the ``with`` block) or call it
    directly (hooks are registered for the duration of each call only). Every hook is removed
    and every stored activation released when the block exits or the call returns or raises.

    During a call the model is put in ``eval()`` mode and afterwards every submodule gets its
    own previous ``training`` flag back; parameters' ``requires_grad`` and ``.grad`` are left
    untouched (the gradient graph is obtained by making a detached copy of the *input* require
    grad). Calls work inside ``torch.no_grad()`` and ``torch.inference_mode()``.

    A hooked layer's output is kept as it is and a copy is passed on to the rest of the network,
    so in-place operations further on (e.g. ``nn.ReLU(inplace=True)`` after a BatchNorm) cannot
    alter the stored activations: the map of a hooked ``bn1`` is the map of ``bn1``'s output,
    not of the ReLU applied to it. If a hooked module runs several times in one forward pass,
    its last output is used.

    ``layers="auto"`` selects the model's stages:

    1. A model with exactly one child is unwrapped (repeatedly) to that child.
    2. Candidates are the direct children of the model. A direct child that is an
       ``nn.Sequential``/``nn.ModuleList`` whose own children's outputs have two or more
       different spatial resolutions is a trunk of stages (torchvision's ``features``,
       ``trunk_output``) and is replaced by its children (one level only).
    3. The first call runs with hooks on all candidates (this is the same single forward pass
       that computes the maps) and keeps candidates whose output is a 4-D (B,C,h,w) tensor with
       h·w > 1, in execution order.
    4. Among consecutive candidates with the same (h, w) the deepest is kept; a candidate whose
       resolution is larger than the one before it (an adaptive pooling that upsamples, a
       decoder) is dropped.

    The selection is made once, on the first call, and printed (shallow to deep) when
    ``verbose``; it depends on the input size of that call. With 64×64 inputs torchvision
    models (``weights=None``) give:

    ======================  ===============================================================
    model                   auto layers (resolution)
    ======================  ===============================================================
    ``resnet18``            relu 32, layer1 16, layer2 8, layer3 4, layer4 2
    ``regnet_x_400mf``      stem 32, trunk_output.block1 16, trunk_output.block2 8,
                            trunk_output.block3 4, trunk_output.block4 2
    ``shufflenet_v2_x1_0``  conv1 32, maxpool 16, stage2 8, stage3 4, conv5 2
    ``mobilenet_v3_small``  features.0 32, features.1 16, features.3 8, features.8 4,
                            features.12 2
    ``vgg11``               features.1 64, features.4 32, features.9 16, features.14 8,
                            features.19 4, features.20 2
    ======================  ===============================================================

    (:func:`auto_layers` returns the selection for a model and an input size from one probe
    pass.) Explicit ``layers`` are names as in ``model.named_modules()`` or module objects; they
    are reported shallow to deep in execution order.

    Args:
        model: the white-box classifier, mapping (B,C_in,H,W) floats to logits (B,num_classes).
        layers: ``"auto"`` or a sequence of layer names / modules.
        weighting: ``"gradcam"``, ``"layercam"``, ``"hirescam"``, or a tuple/list of them (see above).
        verbose: print the automatically chosen layers.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(weights=None, num_classes=10)
        >>> with LayerwiseGradCAM(net, verbose=False) as cam:
        ...     lm = cam(torch.randn(4, 3, 64, 64), targets=[0, 1, 2, 3])
        >>> lm.names
        ['relu', 'layer1', 'layer2', 'layer3', 'layer4']
        >>> {n: tuple(r.shape) for n, r in lm.raw.items()}["layer4"]
        (4, 2, 2)

        Both weightings from one forward and one backward pass:

        >>> both = LayerwiseGradCAM(net, weighting=("gradcam", "layercam"), verbose=False)
        >>> out = both(torch.randn(2, 3, 64, 64), targets=[5, 6])
        >>> sorted(out), out["layercam"].weighting, tuple(out["layercam"].maps["layer2"].shape)
        (['gradcam', 'layercam'], 'layercam', (2, 64, 64))
    """

    def __init__(self, model: nn.Module, layers: LayerSpec = "auto",
                 weighting: str | Sequence[str] = "gradcam", *, verbose: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._weightings, self._single = _check_weighting(weighting)
        self.weighting: str | tuple[str, ...] = self._weightings[0] if self._single else self._weightings
        self.verbose = bool(verbose)
        self._modules = dict(model.named_modules())
        self._auto = isinstance(layers, str)
        if self._auto:
            if layers != "auto":
                raise ValueError(
                    f"layers must be 'auto' or a sequence of layer names/modules, got {layers!r}")
            self._requested: list[str] = []
        else:
            self._requested = self._resolve_explicit(layers)
        self._names: list[str] | None = None  # resolved and ordered on the first call
        self._handles: list[Any] = []
        self._hooked: list[str] = []
        self._store: dict[str, Any] = {}
        self._fired: dict[str, int] = {}
        self._tick = 0
        self._active = False
        self._in_context = False
        self._in_channels = next(
            (m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)

    # ------------------------------------------------------------------ public helpers
    @property
    def layer_names(self) -> list[str] | None:
        """The selected layer names, shallow to deep (``None`` before the first ``"auto"`` call)."""
        if self._names is not None:
            return list(self._names)
        return None if self._auto else list(self._requested)

    def __enter__(self) -> LayerwiseGradCAM:
        if self._in_context:
            raise RuntimeError("this LayerwiseGradCAM is already in use as a context manager")
        self._in_context = True
        self._attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self._in_context = False
        self._detach()
        self._release()

    def __repr__(self) -> str:
        layers = self.layer_names if self.layer_names is not None else "auto (unresolved)"
        return f"LayerwiseGradCAM({type(self.model).__name__}, layers={layers}, weighting={self.weighting!r})"

    # ------------------------------------------------------------------ layer bookkeeping
    def _resolve_explicit(self, layers: Iterable[str | nn.Module]) -> list[str]:
        if isinstance(layers, nn.Module):
            layers = [layers]
        try:
            items = list(layers)
        except TypeError:
            raise TypeError(f"layers must be 'auto' or a sequence of names/modules, got {layers!r}") from None
        if not items:
            raise ValueError("layers is empty: pass 'auto' or at least one layer")
        by_id: dict[int, str] = {}
        for name, mod in self._modules.items():
            by_id.setdefault(id(mod), name)
        names: list[str] = []
        for item in items:
            if isinstance(item, str):
                if item not in self._modules:
                    valid = [n for n in self._modules if n][:12]
                    raise ValueError(
                        f"unknown layer name {item!r}; valid names include {valid}"
                        f"{' ...' if len(self._modules) > 13 else ''} (see model.named_modules())")
                name = item
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(f"layer {type(item).__name__} is not a submodule of the model")
                name = by_id[id(item)]
            else:
                raise TypeError(f"a layer must be a name or an nn.Module, got {type(item).__name__}")
            if name in names:
                raise ValueError(f"layer {name!r} is listed twice")
            names.append(name)
        return names

    def _auto_candidates(self) -> tuple[list[str], dict[str, list[str]]]:
        """Direct children (after unwrapping) and, for containers, their children."""
        prefix, root = "", self.model
        while True:
            kids = list(root.named_children())
            if len(kids) != 1:
                break
            prefix = f"{prefix}{kids[0][0]}."
            root = kids[0][1]
        if not kids:  # a single leaf module
            name = prefix[:-1]
            return [name], {}
        top: list[str] = []
        containers: dict[str, list[str]] = {}
        for local, child in kids:
            name = prefix + local
            top.append(name)
            if _is_container(child):
                containers[name] = [f"{name}.{sub}" for sub, _ in child.named_children()]
        return top, containers

    def _hook_targets(self) -> list[str]:
        if self._names is not None:
            return list(self._names)
        if not self._auto:
            return list(self._requested)
        top, containers = self._auto_candidates()
        return top + [c for subs in containers.values() for c in subs]

    def _make_hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if not self._active:
                return None
            self._tick += 1
            self._fired[name] = self._tick
            self._store[name] = output
            if isinstance(output, Tensor):
                # Downstream layers get a copy: in-place ops further on cannot alter the stored
                # activation, and gradients still flow to it through the copy.
                return output.clone()
            return None

        return hook

    def _attach(self) -> None:
        if self._handles:
            return
        self._hooked = self._hook_targets()
        for name in self._hooked:
            self._handles.append(self._modules[name].register_forward_hook(self._make_hook(name)))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked = []

    def _release(self) -> None:
        self._store.clear()
        self._fired.clear()
        self._tick = 0

    def _select_auto(self) -> list[str]:
        top, containers = self._auto_candidates()

        def res(name: str) -> tuple[int, int] | None:
            out = self._store.get(name)
            if isinstance(out, Tensor) and out.ndim == 4:
                return int(out.shape[-2]), int(out.shape[-1])
            return None

        cands: list[str] = []
        for name in top:
            subs = [s for s in containers.get(name, []) if s in self._fired]
            if len({r for s in subs if (r := res(s)) is not None}) >= 2:
                cands.extend(subs)
            elif name in self._fired:
                cands.append(name)
        cands.sort(key=lambda n: self._fired[n])
        kept: list[tuple[str, tuple[int, int]]] = []
        for name in cands:
            r = res(name)
            if r is None or r[0] * r[1] <= 1:
                continue
            if kept and r == kept[-1][1]:
                kept[-1] = (name, r)
            elif kept and r[0] * r[1] > kept[-1][1][0] * kept[-1][1][1]:
                continue
            else:
                kept.append((name, r))
        if not kept:
            raise ValueError(
                "layers='auto' found no stage with a 4-D (B,C,h,w) output larger than 1x1; "
                f"pass layers explicitly (candidates were {cands})")
        if self.verbose:
            desc = ", ".join(f"{n} ({h}x{w})" for n, (h, w) in kept)
            print(f"LayerwiseGradCAM: auto layers, shallow to deep: {desc}")
        return [n for n, _ in kept]

    def _check_explicit_outputs(self) -> list[str]:
        for name in self._requested:
            if name not in self._fired:
                raise ValueError(
                    f"layer {name!r} did not run in the forward pass, so it has no activations")
            out = self._store[name]
            if not (isinstance(out, Tensor) and out.ndim == 4):
                raise ValueError(
                    f"layer {name!r} must output a 4-D (B,C,h,w) tensor, but it gave {_describe(out)}")
        return sorted(self._requested, key=lambda n: self._fired[n])

    # ------------------------------------------------------------------ inputs
    def _check_images(self, images: Any) -> Tensor:
        """The one image rule (:func:`lwcam._checks.check_images`), then the model's channels, device and dtype."""
        images = check_images(images, dtype=None)
        if self._in_channels is not None and images.shape[1] != self._in_channels:
            raise ValueError(
                f"images have {images.shape[1]} channels but the model's first convolution "
                f"expects {self._in_channels} (shape {tuple(images.shape)})")
        param = next(self.model.parameters(), None)
        if param is not None:
            dtype = param.dtype if param.is_floating_point() else images.dtype
            images = images.to(device=param.device, dtype=dtype)
        return images

    @staticmethod
    def _check_targets(targets: TargetSpec, batch: int) -> Any:
        """Validate what can be validated before the forward pass (indices: :func:`lwcam._checks.check_targets`)."""
        if targets is None or (callable(targets) and not isinstance(targets, Tensor)):
            return targets
        if isinstance(targets, (list, tuple)) and targets and all(callable(t) for t in targets):
            if len(targets) != batch:
                raise ValueError(f"got {len(targets)} target callables for a batch of {batch} images")
            return list(targets)
        return check_targets(targets, batch)

    @staticmethod
    def _scores(logits: Tensor, targets: Any) -> tuple[Tensor, Tensor]:
        """(scores (B,), target indices (B,) with -1 where unknown)."""
        b, c = logits.shape
        unknown = torch.full((b,), -1, dtype=torch.long, device=logits.device)
        category = _category(targets)
        if targets is None:
            idx = logits.detach().argmax(dim=1)
        elif category is not None:
            idx = torch.full((b,), category, dtype=torch.long, device=logits.device)
        elif isinstance(targets, list):  # per-sample callables
            idx = torch.tensor([c_ if (c_ := _category(t)) is not None else -1 for t in targets],
                               dtype=torch.long, device=logits.device)
            check_classes(idx[idx >= 0], c)
            scores = []
            for i, fn in enumerate(targets):
                s = fn(logits[i])
                if not isinstance(s, Tensor) or s.numel() != 1:
                    raise ValueError(f"target callable #{i} must return a scalar tensor, got {_describe(s)}")
                scores.append(s.reshape(()))
            return torch.stack(scores), idx
        elif callable(targets) and not isinstance(targets, Tensor):
            s = targets(logits)
            if not isinstance(s, Tensor) or s.shape != (b,):
                raise ValueError(f"a target callable must map logits ({b},{c}) to scores ({b},), "
                                 f"got {_describe(s)}")
            return s, unknown
        else:
            idx = targets.to(logits.device).clone()  # a normal tensor even if made in inference mode
        check_classes(idx, c)
        return logits.gather(1, idx[:, None]).squeeze(1), idx

    # ------------------------------------------------------------------ the call
    def __call__(self, images: Tensor, targets: TargetSpec = None) -> LayerMaps | dict[str, LayerMaps]:
        """Compute the map of every selected layer (one forward and one backward pass).

        Args:
            images: (B,C,H,W) floating-point batch in the model's input space.
            targets: the class to explain per image: ``None`` (the model's own argmax), an int
                (same class for all), a sequence or 1-D tensor of B ints, a callable mapping the
                logits (B,C) to scores (B,), or a list of B callables each mapping one sample's
                logits (C,) to a scalar (e.g. :class:`ClassifierOutputTarget`).

        Returns:
            A :class:`LayerMaps` (tensors detached, float32, on the model's device); a dict
            weighting ``->`` :class:`LayerMaps` when ``weighting`` is a tuple or list.

        Raises:
            ValueError: bad image shape/dtype/channels, target out of range, unknown or
                unusable layer.
        """
        x = self._check_images(images)
        targets = self._check_targets(targets, x.shape[0])
        size = (int(x.shape[-2]), int(x.shape[-1]))
        attached_here = not self._handles
        try:
            with eval_mode(self.model):
                self._attach()
                names, acts, grads, logits, idx = self._forward_backward(x, targets)
            logits_d = logits.detach().float()
            probs = torch.softmax(logits_d, dim=1)
            p = torch.full(idx.shape, float("nan"), device=logits_d.device)
            known = idx >= 0
            p[known] = probs[known, idx[known]]
            out: dict[str, LayerMaps] = {}
            for i, weighting in enumerate(self._weightings):
                raw, maps = _layer_maps(names, acts, grads, size, weighting, warn=i == 0)
                out[weighting] = LayerMaps(
                    names=list(names), raw=raw, maps=maps, targets=idx.detach(), logits=logits_d,
                    probs=p, student_pred=logits_d.argmax(dim=1), weighting=weighting)
            del acts, grads
            return out[self._weightings[0]] if self._single else out
        finally:
            self._active = False
            self._release()
            if attached_here and not self._in_context:
                self._detach()
            elif self._in_context and self._names is not None and self._hooked != self._names:
                self._detach()  # after the probing call, keep hooks on the chosen layers only
                self._attach()

    def _forward_backward(self, x: Tensor, targets: Any
                          ) -> tuple[list[str], list[Tensor], tuple[Tensor | None, ...], Tensor, Tensor]:
        """The single forward and backward pass: (names, activations, gradients, logits, target indices)."""
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach()
            if x.is_inference():
                x = x.clone()
            x.requires_grad_(True)
            self._release()
            self._active = True
            try:
                logits = self.model(x)
            finally:
                self._active = False
            if not (isinstance(logits, Tensor) and logits.ndim == 2 and logits.shape[0] == x.shape[0]):
                raise ValueError(f"the model must return logits of shape (B, num_classes); "
                                 f"it returned {_describe(logits)}")
            if self._names is None:  # the first call also chooses/orders the layers
                self._names = self._select_auto() if self._auto else self._check_explicit_outputs()
            names = list(self._names)
            for name in names:
                self._check_layer_output(name)
            scores, idx = self._scores(logits, targets)
            acts = [self._store[n] for n in names]
            grads = torch.autograd.grad(scores.sum(), acts, allow_unused=True)
        return names, acts, grads, logits, idx

    def _check_layer_output(self, name: str) -> None:
        if name not in self._fired:
            raise ValueError(f"layer {name!r} did not run in the forward pass")
        out = self._store[name]
        if not (isinstance(out, Tensor) and out.ndim == 4):
            raise ValueError(f"layer {name!r} must output a 4-D (B,C,h,w) tensor, "
                             f"but it gave {_describe(out)}")
        if not out.requires_grad:
            raise ValueError(f"layer {name!r} output does not depend on the input through "
                             "autograd (detached or computed under no_grad)")


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
    """Native-resolution layer maps (:func:`raw_layer_maps`) as the (B,L,H,W) stack of upsampled maps that
    :func:`layer_maps_all_weightings` returns, so one pass serves both the sums and the class-preserving fusions.

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


def auto_layers(model: nn.Module, image_size: int | tuple[int, int] = 64, in_channels: int | None = None) -> list[str]:
    """The layers ``layers="auto"`` picks for ``model`` at ``image_size``, from one probe pass.

    Args:
        model: the classifier.
        image_size: H (=W) or (H, W) of the probe input.
        in_channels: channels of the probe input (default: the first convolution's, else 3).

    Returns:
        Layer names, shallow to deep.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    cam = LayerwiseGradCAM(model, "auto", verbose=False)
    c = in_channels or cam._in_channels or 3
    param = next(model.parameters(), None)
    x = torch.zeros(1, c, h, w, device=param.device if param is not None else None)
    cam(x, targets=0)
    assert cam.layer_names is not None
    return cam.layer_names


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
    fusions (:func:`lwcam.fusion.fuse` with ``size=images.shape[-2:]``). Tensors are on the CPU.

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
    (:func:`lwcam.fusion.fuse`). ``weights`` given as a dict ``layer -> weight`` weigh a layer left
    out 0. A class-preserving ``mode`` (:data:`lwcam.fusion.CLASS_PRESERVING_MODES`) fuses the maps
    at their own resolutions (:func:`raw_layer_maps`) into the input size; ``gate_weighting`` then
    names the weighting whose deepest map is the gate (e.g. ``"gradcam"`` under LayerCAM maps,
    from the same passes), and ``eps``/``alpha`` go to :func:`~lwcam.fusion.fuse`.
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
