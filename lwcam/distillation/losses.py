"""The distillation losses, and the black box's soft answers as log-probabilities.

* :func:`kd_loss`: soft-label distillation ``τ² · KL(p_T^τ ‖ p_S^τ)`` (``probs``, ``logits``, completed ``topk``);
* :func:`label_loss`: cross-entropy on hard labels with label smoothing (``label``);
* :func:`topk_distribution` and :func:`answers_to_log_probs`: what a black box reveals, as a full distribution.

Example:
    >>> import torch
    >>> teacher = answers_to_log_probs(torch.tensor([[0.7, 0.2, 0.1]]), "probs", 3)
    >>> round(float(kd_loss(teacher, teacher, temperature=2.0)), 6)
    0.0
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .._checks import check_real
from ..blackbox import TopK

__all__ = ["MAX_TEMPERATURE", "MIN_TEMPERATURE", "answers_to_log_probs", "kd_loss", "label_loss", "topk_distribution"]

#: The temperatures accepted: z/T and the T² loss scale stay well inside float32 for any logits a network makes.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3


def topk_distribution(values: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Complete top-k probabilities to a full distribution.

    The k revealed probabilities stay where they are; the remaining mass ``1 − Σ values`` (clamped
    at 0) is spread evenly over the other ``C − k`` classes. With ``k = C`` nothing is spread.

    Args:
        values: (B,k) revealed probabilities.
        indices: (B,k) their class indices.
        num_classes: C.

    Returns:
        (B,C) probabilities that sum to 1 (up to the revealed values' own rounding).

    Example:
        >>> topk_distribution(torch.tensor([[0.6, 0.2]]), torch.tensor([[2, 0]]), 4)
        tensor([[0.2000, 0.1000, 0.6000, 0.1000]])
    """
    if values.shape != indices.shape or values.dim() != 2:
        raise ValueError(f"values and indices must both be (B,k), got {tuple(values.shape)} and {tuple(indices.shape)}")
    k = values.shape[1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k={k} must lie in [1, num_classes={num_classes}]")
    values = values.float()
    rest = (1.0 - values.sum(dim=1, keepdim=True)).clamp_min(0.0)
    fill = rest / (num_classes - k) if k < num_classes else torch.zeros_like(rest)
    full = fill.expand(values.shape[0], num_classes).clone()
    return full.scatter_(1, indices.long(), values)


def answers_to_log_probs(answers: torch.Tensor | TopK, output: str, num_classes: int) -> torch.Tensor:
    """Turn a black box's soft answers into (B,C) log-probabilities (``-inf`` where a probability is 0).

    ``probs`` → ``log p``; ``logits`` → ``log_softmax(z)``; ``topk`` → ``log`` of
    :func:`topk_distribution`. A ``label`` black box has no soft answer (``ValueError``).
    """
    if output == "probs":
        return torch.log(answers.float())  # type: ignore[union-attr]
    if output == "logits":
        return torch.log_softmax(answers.float(), dim=1)  # type: ignore[union-attr]
    if output == "topk":
        top: TopK = answers  # type: ignore[assignment]
        return torch.log(topk_distribution(top.values, top.indices, num_classes))
    raise ValueError(f"a black box with output={output!r} reveals no probabilities")


def kd_loss(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float = 4.0,
            reduction: Literal["mean", "sum", "none"] = "mean") -> torch.Tensor:
    """Soft-label distillation loss ``τ² · KL(p_T^τ ‖ p_S^τ)``.

    With ``p_T^τ = softmax(t / τ)`` for the teacher's log-probabilities (or logits) ``t`` and
    ``p_S^τ = softmax(z / τ)`` for the student's logits ``z``::

        L_i = τ² · Σ_c p_T^τ(c) · (log p_T^τ(c) − log p_S^τ(c))

    Classes with teacher probability 0 (``t = -inf``, or a logit far below the others) contribute 0;
    finite logits that overflow float32 once divided by ``τ`` are taken in float64. At ``τ = 1`` this is the plain
    ``KL(teacher ‖ student)``.

    Args:
        student_logits: (B,C) student logits.
        teacher_log_probs: (B,C) teacher log-probabilities or logits (softmax is shift invariant).
        temperature: ``τ > 0``.
        reduction: ``"mean"`` over the batch (``batchmean``), ``"sum"``, or ``"none"`` for (B,).

    Example:
        >>> z = torch.tensor([[2.0, 0.0]])
        >>> abs(float(kd_loss(z, z.log_softmax(1), temperature=3.0))) < 1e-6
        True
    """
    check_real(temperature, "temperature", MIN_TEMPERATURE, MAX_TEMPERATURE)
    if student_logits.shape != teacher_log_probs.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher answers "
                         f"{tuple(teacher_log_probs.shape)} differ in shape")
    t, s = teacher_log_probs.float() / temperature, student_logits.float() / temperature
    if bool((t.isinf() & torch.isfinite(teacher_log_probs)).any() | (s.isinf() & torch.isfinite(student_logits)).any()):
        t, s = teacher_log_probs.double() / temperature, student_logits.double() / temperature  # past float32
    p_t, log_p_s = torch.softmax(t, dim=1), torch.log_softmax(s, dim=1)
    cross = torch.where(p_t > 0, p_t * log_p_s, torch.zeros_like(p_t))  # 0·log 0 = 0, not NaN
    per = ((torch.xlogy(p_t, p_t) - cross).sum(dim=1) * temperature**2).float()
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.mean()


def label_loss(student_logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
               reduction: Literal["mean", "sum", "none"] = "mean") -> torch.Tensor:
    """Cross-entropy on hard labels with label smoothing ``ε``, for a ``label`` black box::

        L_i = −(1 − ε) · log p_S(y_i) − ε / C · Σ_c log p_S(c)

    Example:
        >>> round(float(label_loss(torch.zeros(1, 4), torch.tensor([1]))), 4)  # log 4
        1.3863
    """
    return F.cross_entropy(student_logits.float(), labels.long(), label_smoothing=label_smoothing,
                           reduction=reduction)
