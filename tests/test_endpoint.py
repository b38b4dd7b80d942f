"""A black box behind a real inference server: ``lwcam serve`` (MLServer) in a subprocess, queried over HTTP.

One server per module serves the tiny :class:`ColourTeacher` (TorchScript, 32×32 images) on a free
loopback port. The fault tests put a small fault-injecting proxy (loopback too) in front of it, or
kill and restart the server itself.

What must hold: distillation, a deletion game and RISE through the server give the in-process
answers within 1e-5 with the same query counts; a server killed mid-distillation and restarted
costs no query twice and leaves the student bitwise equal to an undisturbed run's; 429 and 503
are retried (honouring ``Retry-After``) and counted, other 4xx never; a hanging server times out
with the URL and the time-out in the error; a wrong, NaN or unnormalised answer raises
``BlackBoxError`` and caches nothing; a wrong model name or shape fails at construction, before any query.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch

from lwcam.blackbox import BlackBox, BlackBoxError
from lwcam.distillation import DistillResult, distill
from lwcam.remote import EndpointError, RemoteModel
from lwcam.scoring.games import deletion_game
from lwcam.study.pipeline import RunPaths, make_blackbox
from lwcam.study.profiles import Profile
from lwcam.study.serve import ServerProcess, free_port, main

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from _distill_worker import NUM_CLASSES, ColourTeacher, make_images, make_student  # noqa: E402

pytestmark = pytest.mark.slow
SIZE, N, EPOCHS, BATCH = 32, 96, 2, 32
NAME = "colour"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("server")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; it saves this module in 0.1 s
        torch.jit.save(torch.jit.script(ColourTeacher()), str(folder / "colour.pt"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = ServerProcess(["--module", str(folder / "colour.pt"), "--image-size", str(SIZE), "--name", NAME,
                          "--threads", "1"], env=env, log=folder / "server.log")
    with proc:
        yield proc


class FaultProxy:
    """A loopback HTTP proxy in front of the server that can refuse, hang or garble ``infer`` requests."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fail: list[tuple[int, dict[str, str]]] = []  # answers for the next infer requests, then forward
        self.hang = threading.Event()  # while set, infer requests wait for `release` and get no answer
        self.release = threading.Event()
        self.mutate: Callable[[dict], dict] | None = None
        self.infer = 0
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._reply(httpx.get(proxy.upstream + self.path))

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                proxy.infer += 1
                if proxy.fail:
                    status, headers = proxy.fail.pop(0)
                    self._send(status, json.dumps({"error": f"injected {status}"}).encode(), headers)
                    return
                if proxy.hang.is_set():
                    proxy.release.wait(10)
                    return
                self._reply(httpx.post(proxy.upstream + self.path, content=body,
                                       headers={"content-type": "application/json"}))

            def _reply(self, r: httpx.Response) -> None:
                content = r.content
                if proxy.mutate is not None and self.command == "POST" and r.status_code == 200:
                    content = json.dumps(proxy.mutate(r.json())).encode()  # NaN is written as NaN
                self._send(r.status_code, content, {})

            def _send(self, status: int, content: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in {"content-type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        return Handler

    def close(self) -> None:
        self.release.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def proxy(server) -> Iterator[FaultProxy]:
    p = FaultProxy(server.url)
    yield p
    p.close()


def _images(n: int = N, seed: int = 1) -> torch.Tensor:
    return make_images(n, seed=seed, size=SIZE)[0]


def _remote(url: str, **kw) -> BlackBox:
    return BlackBox.from_endpoint(url, NAME, NUM_CLASSES, image_size=SIZE, **kw)


def _distil(bb: BlackBox) -> DistillResult:
    return distill(bb, _images(), student=make_student(0), epochs=EPOCHS, batch_size=BATCH, augment="query",
                   progress=False, seed=0)


def _in_process(cache_dir: Path | None = None) -> BlackBox:
    """The served model in process, answering what the server answers: probabilities."""
    teacher = ColourTeacher().eval()

    def probs(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(teacher(x), dim=1)

    return BlackBox(probs, NUM_CLASSES, fn_returns="probs", cache_dir=cache_dir, cache_namespace="colour")


@pytest.fixture(scope="module")
def undisturbed(server, tmp_path_factory) -> dict[str, tuple[BlackBox, DistillResult]]:
    """One distillation in process and one through the server, each with its own answer cache, and no fault."""
    local = _in_process(cache_dir=tmp_path_factory.mktemp("local"))
    remote = _remote(server.url, cache_dir=tmp_path_factory.mktemp("remote"))
    return {"local": (local, _distil(local)), "remote": (remote, _distil(remote))}


def _rows_in_cache(folder: Path) -> int:
    with sqlite3.connect(folder / "answers.sqlite") as conn:
        return int(conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0])


def test_distillation_deletion_and_rise_through_the_server_equal_in_process(server, undisturbed):
    from lwcam.baselines import rise

    (local, res_l), (remote, res_r) = undisturbed["local"], undisturbed["remote"]
    assert remote.queries == local.queries == res_r.queries == res_l.queries > N
    for a, b in zip(res_l.student.state_dict().values(), res_r.student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    x = _images(2, seed=5) + 0.01  # not among the cached images
    local.reset_queries()
    remote.reset_queries()
    answers = local(x)
    torch.testing.assert_close(remote(x), answers, atol=1e-5, rtol=0)
    targets = answers.argmax(1)
    saliency = torch.rand(2, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    games = [deletion_game(bb, x, saliency, targets, progress=False) for bb in (local, remote)]
    torch.testing.assert_close(games[1].curves, games[0].curves, atol=1e-5, rtol=0)
    maps = [rise(bb, x, targets, n_masks=64, batch_size=64, progress=False) for bb in (local, remote)]
    torch.testing.assert_close(maps[1], maps[0], atol=1e-5, rtol=0)
    assert remote.queries == local.queries > 2 * 64  # the same images paid (duplicates come from the cache)


class KillBefore:
    """Wraps a black box's ``fn``: before call ``at`` the server is killed, and restarted in the background."""

    def __init__(self, fn: RemoteModel, server: ServerProcess, at: int) -> None:
        self.fn, self.server, self.at, self.calls = fn, server, at, 0
        self.restart = threading.Thread(target=server.start)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            self.server.kill()
            self.restart.start()
        return self.fn(x)


def test_server_killed_mid_distillation_and_restarted(server, undisturbed, tmp_path):
    _, clean = undisturbed["remote"]
    bb = _remote(server.url, cache_dir=tmp_path, retries=8, backoff=0.25)
    killer = KillBefore(bb.fn, server, at=3)  # call 1: the transfer set; calls 2-4: epoch 1
    bb.fn = killer  # type: ignore[assignment]
    result = _distil(bb)
    killer.restart.join()
    assert killer.calls > killer.at and bb.retried >= 1  # the kill hit the run, which waited for the restart
    for a, b in zip(clean.student.state_dict().values(), result.student.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in result.history] == [
        {k: v for k, v in h.items() if k != "seconds"} for h in clean.history]
    assert bb.queries == clean.queries == _rows_in_cache(tmp_path)  # every image paid once, and kept
    again = _remote(server.url, cache_dir=tmp_path)
    rerun = _distil(again)  # the cache answers everything: no query is paid twice
    assert again.queries == 0 and again.cache_hits == bb.queries + bb.cache_hits
    assert all(torch.equal(a, b) for a, b in zip(rerun.student.state_dict().values(),
                                                 clean.student.state_dict().values(), strict=True))


@pytest.mark.parametrize("status", [503, 429])
def test_busy_answers_are_retried_and_counted(proxy, server, status):
    proxy.fail = [(status, {"Retry-After": "0"})] * 3
    bb = _remote(proxy.url, backoff=0.01)
    x = _images(8)
    out = bb(x)
    assert bb.retried == 3 and proxy.infer == 4 and bb.queries == 8
    torch.testing.assert_close(out, _remote(server.url)(x), atol=0, rtol=0)


def test_retry_after_is_honoured(proxy):
    proxy.fail = [(503, {"Retry-After": "1"})]
    bb = _remote(proxy.url, backoff=0.01)
    t0 = time.perf_counter()
    bb(_images(2))
    assert time.perf_counter() - t0 >= 1.0 and bb.retried == 1


@pytest.mark.parametrize("status", [400, 404, 413, 500])
def test_other_errors_are_never_retried(proxy, status):
    proxy.fail = [(status, {})]
    bb = _remote(proxy.url, backoff=0.01)
    with pytest.raises(BlackBoxError, match=rf"answered HTTP {status} to a batch of 2 images: injected {status}"):
        bb(_images(2))
    assert proxy.infer == 1 and bb.retried == 0 and bb.queries == 0


def test_a_hanging_server_times_out_with_the_url_and_the_timeout(proxy):
    bb = _remote(proxy.url, timeout=0.5, retries=3)
    proxy.hang.set()
    t0 = time.perf_counter()
    with pytest.raises(BlackBoxError, match=rf"{proxy.url}/v2/models/{NAME}/infer did not answer .* within "
                                            rf"timeout=0\.5 s"):
        bb(_images(2))
    assert time.perf_counter() - t0 < 3 and proxy.infer == 1  # a time-out is not retried


def _shape(body: dict) -> dict:
    out = body["outputs"][0]
    n = out["shape"][0]
    out["shape"], out["data"] = [n, NUM_CLASSES - 1], out["data"][: n * (NUM_CLASSES - 1)]
    return body


def _nan(body: dict) -> dict:
    body["outputs"][0]["data"][5] = math.nan
    return body


def _half(body: dict) -> dict:
    body["outputs"][0]["data"] = [v / 2 for v in body["outputs"][0]["data"]]
    return body


@pytest.mark.parametrize(("mutate", "message"), [
    (_shape, r"fn returned shape \(4, 3\), expected \(4, 4\)"),
    (_nan, r"row 1: NaN or Inf scores"),
    (_half, r"row 0: probabilities that do not sum to 1 \(sum 0\.5000"),
])
def test_a_bad_answer_raises_and_nothing_is_cached(proxy, tmp_path, mutate, message):
    bb = _remote(proxy.url, cache_dir=tmp_path)
    proxy.mutate = mutate
    with pytest.raises(BlackBoxError, match=message):
        bb(_images(4))
    assert bb.queries == 0 and _rows_in_cache(tmp_path) == 0 and bb.retried == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"model_name": "nope"}, r"no model named 'nope' at http://127\.0\.0\.1:\d+ \(HTTP 404"),
    ({"image_size": 64}, r"the model takes 32x32 images \(input shape \[-1, 3, 32, 32\]\), not image_size=64"),
    ({"num_classes": 5}, r"the model answers shape \[-1, 4\], not \[-1, num_classes=5\]"),
    ({"channels": 1}, r"the model takes images of 3 channels, not channels=1"),
    ({"model_version": "v0"}, r"no model named 'colour' version 'v0' at http://127\.0\.0\.1:\d+ \(HTTP 404"),
])
def test_a_model_that_does_not_fit_fails_at_construction(proxy, kwargs, message):
    args = {"model_name": NAME, "num_classes": NUM_CLASSES, "image_size": SIZE, **kwargs}
    with pytest.raises(EndpointError, match=message):
        BlackBox.from_endpoint(proxy.url, args.pop("model_name"), args.pop("num_classes"), **args)
    assert proxy.infer == 0  # before any query


def test_images_of_another_size_fail_before_sending(proxy):
    bb = BlackBox.from_endpoint(proxy.url, NAME, NUM_CLASSES)
    with pytest.raises(BlackBoxError, match=r"images have shape \(1, 3, 16, 16\), but .* takes \[-1, 3, 32, 32\]"):
        bb(torch.zeros(1, 3, 16, 16))
    assert proxy.infer == 0


def test_the_server_names_its_version_in_every_answer_and_a_stale_client_is_refused(server, tmp_path):
    from dataclasses import replace

    bb = _remote(server.url, cache_dir=tmp_path)
    remote: RemoteModel = bb.fn  # type: ignore[assignment]
    version = remote.metadata.version
    assert version and bb.cache is not None and bb.cache.namespace.startswith(f"{server.url}|{NAME}|{version}|")
    remote.metadata = replace(remote.metadata, version="stale")  # as if the server had been given a new model
    with pytest.raises(BlackBoxError, match=rf"{server.url}/v2/models/{NAME}/infer answered as model version "
                                            rf"'{version}', but this client was built for version 'stale'"):
        bb(_images(2))
    assert bb.queries == 0 and _rows_in_cache(tmp_path) == 0


def test_rate_limit_paces_requests_before_sending(server):
    bb = _remote(server.url, rate_limit=100.0, max_batch_size=10)
    t0 = time.perf_counter()
    bb(_images(30))
    assert time.perf_counter() - t0 >= 0.2 and bb.fn.requests == 3  # type: ignore[union-attr]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"timeout": -1.0}, "timeout"), ({"timeout": 0}, "timeout"), ({"timeout": math.nan}, "timeout"),
    ({"timeout": math.inf}, "timeout"), ({"rate_limit": math.nan}, "rate_limit"), ({"rate_limit": 0}, "rate_limit"),
    ({"rate_limit": -5.0}, "rate_limit"), ({"max_batch_size": 0}, "max_batch_size"), ({"retries": -1}, "retries"),
    ({"backoff": math.inf}, "backoff"), ({"image_size": 0}, "image_size"), ({"num_classes": 1}, "num_classes"),
    ({"url": "ftp://127.0.0.1:9"}, "url"), ({"url": ""}, "url"), ({"url": "http://127.0.0.1:99999"}, "port"),
    ({"model_name": ""}, "model_name"), ({"model_name": "a/b"}, "model_name"), ({"model_version": ""}, "model_version"),
    ({"output": "everything"}, "output"), ({"k": 0, "output": "topk"}, "k must be"),
    ({"timeout": 1e300}, "timeout"), ({"rate_limit": 1e-300}, "rate_limit"), ({"rate_limit": True}, "rate_limit"),
    ({"retries": 60}, "before the last retry"), ({"backoff": 1e300, "retries": 1}, "before the last retry"),
    ({"max_batch_size": 2.5}, "max_batch_size"), ({"transport": "mock"}, "transport"), ({"url": None}, "url"),
    ({"cache_namespace": ""}, "cache_namespace"), ({"atol": math.nan}, "atol"),
])
def test_bad_arguments_are_named_before_any_connection(kwargs, message):
    args = {"url": "http://127.0.0.1:9", "model_name": "m", "num_classes": 4, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        BlackBox.from_endpoint(args.pop("url"), args.pop("model_name"), args.pop("num_classes"), **args)


def test_a_server_without_versions_needs_a_name_for_the_cache(tmp_path):
    meta = {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 8, 8]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=meta))
    with pytest.raises(ValueError, match="reports no model version"):
        BlackBox.from_endpoint("http://127.0.0.1:1", "m", 2, cache_dir=tmp_path, transport=transport)
    bb = BlackBox.from_endpoint("http://127.0.0.1:1", "m", 2, cache_dir=tmp_path, cache_namespace="m-2024",
                                transport=transport)
    assert bb.fn_returns == "logits" and bb.cache is not None
    assert bb.cache.namespace.startswith("m-2024|http://127.0.0.1:1|m|None")


def test_the_pipeline_queries_the_server_when_black_box_url_is_set(server, tmp_path):
    p = Profile(profile="served", num_classes=NUM_CLASSES, image_size=SIZE, black_box_url=f"{server.url}/v2/models/"
                f"{NAME}", fast_forward=False)
    bb = make_blackbox(torch.nn.Identity(), p, RunPaths("served", tmp_path), cache=False)
    assert isinstance(bb.fn, RemoteModel) and bb.fn.url == server.url
    x = _images(3)
    torch.testing.assert_close(bb(x), _in_process()(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="black_box_url must look like"):
        make_blackbox(torch.nn.Identity(), p.replace(black_box_url=server.url), RunPaths("s", tmp_path))


@pytest.mark.parametrize(("argv", "message"), [
    (["--module", "m.pt", "--image-size", "32", "--host", "10.1.2.3"], "not a loopback address; add --allow-remote"),
    (["--module", "m.pt"], "--image-size is required"),
    (["--module", "m.pt", "--image-size", "0"], "--image-size must be an int >= 1"),
    (["--module", "m.pt", "--image-size", "8", "--port", "70000"], "--port must be at most 65535"),
    (["--module", "m.pt", "--image-size", "8", "--max-batch-size", "0"], "--max-batch-size must be"),
])
def test_serve_refuses_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["serve", *argv])


def test_serve_loads_no_pickle(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
    with pytest.raises(SystemExit, match="not a TorchScript archive .* pickled modules are not loaded"):
        main(["serve", "--module", str(tmp_path / "pickled.pt"), "--image-size", "8", "--port", str(free_port())])


@pytest.mark.parametrize("any_size", [False, True])
def test_the_served_model_checks_what_it_is_sent(any_size):
    import asyncio

    from mlserver.errors import MLServerError
    from mlserver.types import InferenceRequest

    from lwcam._serving import SERVED, ServedModel, TorchRuntime

    served = ServedModel(ColourTeacher(), "unit", image_size=8, max_batch_size=4, any_size=any_size)
    SERVED["unit"] = served
    runtime = TorchRuntime(served.model_settings())
    asyncio.run(runtime.load())

    def request(*shape: int) -> InferenceRequest:
        return InferenceRequest(inputs=[{"name": "images", "datatype": "FP32", "shape": list(shape),
                                         "data": [0.5] * math.prod(shape)}])

    answer = asyncio.run(runtime.predict(request(2, 3, 8, 16 if any_size else 8)))
    assert answer.outputs[0].shape == [2, NUM_CLASSES] and answer.model_version == served.version
    with pytest.raises(MLServerError, match=r"takes at most 4 images a request, got 5") as err:
        runtime._images(request(5, 3, 8, 8))
    assert err.value.status_code == 413
    if not any_size:
        with pytest.raises(MLServerError, match=r"takes images of shape \[-1, 3, 8, 8\], got \[1, 3, 8, 16\]"):
            runtime._images(request(1, 3, 8, 16))
    with pytest.raises(MLServerError, match="takes images of shape"):
        runtime._images(request(1, 1, 8, 8))


def test_a_connection_lost_mid_request_is_retried_a_read_timeout_is_not():
    meta = {"name": "m", "versions": ["1"], "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 4, 4]}],
            "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 2]}]}
    faults = [httpx.RemoteProtocolError("Server disconnected without sending a response."),
              httpx.ReadError("connection reset by peer"), httpx.ConnectError("connection refused")]

    def server(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=meta)
        if faults:
            raise faults.pop(0)
        n = json.loads(request.content)["inputs"][0]["shape"][0]
        return httpx.Response(200, json={"outputs": [{"name": "probs", "datatype": "FP32", "shape": [n, 2],
                                                      "data": [0.5, 0.5] * n}]})

    bb = BlackBox.from_endpoint("http://127.0.0.1:1", "m", 2, backoff=0.001, transport=httpx.MockTransport(server))
    assert bb(torch.zeros(3, 3, 4, 4)).tolist() == [[0.5, 0.5]] * 3 and bb.retried == 3 and bb.queries == 3
    faults.append(httpx.ReadTimeout("timed out"))
    with pytest.raises(BlackBoxError, match=r"did not answer a batch of 1 images within timeout=30 s \(ReadTimeout\)"):
        bb(torch.ones(1, 3, 4, 4))
    assert bb.retried == 3
