"""The input checks of :func:`~lwcam.distillation.distill` that are not a :class:`DistillConfig` field's.

Each raises before any collective and any query, with a message that names the argument.

Example:
    >>> check_augment(True), check_augment(None), check_augment("query")
    ('default', 'none', 'query')
    >>> check_holdout(-1)
    Traceback (most recent call last):
        ...
    ValueError: holdout must be >= 0, got -1
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Literal

import torch
from torch import nn

from .._checks import check_real, check_targets
from ..models import classification_models
from .access import Images

__all__ = ["Augment", "check_augment", "check_eval_labels", "check_holdout", "check_run_options", "check_student"]

Augment = Literal["default", "query", "none"]


def check_augment(augment: Any) -> Augment:
    """``True``/``"default"``, ``"query"`` or ``False``/``None``/``"none"`` as one of :data:`Augment`."""
    if augment is True or augment == "default":
        return "default"
    if augment is False or augment is None or augment == "none":
        return "none"
    if augment == "query":
        return "query"
    raise ValueError(f"augment must be True/'default', 'query' or False/'none', got {augment!r}")


def check_holdout(holdout: Any) -> None:
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)):
        raise ValueError(f"holdout must be a fraction in [0, 1) or an int count, got {holdout!r}")
    if isinstance(holdout, int):
        if holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {holdout}")
    else:
        check_real(holdout, "holdout as a fraction", 0.0, 1.0, high_open=True)


def check_student(student: Any) -> None:
    if isinstance(student, str):
        if student not in classification_models():
            raise ValueError(f"student={student!r} is not a torchvision classification model; pass an "
                             f"nn.Module or one of torchvision.models.list_models(module=torchvision.models), "
                             f"e.g. 'resnet18'")
    elif not isinstance(student, nn.Module):
        raise TypeError(f"student must be a torchvision model name or an nn.Module, got {type(student).__name__}")


def check_run_options(checkpoint_dir: Any, on_epoch_end: Any) -> None:
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a path (str or os.PathLike) or None, "
                        f"got {type(checkpoint_dir).__name__}")
    if on_epoch_end is not None and not callable(on_epoch_end):
        raise TypeError(f"on_epoch_end must be callable or None, got {type(on_epoch_end).__name__}")


def check_eval_labels(evals: Images | None, eval_labels: Any, num_classes: int) -> torch.Tensor | None:
    """``eval_labels`` (or the labels of a Dataset's ``(image, label, ...)`` items), checked."""
    if eval_labels is not None and evals is None:
        raise ValueError("eval_labels were given without eval_images")
    if evals is None:
        return None
    labels = evals.labels_from_items() if eval_labels is None else eval_labels
    if labels is None:
        return None
    if isinstance(labels, numbers.Integral) or getattr(labels, "ndim", 1) == 0:
        raise ValueError(f"eval_labels must be one label per eval image, shape ({evals.n},), got a single value")
    return check_targets(labels, evals.n, num_classes, name="eval_labels")
