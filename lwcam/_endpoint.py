"""The Open Inference Protocol (KServe v2 REST) client behind :mod:`lwcam.remote`, which documents it.

This module imports nothing from :mod:`lwcam.blackbox`; the black box imports it only inside
``BlackBox.from_endpoint`` (so that ``httpx`` is loaded only when a server is used), and
:mod:`lwcam.remote` imports both. The import graph has no cycle. The public names live in
:mod:`lwcam.remote`.

Why one file: every defence of the client against a faulty server (the metadata check, the deadline
on the whole request, the retries and their ``Retry-After``, the check of each answer's version and
datatype) acts on one request, and is read here in the order a request meets it.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import math
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import httpx
import numpy as np
import orjson
import torch

from ._checks import check_images, check_positive_int, check_real
from ._errors import BlackBoxError

__all__ = ["RemoteModel", "ModelMetadata", "EndpointError", "EndpointBusy", "split_model_url", "retry_after_seconds",
           "MAX_RETRY_AFTER", "MAX_WAIT", "RETRIED_STATUS", "MAX_METADATA_BYTES", "BYTES_PER_SCORE"]

#: HTTP answers that are retried (with the connection errors); every other 4xx and 5xx is not.
RETRIED_STATUS = (429, 503)
#: The longest ``Retry-After`` wait honoured, in seconds; a longer one is cut to this.
MAX_RETRY_AFTER = 60.0
#: The longest single wait the client accepts, in seconds (a day): ``timeout``, one image's share of the rate
#: limit, the last back-off. Longer ones are mistakes, and overflow the platform's timers.
MAX_WAIT = 86_400.0
#: The most bytes read of a metadata answer or of an error answer.
MAX_METADATA_BYTES = 1 << 20
#: An ``infer`` answer for B images and C classes is read up to ``MAX_METADATA_BYTES + BYTES_PER_SCORE * B * C``
#: bytes (a float64 in decimal takes at most 25).
BYTES_PER_SCORE = 64
#: The trace events that hand over the socket of a new connection (``return_value`` is httpcore's stream).
_SOCKET_EVENTS = ("connection.connect_tcp.complete", "connection.connect_unix_socket.complete",
                  "connection.start_tls.complete")


class EndpointError(BlackBoxError):
    """The server cannot serve this black box: unreachable at construction, unknown model, metadata that do not
    fit, a refused or redirected request (a 3xx, a 4xx other than 429, a 5xx other than 503), a malformed answer,
    an answer of another model version than the one the client was built for, or a time-out."""

    __module__ = "lwcam.remote"


class EndpointBusy(ConnectionError):
    """A transient failure (connection error, 429 or 503): retried by the black box after ``retry_after`` s or more."""

    __module__ = "lwcam.remote"

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_seconds(value: str | None, now: float | None = None) -> float:
    """The wait a ``Retry-After`` header asks for, in seconds in ``[0, MAX_RETRY_AFTER]``.

    A number of seconds or an HTTP date. A wait below zero (or a date in the past) is 0, a wait above
    :data:`MAX_RETRY_AFTER` (``inf`` included) is cut to it, and an absent or unreadable value (``nan``
    included) is 0: the black box's own back-off, ``backoff * 2**attempt``, then applies alone.

    Example:
        >>> [retry_after_seconds(v) for v in ("2", None, "soon", "1e9", "-5", "inf", "nan")]
        [2.0, 0.0, 0.0, 60.0, 0.0, 60.0, 0.0]
        >>> retry_after_seconds("Thu, 01 Jan 1970 00:00:05 GMT", now=0.0)
        5.0
    """
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError, IndexError, OverflowError, OSError):
            return 0.0
    if math.isnan(seconds):
        return 0.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def split_model_url(url: str) -> tuple[str, str]:
    """Split a model URL ``http://HOST:PORT[/prefix]/v2/models/NAME`` into the server URL and the model name.

    Example:
        >>> split_model_url("http://127.0.0.1:8080/v2/models/blackbox")
        ('http://127.0.0.1:8080', 'blackbox')
    """
    if not isinstance(url, str) or "/v2/models/" not in url:
        raise ValueError(f"black_box_url must look like http://HOST:PORT/v2/models/NAME, got {url!r}")
    base, _, name = url.rstrip("/").partition("/v2/models/")
    if not name or "/" in name:
        raise ValueError(f"black_box_url must end in /v2/models/NAME (one model name), got {url!r}")
    return _check_url(base), name


def _check_url(url: object) -> str:
    if not isinstance(url, str):
        raise TypeError(f"url must be a str such as 'http://127.0.0.1:8080', got {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url must be an http:// or https:// URL with a host, such as 'http://127.0.0.1:8080', "
                         f"got {url!r}")
    try:
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError as err:
        raise ValueError(f"url {url!r} has an invalid port: {err}") from err
    return url.rstrip("/")


def _check_name(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.strip() or "/" in value:
        raise ValueError(f"{name} must be a non-empty str without '/', got {value!r}")
    return value


@dataclass(frozen=True)
class ModelMetadata:
    """What a server says about a model: its version, its one FP32 image input and its score output."""

    name: str
    version: str | None
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    output_shape: tuple[int, ...]
    output_datatype: str = "FP32"

    @property
    def returns(self) -> Literal["probs", "logits"]:
        """``"logits"`` when the output is named ``logits``, else ``"probs"`` (what ``fn_returns="auto"`` takes)."""
        return "logits" if self.output_name.lower() == "logits" else "probs"

    @classmethod
    def parse(cls, body: Any, where: str, version: str | None = None) -> ModelMetadata:
        """Read a ``GET /v2/models/{name}`` answer; :class:`EndpointError` naming ``where`` if it is malformed.

        Every field must have its JSON type: ``name`` a string, ``inputs`` and ``outputs`` lists of tensors
        (a name, a datatype and a list of ints each), ``versions`` a list of names.
        """
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise EndpointError(f"{where} answered metadata without an 'inputs' list: {str(body)[:200]}")
        inputs, outputs, name = body["inputs"], body.get("outputs"), body.get("name", "")
        if not isinstance(outputs, list | None) or not isinstance(name, str):
            raise EndpointError(f"{where} answered metadata whose 'outputs' ({type(outputs).__name__}) is not a list "
                                f"or whose 'name' ({type(name).__name__}) is not a str: {str(body)[:200]}")
        if len(inputs) != 1:
            names = [t.get("name") for t in inputs if isinstance(t, dict)]
            raise EndpointError(f"{where}: the model takes {len(inputs)} inputs {names}; lwcam sends one image tensor")
        image = _tensor_meta(inputs[0], where, "input")
        if image[1] != "FP32":
            raise EndpointError(f"{where}: the input {image[0]!r} is {image[1]}; lwcam sends FP32 images")
        scores = _pick_output([_tensor_meta(t, where, "output") for t in outputs or []], where)
        return cls(name, _pick_version(body.get("versions"), where, version), image[0], image[2], scores[0],
                   scores[2], scores[1])

    def check(self, num_classes: int, channels: int, image_size: int | None, where: str) -> None:
        """Raise :class:`EndpointError` unless the model answers (B,channels,S,S) images with ``num_classes`` scores."""
        b, c, h, w = self._image_dims(where)
        if c not in (-1, channels):
            raise EndpointError(f"{where}: the model takes images of {c} channels, not channels={channels}")
        if image_size is not None and not h == w == image_size and (h, w) != (-1, -1):
            raise EndpointError(f"{where}: the model takes {h}x{w} images (input shape {list(self.input_shape)}), "
                                f"not image_size={image_size}")
        if len(self.output_shape) != 2 or self.output_shape[1] not in (-1, num_classes):
            raise EndpointError(f"{where}: the model answers shape {list(self.output_shape)}, not [-1, "
                                f"num_classes={num_classes}]")

    def _image_dims(self, where: str) -> tuple[int, int, int, int]:
        if len(self.input_shape) != 4:
            raise EndpointError(f"{where}: the input {self.input_name!r} has shape {list(self.input_shape)}; lwcam "
                                f"sends a batch of images, [-1, C, H, W]")
        b, c, h, w = self.input_shape
        if b != -1:
            raise EndpointError(f"{where}: the input {self.input_name!r} has a fixed batch of {b} (shape "
                                f"{list(self.input_shape)}); lwcam needs a variable batch dimension, -1")
        return b, c, h, w


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_meta(t: Any, where: str, what: str) -> tuple[str, str, tuple[int, ...]]:
    """``(name, datatype, shape)`` of a metadata tensor entry."""
    if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"] or not isinstance(
            t.get("datatype"), str) or not isinstance(t.get("shape"), list) or not all(map(_is_int, t["shape"])):
        raise EndpointError(f"{where}: malformed {what} metadata {str(t)[:200]}; expected a name (a str), a datatype "
                            f"(a str) and a shape (a list of ints)")
    return t["name"], t["datatype"], tuple(t["shape"])


def _pick_output(outputs: list[tuple[str, str, tuple[int, ...]]], where: str) -> tuple[str, str, tuple[int, ...]]:
    scores = [t for t in outputs if t[0].lower() in ("probs", "logits")] if len(outputs) > 1 else outputs
    if len(scores) != 1:
        raise EndpointError(f"{where}: cannot tell the score output among {[t[0] for t in outputs]} (lwcam takes the "
                            f"only output, or the one named 'probs' or 'logits')")
    if scores[0][1] not in ("FP32", "FP64"):
        raise EndpointError(f"{where}: the output {scores[0][0]!r} is {scores[0][1]}; lwcam reads FP32 or FP64 scores")
    return scores[0]


def _pick_version(versions: Any, where: str, version: str | None) -> str | None:
    """The version the client is built for: ``version`` (which the server must list, if it lists any), else the
    only one listed, else ``None``."""
    if versions is None:
        versions = []
    if not isinstance(versions, list) or not all(isinstance(v, str) or _is_int(v) for v in versions):
        raise EndpointError(f"{where} answered metadata whose 'versions' is {str(versions)[:200]}, not a list of "
                            f"version names")
    names = [str(v) for v in versions]
    if version is None:
        if len(names) > 1:
            raise EndpointError(f"{where} serves versions {names}; pass model_version= to choose one")
        return names[0] if names else None
    if names and version not in names:
        raise EndpointError(f"{where} has no version {version!r}; it serves {names}")
    return version


@dataclass(frozen=True)
class _Answer:
    """An HTTP answer read in full."""

    status: int
    headers: httpx.Headers
    body: bytes


class _Expired(Exception):
    """A request's deadline passed."""


class _Deadline:
    """The time limit of one request as a whole: connect, send and answer take ``seconds`` together.

    A timer thread, ended with the request, shuts the request's socket down at the deadline: a read or a
    write blocked on it returns at once, even while a server trickles its answer a byte at a time (a
    per-read time-out never fires then). The socket comes from ``httpx``'s ``trace`` extension when the
    connection opens; the client keeps no idle connection, so every request opens its own. With a
    transport that opens no socket (``httpx.MockTransport``), the deadline is checked between the
    chunks of the answer.
    """

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.expired = False
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.name = "lwcam-request-deadline"
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._timer.join()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """``httpx``'s trace hook: keep the socket of the connection this request opens."""
        if event not in _SOCKET_EVENTS:
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            self._socket = sock if isinstance(sock, socket.socket) else None
            if self.expired:
                self._shut()

    def check(self) -> None:
        """Raise :class:`_Expired` once the deadline has passed."""
        if time.monotonic() >= self.end:
            self.expired = True
            raise _Expired

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shut()

    def _shut(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):  # the socket may be closed already: then there is nothing to wake
                socket.socket.shutdown(self._socket, socket.SHUT_RDWR)  # the plain socket's, also under TLS


def _read_body(response: httpx.Response, deadline: _Deadline, limit: int, where: str, what: str) -> bytes:
    """The whole body of ``response``, checking the deadline before each chunk and refusing more than ``limit``."""
    parts: list[bytes] = []
    size = 0
    deadline.check()
    for chunk in response.iter_bytes():
        deadline.check()
        size += len(chunk)
        if size > limit:
            raise EndpointError(f"{where} answered more than {limit} bytes to {what}; lwcam reads no more (is this "
                                f"an inference server?)")
        parts.append(chunk)
    return b"".join(parts)


class RemoteModel:
    """A model behind an Open Inference Protocol server, as a callable ``(B,3,H,W) float tensor -> (B,C) tensor``.

    Building it reads and checks the model's metadata (see :mod:`lwcam.remote`); calling it sends one
    ``infer`` request for the whole batch (the :class:`~lwcam.blackbox.BlackBox` around it splits
    batches to ``max_batch_size``). It keeps no answer and counts no query: the black box does both.

    Args:
        url: the server, ``http://HOST:PORT`` (plus any path prefix in front of ``/v2``).
        model_name: the model's name on the server.
        num_classes: the number of classes C the model answers for.
        image_size: the side of the square images it will be sent (``None``: any size its metadata allows).
        channels: image channels.
        model_version: ask this version (``None``: the one the server reports, if any).
        timeout: seconds each request may take in all (connect, send, answer), up to :data:`MAX_WAIT`; past it
            :class:`EndpointError`. With a ``transport`` of your own, it bounds each read and the whole
            answer is checked against it between chunks.
        rate_limit: most images sent per second, at least one a day (``None``: no limit).
        transport: an ``httpx`` transport (a proxy, TLS settings, or ``httpx.MockTransport`` in tests).

    Attributes:
        metadata: the :class:`ModelMetadata` read at construction.
        requests: the number of ``infer`` requests sent (retries included).
    """

    __module__ = "lwcam.remote"

    def __init__(self, url: str, model_name: str, *, num_classes: int, image_size: int | None = None,
                 channels: int = 3, model_version: str | None = None, timeout: float = 30.0,
                 rate_limit: float | None = None, transport: httpx.BaseTransport | None = None) -> None:
        self.url = _check_url(url)
        self.model_name = _check_name(model_name, "model_name")
        self.num_classes = check_positive_int(num_classes, "num_classes", minimum=2)
        self.image_size = None if image_size is None else check_positive_int(image_size, "image_size")
        self.channels = check_positive_int(channels, "channels")
        self.timeout = check_real(timeout, "timeout (seconds)", 0.0, MAX_WAIT, low_open=True)
        self.rate_limit = None if rate_limit is None else check_real(rate_limit, "rate_limit (images per second)",
                                                                     1 / MAX_WAIT)
        self.model_version = None if model_version is None else _check_name(model_version, "model_version")
        if transport is not None and not isinstance(transport, httpx.BaseTransport):
            raise TypeError(f"transport must be an httpx.BaseTransport or None, got {type(transport).__name__}")
        self.transport = transport
        self.requests = 0
        self._setup()
        self.metadata = self._read_metadata()
        self.metadata.check(self.num_classes, self.channels, self.image_size, self.model_url)

    def _setup(self) -> None:
        # no idle connection is kept: each request opens its own, whose socket its deadline can shut, and nothing
        # a server sends past an answer can be read as the next one
        self._client = httpx.Client(timeout=httpx.Timeout(self.timeout), transport=self.transport,
                                    limits=httpx.Limits(max_keepalive_connections=0))
        self._lock = threading.Lock()
        self._next_send = 0.0

    @property
    def model_url(self) -> str:
        """``{url}/v2/models/{name}[/versions/{version}]``."""
        path = f"{self.url}/v2/models/{quote(self.model_name, safe='')}"
        return path if self.model_version is None else f"{path}/versions/{quote(self.model_version, safe='')}"

    @property
    def cache_namespace(self) -> str:
        """The answer-cache namespace of this model: URL, name and version (``None`` if the server reports none).

        Every answer returned came from that version (an answer naming another one raises
        :class:`EndpointError`), so the answers cached under this namespace are that version's.
        """
        return f"{self.url}|{self.model_name}|{self.metadata.version}"

    def _exchange(self, method: str, where: str, what: str, content: bytes | None = None,
                  limit: int = MAX_METADATA_BYTES) -> _Answer:
        """One request, its answer read in full within ``timeout`` seconds in all (see :class:`_Deadline`).

        Raises :class:`EndpointError` past the deadline or for an answer over ``limit`` bytes, and the
        ``httpx`` error otherwise (the caller tells a connection failure from the rest).
        """
        headers = None if content is None else {"content-type": "application/json"}
        with _Deadline(self.timeout) as deadline:
            try:
                with self._client.stream(method, where, content=content, headers=headers,
                                         extensions={"trace": deadline.trace}) as response:
                    body = _read_body(response, deadline, limit, where, what)
            except (httpx.HTTPError, _Expired) as err:
                if deadline.expired:
                    raise EndpointError(f"{where} did not answer {what} within timeout={self.timeout:g} s (the time "
                                        f"limit of the whole request: connect, send and answer); raise timeout= for "
                                        f"a slow model") from err
                raise
        return _Answer(response.status_code, response.headers, body)

    def _read_metadata(self) -> ModelMetadata:
        where, what = self.model_url, "the metadata request"
        try:
            answer = self._exchange("GET", where, what)
        except httpx.TimeoutException as err:
            raise EndpointError(f"{where} did not answer {what} within timeout={self.timeout:g} s "
                                f"({type(err).__name__})") from err
        except httpx.TransportError as err:
            raise EndpointError(f"cannot reach {where}: {err!r}; is the server running (e.g. `lwcam serve`)?") from err
        except httpx.HTTPError as err:
            raise EndpointError(f"{where} answered {what} with something unreadable ({err!r})") from err
        if answer.status == 404:
            raise EndpointError(f"no model named {self.model_name!r}"
                                f"{'' if self.model_version is None else f' version {self.model_version!r}'} at "
                                f"{self.url} (HTTP 404 from {where}: {_error_text(answer)})")
        _refuse_redirect(answer, where, what)
        if answer.status != 200:
            raise EndpointError(f"{where} answered HTTP {answer.status} to {what}: {_error_text(answer)}")
        return ModelMetadata.parse(_json(answer, where), where, self.model_version)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Send one ``infer`` request for ``images`` (B,C,H,W); return the (B, C) scores as the server sent them."""
        x = check_images(images, channels=self.channels)
        self._check_size(x)
        body = self._request_body(x)
        self._pace(x.shape[0])
        answer = self._post(body, x.shape[0])
        where = f"{self.model_url}/infer"
        return self._scores(_json(answer, where), where)

    def _check_size(self, x: torch.Tensor) -> None:
        _, _, h, w = self.metadata.input_shape
        if (h not in (-1, x.shape[2])) or (w not in (-1, x.shape[3])):
            raise ValueError(f"images have shape {tuple(x.shape)}, but {self.model_url} takes [-1, "
                             f"{self.metadata.input_shape[1]}, {h}, {w}]")

    def _request_body(self, x: torch.Tensor) -> bytes:
        # float64 decimals are exact for float32 values: the server decodes the very tensor x
        data = np.ascontiguousarray(x.cpu().numpy().reshape(-1), dtype=np.float64)
        request = {"inputs": [{"name": self.metadata.input_name, "shape": list(x.shape), "datatype": "FP32",
                               "data": data}]}
        return orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)

    def _pace(self, n: int) -> None:
        """Wait until ``n`` more images fit in the rate limit (before sending, so the server never sees a burst)."""
        if self.rate_limit is None:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_send)
            self._next_send = start + n / self.rate_limit
        if start > now:
            time.sleep(start - now)

    def _post(self, body: bytes, n: int) -> _Answer:
        where, what = f"{self.model_url}/infer", f"a batch of {n} images"
        with self._lock:
            self.requests += 1
        try:
            answer = self._exchange("POST", where, what, body, MAX_METADATA_BYTES + BYTES_PER_SCORE * n *
                                    self.num_classes)
        except (httpx.ConnectTimeout, httpx.NetworkError, httpx.RemoteProtocolError) as err:
            raise EndpointBusy(f"{where}: connection failed ({err!r})") from err
        except httpx.TimeoutException as err:
            raise EndpointError(f"{where} did not answer {what} within timeout={self.timeout:g} s "
                                f"({type(err).__name__}); raise timeout= for a slow model") from err
        except httpx.HTTPError as err:
            raise EndpointError(f"{where} answered {what} with something unreadable ({err!r})") from err
        if answer.status in RETRIED_STATUS:
            wait = retry_after_seconds(answer.headers.get("retry-after"))
            raise EndpointBusy(f"{where} answered HTTP {answer.status} ({_error_text(answer)}); retry after "
                               f"{wait:g} s or more", retry_after=wait)
        _refuse_redirect(answer, where, what)
        if answer.status != 200:
            hint = "; lower max_batch_size" if answer.status == 413 else ""
            raise EndpointError(f"{where} answered HTTP {answer.status} to {what}: {_error_text(answer)}{hint}")
        return answer

    def _scores(self, body: Any, where: str) -> torch.Tensor:
        """The score tensor of an ``infer`` answer: the metadata's output, of its datatype, from its version."""
        if not isinstance(body, dict):
            raise EndpointError(f"{where} answered JSON that is not an object with 'outputs': {str(body)[:200]}")
        self._check_version(body.get("model_version"), where)
        out = _score_output(body.get("outputs"), self.metadata, where)
        shape = _answer_shape(out, where)
        values = _numbers(out.get("data"), math.prod(shape), where, f"the output {out['name']!r} of shape {shape}")
        return torch.from_numpy(values.reshape(shape))

    def _check_version(self, answered: Any, where: str) -> None:
        """Refuse an answer from another version than :attr:`metadata`'s.

        The version that answered is the answer's ``model_version``; an answer without one (or with an
        empty one) is taken as the metadata's version.
        """
        if answered is None or answered == "":
            return
        if not isinstance(answered, str) and not _is_int(answered):
            raise EndpointError(f"{where} answered a model_version that is not a version name: {str(answered)[:80]}")
        expected = self.metadata.version
        if str(answered) == expected:
            return
        hint = (f"the metadata at {self.model_url} name no version: pass model_version={str(answered)!r}"
                if expected is None else f"build a new black box to query version {str(answered)!r}")
        raise EndpointError(f"{where} answered as model version {str(answered)!r}, but this client was built for "
                            f"version {expected!r}: the model behind the URL changed, and no answer of one version "
                            f"is returned or cached as the other's; {hint}")

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_client", "_lock"):
            del state[key]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup()

    def __repr__(self) -> str:
        return (f"RemoteModel({self.model_url!r}, version={self.metadata.version!r}, "
                f"input={list(self.metadata.input_shape)}, output={list(self.metadata.output_shape)})")


def _score_output(outputs: Any, metadata: ModelMetadata, where: str) -> dict[str, Any]:
    """The one entry of ``outputs`` named as the metadata's score output, of the datatype they declared."""
    if not isinstance(outputs, list) or not outputs:
        raise EndpointError(f"{where} answered without an 'outputs' list: {str(outputs)[:200]}")
    name = metadata.output_name
    named = [o for o in outputs if isinstance(o, dict) and o.get("name") == name]
    if len(named) != 1:
        names = [o.get("name") if isinstance(o, dict) else type(o).__name__ for o in outputs]
        raise EndpointError(f"{where} answered the outputs {names[:10]}, with {len(named)} named {name!r} (the score "
                            f"output of its metadata); lwcam reads exactly one")
    out = named[0]
    if out.get("datatype") != metadata.output_datatype:
        raise EndpointError(f"{where} answered the output {name!r} as {str(out.get('datatype'))[:40]!r}, but the "
                            f"metadata declared {metadata.output_datatype}; lwcam reads scores only as declared")
    return out


def _answer_shape(out: dict[str, Any], where: str) -> list[int]:
    shape = out.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise EndpointError(f"{where} answered the output {out['name']!r} with the shape {str(shape)[:80]}, not a "
                            f"list of sizes")
    return shape


def _numbers(data: Any, count: int, where: str, what: str) -> np.ndarray:
    """``data`` (flat or nested lists, row-major) as ``count`` float32 values; JSON numbers only, bools refused."""
    flat = data
    while isinstance(flat, list) and flat and all(type(v) is list for v in flat):
        flat = [v for row in flat for v in row]
    if not isinstance(flat, list) or not {type(v) for v in flat} <= {int, float}:
        kinds = sorted({type(v).__name__ for v in flat}) if isinstance(flat, list) else [type(flat).__name__]
        raise EndpointError(f"{where} answered {what} with data that are not all JSON numbers (found {kinds})")
    if len(flat) != count:
        raise EndpointError(f"{where} answered {what} with {len(flat)} numbers, not {count}")
    try:
        return np.asarray(flat, dtype=np.float32)
    except OverflowError as err:
        raise EndpointError(f"{where} answered {what} with a number too large for a float: {err}") from err


def _refuse_redirect(answer: _Answer, where: str, what: str) -> None:
    """A 3xx answer is an error naming where it points: the black box is asked only at the URL it was given."""
    if 300 <= answer.status < 400:
        location = answer.headers.get("location")
        raise EndpointError(f"{where} answered HTTP {answer.status} to {what}, a redirect to {location!r}; lwcam "
                            f"follows no redirect: give that URL if it is the model's")


def _json(answer: _Answer, where: str) -> Any:
    """The JSON body of a 200 answer; :class:`EndpointError` for another content type or a body that is not JSON."""
    kind = answer.headers.get("content-type", "")
    media = kind.split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise EndpointError(f"{where} answered content type {kind[:80]!r}, not application/json; lwcam reads only "
                            f"JSON answers")
    try:
        return json.loads(answer.body)  # the standard parser: a NaN in an answer is read, then rejected
    except (ValueError, RecursionError) as err:
        text = answer.body[:200].decode("utf-8", "replace")
        raise EndpointError(f"{where} answered something that is not JSON ({type(err).__name__}): {text!r}") from err


def _error_text(answer: _Answer) -> str:
    text = answer.body.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return text[:300] or httpx.codes.get_reason_phrase(answer.status)
    return str(body.get("error", body) if isinstance(body, dict) else body)[:300]
