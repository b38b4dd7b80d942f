"""Distil a black-box classifier into a white-box student from its answers only.

The student never sees the black box's weights, gradients or training labels. It is trained
on the black box's answers to a set of unlabelled *transfer* images (knowledge distillation,
Hinton, Vinyals and Dean 2015). What the loss can use depends on what the black box reveals:

* ``output="probs"`` or ``"logits"``: soft-label distillation at temperature ``τ``::

      L = τ² · KL(p_T^τ ‖ p_S^τ) = τ² · Σ_c p_T^τ(c) · (log p_T^τ(c) − log p_S^τ(c))
      p_T^τ = softmax(log p_T / τ)      (= p_T^(1/τ) renormalised; softmax(z_T / τ) for logits z_T)
      p_S^τ = softmax(z_S / τ)          (z_S: the student's logits)

  The ``τ²`` factor keeps the gradient scale independent of ``τ``.
* ``output="topk"``: the k revealed probabilities are completed to a full distribution, the
  remaining mass ``1 − Σ top-k`` spread evenly over the other ``C − k`` classes, then the same loss.
* ``output="label"``: cross-entropy on the black box's hard labels, with optional label smoothing.

Queries. Every transfer image is sent to the black box exactly once, at the start; the answers are
kept (and written into the checkpoint, so a resumed run never asks again). The default augmentation
(random horizontal flip plus a random translation of up to 1/8 of the image size, zero padded) is
label preserving and reuses the answer of the original image: it costs no query. With
``augment="query"`` every augmented view is sent to the black box instead, and each one counts.
``query_budget`` is a hard cap on everything :func:`distill` spends: transfer and held-out images,
``eval_images`` and augmented views. When the budget is smaller than the number of transfer images
(plus ``eval_images``), only the *first* ``query_budget − len(eval_images)`` transfer images are used.
Augmented views that no longer fit in the budget reuse their original image's answer.

Held-out fidelity. A seeded random share (``holdout``) of the used transfer images is answered by the
black box but never trained on; after every epoch the student's top-1 agreement with the black box
and ``KL(black box ‖ student)`` at ``T = 1`` are measured there.

Determinism and resuming. With a fixed ``seed`` the run is deterministic: the student's
initialisation, the hold-out split, the data order (its own ``torch.Generator``) and the
augmentation (another generator) all derive from it. The hyper-parameters are checked as a
:class:`DistillConfig`. With ``checkpoint_dir`` a :class:`DistillCheckpoint` is written atomically after
the queries and after every epoch (student, optimiser, scheduler, epoch, every RNG state, history,
black-box answers and the query count). Calling :func:`distill` again with the same
arguments and ``resume=True`` continues from it without asking the black box again and, on the same
machine (CPU, same thread count), ends with bitwise the same student as an uninterrupted run.
A checkpoint written with different arguments raises ``ValueError``; pass ``resume=False`` to
start afresh (the old checkpoint is then overwritten).

Distributed training. The same call runs under ``torchrun``. When ``WORLD_SIZE > 1`` and no process
group exists, one is created (``nccl`` on CUDA, ``gloo`` on CPU) and destroyed at the end. The student
is wrapped in ``DistributedDataParallel``. ``batch_size`` is the *global* batch: every rank draws the
same permutation and augmentation parameters, and takes a contiguous ``1/world_size`` share of each
batch; the loss is scaled so the averaged gradient is the mean over the global batch. Rank 0 alone
talks to the black box (the transfer answers, and augmented views with ``augment="query"``) and
broadcasts the answers, so every query is paid and counted once; held-out evaluation is sharded and
all-reduced. Only rank 0 writes checkpoints (and reads them, broadcasting their content, so nodes need
no shared file system); every rank returns the same student. On one machine::

    torchrun --standalone --nproc_per_node=4 my_script.py

Across two nodes (run on each, with ``--node_rank`` 0 and 1)::

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
        --rdzv_id=lwcam --rdzv_backend=c10d --rdzv_endpoint=HOST_OF_NODE0:29500 my_script.py

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lwcam import BlackBox, distill
    >>> teacher = nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> bb = BlackBox(teacher, num_classes=10, output="probs")
    >>> student = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ...                         nn.Linear(8, 10))
    >>> result = distill(bb, torch.randn(64, 3, 16, 16), student=student, epochs=2, batch_size=16,
    ...                  progress=False)
    >>> result.queries, sorted(result.fidelity)[:3]
    (64, ['accuracy', 'agreement', 'kl'])
"""

from __future__ import annotations

import copy
import hashlib
import math
import numbers
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ._checks import check_bool, check_positive_int, check_real, check_targets
from ._utils import atomic_save, eval_mode, progress_enabled, resolve_device, seed_everything, track, training_layout
from .blackbox import BlackBox, TopK, _row_problems
from .models import build_model, classification_models

__all__ = [
    "distill",
    "DistillConfig",
    "DistillCheckpoint",
    "DistillResult",
    "kd_loss",
    "label_loss",
    "topk_distribution",
    "answers_to_log_probs",
    "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "distill_checkpoint.pt"
_CHECKPOINT_VERSION = 1
_MATERIALIZE_BYTES = 2 * 2**30  # a Dataset up to this size is loaded into memory once
_QUERY_CHUNK = 1024  # images handed to the black box per call while answering the transfer set

#: The temperatures accepted: z/T and the T² loss scale stay well inside float32 for any logits a network makes.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3

Augment = Literal["default", "query", "none"]
#: ``lr`` and ``weight_decay`` when :func:`distill` is given ``None`` (AdamW's weight decay is decoupled).
_OPTIMISER_DEFAULTS = {"adamw": {"lr": 2e-3, "weight_decay": 0.05}, "sgd": {"lr": 0.05, "weight_decay": 5e-4}}


# ----------------------------------------------------------------------------- losses
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


# ----------------------------------------------------------------------------- result
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


# ----------------------------------------------------------------------------- data access
class _Images:
    """Uniform batched access to a (N,3,H,W) tensor or a Dataset of images / (image, ...) tuples."""

    def __init__(self, data: Any, name: str, channels: int) -> None:
        self.name = name
        self.dataset: Any = None
        self.labels: torch.Tensor | None = None
        if isinstance(data, torch.Tensor):
            if not data.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {data.dtype}")
            if data.dim() != 4 or data.shape[1] != channels:
                raise ValueError(f"{name} must have shape (N,{channels},H,W), got {tuple(data.shape)}")
            if data.shape[0] == 0:
                raise ValueError(f"{name} is empty: it holds no image")
            self.tensor: torch.Tensor | None = data.detach()
            self.n = int(data.shape[0])
            self.shape = tuple(int(s) for s in data.shape[1:])
            return
        if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise TypeError(f"{name} must be a (N,{channels},H,W) float tensor or a Dataset of images, "
                            f"got {type(data).__name__}")
        self.n = len(data)
        if self.n == 0:
            raise ValueError(f"{name} is empty: it holds no image")
        first = self._image(data[0], 0)
        if first.dim() != 3 or first.shape[0] != channels:
            raise ValueError(f"{name} items must be images of shape ({channels},H,W), got {tuple(first.shape)}")
        self.shape = tuple(int(s) for s in first.shape)
        self.dataset = data
        self.tensor = None
        if self.n * first.numel() * first.element_size() <= _MATERIALIZE_BYTES:
            self.tensor = self._load(range(self.n))

    def _image(self, item: Any, i: int) -> torch.Tensor:
        img = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(img, torch.Tensor) or not img.is_floating_point():
            raise TypeError(f"{self.name}[{i}] must be a float image tensor or a tuple starting with one, "
                            f"got {type(img).__name__}")
        return img

    def _load(self, idx: Sequence[int]) -> torch.Tensor:
        imgs = []
        for i in idx:
            img = self._image(self.dataset[int(i)], int(i))
            if tuple(img.shape) != self.shape:
                raise ValueError(f"{self.name}[{int(i)}] has shape {tuple(img.shape)}; "
                                 f"every image must be {self.shape}")
            imgs.append(img)
        return torch.stack(imgs)

    def labels_from_items(self) -> torch.Tensor | None:
        """Second element of every tuple item, when it is an integer label (for evaluation only)."""
        if self.dataset is None:
            return None
        first = self.dataset[0]
        if not isinstance(first, (tuple, list)) or len(first) < 2:
            return None
        label = first[1]
        if not isinstance(label, (int, torch.Tensor)) or (isinstance(label, torch.Tensor) and label.numel() != 1):
            return None
        return torch.tensor([int(self.dataset[i][1]) for i in range(self.n)], dtype=torch.long)

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor[idx.to(self.tensor.device)]
        return self._load(idx.tolist())

    def fingerprint(self, n: int | None = None) -> str:
        """SHA-256 over the shape and up to 32 evenly spaced images of the first ``n``."""
        n = self.n if n is None else n
        h = hashlib.sha256(repr((self.n, self.shape)).encode())
        picks = torch.linspace(0, n - 1, steps=min(32, n)).round().long().unique()
        for img in self.get(picks):
            h.update(img.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()


# ----------------------------------------------------------------------------- distributed
class _Dist:
    """World size, rank and the collectives distill needs (no-ops in a single process)."""

    def __init__(self, device_arg: str | torch.device | None) -> None:
        self.created = False
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        initialised = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if initialised else env_world
        self.rank = dist.get_rank() if initialised else int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank if initialised else 0)))
        device = resolve_device(device_arg)
        if device.type == "cuda" and self.world > 1 and device.index is None:
            device = torch.device("cuda", self.local_rank)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        self.device = device
        if self.world > 1 and not initialised:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.created = True

    @property
    def active(self) -> bool:
        return self.world > 1

    def broadcast(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def rank0(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and broadcast its value; an error there is raised on every rank."""
        if not self.active:
            return fn()
        payload: Any = None
        error: Exception | None = None
        if self.rank == 0:
            try:
                payload = ("ok", fn())
            except Exception as err:
                error = err
                payload = ("error", f"{type(err).__name__}: {err}")
        payload = self.broadcast(payload)
        if payload[0] == "error":
            if error is not None:
                raise error
            raise RuntimeError(f"rank 0 failed: {payload[1]}")
        return payload[1]

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dev = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            buf = t.to(dev)
            dist.all_reduce(buf)
            return buf.to(t.device)
        return t

    def sync_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        if not self.active:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)

    def shard(self, n: int) -> torch.Tensor:
        """This rank's contiguous share of positions ``0..n-1``."""
        return torch.tensor_split(torch.arange(n), self.world)[self.rank]

    def close(self) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- argument checks
def _check_augment(augment: Any) -> Augment:
    """``True``/``"default"``, ``"query"`` or ``False``/``None``/``"none"`` as one of :data:`Augment`."""
    if augment is True or augment == "default":
        return "default"
    if augment is False or augment is None or augment == "none":
        return "none"
    if augment == "query":
        return "query"
    raise ValueError(f"augment must be True/'default', 'query' or False/'none', got {augment!r}")


def _check_holdout(holdout: Any) -> None:
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)):
        raise ValueError(f"holdout must be a fraction in [0, 1) or an int count, got {holdout!r}")
    if isinstance(holdout, int):
        if holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {holdout}")
    else:
        check_real(holdout, "holdout as a fraction", 0.0, 1.0, high_open=True)


def _check_student(student: Any) -> None:
    if isinstance(student, str):
        if student not in classification_models():
            raise ValueError(f"student={student!r} is not a torchvision classification model; pass an "
                             f"nn.Module or one of torchvision.models.list_models(module=torchvision.models), "
                             f"e.g. 'resnet18'")
    elif not isinstance(student, nn.Module):
        raise TypeError(f"student must be a torchvision model name or an nn.Module, got {type(student).__name__}")


def _check_run_options(checkpoint_dir: Any, on_epoch_end: Any) -> None:
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a path (str or os.PathLike) or None, "
                        f"got {type(checkpoint_dir).__name__}")
    if on_epoch_end is not None and not callable(on_epoch_end):
        raise TypeError(f"on_epoch_end must be callable or None, got {type(on_epoch_end).__name__}")


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class DistillConfig:
    """The hyper-parameters of :func:`distill`, validated when the object is made.

    The fields and their defaults are :func:`distill`'s keyword arguments of the same names. For a
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
        _check_augment(self.augment)
        if self.query_budget is not None:
            check_positive_int(self.query_budget, "query_budget")
        _check_holdout(self.holdout)
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
        return _check_augment(self.augment)

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

    def fingerprint(self, plan: _Plan, student: str, student_init: str) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: these settings, the student (its name and a
        hash of its initial weights), the black box's kind and the data (sizes and a content hash)."""
        return {"version": _CHECKPOINT_VERSION, "student": student, "student_init": student_init,
                **self.settings(), "n_holdout": plan.n_hold, **plan.facts(),
                "image_shape": list(plan.source.shape), "transfer": plan.source.fingerprint(plan.n_used),
                "eval": plan.evals.fingerprint() if plan.evals is not None else None}


@dataclass(frozen=True)
class _Plan:
    """What a run works on: the black box's kind, the images and how many of them are used."""

    output: str
    num_classes: int
    k: int | None
    source: _Images
    evals: _Images | None
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
        return {"output": self.output, "k": self.k, "num_classes": self.num_classes,
                "n_transfer": self.source.n, "n_used": self.n_used}


def _eval_labels(evals: _Images | None, eval_labels: Any, num_classes: int) -> torch.Tensor | None:
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


def _make_plan(blackbox: BlackBox, transfer_images: Any, eval_images: Any, eval_labels: Any,
               config: DistillConfig) -> _Plan:
    source = _Images(transfer_images, "transfer_images", blackbox.channels)
    evals = _Images(eval_images, "eval_images", blackbox.channels) if eval_images is not None else None
    labels = _eval_labels(evals, eval_labels, blackbox.num_classes)
    n_used, n_hold = config.sizes(source.n, evals.n if evals is not None else 0)
    return _Plan(output=blackbox.output, num_classes=blackbox.num_classes,
                 k=blackbox.k if blackbox.output == "topk" else None, source=source, evals=evals,
                 eval_labels=labels, n_used=n_used, n_hold=n_hold)


# ----------------------------------------------------------------------------- helpers
def _build_student(name: str, num_classes: int) -> nn.Module:
    """A torchvision classification architecture with random weights, auxiliary heads removed."""
    model = build_model(name, num_classes=num_classes, weights=None)  # the name was checked by _check_student
    if getattr(model, "aux_logits", False):  # inception_v3 / googlenet: train on the main head only
        cast(Any, model).aux_logits = False
        for attr in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, attr):
                setattr(model, attr, None)
    return model


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the student must return a (B,C) logits tensor, got {type(out).__name__}")


def _state_hash(module: nn.Module) -> str:
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


def _augment_params(n: int, pad: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    flips = torch.rand(n, generator=gen) < 0.5
    shifts = torch.randint(-pad, pad + 1, (n, 2), generator=gen)
    return flips, shifts


def _apply_augment(x: torch.Tensor, flips: torch.Tensor, shifts: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-image horizontal flip and translation by ``shifts`` (dy, dx) with zero padding."""
    b, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    flips, shifts = flips.to(dev), shifts.to(dev)
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + pad + shifts[:, 1:2]
    rows = torch.arange(h, device=dev).expand(b, h) + pad + shifts[:, 0:1]
    bidx = torch.arange(b, device=dev)[:, None, None]
    out = padded[bidx, :, rows[:, :, None], cols[:, None, :]]  # (B,H,W,C)
    return out.permute(0, 3, 1, 2).contiguous()


def _query(bb: BlackBox, images: _Images, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ask the black box about images ``idx`` (in chunks); answers as CPU tensors."""
    parts: list[Any] = []
    for s in range(0, len(idx), _QUERY_CHUNK):
        parts.append(bb(images.get(idx[s : s + _QUERY_CHUNK])))
    return _cat_answers(parts, bb.output)


def _cat_answers(parts: list[Any], output: str) -> dict[str, torch.Tensor]:
    if output == "topk":
        return {"values": torch.cat([p.values for p in parts]).float().cpu(),
                "indices": torch.cat([p.indices for p in parts]).long().cpu()}
    key = {"probs": "probs", "logits": "logits", "label": "labels"}[output]
    t = torch.cat([p for p in parts]).cpu()
    return {key: t.long() if output == "label" else t.float()}


def _targets(answers: dict[str, torch.Tensor], output: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training targets (log-probs (N,C) or labels (N,)) and the black box's top-1 class (N,)."""
    if output == "label":
        labels = answers["labels"]
        return labels, labels
    if output == "topk":
        raw: Any = TopK(answers["values"], answers["indices"])
        top1 = answers["indices"][:, 0]
    else:
        raw = answers[output]
        top1 = raw.argmax(dim=1)
    return answers_to_log_probs(raw, output, num_classes), top1


def _ask_transfer(blackbox: BlackBox, plan: _Plan) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None,
                                                            int]:
    """The black box's answers for the used transfer images and the eval images, and the queries they cost."""
    before = blackbox.queries
    answers = _query(blackbox, plan.source, torch.arange(plan.n_used))
    evals = _query(blackbox, plan.evals, torch.arange(plan.evals.n)) if plan.evals is not None else None
    return answers, evals, blackbox.queries - before


def _all_finite(loss: torch.Tensor, ctx: _Dist) -> bool:
    """Whether ``loss`` is finite on every rank (one small all-reduce under ``torchrun``, so all ranks agree)."""
    ok = torch.isfinite(loss.detach()).to(torch.float64).reshape(1).cpu()
    return bool(ctx.all_reduce(ok).item() == ctx.world)


def _train_mode(model: nn.Module, frozen: set[str]) -> None:
    """Training mode, except for the submodules the caller had put in eval mode (e.g. a frozen BatchNorm)."""
    model.train()
    for name, m in model.named_modules():
        if name in frozen:
            m.training = False


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return fn


def _optimiser(model: nn.Module, config: DistillConfig,
               n_train: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (or SGD, Nesterov momentum 0.9), one epoch of linear warm-up (at most 1/10 of the run), cosine decay."""
    params = model.parameters()
    opt: torch.optim.Optimizer
    if config.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=config.peak_lr, weight_decay=config.decay)
    else:
        opt = torch.optim.SGD(params, lr=config.peak_lr, momentum=0.9, nesterov=True, weight_decay=config.decay)
    steps_per_epoch = max(1, n_train // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(total_steps, max(1, min(steps_per_epoch, total_steps // 10))))
    return opt, sched


# ----------------------------------------------------------------------------- checkpoint
def _prepare_checkpoint_dir(checkpoint_dir: str | os.PathLike | None) -> Path | None:
    """Create ``checkpoint_dir`` and prove it writable (a test file), before anything is paid for."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"checkpoint_dir {str(path)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"checkpoint_dir {str(path)!r} is not a writable folder: {err}") from err
    return path


def _answers_problem(answers: Any, output: str, num_classes: int, n: int, atol: float) -> str | None:
    """What is wrong with stored black-box answers for ``n`` images, checked like fresh answers; ``None`` if sound."""
    keys = {"probs": ["probs"], "logits": ["logits"], "topk": ["values", "indices"], "label": ["labels"]}[output]
    if not isinstance(answers, dict) or any(not isinstance(answers.get(k), torch.Tensor) for k in keys):
        return f"answers must be a dict of tensors {keys}"
    if output in ("probs", "logits"):
        t = answers[output]
        if tuple(t.shape) != (n, num_classes):
            return f"{output} have shape {tuple(t.shape)}, expected ({n}, {num_classes})"
        bad = _row_problems(t.float(), "probs" if output == "probs" else "logits", atol)
        return None if not bad else f"{len(bad)} invalid rows, e.g. row {next(iter(bad))}: {next(iter(bad.values()))}"
    if output == "label":
        t = answers["labels"]
        if tuple(t.shape) != (n,) or t.is_floating_point() or (t < 0).any() or (t >= num_classes).any():
            return f"labels must be {n} class indices in [0, {num_classes})"
        return None
    v, i = answers["values"], answers["indices"]
    if v.dim() != 2 or v.shape[0] != n or v.shape != i.shape or i.is_floating_point():
        return f"top-k values {tuple(v.shape)} and indices {tuple(i.shape)} must both be ({n}, k) with integer indices"
    if not torch.isfinite(v).all() or (v < -atol).any() or (v > 1 + atol).any() or (v.sum(1) > 1 + atol).any():
        return "top-k values must be finite probabilities in [0, 1] whose sum is at most 1"
    if (i < 0).any() or (i >= num_classes).any():
        return f"top-k indices must lie in [0, {num_classes})"
    return None


#: The entries a resumed run takes from a checkpoint file; a file without one of them is damaged.
_CHECKPOINT_NEEDS = ("epoch", "student", "optimizer", "scheduler", "order_rng", "aug_rng", "torch_rng", "history",
                     "answers", "eval_answers", "queries", "seconds", "holdout_indices", "train_indices")


def _mine(states: list[torch.Tensor], rank: int, world: int) -> torch.Tensor:
    """This rank's RNG state from a per-rank list (rank 0's when the world size has changed)."""
    return states[rank] if len(states) == world else states[0]


@dataclass
class DistillCheckpoint:
    """Everything :func:`distill` needs to continue a run bit for bit, stored in ``distill_checkpoint.pt``.

    Written atomically (:func:`lwcam._utils.atomic_save`) by rank 0 after the queries (``epoch=0``) and
    after every epoch; read with ``torch.load(..., weights_only=True)``. It holds the student, optimiser
    and scheduler states, every random state (the data-order and augmentation generators, and torch's
    CPU and CUDA generators of every rank), the history, the black box's answers (so a resumed run never
    asks again), the queries paid, the wall time so far, the hold-out split and the ``fingerprint`` of
    the arguments (:meth:`DistillConfig.fingerprint`, which holds the epoch count). A resumed run must
    match the fingerprint and draw the same hold-out and training indices (``ValueError`` otherwise).
    """

    fingerprint: dict[str, Any]
    epoch: int
    student: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    order_rng: torch.Tensor
    aug_rng: torch.Tensor
    torch_rng: list[torch.Tensor]
    cuda_rng: list[torch.Tensor] | None
    history: list[dict[str, Any]]
    answers: dict[str, torch.Tensor]
    eval_answers: dict[str, torch.Tensor] | None
    queries: int
    seconds: float
    holdout_indices: torch.Tensor
    train_indices: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        """The plain dict that is written to the file (tensors, numbers, strings: ``weights_only``-safe)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the checkpoint atomically (a temporary file, then a rename)."""
        return atomic_save(self.to_dict(), path)

    @staticmethod
    def read(path: Path) -> dict[str, Any]:
        """The raw content of a checkpoint file; ``ValueError`` naming the file if it is unreadable or not a dict."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"the checkpoint {path} cannot be read ({type(err).__name__}: {err}); delete it or "
                             f"pass resume=False to start afresh") from err
        if not isinstance(ckpt, dict):
            raise ValueError(f"the checkpoint {path} holds a {type(ckpt).__name__}, not a distillation checkpoint; "
                             f"delete it or pass resume=False to start afresh")
        return ckpt

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: Path | None, *, fingerprint: dict[str, Any], plan: _Plan,
                  epochs: int, atol: float, split: tuple[torch.Tensor, torch.Tensor]) -> DistillCheckpoint:
        """Check ``raw`` against the run's ``fingerprint`` (``ValueError`` listing what differs), validate
        what a resumed run takes from it (``ValueError`` naming the file and the damage), then check that
        it was written with the run's ``split`` (hold-out and training indices; ``ValueError`` if not)."""
        old = raw.get("fingerprint", {})
        diff = [f"{k}: {old.get(k)!r} != {v!r}" for k, v in fingerprint.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"the checkpoint {path} was written by a run with other arguments "
                             f"({'; '.join(diff)[:800]}); pass resume=False to start afresh or use another "
                             f"checkpoint_dir")
        _check_content(raw, path, plan=plan, epochs=epochs, atol=atol)
        _check_split(raw, path, split)
        entries: dict[str, Any] = {f.name: raw.get(f.name) for f in fields(cls)}
        return cls(**entries)

    def restore(self, model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                order_gen: torch.Generator, aug_gen: torch.Generator, ctx: _Dist) -> None:
        """Load the student, optimiser and scheduler states, then every random state."""
        model.load_state_dict(self.student)
        opt.load_state_dict(self.optimizer)
        sched.load_state_dict(self.scheduler)
        self.restore_rng(order_gen, aug_gen, ctx)

    def restore_rng(self, order_gen: torch.Generator, aug_gen: torch.Generator, ctx: _Dist) -> None:
        """Data-order and augmentation generators, and this rank's torch CPU (and CUDA) generator."""
        order_gen.set_state(self.order_rng)
        aug_gen.set_state(self.aug_rng)
        torch.set_rng_state(_mine(self.torch_rng, ctx.rank, ctx.world))
        if ctx.device.type == "cuda" and self.cuda_rng is not None:
            torch.cuda.set_rng_state(_mine(self.cuda_rng, ctx.rank, ctx.world), ctx.device)


def _damaged(path: Path | None, what: str) -> ValueError:
    return ValueError(f"the checkpoint {path} is damaged: {what}; delete it or pass resume=False to start afresh")


def _check_split(ckpt: dict[str, Any], path: Path | None, split: tuple[torch.Tensor, torch.Tensor]) -> None:
    """``ValueError`` unless the checkpoint's hold-out and training indices are the run's ``split``.

    The split is a seeded draw (:func:`_split`); a run that draws another one (other arguments slipped past
    the fingerprint, another torch version's random stream) would train on images it measures agreement on.
    """
    for name, mine in zip(("holdout_indices", "train_indices"), split, strict=True):
        theirs = ckpt[name]
        if not isinstance(theirs, torch.Tensor) or not torch.equal(theirs.to(mine.dtype), mine):
            raise ValueError(f"the checkpoint {path} was written with other {name} than this run draws (a different "
                             f"hold-out split of the transfer images); pass resume=False to start afresh or use "
                             f"another checkpoint_dir")


def _check_content(ckpt: dict[str, Any], path: Path | None, *, plan: _Plan, epochs: int, atol: float) -> None:
    """Validate what a resumed run takes from a checkpoint; ``ValueError`` naming the file and the fault."""
    missing = [k for k in _CHECKPOINT_NEEDS if k not in ckpt]
    if missing:
        raise _damaged(path, f"missing entries {missing}")
    problem = _answers_problem(ckpt["answers"], plan.output, plan.num_classes, plan.n_used, atol)
    if problem is not None:
        raise _damaged(path, f"its black-box answers: {problem}")
    if (ckpt["eval_answers"] is None) != (plan.n_eval == 0):
        raise _damaged(path, "eval_answers do not match eval_images")
    if plan.n_eval and (problem := _answers_problem(ckpt["eval_answers"], plan.output, plan.num_classes,
                                                    plan.n_eval, atol)):
        raise _damaged(path, f"its eval_images answers: {problem}")
    epoch, queries = ckpt["epoch"], ckpt["queries"]
    if not isinstance(epoch, int) or not 0 <= epoch <= epochs or len(ckpt["history"]) != epoch:
        raise _damaged(path, f"epoch={epoch!r} must be an int in [0, {epochs}] with one history entry per epoch")
    if not isinstance(queries, int) or queries < 0:
        raise _damaged(path, f"queries={queries!r} must be an int >= 0")
    bad = [k for k, v in ckpt["student"].items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not torch.isfinite(v).all()]
    if bad:
        raise _damaged(path, f"the student's {bad[:3]} hold NaN or Inf")


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _evaluate(model: nn.Module, images: _Images, idx: torch.Tensor, top1: torch.Tensor,
              log_probs: torch.Tensor | None, labels: torch.Tensor | None, ctx: _Dist,
              batch_size: int) -> dict[str, float | None]:
    """Agreement with ``top1``, KL(black box ‖ student) at T=1 and accuracy, sharded over ranks."""
    mine = ctx.shard(len(idx))
    acc = torch.zeros(4, dtype=torch.float64)  # agree, kl_sum, correct, n
    with eval_mode(model):
        for s in range(0, len(mine), batch_size):
            sel = idx[mine[s : s + batch_size]]
            out = _logits(model(images.get(sel).to(ctx.device))).float()
            pred = out.argmax(dim=1).cpu()
            acc[0] += float((pred == top1[sel]).sum())
            if log_probs is not None:
                acc[1] += float(kd_loss(out, log_probs[sel].to(out.device), 1.0, reduction="sum"))
            if labels is not None:
                acc[2] += float((pred == labels[sel]).sum())
            acc[3] += len(sel)
    acc = ctx.all_reduce(acc)
    n = float(acc[3])
    if n == 0:
        return {"agreement": None, "kl": None, "accuracy": None}
    return {"agreement": float(acc[0]) / n,
            "kl": float(acc[1]) / n if log_probs is not None else None,
            "accuracy": float(acc[2]) / n if labels is not None else None}


# ----------------------------------------------------------------------------- training
@dataclass
class _Training:
    """The state of one distillation run that the per-epoch functions read and advance."""

    config: DistillConfig
    plan: _Plan
    ctx: _Dist
    blackbox: BlackBox
    student_name: str
    model: nn.Module
    frozen: set[str]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    holdout_idx: torch.Tensor
    train_idx: torch.Tensor
    answers: dict[str, torch.Tensor]
    eval_answers: dict[str, torch.Tensor] | None
    spent: int  # queries paid by this distillation (over resumed runs)
    fingerprint: dict[str, Any]
    ckpt_path: Path | None
    t_start: float
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    order_gen: torch.Generator = field(default_factory=torch.Generator)
    aug_gen: torch.Generator = field(default_factory=torch.Generator)
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    seconds_before: float = 0.0
    targets: torch.Tensor = field(init=False)  # log-probabilities (N,C), or labels (N,) for a label black box
    top1: torch.Tensor = field(init=False)  # the black box's top-1 class (N,)
    layout: torch.memory_format = torch.contiguous_format  # of the training batches (set by _run)

    def __post_init__(self) -> None:
        self.order_gen.manual_seed(self.config.seed + 1)
        self.aug_gen.manual_seed(self.config.seed + 2)
        self.targets, self.top1 = _targets(self.answers, self.plan.output, self.plan.num_classes)

    @property
    def soft(self) -> bool:
        return self.plan.output != "label"

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.plan.n_train // self.config.batch_size)

    @property
    def global_batch(self) -> int:
        return min(self.config.batch_size, self.plan.n_train)

    @property
    def pad(self) -> int:
        return max(1, round(self.plan.source.shape[1] / 8))

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t_start


def _split(plan: _Plan, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted hold-out and training indices among the used transfer images (a seeded random split)."""
    perm = torch.randperm(plan.n_used, generator=torch.Generator().manual_seed(seed))
    return perm[: plan.n_hold].sort().values, perm[plan.n_hold :].sort().values


def _prepare_student(student: str | nn.Module, plan: _Plan, seed: int,
                     device: torch.device) -> tuple[nn.Module, str, str, set[str]]:
    """The seeded student on ``device``, its name, a hash of its initial weights and its frozen submodules.

    One image is passed through it to check that it takes the transfer images and outputs
    ``num_classes`` logits (``ValueError`` otherwise).
    """
    seed_everything(seed)
    if isinstance(student, str):
        name, model = student, _build_student(student, plan.num_classes)
    else:
        name, model = f"{type(student).__module__}.{type(student).__qualname__}", copy.deepcopy(student)
    init_hash = _state_hash(model)
    frozen = {n for n, m in model.named_modules() if not m.training} if model.training else set()
    model.to(device)
    with eval_mode(model), torch.no_grad():
        try:
            probe = _logits(model(plan.source.get(torch.tensor([0])).to(device)))
        except Exception as err:
            raise ValueError(f"student {name} cannot take transfer_images of shape {plan.source.shape}: "
                             f"{type(err).__name__}: {err}") from err
    if probe.dim() != 2 or probe.shape[1] != plan.num_classes:
        raise ValueError(f"student {name} outputs shape {tuple(probe.shape)} for one image, but the "
                         f"black box has num_classes={plan.num_classes}: its output width must match")
    return model, name, init_hash, frozen


def _resume_point(ctx: _Dist, path: Path | None, resume: bool, fingerprint: dict[str, Any], plan: _Plan,
                  epochs: int, atol: float, split: tuple[torch.Tensor, torch.Tensor]) -> DistillCheckpoint | None:
    """The checkpoint to continue from: read on rank 0, checked on every rank; ``None`` to start afresh."""
    raw = ctx.rank0(lambda: DistillCheckpoint.read(path) if path is not None and resume and path.exists() else None)
    if raw is None:
        return None
    return DistillCheckpoint.from_dict(raw, path, fingerprint=fingerprint, plan=plan, epochs=epochs, atol=atol,
                                       split=split)


def _save(tr: _Training, epoch: int) -> None:
    """Write the checkpoint after ``epoch`` epochs (rank 0 writes; every rank contributes its RNG state)."""
    if tr.ckpt_path is None:
        return
    ctx, device = tr.ctx, tr.ctx.device
    rngs = ctx.gather(torch.get_rng_state())
    cuda_rngs = ctx.gather(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None
    if ctx.rank != 0:
        return
    DistillCheckpoint(
        fingerprint=tr.fingerprint, epoch=epoch,
        student={k: v.detach().cpu() for k, v in tr.model.state_dict().items()},
        optimizer=tr.opt.state_dict(), scheduler=tr.sched.state_dict(),
        order_rng=tr.order_gen.get_state(), aug_rng=tr.aug_gen.get_state(), torch_rng=rngs, cuda_rng=cuda_rngs,
        history=tr.history, answers=tr.answers, eval_answers=tr.eval_answers, queries=tr.spent,
        seconds=tr.elapsed(), holdout_indices=tr.holdout_idx, train_indices=tr.train_idx,
    ).save(tr.ckpt_path)


def _setup(blackbox: BlackBox, student: str | nn.Module, config: DistillConfig, plan: _Plan, ctx: _Dist,
           ckpt_dir: Path | None, resume: bool, t_start: float) -> tuple[_Training, DistillCheckpoint | None]:
    """Split, student, checkpoint, black-box answers and optimiser: a run ready for its first (or next) epoch."""
    holdout_idx, train_idx = _split(plan, config.seed)
    model, name, init_hash, frozen = _prepare_student(student, plan, config.seed, ctx.device)
    fingerprint = config.fingerprint(plan, name, init_hash)
    ckpt_path = ckpt_dir / CHECKPOINT_NAME if ckpt_dir is not None else None
    ckpt = _resume_point(ctx, ckpt_path, resume, fingerprint, plan, config.epochs, blackbox.atol,
                         (holdout_idx, train_idx))
    if ckpt is not None:
        answers, eval_answers, spent = ckpt.answers, ckpt.eval_answers, int(ckpt.queries)
    else:  # asked once, on rank 0, then broadcast
        answers, eval_answers, spent = ctx.rank0(lambda: _ask_transfer(blackbox, plan))
    if ctx.active and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt, sched = _optimiser(model, config, plan.n_train)
    tr = _Training(config=config, plan=plan, ctx=ctx, blackbox=blackbox, student_name=name, model=model,
                   frozen=frozen, opt=opt, sched=sched, holdout_idx=holdout_idx, train_idx=train_idx,
                   answers=answers, eval_answers=eval_answers, spent=spent, fingerprint=fingerprint,
                   ckpt_path=ckpt_path, t_start=t_start, net=model)
    if ckpt is not None:
        ckpt.restore(model, opt, sched, tr.order_gen, tr.aug_gen, ctx)
        tr.history, tr.start_epoch, tr.seconds_before = list(ckpt.history), int(ckpt.epoch), float(ckpt.seconds)
    if ctx.active:
        tr.net = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return tr, ckpt


def _ask_views(tr: _Training, gidx: torch.Tensor, flips: torch.Tensor,
               shifts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """With ``augment="query"``: the black box's answers for the augmented views of a global batch (as
    far as the budget pays; the rest keep their original image's answer) and the queries they cost."""
    views = _apply_augment(tr.plan.source.get(gidx).cpu(), flips, shifts, tr.pad)
    batch_t = tr.targets[gidx].clone()
    budget = tr.config.query_budget
    room = len(views) if budget is None else max(0, budget - tr.spent)
    m = min(room, len(views))
    if m == 0:
        return batch_t, 0
    before = tr.blackbox.queries
    output = tr.plan.output
    fresh, _ = _targets(_cat_answers([tr.blackbox(views[:m])], output), output, tr.plan.num_classes)
    batch_t[:m] = fresh
    return batch_t, tr.blackbox.queries - before


def _batch(tr: _Training, gidx: torch.Tensor, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch ``gidx``: images (augmented) on the device, and their targets."""
    mode, device = tr.config.aug_mode, tr.ctx.device
    if mode == "none":
        return tr.plan.source.get(gidx[mine]).to(device), tr.targets[gidx[mine]]
    flips, shifts = _augment_params(len(gidx), tr.pad, tr.aug_gen)
    if mode == "query":
        batch_targets, paid = tr.ctx.rank0(lambda: _ask_views(tr, gidx, flips, shifts))
        tr.spent += paid
        tgt = batch_targets[mine]
    else:
        tgt = tr.targets[gidx[mine]]
    x = _apply_augment(tr.plan.source.get(gidx[mine]).to(device), flips[mine], shifts[mine], tr.pad)
    return x, tgt


def _train_step(tr: _Training, gidx: torch.Tensor, mine: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
    """One optimiser step on the global batch ``gidx``; returns this rank's summed per-image loss (float64).

    Per image, ``T² · KL(p_T^T ‖ p_S^T)`` for soft answers, cross-entropy for labels; the loss
    backpropagated is their sum times ``world / len(gidx)``, so that DistributedDataParallel's average
    over ranks is the mean over the global batch.
    """
    config, ctx = tr.config, tr.ctx
    x, tgt = _batch(tr, gidx, mine)
    out = _logits(tr.net(x.contiguous(memory_format=tr.layout)))
    tgt = tgt.to(ctx.device)
    if tr.soft:
        per = kd_loss(out, tgt, float(config.temperature), reduction="none")
    else:
        per = label_loss(out, tgt, float(config.label_smoothing), reduction="none")
    loss = per.sum() * (ctx.world / len(gidx))
    if not _all_finite(loss, ctx):
        raise FloatingPointError(
            f"distillation diverged: the training loss is not finite at epoch {epoch + 1}, step {step + 1} "
            f"of {tr.steps_per_epoch} (lr={config.peak_lr:g}, temperature={config.temperature:g}); the student "
            f"was not saved" + (f" and the last good checkpoint (epoch {epoch}) stays in {tr.ckpt_path}"
                                if tr.ckpt_path else "") + "; lower lr and pass resume=False")
    tr.opt.zero_grad(set_to_none=True)
    loss.backward()
    tr.opt.step()
    tr.sched.step()
    return per.detach().sum().double()


def _train_epoch(tr: _Training, epoch: int, show: bool) -> float:
    """One pass over the training share in a seeded random order; returns the mean training loss."""
    _train_mode(tr.model, tr.frozen)
    order = tr.train_idx[torch.randperm(tr.plan.n_train, generator=tr.order_gen)]
    mine = tr.ctx.shard(tr.global_batch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=tr.ctx.device)
    steps = track(range(tr.steps_per_epoch), total=tr.steps_per_epoch,
                  desc=f"distil {epoch + 1}/{tr.config.epochs}", enabled=show)
    for step in steps:
        gidx = order[step * tr.global_batch : (step + 1) * tr.global_batch]
        loss_sum += _train_step(tr, gidx, mine, epoch, step)
    loss_sum = tr.ctx.all_reduce(loss_sum.cpu())
    return float(loss_sum) / (tr.steps_per_epoch * tr.global_batch)


def _holdout_fidelity(tr: _Training) -> dict[str, float | None]:
    """Top-1 agreement and ``KL(black box ‖ student)`` at T=1 on the held-out transfer images."""
    return _evaluate(tr.model, tr.plan.source, tr.holdout_idx, tr.top1, tr.targets if tr.soft else None, None,
                     tr.ctx, tr.config.batch_size)


def _end_epoch(tr: _Training, epoch: int, loss: float, on_epoch_end: Callable[[int, nn.Module], None] | None) -> None:
    """Held-out fidelity, the history entry, the checkpoint and the caller's ``on_epoch_end``."""
    tr.ctx.sync_module(tr.model)  # BatchNorm statistics are per rank: take rank 0's
    ev = _holdout_fidelity(tr)
    if ev["kl"] is not None and not math.isfinite(ev["kl"]):
        raise FloatingPointError(f"distillation diverged: the held-out KL is {ev['kl']} after epoch {epoch + 1}; "
                                 f"the student was not saved; lower lr and pass resume=False")
    tr.history.append({"epoch": epoch + 1, "loss": loss, "agreement": ev["agreement"], "kl": ev["kl"],
                       "queries": tr.spent, "lr": float(tr.opt.param_groups[0]["lr"]), "seconds": tr.elapsed()})
    _save(tr, epoch + 1)
    if on_epoch_end is not None and tr.ctx.rank == 0:
        with eval_mode(tr.model):
            on_epoch_end(epoch + 1, tr.model)


def _fidelity(tr: _Training) -> dict[str, Any]:
    """:attr:`DistillResult.fidelity`: the last epoch's held-out numbers and, with ``eval_images``, the
    student's agreement, KL and accuracy there (and the black box's accuracy when labels are known)."""
    tr.ctx.sync_module(tr.model)
    last, plan = tr.history[-1], tr.plan
    fidelity: dict[str, Any] = {"agreement": last["agreement"], "kl": last["kl"], "accuracy": None,
                                "n_holdout": plan.n_hold}
    if plan.evals is None or tr.eval_answers is None:
        return fidelity
    ev_targets, ev_top1 = _targets(tr.eval_answers, plan.output, plan.num_classes)
    ev = _evaluate(tr.model, plan.evals, torch.arange(plan.evals.n), ev_top1, ev_targets if tr.soft else None,
                   plan.eval_labels, tr.ctx, tr.config.batch_size)
    fidelity.update(accuracy=ev["accuracy"], eval_agreement=ev["agreement"], eval_kl=ev["kl"], n_eval=plan.n_eval)
    if plan.eval_labels is not None:
        fidelity["blackbox_accuracy"] = float((ev_top1 == plan.eval_labels).double().mean())
    return fidelity


def _result_config(tr: _Training, resumed: bool) -> dict[str, Any]:
    """:attr:`DistillResult.config`: the resolved settings, the data sizes and how the run went."""
    plan = tr.plan
    return {"student": tr.student_name, **tr.config.settings(), **plan.facts(), "n_train": plan.n_train,
            "n_holdout": plan.n_hold, "n_eval": plan.n_eval, "image_shape": tuple(plan.source.shape),
            "steps_per_epoch": tr.steps_per_epoch, "world_size": tr.ctx.world, "device": str(tr.ctx.device),
            "resumed_from_epoch": tr.start_epoch if resumed else None,
            "checkpoint": str(tr.ckpt_path) if tr.ckpt_path is not None else None}


# ----------------------------------------------------------------------------- distill
def distill(
    blackbox: BlackBox,
    transfer_images: torch.Tensor | Any,
    student: str | nn.Module = "resnet18",
    temperature: float = 4.0,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float | None = None,
    weight_decay: float | None = None,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    augment: bool | Augment = True,
    query_budget: int | None = None,
    holdout: float | int = 0.1,
    eval_images: torch.Tensor | Any | None = None,
    eval_labels: torch.Tensor | Sequence[int] | None = None,
    label_smoothing: float = 0.0,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool | None = None,
    device: str | torch.device | None = None,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    channels_last: bool = False,
) -> DistillResult:
    """Distil ``blackbox`` into a white-box ``student`` from its answers on ``transfer_images``.

    The loss follows what the black box reveals (see the module docstring): for ``probs``,
    ``logits`` and ``topk`` (completed to a full distribution) it is
    ``τ² · KL(softmax(log p_T / τ) ‖ softmax(z_S / τ))``; for ``label`` it is cross-entropy on
    the black box's labels with ``label_smoothing``. Optimisation: AdamW (or SGD with Nesterov
    momentum 0.9) with a one-epoch linear warm-up and a cosine decay, stepped per batch.

    Args:
        blackbox: the model to explain, reachable only through its answers.
        transfer_images: unlabelled images in the model's normalised space: a float tensor
            (N,3,H,W), or a Dataset whose items are an image (3,H,W) or a tuple starting with one,
            e.g. ``(image, label, mask)``; anything after the image is ignored.
        student: a torchvision classification architecture name (built with random weights and
            ``blackbox.num_classes`` outputs) or an ``nn.Module`` (copied; the argument is left untouched).
        temperature: distillation temperature ``τ > 0`` (soft-label modes).
        epochs: passes over the training share of the transfer images.
        batch_size: global batch size (shared out over ranks under ``torchrun``).
        lr: peak learning rate; ``None``: 2e-3 for AdamW, 0.05 for SGD.
        weight_decay: ``None``: 0.05 for AdamW (decoupled), 5e-4 for SGD.
        optimizer: ``"adamw"`` (default: distils fastest in few epochs) or ``"sgd"``.
        augment: ``True``/``"default"``: random horizontal flip and translation, reusing the original
            image's answer (no query); ``"query"``: the same views, each sent to the black box and
            counted; ``False``/``"none"``: no augmentation.
        query_budget: hard cap on black-box queries (``None``: no cap). If it is smaller than the
            transfer set plus ``eval_images``, only the first ``query_budget − len(eval_images)``
            transfer images are used. It must pay for at least one batch.
        holdout: fraction (float in [0,1)) or count (int) of the used transfer images held out,
            answered but not trained on, to measure fidelity.
        eval_images: optional extra images (tensor or Dataset) answered by the black box (counted)
            to report ``eval_agreement`` and, with labels, student and black-box accuracy.
        eval_labels: true labels of ``eval_images``, for evaluation only; when ``None`` and
            ``eval_images`` is a Dataset of ``(image, label, ...)`` tuples, its labels are used.
        label_smoothing: label smoothing for a ``label`` black box.
        seed: seeds initialisation, split, data order and augmentation.
        checkpoint_dir: folder for an atomically written checkpoint (``distill_checkpoint.pt``)
            after the queries and after every epoch.
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one.
        progress: a progress bar over batches (``None``: only on a TTY).
        device: where the student trains (``None``: CUDA if available).
        on_epoch_end: called on rank 0 as ``on_epoch_end(epoch, student)`` after every epoch
            (``epoch`` counts from 1), with the student in eval mode; use it to keep a snapshot per
            epoch. Epochs restored from a checkpoint are not replayed.
        channels_last: train in the ``channels_last`` layout on the CPU (:func:`~lwcam._utils.training_layout`):
            1.2-1.3x faster steps on 2 cores, but the rounding differences grow over the epochs into
            a different student, as a change of seed would (``benchmarks/bench_train_layout.py``), so
            it is off by default. Your own module's ``forward`` must accept that layout (a ``.view``
            of an activation does not). Ignored under ``torchrun``. The student comes back contiguous.

    Returns:
        a :class:`DistillResult`.

    Raises:
        TypeError: ``blackbox`` is not a :class:`~lwcam.blackbox.BlackBox`, or images are not float tensors.
        ValueError: an unknown ``student`` name, a non-finite or out-of-range number (``temperature``,
            ``lr``, ``weight_decay``, ``label_smoothing``, ``holdout``), a ``query_budget`` smaller than a
            batch, an empty or wrongly shaped ``transfer_images``, a student whose output width differs
            from ``blackbox.num_classes``, a ``checkpoint_dir`` that cannot be created or written, a
            checkpoint written with other arguments, or a checkpoint that cannot be read or whose content
            is damaged (black-box answers checked like fresh ones, the student's weights finite); each
            message names the argument or the file. All of these are raised before the first query.
        FloatingPointError: the training loss (or the held-out KL) became NaN or Inf; the message names
            the epoch and step, and the checkpoint of the last completed epoch is left as it was.

    Example:
        >>> from lwcam import BlackBox
        >>> bb = BlackBox(nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), num_classes=5)
        >>> result = distill(bb, torch.randn(40, 3, 16, 16), student="regnet_x_s8", epochs=1, batch_size=16,
        ...                  query_budget=40, holdout=8, progress=False)
        >>> result.queries, result.fidelity["n_holdout"], type(result.student).__name__
        (40, 8, 'RegNet')
    """
    t_start = time.perf_counter()
    # ---- argument checks (identical on every rank, before any collective and any query)
    if not isinstance(blackbox, BlackBox):
        raise TypeError(f"blackbox must be an lwcam.BlackBox, got {type(blackbox).__name__}")
    config = DistillConfig(temperature=temperature, epochs=epochs, batch_size=batch_size, lr=lr,
                           weight_decay=weight_decay, optimizer=optimizer, augment=augment,
                           query_budget=query_budget, holdout=holdout, label_smoothing=label_smoothing, seed=seed,
                           channels_last=channels_last)
    _check_run_options(checkpoint_dir, on_epoch_end)
    _check_student(student)
    plan = _make_plan(blackbox, transfer_images, eval_images, eval_labels, config)
    ctx = _Dist(device)
    try:
        return _run(blackbox, student, config, plan, ctx, checkpoint_dir=checkpoint_dir, resume=resume,
                    progress=progress, on_epoch_end=on_epoch_end, t_start=t_start)
    finally:
        ctx.close()


def _run(blackbox: BlackBox, student: str | nn.Module, config: DistillConfig, plan: _Plan, ctx: _Dist, *,
         checkpoint_dir: str | os.PathLike | None, resume: bool, progress: bool | None,
         on_epoch_end: Callable[[int, nn.Module], None] | None, t_start: float) -> DistillResult:
    """:func:`distill` once its arguments are checked: set up (or resume), train epoch by epoch, evaluate."""
    if config.batch_size < ctx.world:
        raise ValueError(f"batch_size={config.batch_size} is smaller than the number of processes ({ctx.world})")
    ckpt_dir = ctx.rank0(lambda: _prepare_checkpoint_dir(checkpoint_dir))  # before anything is paid for
    tr, ckpt = _setup(blackbox, student, config, plan, ctx, ckpt_dir, resume, t_start)
    if ckpt is None:
        _save(tr, 0)  # the answers are safe before the first epoch
    show = progress_enabled(progress) and ctx.rank == 0
    with training_layout(tr.model, config.channels_last and not ctx.active) as tr.layout:
        for epoch in range(tr.start_epoch, config.epochs):
            loss = _train_epoch(tr, epoch, show)
            _end_epoch(tr, epoch, loss, on_epoch_end)
    fidelity = _fidelity(tr)
    seconds = tr.elapsed()
    return DistillResult(student=tr.model.cpu().eval(), history=tr.history, fidelity=fidelity, queries=tr.spent,
                         seconds=seconds, config=_result_config(tr, resumed=ckpt is not None))
