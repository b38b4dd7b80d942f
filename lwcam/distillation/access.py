"""Access to the images and to the black box's answers about them.

* :class:`Images`: uniform batched access to a (N,3,H,W) tensor or a Dataset of images (loaded into memory
  once when it is small enough), checked when made, with a content fingerprint for the checkpoint;
* :func:`ask_transfer`: the black box's answers for the used transfer and eval images, asked once;
* :func:`cat_answers` and :func:`answer_targets`: answers as plain CPU tensors, and as training targets;
* :func:`answers_problem`: stored answers (from a checkpoint) checked like fresh ones.

What an answer holds depends on the black box's ``output`` mode: ``{"probs": (N,C)}``, ``{"logits": (N,C)}``,
``{"values": (N,k), "indices": (N,k)}`` for ``topk`` and ``{"labels": (N,)}`` for ``label``.

Example:
    >>> import torch
    >>> images = Images(torch.zeros(5, 3, 8, 8), "transfer_images", channels=3)
    >>> images.n, images.shape, tuple(images.get(torch.tensor([0, 4])).shape)
    (5, (3, 8, 8), (2, 3, 8, 8))
    >>> targets, top1 = answer_targets({"labels": torch.tensor([2, 0])}, "label", 3)
    >>> top1.tolist()
    [2, 0]
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from ..blackbox import BlackBox, TopK, _row_problems
from .losses import answers_to_log_probs

__all__ = ["Images", "answer_targets", "answers_problem", "ask_transfer", "cat_answers"]

_MATERIALIZE_BYTES = 2 * 2**30  # a Dataset up to this size is loaded into memory once
_QUERY_CHUNK = 1024  # images handed to the black box per call while answering the transfer set


class Images:
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


def _query(bb: BlackBox, images: Images, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ask the black box about images ``idx`` (in chunks); answers as CPU tensors."""
    parts: list[Any] = []
    for s in range(0, len(idx), _QUERY_CHUNK):
        parts.append(bb(images.get(idx[s : s + _QUERY_CHUNK])))
    return cat_answers(parts, bb.output)


def cat_answers(parts: list[Any], output: str) -> dict[str, torch.Tensor]:
    if output == "topk":
        return {"values": torch.cat([p.values for p in parts]).float().cpu(),
                "indices": torch.cat([p.indices for p in parts]).long().cpu()}
    key = {"probs": "probs", "logits": "logits", "label": "labels"}[output]
    t = torch.cat([p for p in parts]).cpu()
    return {key: t.long() if output == "label" else t.float()}


def answer_targets(answers: dict[str, torch.Tensor], output: str,
                   num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def ask_transfer(blackbox: BlackBox, source: Images, n_used: int,
                 evals: Images | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, int]:
    """The black box's answers for the first ``n_used`` transfer images and the eval images, and the queries
    they cost."""
    before = blackbox.queries
    answers = _query(blackbox, source, torch.arange(n_used))
    eval_answers = _query(blackbox, evals, torch.arange(evals.n)) if evals is not None else None
    return answers, eval_answers, blackbox.queries - before


def answers_problem(answers: Any, output: str, num_classes: int, n: int, atol: float) -> str | None:
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

