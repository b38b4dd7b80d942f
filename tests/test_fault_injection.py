"""Fault injection: a distillation killed mid-epoch, one damaged cache row, then a rerun.

The black box is a plain callable that logs every image it is paid for (its cache key) before it
answers, so the test can compare, image by image, what an undisturbed run paid with what the
disturbed one paid in its two processes. With ``augment="query"`` every epoch asks the black box
about new views, so the cache is written while the epoch runs.

What must hold: the rerun ends with bitwise the same student and history as an undisturbed run;
every query that was paid *and recorded* (in the checkpoint or the cache) is not paid again; the
damaged row and the batch that was in flight when the process died are paid once more, and nothing else.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lwcam.blackbox import BlackBox, _image_key
from lwcam.distillation import CHECKPOINT_NAME, DistillResult, distill

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
from _distill_worker import NUM_CLASSES, ColourTeacher, make_images, make_student  # noqa: E402

N, EPOCHS, BATCH = 128, 2, 32  # 13 held out, 115 trained on: 3 steps of 32 views per epoch
STOP_AT_CALL = 6  # call 1: the transfer set; calls 2-4: epoch 1; calls 5-7: epoch 2


def logging_teacher(log: Path, stop_at: int | None = None, ready: Path | None = None):
    """A black box that appends ``call key`` for every image it is paid for, then answers image by image.

    With ``stop_at`` it announces that call in ``ready`` and hangs there, to be killed in flight.
    """
    net = ColourTeacher()
    calls = [0]

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        with log.open("a") as fh:
            fh.write("".join(f"{calls[0]} {_image_key(img)}\n" for img in x))
            fh.flush()
            os.fsync(fh.fileno())
        if calls[0] == stop_at and ready is not None:
            ready.write_text(str(os.getpid()))
            time.sleep(120)
        with torch.no_grad():
            return torch.cat([torch.softmax(net(x[i : i + 1]), dim=1) for i in range(len(x))])

    return fn


def run(fn, cache_dir: Path | None, checkpoint_dir: Path | None) -> DistillResult:
    images, _ = make_images(N, seed=1)
    bb = (BlackBox(fn, NUM_CLASSES, cache_dir=cache_dir, cache_namespace="colour-teacher")
          if cache_dir is not None else BlackBox(fn, NUM_CLASSES))
    return distill(bb, images, student=make_student(0), epochs=EPOCHS, batch_size=BATCH, augment="query",
                   checkpoint_dir=checkpoint_dir, progress=False, seed=0)


def _paid(log: Path) -> list[tuple[int, str]]:
    if not log.exists():
        return []
    return [(int(c), k) for c, k in (line.split() for line in log.read_text().splitlines())]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", LWCAM_PROGRESS="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _kill_mid_epoch(tmp_path: Path, cache: Path, ckpt: Path, log: Path) -> None:
    ready = tmp_path / "ready"
    code = textwrap.dedent(f"""
        import sys, torch
        from pathlib import Path
        torch.set_num_threads(1)
        sys.path.insert(0, {str(TESTS)!r})
        import test_fault_injection as t
        fn = t.logging_teacher(Path({str(log)!r}), stop_at={STOP_AT_CALL}, ready=Path({str(ready)!r}))
        t.run(fn, Path({str(cache)!r}), Path({str(ckpt)!r}))
        """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), proc.communicate(timeout=30)[0].decode(errors="replace")[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_mid_epoch_and_damaged_row_then_rerun_equals_an_undisturbed_run(tmp_path, one_thread):
    cache, ckpt = tmp_path / "cache", tmp_path / "ckpt"
    child_log, rerun_log, ref_log = tmp_path / "child.log", tmp_path / "rerun.log", tmp_path / "ref.log"

    _kill_mid_epoch(tmp_path, cache, ckpt, child_log)
    child = _paid(child_log)
    assert max(c for c, _ in child) == STOP_AT_CALL
    at_kill = torch.load(ckpt / CHECKPOINT_NAME, weights_only=True)
    assert at_kill["epoch"] == 1  # killed inside epoch 2

    # damage one recorded answer that the rerun will read back: a view from the first step of epoch 2
    damaged = next(k for c, k in child if c == STOP_AT_CALL - 1)
    with sqlite3.connect(cache / "answers.sqlite") as conn:
        recorded = {k for (k,) in conn.execute("SELECT key FROM answers")}
        conn.execute("UPDATE answers SET value=? WHERE key=?", (np.full(NUM_CLASSES, np.nan, np.float32).tobytes(),
                                                               damaged))
    in_flight = [k for c, k in child if c == STOP_AT_CALL]
    assert damaged in recorded and not set(in_flight) & recorded  # the killed call was paid, never recorded

    with pytest.warns(RuntimeWarning, match=f"answers.sqlite: the row of image key {damaged}.*damaged"):
        resumed = run(logging_teacher(rerun_log), cache, ckpt)
    reference = run(logging_teacher(ref_log), None, None)

    # the same result as if nothing had happened
    assert resumed.config["resumed_from_epoch"] == 1
    ref_state, got_state = reference.student.state_dict(), resumed.student.state_dict()
    assert ref_state.keys() == got_state.keys()
    assert all(torch.equal(ref_state[k], got_state[k]) for k in ref_state)
    for key in ("loss", "agreement", "kl"):
        assert [h[key] for h in resumed.history] == [h[key] for h in reference.history]
    assert resumed.fidelity == reference.fidelity

    # paid and recorded is never paid again; the damaged row and the in-flight batch are paid once more
    rerun = [k for _, k in _paid(rerun_log)]
    assert not set(rerun) & (recorded - {damaged})
    assert damaged in rerun and set(in_flight) <= set(rerun)
    # with the cache every distinct image is paid once (the undisturbed run, without one, pays repeats
    # again); the damaged row and the in-flight batch twice; nothing else
    distinct = {k for _, k in _paid(ref_log)}
    paid_twice = Counter(k for _, k in child) + Counter(rerun) - Counter(distinct)
    assert set(Counter(k for _, k in child) + Counter(rerun)) == distinct
    assert paid_twice == Counter([damaged, *in_flight])
    # the result counts what the checkpoint recorded plus what the rerun paid (cache hits are free)
    saved = torch.load(ckpt / CHECKPOINT_NAME, weights_only=True)
    assert resumed.queries == saved["queries"] == at_kill["queries"] + len(rerun)
