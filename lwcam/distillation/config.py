"""The run's settings (:class:`DistillConfig`) and what it works on (:class:`Plan`).

:class:`DistillConfig` holds :func:`~lwcam.distillation.distill`'s hyper-parameters, checked when made, and
makes the fingerprint a checkpoint must match to be resumed. :class:`Plan` holds the black box's kind, the
checked images and how many of them the query budget and the hold-out leave to train on; :func:`make_plan`
makes it.

Example:
    >>> cfg = DistillConfig(batch_size=16, query_budget=100, holdout=0.25)
    >>> cfg.sizes(n_transfer=500, n_eval=20)  # 80 transfer images used, 20 of them held out
    (80, 20)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from .._checks import check_bool, check_positive_int, check_real
from ..blackbox import BlackBox
from .access import Images
from .checks import Augment, check_augment, check_eval_labels, check_holdout
from .losses import MAX_TEMPERATURE, MIN_TEMPERATURE

__all__ = ["CHECKPOINT_VERSION", "DistillConfig", "Plan", "make_plan"]

#: The version of the checkpoint layout, part of every fingerprint.
CHECKPOINT_VERSION = 1
#: ``lr`` and ``weight_decay`` when :func:`~lwcam.distillation.distill` is given ``None`` (AdamW's is decoupled).
_OPTIMISER_DEFAULTS = {"adamw": {"lr": 2e-3, "weight_decay": 0.05}, "sgd": {"lr": 0.05, "weight_decay": 5e-4}}


@dataclass(frozen=True)
class DistillConfig:
    """The hyper-parameters of :func:`~lwcam.distillation.distill`, validated when the object is made.

    The fields and their defaults are :func:`~lwcam.distillation.distill`'s keyword arguments of the same names. For a
    black box with soft answers (``probs``, ``logits``, ``topk`` completed) the loss is::

        L = T² · KL(softmax(log p_T / T) ‖ softmax(z_S / T))      (T = temperature)

    the ``T²`` keeping the gradient scale independent of ``T``; for a ``label`` black box it is
    cross-entropy with ``label_smoothing``. ``lr`` and ``weight_decay`` may be ``None``, the
    optimiser's default (:attr:`peak_lr`, :attr:`decay`); ``augment`` may be a bool
    (:attr:`aug_mode` is the normalised mode).

    Raises:
        ValueError: a value of the wrong type or out of range; the message names the argument.

    Example:
        >>> cfg = DistillConfig(epochs=2, optimizer="sgd", augment=False)
        >>> cfg.peak_lr, cfg.decay, cfg.aug_mode
        (0.05, 0.0005, 'none')
        >>> DistillConfig(temperature=0)
        Traceback (most recent call last):
            ...
        ValueError: temperature must lie in [0.001, 1000], got 0
    """

    temperature: float = 4.0
    epochs: int = 30
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: str = "adamw"
    augment: bool | str = True
    query_budget: int | None = None
    holdout: float | int = 0.1
    label_smoothing: float = 0.0
    seed: int = 0
    channels_last: bool = False

    def __post_init__(self) -> None:
        check_real(self.temperature, "temperature", MIN_TEMPERATURE, MAX_TEMPERATURE)
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        check_positive_int(self.seed, "seed", minimum=0)
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        self._resolved("lr")
        self._resolved("weight_decay")
        check_real(self.label_smoothing, "label_smoothing", 0.0, 1.0, high_open=True)
        check_augment(self.augment)
        if self.query_budget is not None:
            check_positive_int(self.query_budget, "query_budget")
        check_holdout(self.holdout)
        check_bool(self.channels_last, "channels_last")

    def _resolved(self, name: Literal["lr", "weight_decay"]) -> float:
        """``lr`` or ``weight_decay`` as given, or the optimiser's default when ``None``; checked."""
        value = getattr(self, name)
        if value is None:
            value = _OPTIMISER_DEFAULTS[self.optimizer][name]
        if name == "lr":
            return check_real(value, "lr", 0.0, low_open=True)
        return check_real(value, "weight_decay", 0.0)

    @property
    def peak_lr(self) -> float:
        """``lr``, or 2e-3 for AdamW and 0.05 for SGD when it is ``None``."""
        return self._resolved("lr")

    @property
    def decay(self) -> float:
        """``weight_decay``, or 0.05 for AdamW (decoupled) and 5e-4 for SGD when it is ``None``."""
        return self._resolved("weight_decay")

    @property
    def aug_mode(self) -> Augment:
        """``augment`` as ``"default"``, ``"query"`` or ``"none"``."""
        return check_augment(self.augment)

    def sizes(self, n_transfer: int, n_eval: int) -> tuple[int, int]:
        """``(n_used, n_holdout)``: the transfer images the budget pays for, and how many are held out.

        Raises:
            ValueError: ``query_budget`` cannot pay for one batch (after ``n_eval`` evaluation images),
                or ``holdout`` leaves no image to train on.
        """
        n_used = n_transfer
        budget = self.query_budget
        if budget is not None:
            one_batch = min(self.batch_size, n_transfer)
            if budget < one_batch:
                raise ValueError(f"query_budget={budget} is smaller than one batch ({one_batch} images)")
            if budget - n_eval < one_batch:
                raise ValueError(f"query_budget={budget} leaves {budget - n_eval} queries after the "
                                 f"{n_eval} eval_images: less than one batch ({one_batch} images)")
            n_used = min(n_transfer, budget - n_eval)
        holdout = self.holdout
        n_hold = holdout if isinstance(holdout, int) else int(round(float(holdout) * n_used))
        if n_used - n_hold < 1:
            raise ValueError(f"holdout={holdout!r} leaves no transfer image to train on ({n_used} used)")
        return n_used, n_hold

    def settings(self) -> dict[str, Any]:
        """The resolved hyper-parameters, as the checkpoint fingerprint and :attr:`DistillResult.config` hold them."""
        return {"temperature": float(self.temperature), "epochs": self.epochs, "batch_size": self.batch_size,
                "lr": self.peak_lr, "weight_decay": self.decay, "optimizer": self.optimizer,
                "augment": self.aug_mode, "query_budget": self.query_budget,
                "label_smoothing": float(self.label_smoothing), "seed": self.seed,
                "channels_last": self.channels_last}

    def fingerprint(self, plan: Plan, student: str, student_init: str) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: these settings, the student (its name and a
        hash of its initial weights), the black box's kind and the data (sizes and a content hash)."""
        return {"version": CHECKPOINT_VERSION, "student": student, "student_init": student_init,
                **self.settings(), "n_holdout": plan.n_hold, **plan.facts(),
                "image_shape": list(plan.source.shape), "transfer": plan.source.fingerprint(plan.n_used),
                "eval": plan.evals.fingerprint() if plan.evals is not None else None}


@dataclass(frozen=True)
class Plan:
    """What a run works on: the black box's kind, the images and how many of them are used."""

    output: str
    num_classes: int
    k: int | None
    source: Images
    evals: Images | None
    eval_labels: torch.Tensor | None
    n_used: int
    n_hold: int

    @property
    def n_train(self) -> int:
        return self.n_used - self.n_hold

    @property
    def n_eval(self) -> int:
        return self.evals.n if self.evals is not None else 0

    def facts(self) -> dict[str, Any]:
        """The black box's kind and the data sizes, as the fingerprint and the result's config hold them."""
        return {"output": self.output, "k": self.k, "num_classes": self.num_classes,
                "n_transfer": self.source.n, "n_used": self.n_used}


def make_plan(blackbox: BlackBox, transfer_images: Any, eval_images: Any, eval_labels: Any,
              config: DistillConfig) -> Plan:
    """The checked images (``TypeError``/``ValueError`` naming the argument) and the sizes ``config`` leaves."""
    source = Images(transfer_images, "transfer_images", blackbox.channels)
    evals = Images(eval_images, "eval_images", blackbox.channels) if eval_images is not None else None
    labels = check_eval_labels(evals, eval_labels, blackbox.num_classes)
    n_used, n_hold = config.sizes(source.n, evals.n if evals is not None else 0)
    return Plan(output=blackbox.output, num_classes=blackbox.num_classes,
                k=blackbox.k if blackbox.output == "topk" else None, source=source, evals=evals,
                eval_labels=labels, n_used=n_used, n_hold=n_hold)
