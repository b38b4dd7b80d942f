"""Query-only access to an image classifier.

A :class:`BlackBox` is the only way lwcam talks to the model being explained. It exposes
exactly what its ``output`` mode allows (full probabilities, logits, the top-k
probabilities, or a single label), counts every image it answers, validates every
answer, batches, retries a failing callable with bounded back-off, and can keep an
on-disk cache so that the same image is never paid for twice.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    >>> bb = BlackBox(net, num_classes=4, output="topk", k=2)
    >>> top = bb(torch.rand(5, 3, 8, 8))
    >>> top.values.shape, top.indices.shape, bb.queries
    (torch.Size([5, 2]), torch.Size([5, 2]), 5)
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import nn

from ._utils import progress

__all__ = ["BlackBox", "TopK", "BlackBoxError", "as_prob_fn"]

FnReturns = Literal["auto", "probs", "logits"]
Output = Literal["probs", "logits", "topk", "label"]


class TopK(NamedTuple):
    """Answer of a ``topk`` black box: ``values`` (B,k) probabilities, ``indices`` (B,k) classes."""

    values: torch.Tensor
    indices: torch.Tensor


class BlackBoxError(RuntimeError):
    """The wrapped callable returned an invalid answer or kept failing."""


class _Cache:
    """A process-safe answer cache in one SQLite file (atomic transactions, WAL journal)."""

    def __init__(self, directory: str | os.PathLike, namespace: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "answers.sqlite"
        self.namespace = namespace
        self._conn: sqlite3.Connection | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=60.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS answers (ns TEXT, key TEXT, value BLOB, PRIMARY KEY (ns, key))"
            )
            conn.commit()
            self._conn = conn
        return self._conn

    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                f"SELECT key, value FROM answers WHERE ns=? AND key IN ({marks})", [self.namespace, *chunk]
            ).fetchall()
            for key, value in rows:
                out[key] = np.frombuffer(value, dtype=np.float32).copy()
        return out

    def put_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        with self.conn:  # one transaction: all or nothing
            self.conn.executemany(
                "INSERT OR REPLACE INTO answers (ns, key, value) VALUES (?, ?, ?)",
                [(self.namespace, k, v.astype(np.float32).tobytes()) for k, v in items],
            )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_conn"] = None
        return state


def _image_key(image: torch.Tensor) -> str:
    arr = image.detach().to("cpu", torch.float32).contiguous().numpy()
    h = hashlib.sha256()
    h.update(str(tuple(arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


class BlackBox:
    """Query-only access to a classifier ``fn: (B,3,H,W) float tensor -> (B,C)``.

    Args:
        fn: an ``nn.Module`` or any callable from a batch of images to per-class scores.
        num_classes: the number of classes C that ``fn`` answers for.
        fn_returns: what ``fn`` returns: ``"logits"``, ``"probs"``, or ``"auto"`` (logits for
            an ``nn.Module``, probabilities for any other callable).
        output: what the black box exposes, and no more: ``"probs"`` (B,C) probabilities,
            ``"logits"`` (B,C) scores (log-probabilities when ``fn`` returns probabilities),
            ``"topk"`` a :class:`TopK` of the k largest probabilities with their class indices,
            or ``"label"`` (B,) class indices.
        k: how many classes a ``topk`` black box reveals.
        batch_size: how many images are sent to ``fn`` at once.
        cache_dir: folder for an on-disk answer cache keyed by a SHA-256 of the image bytes.
            Hits cost no query, across processes and restarts. ``None`` disables it.
        retries: how many times a call to ``fn`` that raises is retried (with exponential
            back-off from ``backoff`` seconds) before the error is raised.
        backoff: the first back-off delay in seconds.
        atol: tolerance for probabilities summing to 1.
        channels: expected channel count of the images.
        cache_namespace: separates the answers of different models sharing one cache folder.
        progress: show a progress bar over batches (``None``: only on a TTY).

    Attributes:
        queries: the number of images sent to ``fn`` and answered. Cache hits are free.
        cache_hits: the number of images answered from the cache.
        calls: the number of successful calls to ``fn``.

    Example:
        >>> bb = BlackBox(lambda x: torch.full((x.shape[0], 3), 1 / 3), num_classes=3, output="label")
        >>> bb(torch.zeros(2, 3, 4, 4)).tolist(), bb.queries
        ([0, 0], 2)
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor] | nn.Module,
        num_classes: int,
        fn_returns: FnReturns = "auto",
        output: Output = "probs",
        k: int = 5,
        batch_size: int = 256,
        cache_dir: str | os.PathLike | None = None,
        retries: int = 3,
        backoff: float = 0.05,
        atol: float = 1e-3,
        channels: int = 3,
        cache_namespace: str = "default",
        progress: bool | None = False,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable (an nn.Module or a function), got {type(fn).__name__}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if fn_returns not in ("auto", "probs", "logits"):
            raise ValueError(f"fn_returns must be 'auto', 'probs' or 'logits', got {fn_returns!r}")
        if output not in ("probs", "logits", "topk", "label"):
            raise ValueError(f"output must be 'probs', 'logits', 'topk' or 'label', got {output!r}")
        if output == "topk" and (not isinstance(k, int) or not 1 <= k <= num_classes):
            raise ValueError(f"k must be an int in [1, num_classes={num_classes}], got {k!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative int, got {retries!r}")
        if backoff < 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff!r}")
        self.fn = fn
        self.num_classes = num_classes
        self.fn_returns: Literal["probs", "logits"] = (
            ("logits" if isinstance(fn, nn.Module) else "probs") if fn_returns == "auto" else fn_returns
        )
        self.output: Output = output
        self.k = k
        self.batch_size = batch_size
        self.retries = retries
        self.backoff = backoff
        self.atol = atol
        self.channels = channels
        self.progress = progress
        self.queries = 0
        self.cache_hits = 0
        self.calls = 0
        self.cache = (
            _Cache(cache_dir, f"{cache_namespace}|C={num_classes}|{self.fn_returns}")
            if cache_dir is not None
            else None
        )

    # ------------------------------------------------------------------ public
    def __call__(self, images: torch.Tensor) -> torch.Tensor | TopK:
        """Answer a batch of images (B,C,H,W) as the ``output`` mode allows."""
        probs_or_logits = self._answer(images)
        return self._expose(probs_or_logits)

    def reset_queries(self) -> None:
        """Zero the query, cache-hit and call counters."""
        self.queries = 0
        self.cache_hits = 0
        self.calls = 0

    @property
    def device(self) -> torch.device:
        if isinstance(self.fn, nn.Module):
            for p in self.fn.parameters():
                return p.device
        return torch.device("cpu")

    def __repr__(self) -> str:
        return (
            f"BlackBox(num_classes={self.num_classes}, output={self.output!r}, fn_returns={self.fn_returns!r}, "
            f"queries={self.queries}, cache={'on' if self.cache else 'off'})"
        )

    # ---------------------------------------------------------------- internal
    def _validate_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B,{self.channels},H,W), got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got dtype {images.dtype}")
        if images.dim() != 4:
            raise ValueError(
                f"images must have 4 dimensions (B,{self.channels},H,W), got {images.dim()} with shape {tuple(images.shape)}"
            )
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch (B=0); expected at least one image")
        if images.shape[1] != self.channels:
            raise ValueError(f"images must have {self.channels} channels, got shape {tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or Inf pixels")

    def _validate_answer(self, out: object, n: int) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            if isinstance(out, np.ndarray):
                out = torch.from_numpy(out)
            else:
                raise BlackBoxError(f"fn must return a tensor of shape ({n}, {self.num_classes}), got {type(out).__name__}")
        out = out.detach().to("cpu", torch.float32)
        if tuple(out.shape) != (n, self.num_classes):
            raise BlackBoxError(
                f"fn returned shape {tuple(out.shape)}, expected ({n}, {self.num_classes}) for a batch of {n} images"
            )
        if not torch.isfinite(out).all():
            raise BlackBoxError("fn returned NaN or Inf scores")
        if self.fn_returns == "probs":
            if (out < -self.atol).any() or (out > 1 + self.atol).any():
                raise BlackBoxError("fn_returns='probs' but fn returned values outside [0, 1]")
            sums = out.sum(dim=1)
            bad = (sums - 1).abs() > self.atol
            if bad.any():
                raise BlackBoxError(
                    f"fn_returns='probs' but {int(bad.sum())} rows do not sum to 1 within atol={self.atol} "
                    f"(e.g. {sums[bad][0].item():.4f}); pass fn_returns='logits' if fn returns scores"
                )
        return out

    def _call_fn(self, batch: torch.Tensor) -> torch.Tensor:
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            try:
                with torch.no_grad():
                    if isinstance(self.fn, nn.Module):
                        was_training = self.fn.training
                        self.fn.eval()
                        try:
                            out = self.fn(batch.to(self.device))
                        finally:
                            self.fn.train(was_training)
                    else:
                        out = self.fn(batch)
            except Exception as err:  # the callable failed: back off and retry
                last = err
                if attempt < self.retries:
                    time.sleep(self.backoff * (2**attempt))
                continue
            answer = self._validate_answer(out, batch.shape[0])
            self.queries += batch.shape[0]
            self.calls += 1
            return answer
        raise BlackBoxError(f"fn failed {self.retries + 1} times on a batch of {batch.shape[0]} images") from last

    def _answer(self, images: torch.Tensor) -> torch.Tensor:
        """Full (B,C) answer as ``fn`` returns it (probabilities or logits), in input order."""
        self._validate_images(images)
        images = images.detach()
        n = images.shape[0]
        result = torch.empty(n, self.num_classes)
        todo = list(range(n))
        keys: list[str] = []
        if self.cache is not None:
            keys = [_image_key(img) for img in images]
            hits = self.cache.get_many(sorted(set(keys)))
            todo = []
            first_of: dict[str, int] = {}
            for i, key in enumerate(keys):
                if key in hits:
                    result[i] = torch.from_numpy(hits[key])
                    self.cache_hits += 1
                elif key in first_of:  # duplicate inside this batch: ask once
                    self.cache_hits += 1
                else:
                    first_of[key] = i
                    todo.append(i)
        starts = range(0, len(todo), self.batch_size)
        for s in progress(starts, total=len(starts), desc="black-box queries", enabled=self.progress):
            idx = todo[s : s + self.batch_size]
            answer = self._call_fn(images[idx].cpu() if not isinstance(self.fn, nn.Module) else images[idx])
            result[idx] = answer
            if self.cache is not None:
                self.cache.put_many([(keys[i], answer[j].numpy()) for j, i in enumerate(idx)])
        if self.cache is not None:  # fill in-batch duplicates
            seen: dict[str, int] = {}
            for i, key in enumerate(keys):
                if key in seen:
                    result[i] = result[seen[key]]
                else:
                    seen[key] = i
        return result

    def _probs(self, raw: torch.Tensor) -> torch.Tensor:
        if self.fn_returns == "logits":
            return torch.softmax(raw, dim=1)
        return raw.clamp_min(0) / raw.clamp_min(0).sum(dim=1, keepdim=True)

    def _expose(self, raw: torch.Tensor) -> torch.Tensor | TopK:
        if self.output == "logits":
            return raw if self.fn_returns == "logits" else torch.log(raw.clamp_min(1e-12))
        probs = self._probs(raw)
        if self.output == "probs":
            return probs
        if self.output == "topk":
            values, indices = probs.topk(self.k, dim=1)
            return TopK(values, indices)
        return probs.argmax(dim=1)

    def close(self) -> None:
        """Close the cache connection (it reopens on the next call)."""
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> BlackBox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_prob_fn(model: BlackBox | nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Turn a ``BlackBox``, module or callable into ``images -> (B,C) probabilities``.

    * ``BlackBox`` in ``probs`` or ``logits`` mode: its answer (softmax for logits).
    * ``BlackBox`` in ``topk`` mode: the revealed probabilities, 0 for unrevealed classes.
    * ``BlackBox`` in ``label`` mode: a ``ValueError`` (a label carries no score).
    * ``nn.Module``: softmax of its output, under ``torch.no_grad()`` in eval mode.
    * any other callable: taken to return probabilities.
    """
    if isinstance(model, BlackBox):
        if model.output == "label":
            raise ValueError("a BlackBox with output='label' reveals no class probability; use 'probs', 'logits' or 'topk'")

        def bb_fn(x: torch.Tensor) -> torch.Tensor:
            out = model(x)
            if model.output == "probs":
                return out  # type: ignore[return-value]
            if model.output == "logits":
                return torch.softmax(out, dim=1)  # type: ignore[arg-type]
            top: TopK = out  # type: ignore[assignment]
            full = torch.zeros(x.shape[0], model.num_classes)
            return full.scatter_(1, top.indices, top.values)

        return bb_fn
    if isinstance(model, nn.Module):

        def module_fn(x: torch.Tensor) -> torch.Tensor:
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    dev = next(model.parameters(), torch.empty(0)).device
                    return torch.softmax(model(x.to(dev)), dim=1).cpu()
            finally:
                model.train(was_training)

        return module_fn
    if callable(model):
        return model
    raise TypeError(f"model must be a BlackBox, an nn.Module or a callable, got {type(model).__name__}")

