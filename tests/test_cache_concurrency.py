"""One answer cache shared by two threads and by two processes: exact query counts, no answer lost."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import torch

from lwcam.blackbox import BlackBox

ROOT = Path(__file__).resolve().parents[1]
C, PER_WORKER, BATCH = 5, 40, 4  # ten transactions per worker


def teacher(x: torch.Tensor) -> torch.Tensor:
    """A deterministic black box, image by image; the sleep makes concurrent calls overlap."""
    time.sleep(0.002)
    w = torch.arange(1.0, C + 1)
    return torch.cat([torch.softmax(img[:1].mean() * w, dim=0)[None] for img in x])


def images(worker: int) -> torch.Tensor:
    return torch.randn(PER_WORKER, 3, 16, 16, generator=torch.Generator().manual_seed(100 + worker))


def _rows(cache: Path) -> int:
    with sqlite3.connect(cache / "answers.sqlite") as conn:
        return conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


def _check_union(cache: Path, workers: int) -> None:
    """Every answer is there: a fresh black box over the union pays nothing and answers right."""
    x = torch.cat([images(i) for i in range(workers)])
    bb = BlackBox(teacher, C, cache_dir=cache, cache_namespace="teacher", batch_size=BATCH)
    out = bb(x)
    assert bb.queries == 0 and bb.cache_hits == len(x)
    torch.testing.assert_close(out, teacher(x))
    assert _rows(cache) == len(x)


def test_two_threads_share_one_blackbox_and_cache(tmp_path):
    bb = BlackBox(teacher, C, cache_dir=tmp_path, cache_namespace="teacher", batch_size=BATCH)
    start = threading.Barrier(2)
    results: dict[int, object] = {}

    def work(i: int) -> None:
        try:
            start.wait(timeout=30)
            results[i] = bb(images(i))
        except Exception as err:  # reported below
            results[i] = err

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(2):
        assert isinstance(results[i], torch.Tensor), results[i]
        torch.testing.assert_close(results[i], teacher(images(i)))
    assert bb.queries == 2 * PER_WORKER and bb.calls == 2 * PER_WORKER // BATCH and bb.cache_hits == 0
    bb.close()
    _check_union(tmp_path, 2)


def test_two_processes_share_one_cache(tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    code = textwrap.dedent("""
        import sys, time, torch
        from pathlib import Path
        torch.set_num_threads(1)
        sys.path.insert(0, {tests!r})
        import test_cache_concurrency as t
        from lwcam.blackbox import BlackBox
        worker = int(sys.argv[1])
        bb = BlackBox(t.teacher, t.C, cache_dir={cache!r}, cache_namespace="teacher", batch_size=t.BATCH)
        x = t.images(worker)
        Path({go!r} + f".ready{{worker}}").write_text("")
        while not Path({go!r}).exists():
            time.sleep(0.005)
        out = bb(x)
        torch.testing.assert_close(out, t.teacher(x))
        print(bb.queries, bb.calls, bb.cache_hits)
        """).format(tests=str(Path(__file__).parent), cache=str(cache), go=str(go))
    env = dict(os.environ, OMP_NUM_THREADS="1", LWCAM_PROGRESS="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 90
        while not all(Path(f"{go}.ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
            if not all(p.poll() is None for p in procs):
                for p in procs:
                    p.kill()
                raise AssertionError([p.communicate(timeout=30)[1][-2000:] for p in procs])
            time.sleep(0.01)
        go.write_text("")  # both start writing at once
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (stdout, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
        assert stdout.split() == [str(PER_WORKER), str(PER_WORKER // BATCH), "0"]
    _check_union(cache, 2)
