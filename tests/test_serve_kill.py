"""The real server killed mid-run: ``lwcam serve`` SIGKILLed during a RISE run through the Open Inference Protocol.

The server serves :class:`ColourTeacher` (TorchScript: it starts in half the time of a ``.pt2``
program, whose serving ``test_serve_cli`` checks) on a free loopback port and
counts, on its side (``--count-file``), the images it answered. A RISE run (2 images, 200 masks,
16 masked images a request, paced so that it lasts a few seconds) starts through
``BlackBox.from_endpoint`` with an answer cache; once the server has answered some images it is
killed (SIGKILL) and restarted on the same port. The run rides through the outage on its retries
(or stops with an error naming the URL); a rerun with a new client and the same cache completes.

What must hold: every answer the servers gave equals the module's in process within 1e-5, and so
does the RISE map; the servers answered at most the distinct images plus one batch in flight at
the kill (nothing is paid twice: the rerun takes what was answered from the cache). The numbers
are printed (``pytest -s``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lwcam.baselines import rise
from lwcam.blackbox import BlackBox, BlackBoxError
from lwcam.study.serve import ServerProcess

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from _distill_worker import NUM_CLASSES, ColourTeacher, make_images  # noqa: E402

pytestmark = pytest.mark.slow
SIZE, IMAGES, MASKS, BATCH = 32, 2, 200, 16
NAME = "colour"
KILL_AFTER = 48  # images the server has answered when it is killed
RATE = 150.0  # images a second the client sends at most: 400 images take about 2.7 s
LIMIT = 50.0  # seconds any phase may take
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def answered(count_file: Path) -> int:
    """Images the servers answered: the sum of the count file's lines."""
    return sum(int(line) for line in count_file.read_text().split()) if count_file.exists() else 0


class Recorder:
    """Wraps a black box's ``fn``: every batch answered, the answer, and when it came."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.answers: list[tuple[float, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x)
        self.answers.append((time.monotonic(), x.clone(), out.clone()))
        return out


class Killer(threading.Thread):
    """Kills the server once it has answered ``at`` images, then restarts it on the same port."""

    def __init__(self, server: ServerProcess, count_file: Path, at: int) -> None:
        super().__init__(daemon=True)
        self.server, self.count_file, self.at = server, count_file, at
        self.killed_at = -1  # images answered when the kill came
        self.t_kill = self.t_ready = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        deadline = time.monotonic() + LIMIT
        while answered(self.count_file) < self.at:
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        self.t_kill = time.monotonic()
        self.server.kill()
        self.killed_at = answered(self.count_file)
        try:
            self.server.start()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err
        self.t_ready = time.monotonic()


def _client(server: ServerProcess, cache: Path) -> tuple[BlackBox, Recorder]:
    bb = BlackBox.from_endpoint(server.url, NAME, NUM_CLASSES, image_size=SIZE, cache_dir=cache, retries=7,
                                backoff=0.25, max_batch_size=BATCH, rate_limit=RATE, timeout=10.0)
    recorder = Recorder(bb.fn)  # type: ignore[arg-type]
    bb.fn = recorder  # type: ignore[assignment]
    return bb, recorder


def _rise(bb: BlackBox, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return rise(bb, x, targets, n_masks=MASKS, batch_size=BATCH, grid_size=4, progress=False)


def _in_thread(fn: Callable[[], torch.Tensor]) -> torch.Tensor | BaseException:
    """``fn()`` in a thread, within :data:`LIMIT` seconds: its result, or what it raised."""
    box: list[torch.Tensor | BaseException] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as err:  # noqa: BLE001 - handed to the test
            box.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(LIMIT)
    assert box, f"the run did not end within {LIMIT:g} s"
    return box[0]


def _probs(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(ColourTeacher()(x), dim=1)


@pytest.fixture
def program(tmp_path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; it saves this module in 0.1 s
        torch.jit.save(torch.jit.script(ColourTeacher()), str(tmp_path / "colour.pt"))
    return tmp_path / "colour.pt"


def test_server_killed_mid_rise_and_restarted(program, tmp_path):
    count, cache = tmp_path / "answered", tmp_path / "cache"
    server = ServerProcess(["--module", str(program), "--image-size", str(SIZE), "--name", NAME, "--threads", "1",
                            "--count-file", str(count)], env=ENV, log=tmp_path / "server.log", startup_timeout=LIMIT)
    x = make_images(IMAGES, seed=7, size=SIZE)[0]
    local = BlackBox(_probs, NUM_CLASSES, fn_returns="probs")
    targets = local(x).argmax(1)
    expected = _rise(local, x, targets)
    try:
        server.start()
        first, first_rec = _client(server, cache)
        killer = Killer(server, count, KILL_AFTER)
        killer.start()
        t0 = time.monotonic()
        outcome = _in_thread(lambda: _rise(first, x, targets))
        run_seconds = time.monotonic() - t0
        killer.join(LIMIT)
        assert killer.error is None and killer.killed_at >= KILL_AFTER, (killer.error, killer.killed_at)
        if isinstance(outcome, BaseException):  # it stopped: with an error naming the URL
            assert isinstance(outcome, BlackBoxError) and server.url in str(outcome), repr(outcome)
        else:
            torch.testing.assert_close(outcome, expected, atol=1e-5, rtol=0)
        rerun, rerun_rec = _client(server, cache)
        again = _in_thread(lambda: _rise(rerun, x, targets))
        assert isinstance(again, torch.Tensor), repr(again)
    finally:
        server.kill()
    torch.testing.assert_close(again, expected, atol=1e-5, rtol=0)
    for _, sent, got in first_rec.answers + rerun_rec.answers:  # every answer a server gave
        torch.testing.assert_close(got, _probs(sent), atol=1e-5, rtol=0)

    distinct, total = IMAGES * MASKS, answered(count)
    after_kill = [t for t, _, _ in first_rec.answers + rerun_rec.answers if t > killer.t_kill]
    outage = (min(after_kill) if after_kill else float("nan")) - killer.t_kill
    print(f"\n[kill test] RISE asked {distinct} distinct images per run, twice; the servers answered {total} "
          f"({killer.killed_at} before the kill, at most one batch of {BATCH} paid twice); retries {first.retried}; "
          f"paid {first.queries} + {rerun.queries} (rerun cache hits {rerun.cache_hits}); outage {outage:.2f} s "
          f"(restart {killer.t_ready - killer.t_kill:.2f} s); first run "
          f"{'stopped: ' + str(outcome)[:120] if isinstance(outcome, BaseException) else 'rode through'} after "
          f"{run_seconds:.2f} s")
    assert killer.killed_at < distinct  # the kill came mid-run
    assert distinct <= total <= distinct + BATCH  # nothing paid twice but a batch in flight at the kill
    assert first.queries + rerun.queries == distinct and rerun.cache_hits == first.queries
    assert first.retried >= 1
