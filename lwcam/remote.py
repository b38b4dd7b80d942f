"""A black box behind an inference server: a client for the Open Inference Protocol (KServe v2 REST).

KServe, Triton, MLServer, TorchServe and Seldon speak one protocol: ``GET /v2/models/{name}``
returns the model's metadata, ``POST /v2/models/{name}/infer`` takes and returns tensors as JSON.
:class:`RemoteModel` is a callable ``(B,3,H,W) -> (B,C)`` that speaks it over ``httpx``, and
:func:`endpoint_blackbox` (also ``BlackBox.from_endpoint``) wraps it in a
:class:`~lwcam.blackbox.BlackBox`, which adds what lwcam guarantees for any black box: answer
validation, the query count, batching, retries and the answer cache.

* **Metadata first.** The model's input (name, FP32, shape ``[-1, 3, H, W]``) and output
  (``[-1, C]``) are read when the client is built and checked against ``num_classes``, the
  channels and ``image_size``: a mismatch, a field of the wrong JSON type, an unknown model name
  or an unreachable server raises :class:`EndpointError` before any query is sent.
* **Retries.** A connection error (refused, reset, the server gone mid-request) and the answers
  429 and 503 raise :class:`EndpointBusy`, a ``ConnectionError``, which the black box retries with
  exponential back-off, waiting at least the server's ``Retry-After`` (seconds or an HTTP date, up
  to :data:`MAX_RETRY_AFTER`; one below zero, in the past or unreadable asks no wait, so the
  back-off applies alone, see :func:`retry_after_seconds`). A redirect (3xx, never followed: the
  error names its ``Location``), any other 4xx or 5xx answer, a malformed answer and a request that
  times out raise :class:`EndpointError` and are never retried (a server that hangs would only
  hang again).
* **Time-out.** ``timeout`` bounds each request as a whole (connect, send and the whole answer), not
  each read: a server that trickles its answer a byte at a time ends in :class:`EndpointError` at
  ``timeout``. No idle connection is kept, so nothing a server sends past an answer is read as
  the next one.
* **Answers.** An answer must be JSON (content type ``application/json``, at most
  :data:`MAX_METADATA_BYTES` plus :data:`BYTES_PER_SCORE` per score) and hold exactly one output
  named as in the metadata, of the datatype the metadata declared (``FP32`` or ``FP64``), whose
  data are JSON numbers (no bools, no strings), as many as its shape says. Anything else raises
  :class:`EndpointError` naming the URL and the fault.
* **Rate limit.** ``rate_limit`` images per second, enforced before each request is sent: a
  request waits until the images sent before it have had their share of time.
* **Cache key and versions.** The black box's cache namespace holds the URL, the model name and the
  model version from the metadata, so a new version of a model never reads an old version's
  answers. The version that answered is the answer's ``model_version`` (an answer without one is
  taken as the metadata's version): an answer from another version than the client was built for
  raises :class:`EndpointError` naming the URL and both versions, so it is neither returned, nor
  mixed with cached answers, nor cached under the old version's name.

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

from typing import Any

from ._endpoint import (
    BYTES_PER_SCORE,
    MAX_METADATA_BYTES,
    MAX_RETRY_AFTER,
    MAX_WAIT,
    RETRIED_STATUS,
    EndpointBusy,
    EndpointError,
    ModelMetadata,
    RemoteModel,
    retry_after_seconds,
    split_model_url,
)
from .blackbox import BlackBox

__all__ = ["RemoteModel", "ModelMetadata", "EndpointError", "EndpointBusy", "endpoint_blackbox", "split_model_url",
           "retry_after_seconds", "MAX_RETRY_AFTER", "MAX_WAIT", "RETRIED_STATUS", "MAX_METADATA_BYTES",
           "BYTES_PER_SCORE"]


def endpoint_blackbox(url: str, model_name: str, num_classes: int, **options: Any) -> BlackBox:
    """``BlackBox.from_endpoint(url, model_name, num_classes, **options)``: see
    :meth:`lwcam.blackbox.BlackBox.from_endpoint` for the options."""
    return BlackBox.from_endpoint(url, model_name, num_classes, **options)
