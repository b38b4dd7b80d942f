"""A black box behind an inference server: a client for the Open Inference Protocol (KServe v2 REST).

KServe, Triton, MLServer, TorchServe and Seldon speak one protocol: ``GET /v2/models/{name}``
returns the model's metadata, ``POST /v2/models/{name}/infer`` takes and returns tensors as JSON.
:class:`RemoteModel` is a callable ``(B,3,H,W) -> (B,C)`` that speaks it over ``httpx``, and
:func:`endpoint_blackbox` (also ``BlackBox.from_endpoint``) wraps it in a
:class:`~lwcam.blackbox.BlackBox`, which adds what lwcam guarantees for any black box: answer
validation, the query count, batching, retries and the answer cache.

* **Metadata first.** The model's input (name, FP32, shape ``[-1, 3, H, W]``) and output
  (``[-1, C]``) are read when the client is built and checked against ``num_classes``, the
  channels and ``image_size``: a mismatch, an unknown model name or an unreachable server raises
  :class:`EndpointError` before any query is sent.
* **Retries.** A connection error (refused, reset, the server gone mid-request) and the answers
  429 and 503 raise :class:`EndpointBusy`, a ``ConnectionError``, which the black box retries with
  exponential back-off, waiting at least the server's ``Retry-After`` (seconds or an HTTP date, up
  to :data:`MAX_RETRY_AFTER`). Any other 4xx or 5xx answer, a malformed answer and a request that
  times out raise :class:`EndpointError` and are never retried (a server that hangs would only
  hang again).
* **Rate limit.** ``rate_limit`` images per second, enforced before each request is sent: a
  request waits until the images sent before it have had their share of time.
* **Cache key.** The black box's cache namespace holds the URL, the model name and the model
  version from the metadata, so a new version of a model never reads an old version's answers.

Only tensors cross the wire: FP32 images out, FP32 scores back, as JSON numbers. An image is sent
as the exact decimal of each float32 value, so the server sees the very tensor the client holds.

Example (an ``httpx.MockTransport`` stands in for a server with 2 classes that always answers 0.75, 0.25):
    >>> import json, httpx, torch
    >>> meta = {"name": "m", "versions": ["1"], "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 2]}],
    ...         "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 8, 8]}]}
    >>> def server(request):
    ...     if request.method == "GET":
    ...         return httpx.Response(200, json=meta)
    ...     n = json.loads(request.content)["inputs"][0]["shape"][0]
    ...     out = {"name": "probs", "datatype": "FP32", "shape": [n, 2], "data": [0.75, 0.25] * n}
    ...     return httpx.Response(200, json={"model_name": "m", "outputs": [out]})
    >>> bb = endpoint_blackbox("http://127.0.0.1:8080", "m", num_classes=2, transport=httpx.MockTransport(server))
    >>> bb(torch.zeros(3, 3, 8, 8)).tolist(), bb.queries
    ([[0.75, 0.25], [0.75, 0.25], [0.75, 0.25]], 3)
    >>> bb.fn.cache_namespace, bb.fn.metadata.returns
    ('http://127.0.0.1:8080|m|1', 'probs')
"""

from __future__ import annotations

import email.utils
import json
import math
import os
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
from .blackbox import BlackBox, BlackBoxError, FnReturns, Output

__all__ = ["RemoteModel", "ModelMetadata", "EndpointError", "EndpointBusy", "endpoint_blackbox", "split_model_url",
           "retry_after_seconds", "MAX_RETRY_AFTER", "MAX_WAIT", "RETRIED_STATUS"]

#: HTTP answers that are retried (with the connection errors); every other 4xx and 5xx is not.
RETRIED_STATUS = (429, 503)
#: The longest ``Retry-After`` wait honoured, in seconds; a longer one is cut to this.
MAX_RETRY_AFTER = 60.0
#: The longest single wait the client accepts, in seconds (a day): ``timeout``, one image's share of the rate
#: limit, the last back-off. Longer ones are mistakes, and overflow the platform's timers.
MAX_WAIT = 86_400.0


class EndpointError(BlackBoxError):
    """The server cannot serve this black box: unreachable at construction, unknown model, metadata that do not
    fit, a refused request (a 4xx other than 429, or a 5xx other than 503), a malformed answer, or a time-out."""


class EndpointBusy(ConnectionError):
    """A transient failure (connection error, 429 or 503): retried by the black box after ``retry_after`` s or more."""

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_seconds(value: str | None, now: float | None = None) -> float:
    """The wait a ``Retry-After`` header asks for, in seconds in ``[0, MAX_RETRY_AFTER]`` (0 if absent or unreadable).

    Example:
        >>> retry_after_seconds("2"), retry_after_seconds(None), retry_after_seconds("soon"), retry_after_seconds("1e9")
        (2.0, 0.0, 0.0, 60.0)
        >>> retry_after_seconds("Thu, 01 Jan 1970 00:00:05 GMT", now=0.0)
        5.0
    """
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            date = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return 0.0
        seconds = date.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
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

    @property
    def returns(self) -> Literal["probs", "logits"]:
        """``"logits"`` when the output is named ``logits``, else ``"probs"`` (what ``fn_returns="auto"`` takes)."""
        return "logits" if self.output_name.lower() == "logits" else "probs"

    @classmethod
    def parse(cls, body: Any, where: str, version: str | None = None) -> ModelMetadata:
        """Read a ``GET /v2/models/{name}`` answer; :class:`EndpointError` naming ``where`` if it is malformed."""
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise EndpointError(f"{where} answered metadata without an 'inputs' list: {str(body)[:200]}")
        inputs, outputs = body["inputs"], body.get("outputs") or []
        if len(inputs) != 1:
            names = [t.get("name") for t in inputs if isinstance(t, dict)]
            raise EndpointError(f"{where}: the model takes {len(inputs)} inputs {names}; lwcam sends one image tensor")
        image = _tensor_meta(inputs[0], where, "input")
        if image[1] != "FP32":
            raise EndpointError(f"{where}: the input {image[0]!r} is {image[1]}; lwcam sends FP32 images")
        scores = _pick_output([_tensor_meta(t, where, "output") for t in outputs], where)
        versions = body.get("versions") or []
        if version is None:
            if len(versions) > 1:
                raise EndpointError(f"{where} serves versions {versions}; pass model_version= to choose one")
            version = str(versions[0]) if versions else None
        elif versions and version not in [str(v) for v in versions]:
            raise EndpointError(f"{where} has no version {version!r}; it serves {versions}")
        return cls(str(body.get("name", "")), version, image[0], image[2], scores[0], scores[2])

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


def _tensor_meta(t: Any, where: str, what: str) -> tuple[str, str, tuple[int, ...]]:
    """``(name, datatype, shape)`` of a metadata tensor entry."""
    if not isinstance(t, dict) or not isinstance(t.get("shape"), list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in t["shape"]):
        raise EndpointError(f"{where}: malformed {what} metadata {t!r}; expected name, datatype and an int shape")
    return str(t.get("name", "")), str(t.get("datatype", "")), tuple(t["shape"])


def _pick_output(outputs: list[tuple[str, str, tuple[int, ...]]], where: str) -> tuple[str, str, tuple[int, ...]]:
    scores = [t for t in outputs if t[0].lower() in ("probs", "logits")] if len(outputs) > 1 else outputs
    if len(scores) != 1:
        raise EndpointError(f"{where}: cannot tell the score output among {[t[0] for t in outputs]} (lwcam takes the "
                            f"only output, or the one named 'probs' or 'logits')")
    if scores[0][1] not in ("FP32", "FP64"):
        raise EndpointError(f"{where}: the output {scores[0][0]!r} is {scores[0][1]}; lwcam reads FP32 or FP64 scores")
    return scores[0]


class RemoteModel:
    """A model behind an Open Inference Protocol server, as a callable ``(B,3,H,W) float tensor -> (B,C) tensor``.

    Building it reads and checks the model's metadata (see the module docstring); calling it sends one
    ``infer`` request for the whole batch (the :class:`~lwcam.blackbox.BlackBox` around it splits
    batches to ``max_batch_size``). It keeps no answer and counts no query: the black box does both.

    Args:
        url: the server, ``http://HOST:PORT`` (plus any path prefix in front of ``/v2``).
        model_name: the model's name on the server.
        num_classes: the number of classes C the model answers for.
        image_size: the side of the square images it will be sent (``None``: any size its metadata allows).
        channels: image channels.
        model_version: ask this version (``None``: the one the server reports, if any).
        timeout: seconds each request (connect, send, answer) may take, up to :data:`MAX_WAIT`; past it
            :class:`EndpointError`.
        rate_limit: most images sent per second, at least one a day (``None``: no limit).
        transport: an ``httpx`` transport (a proxy, TLS settings, or ``httpx.MockTransport`` in tests).

    Attributes:
        metadata: the :class:`ModelMetadata` read at construction.
        requests: the number of ``infer`` requests sent (retries included).
    """

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
        self._client = httpx.Client(timeout=httpx.Timeout(self.timeout), transport=self.transport)
        self._lock = threading.Lock()
        self._next_send = 0.0

    @property
    def model_url(self) -> str:
        """``{url}/v2/models/{name}[/versions/{version}]``."""
        path = f"{self.url}/v2/models/{quote(self.model_name, safe='')}"
        return path if self.model_version is None else f"{path}/versions/{quote(self.model_version, safe='')}"

    @property
    def cache_namespace(self) -> str:
        """The answer-cache namespace of this model: URL, name and version (``None`` if the server reports none)."""
        return f"{self.url}|{self.model_name}|{self.metadata.version}"

    def _read_metadata(self) -> ModelMetadata:
        where = self.model_url
        try:
            response = self._client.get(where)
        except httpx.TimeoutException as err:
            raise EndpointError(f"{where} did not answer within timeout={self.timeout:g} s ({err!r})") from err
        except httpx.TransportError as err:
            raise EndpointError(f"cannot reach {where}: {err!r}; is the server running (e.g. `lwcam serve`)?") from err
        if response.status_code == 404:
            raise EndpointError(f"no model named {self.model_name!r}"
                                f"{'' if self.model_version is None else f' version {self.model_version!r}'} at "
                                f"{self.url} (HTTP 404 from {where}: {_error_text(response)})")
        if response.status_code != 200:
            raise EndpointError(f"{where} answered HTTP {response.status_code} to the metadata request: "
                                f"{_error_text(response)}")
        return ModelMetadata.parse(_json(response, where), where, self.model_version)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Send one ``infer`` request for ``images`` (B,C,H,W); return the (B, C) scores as the server sent them."""
        x = check_images(images, channels=self.channels)
        self._check_size(x)
        body = self._request_body(x)
        self._pace(x.shape[0])
        response = self._post(body, x.shape[0])
        return self._scores(_json(response, f"{self.model_url}/infer"))

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

    def _post(self, body: bytes, n: int) -> httpx.Response:
        where = f"{self.model_url}/infer"
        with self._lock:
            self.requests += 1
        try:
            response = self._client.post(where, content=body, headers={"content-type": "application/json"})
        except (httpx.ConnectTimeout, httpx.NetworkError, httpx.RemoteProtocolError) as err:
            raise EndpointBusy(f"{where}: connection failed ({err!r})") from err
        except httpx.TimeoutException as err:
            raise EndpointError(f"{where} did not answer a batch of {n} images within timeout={self.timeout:g} s "
                                f"({type(err).__name__}); raise timeout= for a slow model") from err
        if response.status_code in RETRIED_STATUS:
            wait = retry_after_seconds(response.headers.get("retry-after"))
            raise EndpointBusy(f"{where} answered HTTP {response.status_code} ({_error_text(response)}); retry after "
                               f"{wait:g} s or more", retry_after=wait)
        if response.status_code != 200:
            hint = "; lower max_batch_size" if response.status_code == 413 else ""
            raise EndpointError(f"{where} answered HTTP {response.status_code} to a batch of {n} images: "
                                f"{_error_text(response)}{hint}")
        return response

    def _scores(self, body: Any) -> torch.Tensor:
        where = f"{self.model_url}/infer"
        outputs = body.get("outputs") if isinstance(body, dict) else None
        if not isinstance(outputs, list) or not outputs:
            raise EndpointError(f"{where} answered without an 'outputs' list: {str(body)[:200]}")
        named = [o for o in outputs if isinstance(o, dict) and o.get("name") == self.metadata.output_name]
        out = named[0] if named else outputs[0] if len(outputs) == 1 else None
        if not isinstance(out, dict) or not isinstance(out.get("shape"), list):
            raise EndpointError(f"{where} answered no output named {self.metadata.output_name!r} with a shape")
        try:
            values = np.asarray(out.get("data"), dtype=np.float32)
            return torch.from_numpy(values.reshape([int(d) for d in out["shape"]]).copy())
        except (TypeError, ValueError) as err:
            raise EndpointError(f"{where} answered an output {out.get('name')!r} of shape {out.get('shape')} whose "
                                f"data are not that many numbers: {err}") from err

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


def _json(response: httpx.Response, where: str) -> Any:
    try:
        return json.loads(response.content)  # the standard parser: a NaN in an answer is read, then rejected
    except ValueError as err:
        raise EndpointError(f"{where} answered something that is not JSON: {response.text[:200]!r}") from err


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    return str(body.get("error", body) if isinstance(body, dict) else body)[:300]


def endpoint_blackbox(url: str, model_name: str, num_classes: int, *, image_size: int | None = None,
                      model_version: str | None = None, fn_returns: FnReturns = "auto", output: Output = "probs",
                      k: int = 5, max_batch_size: int = 64, timeout: float = 30.0, retries: int = 6,
                      backoff: float = 0.25, rate_limit: float | None = None,
                      cache_dir: str | os.PathLike | None = None, cache_namespace: str | None = None,
                      atol: float = 1e-3, channels: int = 3, progress: bool | None = False,
                      transport: httpx.BaseTransport | None = None) -> BlackBox:
    """A :class:`~lwcam.blackbox.BlackBox` for a model behind an Open Inference Protocol server.

    The metadata are read and checked first (:class:`RemoteModel`); nothing is queried if they do
    not fit. ``fn_returns="auto"`` takes logits when the model's output is named ``logits`` and
    probabilities otherwise. Requests carry at most ``max_batch_size`` images; ``retries``,
    ``backoff`` (seconds, doubled each try, at least the server's ``Retry-After``) apply to
    connection errors, 429 and 503 only. The cache namespace is ``URL|name|version`` (then
    ``cache_namespace``, if given, in front); with ``cache_dir``, a server that reports no model
    version needs ``model_version`` or ``cache_namespace``, so that a new model is never answered
    from an old one's cache. The other arguments are :class:`~lwcam.blackbox.BlackBox`'s and
    :class:`RemoteModel`'s. The returned black box's ``fn`` is the :class:`RemoteModel`.
    """
    check_positive_int(max_batch_size, "max_batch_size")
    BlackBox._check_outputs(num_classes, fn_returns, output, k)
    BlackBox._check_limits(max_batch_size, retries, backoff, atol, channels, cache_namespace, ())
    if retries > 0 and backoff * 2 ** (retries - 1) > MAX_WAIT:
        raise ValueError(f"retries={retries} with backoff={backoff} s would wait {backoff * 2 ** (retries - 1):.3g} s "
                         f"before the last retry; at most {MAX_WAIT:g} s (a day)")
    remote = RemoteModel(url, model_name, num_classes=num_classes, image_size=image_size, channels=channels,
                         model_version=model_version, timeout=timeout, rate_limit=rate_limit, transport=transport)
    if cache_dir is not None and remote.metadata.version is None and cache_namespace is None:
        remote.close()
        raise ValueError(f"{remote.model_url} reports no model version, so the answer cache cannot tell this model "
                         f"from a later one under the same name: pass model_version= or cache_namespace=")
    namespace = remote.cache_namespace if cache_namespace is None else f"{cache_namespace}|{remote.cache_namespace}"
    return BlackBox(remote, num_classes, fn_returns=remote.metadata.returns if fn_returns == "auto" else fn_returns,
                    output=output, k=k, batch_size=max_batch_size, cache_dir=cache_dir, retries=retries,
                    backoff=backoff, atol=atol, channels=channels, cache_namespace=namespace, progress=progress)
