"""Baseline saliency methods, each given only the model access it is allowed.

Every method is a function ``method(model, images, targets, **params) -> (B,H,W)`` saliency
(float32, CPU; higher = more important). The one method registry, :data:`METHODS`
(:mod:`lwcam.baselines.registry`), holds these and lwcam itself (``lwcam``, the paper's fusion, and
``lwcam_selected``, the fusion chosen on ``val``, both white-box on the student). Run through the
registry (:func:`explain`, or ``METHODS[name](...)``), a method returns an :class:`Explanation`:
the saliency, the call's wall-clock ``seconds`` and its black-box ``queries`` (the difference of
``blackbox.queries`` before and after), measured the same way for every method.

===========================  ================================  ===========================
name                         access                            black-box queries per image
===========================  ================================  ===========================
``lwcam``, ``lwcam_selected``  white-box student (all layers,  0
                             fused)
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
    >>> rise(bb, torch.rand(2, 3, 16, 16), [0, 3], n_masks=100, grid_size=4).shape
    torch.Size([2, 16, 16])
    >>> e = explain("rise", torch.rand(2, 3, 16, 16), [0, 3], blackbox=bb, n_masks=100, grid_size=4)
    >>> e.saliency.shape, e.queries, e.queries_per_image
    (torch.Size([2, 16, 16]), 200, 100.0)
"""

from __future__ import annotations

from .._ops import minmax_normalize as minmax
from .cam import cam, find_cam_head
from .gradcam import gradcam, last_layer
from .gradcampp import gradcampp
from .layercam_multi import fuse_layercam, layercam
from .lime import lime, superpixels
from .meaningful_perturbation import meaningful_perturbation
from .occlusion import occlusion, occlusion_queries
from .registry import LWCAM_LABEL, METHODS, Access, Explanation, Method, explain
from .rise import rise, rise_classes, rise_masks
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
    "Access",
    "Explanation",
    "Method",
    "METHODS",
    "LWCAM_LABEL",
    "explain",
    "minmax",
    "find_cam_head",
    "last_layer",
    "fuse_layercam",
    "superpixels",
    "occlusion_queries",
    "rise_masks",
    "rise_classes",
]
