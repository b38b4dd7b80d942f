"""What :func:`~lwcam.distillation.distill` returns: the student, its history and its fidelity.

Example:
    >>> from torch import nn
    >>> DistillResult(nn.Linear(2, 2), queries=10, fidelity={"agreement": 0.5, "n_holdout": 2})
    DistillResult(student=Linear, epochs=0, queries=10, seconds=0.0, fidelity=(agreement=0.5, n_holdout=2))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["DistillResult"]


@dataclass
class DistillResult:
    """Outcome of :func:`distill`.

    Attributes:
        student: the distilled student, in eval mode, on the CPU.
        history: one dict per epoch: ``epoch``, ``loss`` (mean training loss), ``agreement`` and
            ``kl`` (held-out top-1 agreement and ``KL(black box ‖ student)`` at T=1; ``None`` without
            a hold-out, ``kl`` also ``None`` for a ``label`` black box; for ``topk`` it is measured
            against the completed distribution of :func:`topk_distribution`), ``queries`` (cumulative),
            ``lr`` (at the epoch's end) and ``seconds`` (cumulative wall time).
        fidelity: ``agreement``, ``kl``, ``n_holdout`` on the held-out transfer images; ``accuracy``
            (student vs ``eval_labels``, else ``None``); with ``eval_images`` also ``eval_agreement``,
            ``eval_kl``, ``n_eval`` and, with labels, ``blackbox_accuracy``.
        queries: black-box queries spent by this distillation, over all resumed runs.
        seconds: wall time, over all resumed runs.
        config: the settings and sizes the run used.
    """

    student: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    fidelity: dict[str, Any] = field(default_factory=dict)
    queries: int = 0
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        fid = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.fidelity.items())
        return (f"DistillResult(student={type(self.student).__name__}, epochs={len(self.history)}, "
                f"queries={self.queries}, seconds={self.seconds:.1f}, fidelity=({fid}))")
