"""The one method registry: every saliency method of the benchmark, lwcam included, with its access and cost.

:data:`METHODS` maps a name to a :class:`Method`. Calling a method hands it only the model its
access kind allows and returns an :class:`Explanation`: the saliency with what it cost, measured
the same way for every method (wall-clock seconds of the call; black-box queries as the
difference of ``blackbox.queries`` before and after, so cache hits are free).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..blackbox import BlackBox
from ..cam.batched import explain_lwcam
from .cam import cam
from .gradcam import gradcam
from .gradcampp import gradcampp
from .layercam_multi import layercam
from .lime import lime
from .meaningful_perturbation import meaningful_perturbation
from .occlusion import occlusion
from .rise import rise
from .scorecam import scorecam
from .simple import center_saliency, mask_saliency, random_saliency

__all__ = ["Access", "Explanation", "Method", "METHODS", "explain", "LWCAM_LABEL"]

Access = Literal["black-box", "white-box student", "white-box teacher (oracle)", "ground truth (oracle)", "none"]

#: The display label of lwcam as the paper defines it (Grad-CAM per layer, min-max, sum, min-max).
LWCAM_LABEL = "lwcam (paper)"

_MODEL_ARG = {"black-box": "blackbox", "white-box student": "student", "white-box teacher (oracle)": "teacher"}


@dataclass(frozen=True)
class Explanation:
    """A method's saliency for a batch, with its cost.

    Attributes:
        saliency: (B,H,W) float32 maps on the CPU (higher = more important).
        seconds: wall-clock seconds of the call.
        queries: images sent to the black box during the call (0 for a method that never queries it).
    """

    saliency: torch.Tensor
    seconds: float
    queries: int

    @property
    def n_images(self) -> int:
        return int(self.saliency.shape[0])

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.n_images

    @property
    def queries_per_image(self) -> float:
        return self.queries / self.n_images


@dataclass(frozen=True)
class Method:
    """One entry of :data:`METHODS`.

    Attributes:
        name: the key in :data:`METHODS`.
        fn: the function, returning a (B,H,W) tensor.
        access: what it sees: ``"black-box"`` (queries through a BlackBox),
            ``"white-box student"``, ``"white-box teacher (oracle)"`` (possible only because the
            default black box is our own model), ``"ground truth (oracle)"`` or ``"none"``.
        label: a display name for tables and figures.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    access: Access
    label: str

    def __call__(self, images: torch.Tensor, targets: Any = None, *, blackbox: BlackBox | None = None,
                 student: nn.Module | None = None, teacher: nn.Module | None = None,
                 masks: torch.Tensor | None = None, **params: Any) -> Explanation:
        """Run the method with the model its access kind allows (the others are ignored) and measure its cost."""
        counter = blackbox if isinstance(blackbox, BlackBox) else None
        q0 = counter.queries if counter is not None else 0
        t0 = time.perf_counter()
        saliency = self._run(images, targets, {"black-box": blackbox, "white-box student": student,
                                               "white-box teacher (oracle)": teacher}, masks, params)
        seconds = time.perf_counter() - t0
        queries = counter.queries - q0 if counter is not None else 0
        return Explanation(saliency=saliency.detach().float().cpu(), seconds=seconds, queries=int(queries))

    def _run(self, images: torch.Tensor, targets: Any, models: dict[str, Any], masks: torch.Tensor | None,
             params: dict[str, Any]) -> torch.Tensor:
        if self.access == "none":
            return self.fn(images, **params)
        if self.access == "ground truth (oracle)":
            if masks is None:
                raise ValueError(f"{self.name} needs masks=")
            return self.fn(masks, **params)
        model = models[self.access]
        if model is None:
            raise ValueError(f"{self.name} ({self.access}) needs {_MODEL_ARG[self.access]}=")
        if targets is None:
            raise ValueError(f"{self.name} needs targets (the black box's class for each image)")
        return self.fn(model, images, targets, **params)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lwcam", explain_lwcam, "white-box student", LWCAM_LABEL),
        Method("lwcam_selected", explain_lwcam, "white-box student", "lwcam (selected on val)"),
        Method("gradcam", gradcam, "white-box student", "Grad-CAM (student, last layer)"),
        Method("gradcam_teacher", gradcam, "white-box teacher (oracle)", "Grad-CAM (teacher, oracle)"),
        Method("gradcampp", gradcampp, "white-box student", "Grad-CAM++ (student, last layer)"),
        Method("scorecam", scorecam, "white-box student", "Score-CAM (student, last layer)"),
        Method("layercam", layercam, "white-box student", "LayerCAM (student, all layers, tanh + max)"),
        Method("cam", cam, "white-box student", "CAM (student)"),
        Method("meaningful_perturbation", meaningful_perturbation, "white-box student",
               "Meaningful Perturbation (student)"),
        Method("rise", rise, "black-box", "RISE"),
        Method("lime", lime, "black-box", "LIME"),
        Method("occlusion", occlusion, "black-box", "Occlusion"),
        Method("random", random_saliency, "none", "Random"),
        Method("center", center_saliency, "none", "Centre bias"),
        Method("mask", mask_saliency, "ground truth (oracle)", "Ground-truth mask (oracle)"),
    )
}


def explain(name: str, images: torch.Tensor, targets: Any = None, **kwargs: Any) -> Explanation:
    """Run the method ``name`` of :data:`METHODS`, handing it only the model it may see.

    Args:
        name: a key of :data:`METHODS`.
        images: ``(B,3,H,W)`` images.
        targets: the class to explain per image (the black box's class).
        **kwargs: ``blackbox=``, ``student=``, ``teacher=``, ``masks=`` and the method's own parameters.

    Returns:
        An :class:`Explanation`: ``.saliency`` (B,H,W), ``.seconds`` and ``.queries`` of the call.

    Example:
        >>> explain("center", torch.zeros(1, 3, 8, 8)).saliency.shape
        torch.Size([1, 8, 8])
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name](images, targets, **kwargs)
