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

Why one file: it is the query boundary. Every image that reaches the model being explained goes
through :class:`BlackBox` (its access mode, its count, the check of every answer, the retries and the
answer cache), so that what a student can learn from the black box is read in one place.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import torch
from torch import nn

from ._checks import check_images, check_positive_int, check_real
from ._errors import BlackBoxError
from ._utils import eval_mode, track

if TYPE_CHECKING:
    import httpx

__all__ = ["BlackBox", "TopK", "BlackBoxError", "CacheError", "as_prob_fn", "module_fingerprint", "TRANSIENT_ERRORS"]

FnReturns = Literal["auto", "probs", "logits"]
Output = Literal["probs", "logits", "topk", "label"]

#: Errors from ``fn`` that may go away on a second try (network, file system, time-outs); only these,
#: plus a black box's own ``retry_on``, are retried. ``ConnectionError`` and ``TimeoutError`` are ``OSError``\ s.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)


class TopK(NamedTuple):
    """Answer of a ``topk`` black box: ``values`` (B,k) probabilities, ``indices`` (B,k) classes."""

    values: torch.Tensor
    indices: torch.Tensor


def _rows(images: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``images[idx]``; a run of consecutive rows is sliced, which keeps the memory format (``channels_last``)."""
    if idx and idx[-1] - idx[0] == len(idx) - 1 and idx == list(range(idx[0], idx[-1] + 1)):
        return images[idx[0] : idx[-1] + 1]
    return images[idx]


class CacheError(BlackBoxError):
    """The answer cache file cannot be used: not an SQLite database, a foreign table, or unreadable."""


class _Cache:
    """An answer cache in one SQLite file, safe across threads and processes.

    Every thread (and every process, also after a ``fork``) opens its own connection; writes are
    single transactions in WAL mode with a 60 s busy time-out, so concurrent writers wait instead of
    failing and a killed writer leaves every committed row intact and no half row.
    """

    def __init__(self, directory: str | os.PathLike, namespace: str) -> None:
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"cache_dir {str(self.dir)!r} exists and is not a folder")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cache_dir {str(self.dir)!r} cannot be created: {err}") from err
        self.path = self.dir / "answers.sqlite"
        self.namespace = namespace
        self._setup()

    def _setup(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._generation = 0

    @property
    def conn(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "key", None) != (os.getpid(), self._generation):
            local.conn = self._open()
            local.key = (os.getpid(), self._generation)
        return local.conn

    def _connect(self) -> tuple[sqlite3.Connection, list[str]]:
        """Open the database, set WAL mode and the table; retried while another process holds the lock.

        Switching to WAL can answer "database is locked" at once, without waiting for the busy timeout,
        when two processes open a new cache together.
        """
        for attempt in range(100):
            try:
                # check_same_thread=False only so that close() may close it; one thread uses each connection
                conn = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout=60000")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("CREATE TABLE IF NOT EXISTS answers "
                             "(ns TEXT, key TEXT, value BLOB, PRIMARY KEY (ns, key))")
                conn.commit()
                return conn, [row[1] for row in conn.execute("PRAGMA table_info(answers)")]
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or attempt == 99:
                    raise
                time.sleep(0.01 * (1 + attempt % 10))
        raise AssertionError("unreachable")

    def _open(self) -> sqlite3.Connection:
        try:
            conn, cols = self._connect()
        except sqlite3.Error as err:
            raise CacheError(f"the answer cache {self.path} cannot be opened as an SQLite database ({err}); "
                             f"move or delete the file, or use another cache_dir") from err
        if cols != ["ns", "key", "value"]:
            conn.close()
            raise CacheError(f"the answer cache {self.path} holds a table 'answers' with columns {cols}, not "
                             f"['ns', 'key', 'value']; move or delete the file, or use another cache_dir")
        with self._lock:
            self._conns.append(conn)
        return conn

    def _run(self, what: str, fn: Callable[[sqlite3.Connection], object]) -> object:
        try:
            return fn(self.conn)
        except sqlite3.Error as err:
            raise CacheError(f"the answer cache {self.path} could not {what}: {err}") from err

    def get_many(self, keys: list[str]) -> dict[str, object]:
        """The stored value of every key found, as stored (bytes for a sound row)."""
        out: dict[str, object] = {}
        for i in range(0, len(keys), 500):
            out.update(self._select(keys[i : i + 500]))
        return out

    def _select(self, chunk: list[str]) -> dict[str, object]:
        query = f"SELECT key, value FROM answers WHERE ns=? AND key IN ({','.join('?' * len(chunk))})"

        def read(c: sqlite3.Connection) -> list[tuple[str, object]]:
            return c.execute(query, [self.namespace, *chunk]).fetchall()

        rows = self._run("be read", read)
        assert isinstance(rows, list)
        return dict(rows)

    def put_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        rows = [(self.namespace, k, v.astype(np.float32).tobytes()) for k, v in items]

        def put(conn: sqlite3.Connection) -> None:
            with conn:  # one transaction: all or nothing
                conn.executemany("INSERT OR REPLACE INTO answers (ns, key, value) VALUES (?, ?, ?)", rows)

        self._run("be written", put)

    def delete(self, items: dict[str, object]) -> None:
        """Delete rows ``key -> value``, each only if it still holds that value."""
        rows = [(self.namespace, k, v) for k, v in items.items()]

        def delete(conn: sqlite3.Connection) -> None:
            with conn:
                conn.executemany("DELETE FROM answers WHERE ns=? AND key=? AND value IS ?", rows)

        self._run("delete a damaged row", delete)

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
            self._generation += 1
        for conn in conns:
            conn.close()

    def __getstate__(self) -> dict:
        return {"dir": self.dir, "path": self.path, "namespace": self.namespace}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup()


def _image_key(image: torch.Tensor) -> str:
    arr = image.detach().to("cpu", torch.float32).contiguous().numpy()
    h = hashlib.sha256()
    h.update(str(tuple(arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a module's class, structure and every state-dict entry.

    Two modules with the same fingerprint compute the same function, unless their ``forward``
    depends on attributes outside ``repr`` and the state dict.

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> module_fingerprint(a) == module_fingerprint(a), module_fingerprint(a) == module_fingerprint(b)
        (True, False)
    """
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}\n{module!r}".encode())
    for name, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}={t!r}".encode())
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _row_problems(rows: torch.Tensor, fn_returns: str, atol: float) -> dict[int, str]:
    """``{row: what is wrong}`` for every invalid row of a (B,C) answer (vectorised checks)."""
    finite = torch.isfinite(rows).all(dim=1)
    bad_range = torch.zeros_like(finite)
    bad_sum = torch.zeros_like(finite)
    sums = rows.sum(dim=1)
    if fn_returns == "probs":
        bad_range = finite & ((rows < -atol) | (rows > 1 + atol)).any(dim=1)
        bad_sum = finite & ~bad_range & ((sums - 1).abs() > atol)
    out: dict[int, str] = {}
    for i in torch.nonzero(~finite | bad_range | bad_sum).flatten().tolist():
        row = rows[i]
        if not finite[i]:
            out[i] = "NaN or Inf scores"
        elif bad_range[i]:
            out[i] = (f"probabilities outside [0, 1] (min {row.min().item():.4g}, max {row.max().item():.4g}, "
                      f"atol={atol})")
        else:
            out[i] = f"probabilities that do not sum to 1 (sum {sums[i].item():.4f}, atol={atol})"
    return out


class BlackBox:
    """Query-only access to a classifier ``fn: (B,3,H,W) float tensor -> (B,C)``.

    Failure behaviour:

    * Images: any floating-point dtype is accepted and converted to float32 before ``fn`` sees it
      (and before the cache key is taken); any other dtype raises ``TypeError`` naming it. Shape,
      channel count and finiteness are checked too.
    * Answers: every answer is checked before it is used or cached: shape (B,C), finite, and for
      ``fn_returns="probs"`` within ``[0, 1]`` and summing to 1 (``atol``). An invalid answer raises
      :class:`BlackBoxError` naming the row and what is wrong; it is not retried.
    * Errors from ``fn``: only transient ones (``OSError``, which includes ``ConnectionError`` and
      ``TimeoutError``, plus the classes in ``retry_on``) are retried, ``retries`` times with
      exponential back-off, waiting at least an error's ``retry_after`` seconds (a server's
      ``Retry-After``, see :mod:`lwcam.remote`); ``retried`` counts them. Any other error (a
      ``TypeError``, ``ValueError``, ``RuntimeError``...) is raised at once as a
      :class:`BlackBoxError` that quotes the original message.
    * Cache: rows read back are checked exactly like fresh answers. A damaged row is reported with a
      ``RuntimeWarning`` naming the file and key, deleted, and asked again (one query). A file that is
      not a usable SQLite database raises :class:`CacheError` naming it. The cache is safe to share
      between threads and processes.

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
        cache_dir: folder for an on-disk answer cache (``answers.sqlite``) keyed by a SHA-256 of the
            float32 image bytes. Hits cost no query, across threads, processes and restarts.
            ``None`` disables it.
        retries: how many times a transient failure of ``fn`` is retried (with exponential back-off
            from ``backoff`` seconds) before the error is raised.
        backoff: the first back-off delay in seconds.
        atol: tolerance for probabilities summing to 1 and lying in [0, 1].
        channels: expected channel count of the images.
        cache_namespace: names the model in the cache, so that different models can share one
            ``cache_dir``. The key always includes ``num_classes``, ``fn_returns``, ``output`` and
            ``k``; for an ``nn.Module`` it also includes a fingerprint of its weights (see
            :func:`module_fingerprint`, taken when the black box is built), so it may be omitted. A
            module on a faster engine (:func:`lwcam.fast.accelerate`) carries the same fingerprint, so
            it shares the module's cached answers.
            A plain callable cannot be fingerprinted: with ``cache_dir`` it needs a
            ``cache_namespace`` (``ValueError`` otherwise).
        retry_on: further exception classes that are transient for this ``fn``.
        progress: show a progress bar over batches (``None``: only on a TTY).

    Attributes:
        queries: the number of images sent to ``fn`` and answered. Cache hits are free.
        cache_hits: the number of images answered from the cache.
        calls: the number of successful calls to ``fn``.
        retried: the number of times a transient failure of ``fn`` was retried.

    Example:
        >>> bb = BlackBox(lambda x: torch.full((x.shape[0], 3), 1 / 3), num_classes=3, output="label")
        >>> bb(torch.zeros(2, 3, 4, 4, dtype=torch.float64)).tolist(), bb.queries
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
        cache_namespace: str | None = None,
        progress: bool | None = False,
        retry_on: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._check_args(fn, num_classes, fn_returns, output, k, batch_size, retries, backoff, atol, channels,
                         cache_namespace, retry_on)
        self.fn = fn
        self.num_classes = num_classes
        self.fn_returns: Literal["probs", "logits"] = (
            ("logits" if isinstance(fn, nn.Module) else "probs") if fn_returns == "auto" else fn_returns
        )
        self.output: Output = output
        self.k = k
        self.batch_size = batch_size
        self.retries = retries
        self.backoff = float(backoff)
        self.atol = float(atol)
        self.channels = channels
        self.progress = progress
        self.retry_on = tuple(retry_on)
        self.queries = 0
        self.cache_hits = 0
        self.calls = 0
        self.retried = 0
        self._setup_locks()
        self.cache = _Cache(cache_dir, self._namespace(cache_namespace)) if cache_dir is not None else None
        if self.cache is not None:
            self.cache.conn  # noqa: B018 - open (and check) the file now, before anything is paid for

    @staticmethod
    def _check_args(fn: object, num_classes: object, fn_returns: object, output: object, k: object,
                    batch_size: object, retries: object, backoff: object, atol: object, channels: object,
                    cache_namespace: object, retry_on: object) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable (an nn.Module or a function), got {type(fn).__name__}")
        BlackBox._check_outputs(num_classes, fn_returns, output, k)
        BlackBox._check_limits(batch_size, retries, backoff, atol, channels, cache_namespace, retry_on)

    @staticmethod
    def _check_outputs(num_classes: object, fn_returns: object, output: object, k: object) -> None:
        n = check_positive_int(num_classes, "num_classes", minimum=2)
        if fn_returns not in ("auto", "probs", "logits"):
            raise ValueError(f"fn_returns must be 'auto', 'probs' or 'logits', got {fn_returns!r}")
        if output not in ("probs", "logits", "topk", "label"):
            raise ValueError(f"output must be 'probs', 'logits', 'topk' or 'label', got {output!r}")
        if output == "topk" and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n):
            raise ValueError(f"k must be an int in [1, num_classes={n}], got {k!r}")

    @staticmethod
    def _check_limits(batch_size: object, retries: object, backoff: object, atol: object, channels: object,
                      cache_namespace: object, retry_on: object) -> None:
        check_positive_int(batch_size, "batch_size")
        check_positive_int(retries, "retries", minimum=0)
        check_real(backoff, "backoff (seconds)", 0.0)
        check_real(atol, "atol", 0.0, 1.0, high_open=True)
        check_positive_int(channels, "channels")
        if cache_namespace is not None and (not isinstance(cache_namespace, str) or not cache_namespace):
            raise ValueError(f"cache_namespace must be a non-empty str or None, got {cache_namespace!r}")
        if not isinstance(retry_on, tuple) or not all(
                isinstance(e, type) and issubclass(e, BaseException) for e in retry_on):
            raise TypeError(f"retry_on must be a tuple of exception classes, got {retry_on!r}")

    def _namespace(self, given: str | None) -> str:
        """The cache key of this model: ``given`` and/or a weight fingerprint, plus the answer format."""
        parts = [f"C={self.num_classes}", self.fn_returns, f"output={self.output}"]
        if self.output == "topk":
            parts.append(f"k={self.k}")
        fn = self.fn
        accelerated = getattr(fn, "weights_fingerprint", None)  # a module on a faster engine (lwcam.fast)
        if isinstance(fn, nn.Module) and len(fn.state_dict()) > 0:
            parts.insert(0, f"weights={module_fingerprint(fn)}")
        elif isinstance(accelerated, str):
            parts.insert(0, f"weights={accelerated}")
        elif given is None:
            raise ValueError(
                "cache_namespace is required with cache_dir when fn is a plain callable (or a module without "
                "weights): the cache cannot tell one such model from another, so name the model, e.g. "
                "cache_namespace='my-api-v2'")
        if given is not None:
            parts.insert(0, given)
        return "|".join(parts)

    def _setup_locks(self) -> None:
        self._lock = threading.Lock()  # counters
        self._fn_lock = threading.Lock()  # a module's train/eval flags while it answers

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"], state["_fn_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup_locks()

    # ------------------------------------------------------------------ public
    @classmethod
    def from_endpoint(cls, url: str, model_name: str, num_classes: int, *, image_size: int | None = None,
                      model_version: str | None = None, fn_returns: FnReturns = "auto", output: Output = "probs",
                      k: int = 5, max_batch_size: int = 64, timeout: float = 30.0, retries: int = 6,
                      backoff: float = 0.25, rate_limit: float | None = None,
                      cache_dir: str | os.PathLike | None = None, cache_namespace: str | None = None,
                      atol: float = 1e-3, channels: int = 3, progress: bool | None = False,
                      transport: httpx.BaseTransport | None = None) -> BlackBox:
        """A black box for a model behind an Open Inference Protocol (KServe v2) server at ``url``.

        The metadata are read and checked first (:class:`lwcam.remote.RemoteModel`); nothing is queried
        if they do not fit. ``fn_returns="auto"`` takes logits when the model's output is named
        ``logits`` and probabilities otherwise. Requests carry at most ``max_batch_size`` images and
        each takes at most ``timeout`` seconds in all; ``retries``, ``backoff`` (seconds, doubled each
        try, at least the server's ``Retry-After``) apply to connection errors, 429 and 503 only. The
        cache namespace is ``URL|name|version`` (then ``cache_namespace``, if given, in front), and
        every answer cached under it came from that version: an answer naming another
        ``model_version`` raises :class:`lwcam.remote.EndpointError`. With ``cache_dir``, a server
        that reports no model version needs ``model_version`` or ``cache_namespace``, so that a new
        model is never answered from an old one's cache. The other arguments are :class:`BlackBox`'s
        and :class:`~lwcam.remote.RemoteModel`'s. The returned black box's ``fn`` is the
        :class:`~lwcam.remote.RemoteModel`. Also :func:`lwcam.remote.endpoint_blackbox`.

        Example (nothing listens on port 9 of loopback, so the error comes at construction):
            >>> BlackBox.from_endpoint("http://127.0.0.1:9", "resnet", num_classes=10)
            Traceback (most recent call last):
            ...
            lwcam.remote.EndpointError: cannot reach http://127.0.0.1:9/v2/models/resnet: ...
        """
        from ._endpoint import MAX_WAIT, RemoteModel  # here: httpx is imported only when a server is used

        check_positive_int(max_batch_size, "max_batch_size")
        BlackBox._check_outputs(num_classes, fn_returns, output, k)
        BlackBox._check_limits(max_batch_size, retries, backoff, atol, channels, cache_namespace, ())
        if retries > 0 and backoff * 2 ** (retries - 1) > MAX_WAIT:
            raise ValueError(f"retries={retries} with backoff={backoff} s would wait "
                             f"{backoff * 2 ** (retries - 1):.3g} s before the last retry; at most {MAX_WAIT:g} s "
                             f"(a day)")
        remote = RemoteModel(url, model_name, num_classes=num_classes, image_size=image_size, channels=channels,
                             model_version=model_version, timeout=timeout, rate_limit=rate_limit, transport=transport)
        if cache_dir is not None and remote.metadata.version is None and cache_namespace is None:
            remote.close()
            raise ValueError(f"{remote.model_url} reports no model version, so the answer cache cannot tell this "
                             f"model from a later one under the same name: pass model_version= or cache_namespace=")
        namespace = remote.cache_namespace if cache_namespace is None else f"{cache_namespace}|{remote.cache_namespace}"
        return cls(remote, num_classes, fn_returns=remote.metadata.returns if fn_returns == "auto" else fn_returns,
                   output=output, k=k, batch_size=max_batch_size, cache_dir=cache_dir, retries=retries,
                   backoff=backoff, atol=atol, channels=channels, cache_namespace=namespace, progress=progress)

    def __call__(self, images: torch.Tensor) -> torch.Tensor | TopK:
        """Answer a batch of images (B,C,H,W) as the ``output`` mode allows."""
        probs_or_logits = self._answer(images)
        return self._expose(probs_or_logits)

    def reset_queries(self) -> None:
        """Zero the query, cache-hit, call and retry counters."""
        with self._lock:
            self.queries = 0
            self.cache_hits = 0
            self.calls = 0
            self.retried = 0

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
    def _validate_images(self, images: torch.Tensor) -> torch.Tensor:
        """Check a batch and return it detached as float32 (the one image rule, :func:`lwcam._checks.check_images`)."""
        return check_images(images, channels=self.channels)

    def _validate_answer(self, out: object, n: int) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            if isinstance(out, np.ndarray):
                out = torch.from_numpy(out)
            else:
                raise BlackBoxError(f"fn must return a tensor of shape ({n}, {self.num_classes}), "
                                    f"got {type(out).__name__}")
        out = out.detach().to("cpu", torch.float32)
        if tuple(out.shape) != (n, self.num_classes):
            raise BlackBoxError(
                f"fn returned shape {tuple(out.shape)}, expected ({n}, {self.num_classes}) for a batch of {n} images"
            )
        problems = _row_problems(out, self.fn_returns, self.atol)
        if problems:
            row, what = next(iter(problems.items()))
            hint = "; pass fn_returns='logits' if fn returns scores" if self.fn_returns == "probs" else ""
            raise BlackBoxError(f"fn returned {len(problems)} invalid rows of {n} (fn_returns={self.fn_returns!r}); "
                                f"row {row}: {what}{hint}")
        return out

    def _invoke(self, batch: torch.Tensor) -> object:
        with torch.no_grad():
            if isinstance(self.fn, nn.Module):
                with self._fn_lock, eval_mode(self.fn):
                    return self.fn(batch.to(self.device))
            return self.fn(batch)

    def _call_fn(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        retryable = (*TRANSIENT_ERRORS, *self.retry_on)
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            try:
                out = self._invoke(batch)
            except retryable as err:  # transient: back off and retry
                last = err
                if attempt < self.retries:  # at least the wait the error asks for (an HTTP Retry-After)
                    with self._lock:
                        self.retried += 1
                    time.sleep(max(self.backoff * (2**attempt), float(getattr(err, "retry_after", 0.0))))
                continue
            except Exception as err:
                names = ", ".join(e.__name__ for e in retryable)
                raise BlackBoxError(
                    f"fn raised {type(err).__name__}: {err} (on a batch of {n} images of shape "
                    f"{tuple(batch.shape[1:])}, dtype {batch.dtype}); not retried: only {names} are "
                    f"(see retry_on)") from err
            answer = self._validate_answer(out, n)
            with self._lock:
                self.queries += n
                self.calls += 1
            return answer
        raise BlackBoxError(f"fn failed {self.retries + 1} times on a batch of {n} images; "
                            f"last error {type(last).__name__}: {last}") from last

    def _cached(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Cache rows for ``keys``, each checked like a fresh answer; damaged rows are dropped and deleted."""
        assert self.cache is not None
        raw = self.cache.get_many(keys)
        width = 4 * self.num_classes
        good = {k: v for k, v in raw.items() if isinstance(v, bytes) and len(v) == width}
        bad = {k: (f"a value of {len(v)} bytes, not {width} ({self.num_classes} float32 scores)"
                   if isinstance(v, bytes) else f"a {type(v).__name__} value, not a float32 blob")
               for k, v in raw.items() if k not in good}
        names = list(good)
        rows = torch.from_numpy(np.frombuffer(b"".join(good[k] for k in names), dtype=np.float32)
                                .reshape(len(names), self.num_classes).copy())
        for i, what in _row_problems(rows, self.fn_returns, self.atol).items():
            bad[names[i]] = what
        for key, what in bad.items():
            warnings.warn(f"answer cache {self.cache.path}: the row of image key {key} (namespace "
                          f"{self.cache.namespace!r}) is damaged ({what}); it was deleted and the image "
                          f"is asked again", RuntimeWarning, stacklevel=5)
        if bad:
            self.cache.delete({k: raw[k] for k in bad})
        return {k: rows[i] for i, k in enumerate(names) if k not in bad}

    def _plan(self, images: torch.Tensor, result: torch.Tensor) -> tuple[list[str], list[int]]:
        """Fill ``result`` from the cache; return every image's key and the indices still to ask."""
        keys = [_image_key(img) for img in images]
        hits = self._cached(sorted(set(keys)))
        todo: list[int] = []
        first_of: dict[str, int] = {}
        n_hits = 0
        for i, key in enumerate(keys):
            if key in hits:
                result[i] = hits[key]
                n_hits += 1
            elif key in first_of:  # duplicate inside this batch: ask once
                n_hits += 1
            else:
                first_of[key] = i
                todo.append(i)
        with self._lock:
            self.cache_hits += n_hits
        return keys, todo

    def _answer(self, images: torch.Tensor) -> torch.Tensor:
        """Full (B,C) answer as ``fn`` returns it (probabilities or logits), in input order."""
        images = self._validate_images(images)
        n = images.shape[0]
        result = torch.empty(n, self.num_classes)
        todo = list(range(n))
        keys: list[str] = []
        if self.cache is not None:
            keys, todo = self._plan(images, result)
        starts = range(0, len(todo), self.batch_size)
        for s in track(starts, total=len(starts), desc="black-box queries", enabled=self.progress):
            idx = todo[s : s + self.batch_size]
            answer = self._call_fn(_rows(images, idx) if isinstance(self.fn, nn.Module) else _rows(images, idx).cpu())
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
        """Close the cache connections (they reopen on the next call)."""
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> BlackBox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_prob_fn(model: BlackBox | nn.Module | Callable[[torch.Tensor], torch.Tensor]
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Turn a ``BlackBox``, module or callable into ``images -> (B,C) probabilities``.

    * ``BlackBox`` in ``probs`` or ``logits`` mode: its answer (softmax for logits).
    * ``BlackBox`` in ``topk`` mode: the revealed probabilities, 0 for unrevealed classes.
    * ``BlackBox`` in ``label`` mode: a ``ValueError`` (a label carries no score).
    * ``nn.Module``: softmax of its output, under ``torch.no_grad()`` in eval mode (every
      submodule's own train/eval flag is restored afterwards).
    * any other callable: taken to return probabilities (the caller checks them: the games do).
    """
    if isinstance(model, BlackBox):
        if model.output == "label":
            raise ValueError("a BlackBox with output='label' reveals no class probability; "
                             "use 'probs', 'logits' or 'topk'")

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
            with eval_mode(model), torch.no_grad():
                dev = next(model.parameters(), torch.empty(0)).device
                return torch.softmax(model(x.to(dev)), dim=1).cpu()

        return module_fn
    if callable(model):
        return model
    raise TypeError(f"model must be a BlackBox, an nn.Module or a callable, got {type(model).__name__}")

