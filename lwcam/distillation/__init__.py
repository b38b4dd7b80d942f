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

The package, one job per module:

============== ===========================================================================================
``losses``     :func:`kd_loss`, :func:`label_loss`, :func:`topk_distribution`, :func:`answers_to_log_probs`
``access``     the images (a tensor or a Dataset) and the black box's answers about them
``augment``    the label-preserving flip and translation
``checks``     the input checks of :func:`distill` that are not a :class:`DistillConfig` field's
``config``     :class:`DistillConfig` (the settings, the checkpoint fingerprint) and the run's ``Plan``
``ddp``        world size, rank and the collectives (no-ops in one process)
``student``    the student built or copied, its logits, its training mode and its optimiser
``checkpoint`` :class:`DistillCheckpoint`: atomic writes, the resume checks
``state``      a run's state in four parts (``Run``, ``Learner``, ``Answers``, ``Progress``) and its set-up
``training``   batches, optimiser steps, epochs
``evaluate``   agreement, KL and accuracy against the black box
``result``     :class:`DistillResult`
``api``        :func:`distill`
============== ===========================================================================================

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

from .api import distill
from .checkpoint import CHECKPOINT_NAME, DistillCheckpoint
from .checks import Augment
from .config import DistillConfig
from .losses import MAX_TEMPERATURE, MIN_TEMPERATURE, answers_to_log_probs, kd_loss, label_loss, topk_distribution
from .result import DistillResult

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
    "MIN_TEMPERATURE",
    "MAX_TEMPERATURE",
    "Augment",
]
