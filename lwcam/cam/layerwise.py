"""Grad-CAM (or LayerCAM) on every layer of a white-box model, from one forward and one backward pass.

For a layer with activations ``A`` of shape (B,K,h,w) and the target score ``y`` (the
*logit* of the target class, before softmax), Grad-CAM (``weighting="gradcam"``, the default) is

.. math::

    \alpha_k = \frac{1}{hw} \\sum_{i,j} \frac{\\partial y}{\\partial A_{k,i,j}}, \\qquad
    M = \\mathrm{ReLU}\\Big(\\sum_k \alpha_k A_k\\Big) \\in \\mathbb{R}^{h \times w},

and LayerCAM (``weighting="layercam"``, Jiang et al., IEEE TIP 2021) weighs every position by
its own positive gradient, element-wise:

.. math::

    M = \\mathrm{ReLU}\\Big(\\sum_k \\mathrm{ReLU}\\Big(\frac{\\partial y}{\\partial A_k}\\Big)
    \\odot A_k\\Big),

and HiResCAM (``weighting="hirescam"``, Draelos & Carin 2020) keeps the gradient's sign,
element-wise (gradient times activation summed over channels, each position's first-order
contribution to ``y``):

.. math::

    M = \\mathrm{ReLU}\\Big(\\sum_k \frac{\\partial y}{\\partial A_k} \\odot A_k\\Big).

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

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_classes, check_images, check_targets
from .._utils import eval_mode
from .locate import candidate_layers, describe_output, resolve_layers, select_stages
from .maps import LayerMaps, TargetSpec, _category, _check_weighting, _layer_maps

__all__ = ["LayerwiseGradCAM", "auto_layers"]

LayerSpec = str | Sequence[str | nn.Module]


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
            self._requested = resolve_layers(self._modules, layers)
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
    def _hook_targets(self) -> list[str]:
        if self._names is not None:
            return list(self._names)
        if not self._auto:
            return list(self._requested)
        top, containers = candidate_layers(self.model)
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
        kept = select_stages(*candidate_layers(self.model), self._store, self._fired)
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
                    f"layer {name!r} must output a 4-D (B,C,h,w) tensor, but it gave {describe_output(out)}")
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
                    raise ValueError(f"target callable #{i} must return a scalar tensor, got {describe_output(s)}")
                scores.append(s.reshape(()))
            return torch.stack(scores), idx
        elif callable(targets) and not isinstance(targets, Tensor):
            s = targets(logits)
            if not isinstance(s, Tensor) or s.shape != (b,):
                raise ValueError(f"a target callable must map logits ({b},{c}) to scores ({b},), "
                                 f"got {describe_output(s)}")
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
                                 f"it returned {describe_output(logits)}")
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
                             f"but it gave {describe_output(out)}")
        if not out.requires_grad:
            raise ValueError(f"layer {name!r} output does not depend on the input through "
                             "autograd (detached or computed under no_grad)")


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
