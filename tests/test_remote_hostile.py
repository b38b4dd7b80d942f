"""The inference-server client against a hostile server: a loopback stdlib HTTP server whose answers each test writes.

Every fault must end in a clear :class:`~lwcam.remote.EndpointError` (or, through a black box,
a :class:`~lwcam.blackbox.BlackBoxError`) naming the URL and the fault, or in a correct answer:
never a hang past ``timeout``, never a wrong answer returned or cached. Each client has a small
``timeout``, and the slow cases assert the time they took; each server stops in its fixture.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from _imports import cycles, import_graph

import lwcam
from lwcam import _endpoint
from lwcam.blackbox import BlackBox, BlackBoxError
from lwcam.remote import MAX_RETRY_AFTER, EndpointBusy, EndpointError, RemoteModel, retry_after_seconds

C, SIZE = 2, 8
META: dict[str, Any] = {"name": "m", "versions": ["1"],
                        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]}],
                        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, C]}]}
#: How far past ``timeout`` a request may end (thread wake-ups on a busy machine).
SLACK = 0.5


def answer(n: int, version: str | None = "1", row: tuple[Any, ...] = (0.75, 0.25), **output: Any) -> dict[str, Any]:
    """An ``infer`` answer of ``n`` rows ``row``; ``output`` overrides the output's fields."""
    out = {"name": "probs", "datatype": "FP32", "shape": [n, C], "data": list(row) * n, **output}
    body: dict[str, Any] = {"model_name": "m", "outputs": [out]}
    if version is not None:
        body["model_version"] = version
    return body


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.gets += 1
        self.server.on_get(self)

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.posts += 1
        self.server.on_post(self, request["inputs"][0]["shape"][0])

    def reply(self, status: int, body: bytes | dict | list, headers: dict[str, str] | None = None,
              content_type: str | None = "application/json", length: int | None = None) -> None:
        """Answer ``body`` (JSON-encoded unless bytes) with a ``Content-Length`` of ``length`` (default: its own)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for key, value in {**({} if content_type is None else {"content-type": content_type}),
                           **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("content-length", str(len(data) if length is None else length))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def trickle(self, data: bytes, every: float = 0.2) -> None:
        """Send ``data`` a byte every ``every`` seconds, until it is sent, the server stops or the client is gone."""
        self.close_connection = True
        for i in range(len(data)):
            if self.server.stop.wait(every):
                return
            try:
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
            except OSError:
                return

    def hang(self) -> None:
        """Keep the connection open and answer nothing until the server stops."""
        self.close_connection = True
        self.server.stop.wait(30)


class Server(ThreadingHTTPServer):
    """A loopback server that answers the metadata ``meta`` and each ``infer`` with ``on_post(handler, n)``."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.meta: Any = json.loads(json.dumps(META))
        self.on_get: Callable[[Handler], None] = lambda h: h.reply(200, self.meta)
        self.on_post: Callable[[Handler, int], None] = lambda h, n: h.reply(200, answer(n))
        self.gets = self.posts = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/m/infer"

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def other() -> Iterator[Server]:
    """A second server, where a redirect points."""
    s = Server()
    try:
        yield s
    finally:
        s.close()


def _model(server: Server, timeout: float = 2.0, **kw: Any) -> RemoteModel:
    return RemoteModel(server.url, "m", num_classes=C, image_size=SIZE, timeout=timeout, **kw)


def _images(n: int = 2, value: float = 0.0) -> torch.Tensor:
    """``n`` distinct images: image ``i`` is ``value + i / 100`` everywhere."""
    return value + torch.arange(n, dtype=torch.float32).div(100).view(n, 1, 1, 1).expand(n, 3, SIZE, SIZE)


def _raises(server: Server, match: str, timeout: float = 2.0, n: int = 2) -> EndpointError:
    """Call a client of ``server`` once; it must raise an :class:`EndpointError` naming the infer URL and ``match``."""
    model = _model(server, timeout=timeout)
    with pytest.raises(EndpointError, match=match) as err:
        model(_images(n))
    assert server.infer_url in str(err.value)
    return err.value


def _rows(folder: Path) -> int:
    with sqlite3.connect(folder / "answers.sqlite") as conn:
        return int(conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0])


# ------------------------------------------------------------------------------------------ malformed bodies
def test_truncated_json_is_refused_with_the_url(server):
    server.on_post = lambda h, n: h.reply(200, json.dumps(answer(n)).encode()[:-7])
    _raises(server, "answered something that is not JSON")


def test_a_body_cut_short_of_its_content_length_is_a_lost_connection_retried_then_named(server):
    def short(h: Handler, n: int) -> None:
        h.close_connection = True
        h.reply(200, json.dumps(answer(n)).encode(), length=10_000)

    server.on_post = short
    with pytest.raises(EndpointBusy, match=rf"{server.infer_url}: connection failed \(RemoteProtocolError"):
        _model(server)(_images())
    bb = BlackBox.from_endpoint(server.url, "m", C, image_size=SIZE, timeout=2.0, retries=2, backoff=0.01)
    with pytest.raises(BlackBoxError, match=rf"failed 3 times .*{server.infer_url}: connection failed"):
        bb(_images())
    assert bb.queries == 0 and server.posts == 1 + 3


def test_a_body_longer_than_its_content_length_is_read_up_to_it_and_the_rest_never_answers(server):
    forged = json.dumps(answer(2, row=(0.0, 1.0))).encode()
    smuggled = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: " + str(len(forged)).encode()
                + b"\r\n\r\n" + forged)

    def longer(h: Handler, n: int) -> None:
        body = json.dumps(answer(n)).encode()
        h.reply(200, body + smuggled, length=len(body))

    server.on_post = longer
    model = _model(server)
    assert model(_images()).tolist() == model(_images(value=1.0)).tolist() == [[0.75, 0.25]] * 2


@pytest.mark.parametrize("content_type", ["text/html", "text/plain; charset=utf-8", None])
def test_an_answer_that_is_not_declared_json_is_refused(server, content_type):
    server.on_post = lambda h, n: h.reply(200, answer(n), content_type=content_type)
    _raises(server, rf"answered content type {content_type or ''!r}, not application/json")


def test_an_answer_larger_than_its_bound_is_refused(server):
    limit = _endpoint.MAX_METADATA_BYTES + _endpoint.BYTES_PER_SCORE * 2 * C
    server.on_post = lambda h, n: h.reply(200, b" " * limit + json.dumps(answer(n)).encode())
    _raises(server, rf"answered more than {limit} bytes to a batch of 2 images")


# ------------------------------------------------------------------------------------------ redirects
@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_of_a_query_is_never_followed(server, other, status):
    location = f"{other.url}/v2/models/m/infer"
    server.on_post = lambda h, n: h.reply(status, b"", headers={"location": location})
    _raises(server, rf"answered HTTP {status} to a batch of 2 images, a redirect to '{location}'; lwcam follows no "
                    rf"redirect")
    assert other.posts == other.gets == 0


def test_a_redirect_of_the_metadata_is_never_followed(server, other):
    server.on_get = lambda h: h.reply(302, b"", headers={"location": f"{other.url}/v2/models/m"})
    with pytest.raises(EndpointError, match=rf"{server.url}/v2/models/m answered HTTP 302 to the metadata request, "
                                            rf"a redirect to '{other.url}/v2/models/m'"):
        _model(server)
    assert other.gets == 0


# ------------------------------------------------------------------------------------------ Retry-After
@pytest.mark.parametrize(("value", "seconds"), [
    ("-5", 0.0), ("-inf", 0.0), ("nan", 0.0), ("soon", 0.0), ("", 0.0), (" 3 ", 3.0), ("1e9", MAX_RETRY_AFTER),
    ("inf", MAX_RETRY_AFTER), ("Thu, 01 Jan 1970 00:00:05 GMT", 0.0), ("Fri, 31 Dec 9999 23:59:59 GMT",
                                                                        MAX_RETRY_AFTER),
])
def test_retry_after_values_are_read_as_documented(value, seconds):
    assert retry_after_seconds(value) == seconds


@pytest.mark.parametrize("value", ["-30", "soon", "nan"])
def test_a_negative_or_unreadable_retry_after_leaves_the_back_off(server, value):
    busy = [True]

    def once_busy(h: Handler, n: int) -> None:
        if busy.pop() if busy else False:
            h.reply(503, {"error": "busy"}, headers={"retry-after": value})
        else:
            h.reply(200, answer(n))

    server.on_post = once_busy
    bb = BlackBox.from_endpoint(server.url, "m", C, image_size=SIZE, timeout=2.0, retries=2, backoff=0.05)
    t0 = time.perf_counter()
    assert bb(_images()).tolist() == [[0.75, 0.25]] * 2
    assert bb.retried == 1 and 0.05 <= time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("value", ["1e12", "inf", "Fri, 31 Dec 9999 23:59:59 GMT"])
@pytest.mark.parametrize("status", [503, 429])
def test_a_huge_retry_after_is_capped_and_the_retries_end(server, monkeypatch, value, status):
    monkeypatch.setattr(_endpoint, "MAX_RETRY_AFTER", 0.3)
    server.on_post = lambda h, n: h.reply(status, {"error": "busy"}, headers={"retry-after": value})
    bb = BlackBox.from_endpoint(server.url, "m", C, image_size=SIZE, timeout=2.0, retries=2, backoff=0.01)
    t0 = time.perf_counter()
    with pytest.raises(BlackBoxError, match=rf"failed 3 times .*{server.infer_url} answered HTTP {status}"):
        bb(_images())
    assert 2 * 0.3 <= time.perf_counter() - t0 < 2 * 0.3 + 1.5 and server.posts == 3 and bb.retried == 2


# ------------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize(("output", "match"), [
    ({"datatype": "INT64", "data": [1, 0] * 2}, r"the output 'probs' as 'INT64', but the metadata declared FP32"),
    ({"datatype": "FP16"}, r"the output 'probs' as 'FP16', but the metadata declared FP32"),
    ({"datatype": "BYTES", "data": ["0.75", "0.25"] * 2}, r"as 'BYTES', but the metadata declared FP32"),
    ({"datatype": None}, r"as 'None', but the metadata declared FP32"),
    ({"data": [True, False] * 2}, r"data that are not all JSON numbers \(found \['bool'\]\)"),
    ({"data": ["0.75", "0.25"] * 2}, r"data that are not all JSON numbers \(found \['str'\]\)"),
    ({"data": [0.75, 0.25, 0.75, False]}, r"data that are not all JSON numbers \(found \['bool', 'float'\]\)"),
    ({"data": [0.75, 0.25] * 2 + [0.5]}, r"with 5 numbers, not 4"),
    ({"data": [0.75, 0.25, 0.75]}, r"with 3 numbers, not 4"),
    ({"shape": ["2", 2]}, r"with the shape \['2', 2\], not a list of sizes"),
])
def test_an_output_not_as_declared_is_refused(server, output, match):
    server.on_post = lambda h, n: h.reply(200, answer(n, **output))
    _raises(server, match)


def test_nested_data_are_read_row_major(server):
    server.on_post = lambda h, n: h.reply(200, answer(n, data=[[0.75, 0.25]] * n))
    assert _model(server)(_images(3)).tolist() == [[0.75, 0.25]] * 3


def test_an_extra_output_is_ignored(server):
    def extra(h: Handler, n: int) -> None:
        body = answer(n)
        body["outputs"].insert(0, {"name": "labels", "datatype": "INT64", "shape": [n], "data": [0] * n})
        h.reply(200, body)

    server.on_post = extra
    assert _model(server)(_images()).tolist() == [[0.75, 0.25]] * 2


@pytest.mark.parametrize(("outputs", "match"), [
    (lambda n: [answer(n, name="logits")["outputs"][0]], r"answered the outputs \['logits'\], with 0 named 'probs'"),
    (lambda n: answer(n)["outputs"] * 2, r"answered the outputs \['probs', 'probs'\], with 2 named 'probs'"),
    (lambda n: [], r"answered without an 'outputs' list"),
    (lambda n: {"probs": answer(n)["outputs"][0]}, r"answered without an 'outputs' list"),
])
def test_a_missing_or_doubled_output_is_refused(server, outputs, match):
    server.on_post = lambda h, n: h.reply(200, {"model_name": "m", "model_version": "1", "outputs": outputs(n)})
    _raises(server, match)


# ------------------------------------------------------------------------------------------ metadata
def _set(path: str, value: Any) -> Callable[[dict], Any]:
    """Set a field of the metadata, ``path`` like ``inputs.0.shape``; ``meta`` for the whole answer."""
    def edit(meta: dict) -> Any:
        if path == "meta":
            return value
        *parents, last = path.split(".")
        node: Any = meta
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
        return meta
    return edit


@pytest.mark.parametrize(("edit", "match"), [
    (_set("meta", [META]), r"answered metadata without an 'inputs' list"),
    (_set("inputs", META["inputs"][0]), r"answered metadata without an 'inputs' list"),
    (_set("outputs", META["outputs"][0]), r"answered metadata whose 'outputs' \(dict\) is not a list"),
    (_set("name", 7), r"or whose 'name' \(int\) is not a str"),
    (_set("versions", "12"), r"answered metadata whose 'versions' is 12, not a list of version names"),
    (_set("versions", {"v": "1"}), r"answered metadata whose 'versions' is \{'v': '1'\}, not a list"),
    (_set("versions", [["1"]]), r"whose 'versions' is \[\['1'\]\], not a list"),
    (_set("inputs.0.shape", "[-1, 3, 8, 8]"), r"malformed input metadata"),
    (_set("inputs.0.shape", [-1, True, 8, 8]), r"malformed input metadata"),
    (_set("inputs.0.name", ["images"]), r"malformed input metadata"),
    (_set("inputs.0.datatype", 32), r"malformed input metadata"),
    (_set("outputs.0.shape", {"0": -1, "1": 2}), r"malformed output metadata"),
    (_set("outputs.0.name", None), r"malformed output metadata"),
])
def test_metadata_fields_of_the_wrong_json_type_fail_at_construction(server, edit, match):
    server.meta = edit(server.meta)
    with pytest.raises(EndpointError, match=match) as err:
        _model(server)
    assert f"{server.url}/v2/models/m" in str(err.value) and server.posts == 0


# ------------------------------------------------------------------------------------------ model versions
def test_answers_of_a_new_version_are_never_mixed_with_the_old_versions_cache(server, tmp_path):
    old = BlackBox.from_endpoint(server.url, "m", C, image_size=SIZE, timeout=2.0, cache_dir=tmp_path)
    seen = _images(2, value=0.0)
    assert old(seen).tolist() == [[0.75, 0.25]] * 2 and _rows(tmp_path) == 2
    server.meta["versions"] = ["2"]  # the server now serves version 2, which answers otherwise
    server.on_post = lambda h, n: h.reply(200, answer(n, version="2", row=(0.25, 0.75)))
    both = torch.cat([seen, _images(1, value=1.0)])  # two answers in the cache, one to ask
    with pytest.raises(BlackBoxError, match=rf"{server.infer_url} answered as model version '2', but this client was "
                                            rf"built for version '1'"):
        old(both)
    assert _rows(tmp_path) == 2 and old.queries == 2  # nothing of version 2 under version 1's name
    assert old(seen).tolist() == [[0.75, 0.25]] * 2  # version 1's answers stay version 1's
    new = BlackBox.from_endpoint(server.url, "m", C, image_size=SIZE, timeout=2.0, cache_dir=tmp_path)
    assert new.fn.cache_namespace.endswith("|m|2")  # type: ignore[union-attr]
    assert new(both).tolist() == [[0.25, 0.75]] * 3 and new.queries == 3 and new.cache_hits == 0
    assert _rows(tmp_path) == 2 + 3


def test_an_answer_without_a_version_is_taken_as_the_metadatas(server, tmp_path):
    server.on_post = lambda h, n: h.reply(200, answer(n, version=None))
    bb = BlackBox.from_endpoint(server.url, "m", C, image_size=SIZE, timeout=2.0, cache_dir=tmp_path)
    assert bb(_images()).tolist() == [[0.75, 0.25]] * 2 and _rows(tmp_path) == 2
    assert bb.cache is not None and bb.cache.namespace.startswith(f"{server.url}|m|1|")


@pytest.mark.parametrize(("version", "match"), [
    ("2", r"answered as model version '2', but this client was built for version '1'"),
    (1.0, r"answered a model_version that is not a version name: 1\.0"),
    (["1"], r"answered a model_version that is not a version name"),
])
def test_an_answer_from_another_version_than_the_metadata_is_refused_and_not_cached(server, tmp_path, version, match):
    server.on_post = lambda h, n: h.reply(200, answer(n, version=version))
    bb = BlackBox.from_endpoint(server.url, "m", C, image_size=SIZE, timeout=2.0, cache_dir=tmp_path)
    with pytest.raises(BlackBoxError, match=match):
        bb(_images())
    assert _rows(tmp_path) == 0 and bb.queries == 0 and bb.retried == 0


def test_a_server_naming_no_version_in_its_metadata_but_one_in_its_answers_is_refused(server, tmp_path):
    del server.meta["versions"]
    server.on_post = lambda h, n: h.reply(200, answer(n, version="7"))
    bb = BlackBox.from_endpoint(server.url, "m", C, image_size=SIZE, timeout=2.0, cache_dir=tmp_path,
                                cache_namespace="m-2024")
    with pytest.raises(BlackBoxError, match=r"built for version None: .* name no version: pass model_version='7'"):
        bb(_images())
    assert _rows(tmp_path) == 0
    assert _model(server, model_version="7")(_images()).tolist() == [[0.75, 0.25]] * 2


# ------------------------------------------------------------------------------------------ time
def _deadline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lwcam-request-deadline"]


def _ends_in_time(server: Server, timeout: float, match: str) -> float:
    """The seconds a query of ``server`` took to fail with ``match``; it must end within ``timeout`` + slack."""
    model = _model(server, timeout=timeout)
    t0 = time.perf_counter()
    with pytest.raises(EndpointError, match=match):
        model(_images())
    elapsed = time.perf_counter() - t0
    assert elapsed < timeout + SLACK, f"the request ran {elapsed:.2f} s with timeout={timeout}"
    assert not _deadline_threads()  # the timer ended with its request
    return elapsed


def test_a_server_that_never_answers_ends_at_the_timeout(server):
    server.on_post = lambda h, n: h.hang()
    elapsed = _ends_in_time(server, 0.5, rf"{server.infer_url} did not answer a batch of 2 images within "
                                         rf"timeout=0\.5 s")
    assert elapsed >= 0.45


def test_a_server_trickling_its_answer_ends_at_the_timeout_not_at_each_read(server):
    def trickle(h: Handler, n: int) -> None:
        body = json.dumps(answer(n)).encode()
        h.send_response(200)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(body)))
        h.end_headers()
        h.wfile.flush()
        h.trickle(body)  # a byte each 0.2 s: 20 s in all, while each read waits 0.2 s

    server.on_post = trickle
    elapsed = _ends_in_time(server, 1.0, rf"{server.infer_url} did not answer a batch of 2 images within timeout=1 s "
                                         rf"\(the time limit of the whole request")
    assert elapsed >= 0.95


def test_a_server_trickling_its_headers_ends_at_the_timeout(server):
    server.on_post = lambda h, n: h.trickle(b"HTTP/1.1 200 OK\r\n" + b"x-padding: " + b"a" * 200 + b"\r\n")
    _ends_in_time(server, 1.0, rf"{server.infer_url} did not answer a batch of 2 images within timeout=1 s")


def test_a_metadata_request_that_never_ends_fails_construction_at_the_timeout(server):
    server.on_get = lambda h: h.trickle(b"HTTP/1.1 200 OK\r\n" + b"x-padding: " + b"a" * 200 + b"\r\n")
    t0 = time.perf_counter()
    with pytest.raises(EndpointError, match=rf"{server.url}/v2/models/m did not answer the metadata request within "
                                            rf"timeout=0\.6 s"):
        _model(server, timeout=0.6)
    assert time.perf_counter() - t0 < 0.6 + SLACK


def test_a_timeout_is_not_retried_and_a_correct_answer_still_comes_in_time(server):
    slow = [True]

    def hang_once(h: Handler, n: int) -> None:
        if slow.pop() if slow else False:
            h.hang()
        else:
            h.reply(200, answer(n))

    server.on_post = hang_once
    bb = BlackBox.from_endpoint(server.url, "m", C, image_size=SIZE, timeout=0.5, retries=3, backoff=0.01)
    with pytest.raises(BlackBoxError, match="within timeout=0.5 s"):
        bb(_images())
    assert server.posts == 1 and bb.retried == 0
    assert bb(_images()).tolist() == [[0.75, 0.25]] * 2


# ------------------------------------------------------------------------------------------ imports
def test_the_black_box_and_the_server_client_import_each_other_in_no_cycle():
    graph = import_graph()
    assert "lwcam._endpoint" in graph["lwcam.blackbox"]  # from_endpoint needs the client...
    assert {"lwcam.blackbox", "lwcam.remote"} & graph["lwcam._endpoint"] == set()  # ...which needs no black box
    ours = {"lwcam.blackbox", "lwcam.remote", "lwcam._endpoint", "lwcam._errors"}
    assert [c for c in cycles(graph) if c & ours] == []
    assert lwcam.remote.EndpointError is _endpoint.EndpointError and issubclass(EndpointError, BlackBoxError)
