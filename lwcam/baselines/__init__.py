"""Baseline saliency methods, each given only the model access it is allowed.

Every method is a function ``method(model, images, targets, **params) -> (B,H,W)`` saliency
(float32, CPU; higher = more important). Cost is reported the same way everywhere: pass a
dict as ``stats=`` and it receives ``queries`` (images sent to the black box during the
call), ``seconds`` (wall clock), ``images`` (B), ``queries_per_image``, ``seconds_per_image``,
plus a few method-specific entries (the layer used, the number of superpixels, ...).

===========================  ================================  ===========================
name                         access                            black-box queries per image
===========================  ================================  ===========================
``gradcam``                  white-box student (or teacher,    0
                             as an oracle)
``gradcampp``                white-box student (last layer)    0
``scorecam``                 white-box student (last layer)    0 (K forward passes per image
                                                               on the student, K channels)
``layercam``                 white-box student (all layers,    0
                             tanh + max, as torchcam)
``cam``                      white-box student (GAP + linear)  0
``meaningful_perturbation``  white-box student (gradients)     0
``rise``                     black-box                         ``n_masks`` (4000)
``lime``                     black-box                         ``n_samples`` (1000)
``occlusion``                black-box                         windows + 1 (226 at 64 px)
``random``, ``center``       none                              0
``mask``                     ground truth (oracle)             0
===========================  ================================  ===========================

A black-box method accepts only a :class:`lwcam.BlackBox` and raises ``TypeError`` for an
``nn.Module``; a white-box method needs the ``nn.Module``. :data:`METHODS` lists every method
with its access kind, and :func:`explain` calls one by name with the right model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lwcam import BlackBox
    >>> bb = BlackBox(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)), num_classes=10)
    >>> stats = {}
    >>> s = rise(bb, torch.rand(2, 3, 16, 16), [0, 3], n_masks=100, grid_size=4, stats=stats)
    >>> s.shape, stats["queries"], stats["queries_per_image"]
    (torch.Size([2, 16, 16]), 200, 100.0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..blackbox import BlackBox
from ._base import minmax
from .cam import cam, find_cam_head
from .gradcam import gradcam, last_layer
from .gradcampp import gradcampp
from .layercam_multi import fuse_layercam, layercam
from .lime import lime, superpixels
from .meaningful_perturbation import meaningful_perturbation
from .occlusion import occlusion, occlusion_queries
from .rise import rise, rise_masks
from .scorecam import scorecam
from .simple import center_saliency, mask_saliency, random_saliency

__all__ = [
    "gradcam",
    "gradcampp",
    "scorecam",
    "layercam",
    "cam",
    "meaningful_perturbation",
    "rise",
    "lime",
    "occlusion",
    "random_saliency",
    "center_saliency",
    "mask_saliency",
    "Method",
    "METHODS",
    "explain",
    "minmax",
    "find_cam_head",
    "last_layer",
    "fuse_layercam",
    "superpixels",
    "occlusion_queries",
    "rise_masks",
]

Access = Literal["black-box", "white-box student", "white-box teacher (oracle)", "ground truth (oracle)", "none"]


@dataclass(frozen=True)
class Method:
    """One entry of :data:`METHODS`.

    Attributes:
        name: the key in :data:`METHODS`.
        fn: the function.
        access: what it sees: ``"black-box"`` (queries through a BlackBox),
            ``"white-box student"``, ``"white-box teacher (oracle)"`` (possible only because the
            default black box is our own model), ``"ground truth (oracle)"`` or ``"none"``.
        label: a display name for tables and figures.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    access: Access
    label: str

    def __call__(
        self,
        images: torch.Tensor,
        targets: Any = None,
        *,
        blackbox: BlackBox | None = None,
        student: nn.Module | None = None,
        teacher: nn.Module | None = None,
        masks: torch.Tensor | None = None,
        stats: dict | None = None,
        **params: Any,
    ) -> torch.Tensor:
        """Run the method with the model its access kind allows; the others are ignored."""
        if self.access == "none":
            return self.fn(images, stats=stats, **params)
        if self.access == "ground truth (oracle)":
            if masks is None:
                raise ValueError(f"{self.name} needs masks=")
            return self.fn(masks, stats=stats, **params)
        model: Any = {
            "black-box": blackbox,
            "white-box student": student,
            "white-box teacher (oracle)": teacher,
        }[self.access]
        if model is None:
            what = {"black-box": "blackbox", "white-box student": "student", "white-box teacher (oracle)": "teacher"}
            raise ValueError(f"{self.name} ({self.access}) needs {what[self.access]}=")
        if targets is None:
            raise ValueError(f"{self.name} needs targets (the black box's class for each image)")
        return self.fn(model, images, targets, stats=stats, **params)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
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


def explain(name: str, images: torch.Tensor, targets: Any = None, **kwargs: Any) -> torch.Tensor:
    """Run the method ``name`` of :data:`METHODS`, handing it only the model it may see.

    Args:
        name: a key of :data:`METHODS`.
        images: ``(B,3,H,W)`` images.
        targets: the class to explain per image (the black box's class).
        **kwargs: ``blackbox=``, ``student=``, ``teacher=``, ``masks=``, ``stats=`` and the
            method's own parameters.

    Example:
        >>> explain("center", torch.zeros(1, 3, 8, 8)).shape
        torch.Size([1, 8, 8])
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name](images, targets, **kwargs)
