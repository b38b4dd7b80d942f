"""Seconds and black-box queries per explained image: lwcam against the baselines.

A teacher (the black box, reachable only through ``lwcam.BlackBox``) and a student are built
from torchvision with random weights (``weights=None``): the cost of an explanation does not
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

Usage:
    python benchmarks/bench_baselines.py --n-images 8 --size 64
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
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lwcam.baselines as bl  # noqa: E402
from lwcam import BlackBox, LayerwiseGradCAM  # noqa: E402
from lwcam._utils import seed_everything  # noqa: E402
from lwcam.data import get_dataset, load_tensors  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-images", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--teacher", default="regnet_x_400mf", help="torchvision architecture of the black box")
    p.add_argument("--student", default="shufflenet_v2_x1_0", help="torchvision architecture of the student")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--rise-masks", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=15, help="timings of methods under 5 s per batch (median kept)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reports/bench_baselines.csv")
    return p.parse_args(argv)


def lwcam_explain(student: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
                  stats: dict | None = None) -> torch.Tensor:
    """Layer-wise Grad-CAM on every auto layer of the student, fused (default fusion)."""
    t0 = time.perf_counter()
    with LayerwiseGradCAM(student, layers="auto", verbose=False) as lw:
        saliency = lw(images, targets).fuse()
    if stats is not None:
        sec = time.perf_counter() - t0
        b = images.shape[0]
        stats.update(queries=0, seconds=sec, images=b, queries_per_image=0.0, seconds_per_image=sec / b)
    return saliency.cpu()


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    teacher = getattr(torchvision.models, args.teacher)(weights=None, num_classes=args.num_classes).eval()
    student = getattr(torchvision.models, args.student)(weights=None, num_classes=args.num_classes).eval()
    bb = BlackBox(teacher, num_classes=args.num_classes)

    ds = get_dataset("synthetic", split="test", image_size=args.size, n=args.n_images)
    images, _, _ = load_tensors(ds)
    targets = bb(images).argmax(dim=1)  # the black box's labels: asked once, charged to no method
    bb.reset_queries()

    methods: list[tuple[str, str, Any, dict]] = [
        ("lwcam", "white-box student", lambda x, t, **kw: lwcam_explain(student, x, t, **kw), {}),
        ("gradcam", "white-box student", lambda x, t, **kw: bl.gradcam(student, x, t, **kw), {}),
        ("gradcam_teacher", "white-box teacher (oracle)", lambda x, t, **kw: bl.gradcam(teacher, x, t, **kw), {}),
        ("cam", "white-box student", lambda x, t, **kw: bl.cam(student, x, t, **kw), {}),
        ("meaningful_perturbation", "white-box student",
         lambda x, t, **kw: bl.meaningful_perturbation(student, x, t, **kw), {}),
        ("rise", "black-box", lambda x, t, **kw: bl.rise(bb, x, t, **kw), {"n_masks": args.rise_masks}),
        ("lime", "black-box", lambda x, t, **kw: bl.lime(bb, x, t, **kw), {}),
        ("occlusion", "black-box", lambda x, t, **kw: bl.occlusion(bb, x, t, **kw), {}),
    ]
    # warm-up calls: the fast white-box methods on the whole batch (same shapes as timed), the slow
    # methods on one image with a few samples
    warm = {"rise": {"n_masks": 256}, "lime": {"n_samples": 250}, "meaningful_perturbation": {"iters": 2},
            "occlusion": {}}

    rows = []
    for name, access, fn, params in methods:
        if name in warm:
            fn(images[:1], targets[:1], **warm[name])  # warm-up, not timed
        else:
            fn(images, targets, **params)
        bb.reset_queries()
        runs: list[dict] = []
        while True:
            st: dict = {}
            fn(images, targets, stats=st, **params)
            runs.append(st)
            if st["seconds"] >= 5.0 or len(runs) >= args.repeats:
                break
        sec = statistics.median(r["seconds_per_image"] for r in runs)
        best = min(r["seconds_per_image"] for r in runs)
        queries = runs[0]["queries_per_image"]
        rows.append({"method": name, "access": access, "seconds_per_image": sec, "best_seconds_per_image": best,
                     "queries_per_image": queries, "timed_runs": len(runs), "n_images": args.n_images,
                     "size": args.size,
                     "params": ", ".join(f"{k}={v}" for k, v in params.items())})
        print(f"{name:>24}: {sec:9.4f} s/image  {queries:7.0f} queries/image  ({len(runs)} run(s))", flush=True)

    df = pd.DataFrame(rows)
    lw_sec = float(df.loc[df.method == "lwcam", "seconds_per_image"].iloc[0])
    df["x_lwcam_seconds"] = df["seconds_per_image"] / lw_sec
    df["teacher"], df["student"], df["threads"] = args.teacher, args.student, torch.get_num_threads()
    rise_ratio = float(df.loc[df.method == "rise", "x_lwcam_seconds"].iloc[0])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    md = out.with_suffix(".md")
    md.write_text(
        f"# Cost per explained image ({args.n_images} images, {args.size}x{args.size}, black box "
        f"{args.teacher}, student {args.student}, {torch.get_num_threads()} threads)\n\n"
        + df.drop(columns=["teacher", "student", "threads", "n_images", "size"]).to_markdown(
            index=False, floatfmt=".4g")
        + f"\n\nRISE / lwcam seconds per image: {rise_ratio:.0f}x (goal: at least 300x). lwcam's black-box "
        "queries are those of distillation, amortised over every explained image and reported in T1.\n"
    )
    print()
    print(df[["method", "access", "seconds_per_image", "queries_per_image", "x_lwcam_seconds"]].to_string(index=False))
    print(f"\nRISE / lwcam seconds per image: {rise_ratio:.0f}x (goal >= 300x)")
    print(f"wrote {out} and {md}")
    return df


if __name__ == "__main__":
    main()
