"""Seconds and black-box queries per explained image: lwcam against the baselines.

A teacher (the black box, reachable only through ``lwcam.BlackBox``) and a student are built by
``lwcam.models.build_model`` with random weights (by default the default profile's pair,
``mobilenet_v2_s8`` and ``regnet_x_s8``): the cost of an explanation does not
depend on what the networks learnt. The images are the embedded synthetic test images. The
class explained is the black box's label, asked once beforehand and charged to no method.

Methods:

* ``lwcam``: ``LayerwiseGradCAM`` on the student, every auto layer, one forward and one backward
  pass, then the default fusion. It sends no query to the black box once the student exists; the
  queries spent on distillation are reported by the pipeline (table T1), not here.
* ``rise``, ``lime``, ``occlusion``: black-box methods with their defaults (RISE N = 4000).
* ``gradcam`` (student, last layer), ``gradcam_teacher`` (white-box oracle), ``cam`` (student),
  ``meaningful_perturbation`` (student): for reference.

Methods taking under 5 s per batch are timed ``--repeats`` times; the median is the reported
time (``seconds_per_image``) and the fastest run is shown beside it. Every method
is run once before it is timed (imports, first-call set-up): the white-box ones on the same batch,
the slow ones on one image with few samples. The ratio
RISE seconds / lwcam seconds per image is printed and written as a column; it is reported, not
checked.

The forward-pass bound: the black box's own model, batched (RISE's batch size) under
``torch.inference_mode()``, with inputs contiguous (``nchw``) and ``channels_last``, timed half just
before and half just after RISE so that both see the same load. For each black-box method,
``model_images_per_s`` is its black-box queries (model images, no cache) per second, and
``ratio_to_raw_bound`` that throughput over the faster raw forward (goal for RISE: at least 0.8).

The black-box methods run a second time on the black box as the profiles run it (``fast_forward``:
the model on ONNX Runtime, :func:`lwcam.fast.accelerate`), rows ``<method> (onnxruntime)``, beside
that engine's own raw bound, timed around RISE the same way. ``x_eager`` is the eager row's seconds
per image over the accelerated one's.

Usage:
    python benchmarks/bench_baselines.py --n-images 4 --size 64 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lwcam.baselines as bl  # noqa: E402
from benchmarks._report import add_common_args, machine, write_report  # noqa: E402
from lwcam import BlackBox  # noqa: E402
from lwcam._utils import seed_everything  # noqa: E402
from lwcam.data import get_dataset, load_tensors  # noqa: E402
from lwcam.fast import accelerate  # noqa: E402
from lwcam.models import build_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-images", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--teacher", default="mobilenet_v2_s8", help="the black box (a lwcam.models.build_model name)")
    p.add_argument("--student", default="regnet_x_s8", help="the student (a lwcam.models.build_model name)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--rise-masks", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=256, help="RISE's and the raw bound's model batch size")
    p.add_argument("--raw-images", type=int, default=2048, help="images per layout for the raw bound")
    p.add_argument("--repeats", type=int, default=15, help="timings of methods under 5 s per batch (median kept)")
    p.add_argument("--out", default="reports/bench_baselines.csv")
    return add_common_args(p).parse_args(argv)


def time_raw(model: Any, images: torch.Tensor, n: int, batch_size: int,
             layouts: tuple[str, ...] = ("nchw", "channels_last")) -> dict[str, tuple[float, int]]:
    """Seconds and images of the model's batched inference on ``n`` images per layout."""
    pool = images[torch.arange(batch_size) % images.shape[0]].contiguous()
    out = {}
    for fmt, x in (("nchw", pool), ("channels_last", pool.contiguous(memory_format=torch.channels_last))):
        if fmt not in layouts:
            continue
        t0 = time.perf_counter()
        with torch.inference_mode():
            for lo in range(0, n, batch_size):
                model(x[: min(batch_size, n - lo)])
        out[fmt] = (time.perf_counter() - t0, n)
    return out


def time_method(name: str, models: dict, images: torch.Tensor, targets: torch.Tensor, params: dict,
                warm: dict | None, repeats: int, bb: BlackBox) -> list[bl.Explanation]:
    """One warm-up call, then timed calls (until 5 s or ``repeats``) through the method registry."""
    method = bl.METHODS[name]
    if warm is not None:
        method(images[:1], targets[:1], **models, **warm)  # warm-up, not timed
    else:
        method(images, targets, **models, **params)
    bb.reset_queries()
    runs: list[bl.Explanation] = []
    while not runs or (runs[-1].seconds < 5.0 and len(runs) < repeats):
        runs.append(method(images, targets, **models, **params))
    return runs


def method_rows(args: argparse.Namespace, teacher, student, bb: BlackBox, images, targets,
                engine: str = "eager") -> tuple[list[dict], dict]:
    """A row per method, and the raw forward timings taken around RISE. With an accelerated black box
    (``engine`` is not ``"eager"``), only the black-box methods run, and the raw forward is the engine's."""
    methods: list[tuple[str, dict]] = [
        ("lwcam", {}), ("gradcam", {}), ("gradcam_teacher", {}), ("cam", {}), ("meaningful_perturbation", {}),
        ("rise", {"n_masks": args.rise_masks, "batch_size": args.batch_size}), ("lime", {}), ("occlusion", {}),
    ]
    if engine != "eager":
        methods = [(n, p) for n, p in methods if bl.METHODS[n].access == "black-box"]
    layouts = ("nchw", "channels_last") if engine == "eager" else ("nchw",)
    forward = teacher if engine == "eager" else bb.fn
    models = {"blackbox": bb, "student": student, "teacher": teacher}
    # warm-up calls: the fast white-box methods on the whole batch (same shapes as timed), the slow
    # methods on one image with a few samples
    warm = {"rise": {"n_masks": 256}, "lime": {"n_samples": 250}, "meaningful_perturbation": {"iters": 2},
            "occlusion": {}}
    rows, raw = [], {}
    for name, params in methods:
        access = bl.METHODS[name].access
        if name == "rise":
            time_raw(forward, images, args.batch_size, args.batch_size, layouts)  # warm-up, not timed
            raw = time_raw(forward, images, args.raw_images // 2, args.batch_size, layouts)
        runs = time_method(name, models, images, targets, params, warm.get(name), args.repeats, bb)
        if name == "rise":
            after = time_raw(forward, images, args.raw_images - args.raw_images // 2, args.batch_size, layouts)
            raw = {k: (raw[k][0] + after[k][0], raw[k][1] + after[k][1]) for k in raw}
        sec = statistics.median(r.seconds_per_image for r in runs)
        queries = runs[0].queries_per_image
        rows.append({"method": name if engine == "eager" else f"{name} ({engine})", "engine": engine,
                     "access": access, "seconds_per_image": sec,
                     "best_seconds_per_image": min(r.seconds_per_image for r in runs),
                     "queries_per_image": queries, "model_images_per_s": queries / sec if queries else float("nan"),
                     "timed_runs": len(runs), "params": ", ".join(f"{k}={v}" for k, v in params.items())})
        print(f"{name:>24}: {sec:9.4f} s/image  {queries:7.0f} queries/image  ({len(runs)} run(s))", flush=True)
    return rows, raw


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    seed_everything(args.seed)
    teacher = build_model(args.teacher, args.num_classes).eval()
    student = build_model(args.student, args.num_classes).eval()
    bb = BlackBox(teacher, num_classes=args.num_classes, batch_size=args.batch_size)

    ds = get_dataset("synthetic", split="test", image_size=args.size, n=args.n_images)
    images, _, _ = load_tensors(ds)
    targets = bb(images).argmax(dim=1)  # the black box's labels: asked once, charged to no method
    bb.reset_queries()

    fast = accelerate(teacher, (3, args.size, args.size))
    bb_fast = BlackBox(fast, num_classes=args.num_classes, fn_returns="logits", batch_size=args.batch_size)
    rows, raws = [], {}
    for engine, box in (("eager", bb), (fast.engine, bb_fast)):
        part, raw = method_rows(args, teacher, student, box, images, targets, engine)
        rows += part
        raws[engine] = max(n / sec for sec, n in raw.values())
        for fmt, (sec, n) in raw.items():
            rows.append({"method": f"raw forward, {fmt if engine == 'eager' else engine}", "engine": engine,
                         "access": "black box's model, inference_mode", "model_images_per_s": n / sec,
                         "timed_runs": 1, "params": f"{n} images, batch {args.batch_size}"})
    df = pd.DataFrame(rows)
    df["ratio_to_raw_bound"] = df["model_images_per_s"] / df["engine"].map(raws)
    eager_sec = df[df.engine == "eager"].set_index("method")["seconds_per_image"]
    df["x_eager"] = [eager_sec.get(m.split(" (")[0], float("nan")) / v if e != "eager" else float("nan")
                     for m, e, v in zip(df.method, df.engine, df.seconds_per_image, strict=True)]
    lw_sec = float(df.loc[df.method == "lwcam", "seconds_per_image"].iloc[0])
    df["x_lwcam_seconds"] = df["seconds_per_image"] / lw_sec
    df["n_images"], df["size"], df["teacher"], df["student"] = args.n_images, args.size, args.teacher, args.student
    rise = df.set_index("method").loc["rise"]
    notes = (
        f"{args.n_images} synthetic test images of {args.size}x{args.size}; black box {args.teacher}, student "
        f"{args.student} (weights=None, {args.num_classes} classes); seed {args.seed}. RISE / lwcam seconds per "
        f"image: {rise.x_lwcam_seconds:.0f}x (goal: at least 300x). RISE model images per second / the raw "
        f"forward bound (batch {args.batch_size}, inference_mode, the faster layout): {rise.ratio_to_raw_bound:.2f} "
        f"(goal: at least 0.8). The black box on {fast.engine} (set up once in {fast.setup_seconds:.2f} s, not in "
        f"the table): RISE {df.set_index('method').loc[f'rise ({fast.engine})', 'x_eager']:.2f}x faster than eager, "
        f"{df.set_index('method').loc[f'rise ({fast.engine})', 'ratio_to_raw_bound']:.2f} of that engine's raw "
        "bound. lwcam's black-box queries are those of distillation, amortised over every "
        f"explained image and reported in T1. Load average at the start {info['load_1min']}, at the end "
        f"{machine()['load_1min']}: other work on a shared machine adds noise."
    )
    write_report(df, args.out, title=f"Cost per explained image ({args.n_images} images, {args.size}x{args.size})",
                 notes=notes, info=info, floatfmt=".4g",
                 columns=["method", "engine", "access", "seconds_per_image", "best_seconds_per_image",
                          "queries_per_image", "model_images_per_s", "ratio_to_raw_bound", "x_eager", "x_lwcam_seconds",
                          "timed_runs", "params"])
    return df


if __name__ == "__main__":
    main()
