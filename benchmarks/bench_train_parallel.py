"""Two trainings at once, one thread each, against one training on every thread: which uses the cores better?

The `default` run trains its models one after another, each on every core. Its students are independent of
each other once the black box has answered (the same transfer images, answers asked once), so two of them
could train at the same time, each in its own process on one core. This measures what that would buy,
side by side in one run, for the profile's student (``regnet_x_s8``) and its 32x-stride ablation student
(``shufflenet_v2_x1_0``):

* ``one process``: one training loop with ``--threads`` torch threads (the run's way);
* ``two processes``: two training loops at once, each in its own process with one torch thread, started
  together from a barrier; the wall time is the later one's.

Each loop makes ``--steps`` optimiser steps (SGD with momentum, cross-entropy) on seeded random
``--batch-size`` batches of 64x64 images in ``channels_last``, after ``--warmup`` steps that are not timed.
``images_per_s`` counts every process's images; ``speedup`` is two processes' images per second over one
process's. Only the throughput is measured: whether a student trained on one thread stays within the
spread over seeds is a separate question (a different thread count rounds differently, like a change of
seed; ``benchmarks/bench_seeds.py``).

Usage:
    python benchmarks/bench_train_parallel.py
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import add_common_args, machine, write_report  # noqa: E402

MODELS = ("regnet_x_s8", "shufflenet_v2_x1_0")


def train_loop(model_name: str, threads: int, steps: int, warmup: int, batch_size: int, seed: int,
               barrier: object | None = None) -> float:
    """Seconds for ``steps`` timed optimiser steps of ``model_name`` on ``threads`` torch threads."""
    from lwcam.models import build_model

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(model_name, num_classes=10).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, 64, 64, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), generator=gen)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if barrier is not None:
        barrier.wait()  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


def _child(model_name: str, steps: int, warmup: int, batch_size: int, seed: int, barrier: object,
           out: object) -> None:
    out.put(train_loop(model_name, 1, steps, warmup, batch_size, seed, barrier))  # type: ignore[attr-defined]


def two_processes(model_name: str, steps: int, warmup: int, batch_size: int, seed: int) -> float:
    """Wall seconds of two one-thread loops started together (the later one to finish)."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(model_name, steps, warmup, batch_size, seed + r, barrier, out))
             for r in range(2)]
    for p in procs:
        p.start()
    seconds = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"a training process of {model_name} exited with code {p.exitcode}")
    return max(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--steps", type=int, default=60, help="timed optimiser steps per loop")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimiser steps first")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (the profile's 32)")
    parser.add_argument("--out", default="reports/bench_train_parallel.csv")
    args = parser.parse_args(argv)
    info = machine()
    info["threads"] = args.threads
    rows = []
    for name in MODELS:
        one = train_loop(name, args.threads, args.steps, args.warmup, args.batch_size, args.seed)
        two = two_processes(name, args.steps, args.warmup, args.batch_size, args.seed)
        n = args.steps * args.batch_size
        rows += [{"model": name, "layout": f"one process, {args.threads} threads", "seconds": one,
                  "images_per_s": n / one, "speedup": 1.0},
                 {"model": name, "layout": "two processes, 1 thread each", "seconds": two,
                  "images_per_s": 2 * n / two, "speedup": (2 * n / two) / (n / one)}]
    notes = (f"{args.steps} timed steps of {args.batch_size} images (64x64, channels_last) per loop after "
             f"{args.warmup} untimed ones, seed {args.seed}; each row ran with nothing else of this benchmark "
             f"running. `speedup`: images per second over the one-process row of the same model.")
    write_report(pd.DataFrame(rows), args.out, title="Two trainings at once, one thread each", notes=notes,
                 info=info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
