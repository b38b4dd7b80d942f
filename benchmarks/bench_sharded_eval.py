"""T3's explanations and games, T2's per-layer games or T4's scorecard, sharded over processes
(:mod:`lwcam.study.sharded`): wall time on 1 and 2 processes.

Side by side in one run, on the same task: ``--n-images`` images of ``--image-size`` px, an untrained
black box (``mobilenet_v2_s8``, ``weights=None``) and student (``regnet_x_s8``), every T3 method on every
image (``n_eval_blackbox = n_eval_mp = n``, so each image costs the same), ``--rise-masks`` RISE masks,
``--lime-samples`` LIME samples, ``--game-steps`` game steps. Each process count runs under
:func:`lwcam.study.sharded.launch` (127.0.0.1, a free port) with one torch thread per process; the time is
rank 0's wall time of :func:`lwcam.study.sharded.evaluate_t3` (explain, score, gather, merge) from a barrier
after the set-up, best of ``--rounds`` rounds, run in turn. ``--stage t2`` times
:func:`lwcam.study.sharded.evaluate_t2` instead (the student's per-layer Grad-CAM, every layer's map and the
fused map without it scored on the black box) and writes ``reports/bench_sharded_eval_t2.csv``; ``--stage t4``
times :func:`lwcam.study.sharded_t4.run_scorecard_sharded` on ``--n-images`` conflict scenes of ``size x 2 size`` px
(two boxes of two classes each; every T4 method on every scene, ROAD on the first 4 scenes, randomisation in 2
steps and robustness on the first 2, 2 noise samples) and writes ``reports/bench_sharded_eval_t4.csv``.

* ``images_per_s`` = images / seconds;
* ``efficiency`` = (seconds on one process) / (processes × seconds on this many processes): 1 is a perfect split;
* ``imagenet_hours`` = the hours 50 000 images would take at the measured seconds per image (these settings).

Usage:
    python benchmarks/bench_sharded_eval.py --n-images 8 --image-size 64 --nproc 1 2
    python benchmarks/bench_sharded_eval.py --stage t2 --n-images 8 --nproc 1 2
    python benchmarks/bench_sharded_eval.py --stage t4 --n-images 8 --nproc 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import machine, write_report  # noqa: E402

IMAGENET_VAL = 50_000


def make_task(n: int, size: int, seed: int, rise_masks: int, lime_samples: int, game_steps: int) -> dict:
    """Every input of :func:`lwcam.study.sharded.evaluate_t3`, a pure function of the arguments."""
    from lwcam.blackbox import BlackBox
    from lwcam.models import build_model
    from lwcam.study.pipeline import blackbox_labels
    from lwcam.study.profiles import Profile

    params = Profile.from_dict({"image_size": size, "num_classes": 10, "seed": seed, "n_eval": n,
                                "n_eval_blackbox": n, "n_eval_mp": n, "rise_masks": rise_masks,
                                "lime_samples": lime_samples, "game_steps": game_steps, "fast_forward": False},
                               source="benchmark")
    torch.manual_seed(seed)
    student, teacher = build_model("regnet_x_s8", 10).eval(), build_model("mobilenet_v2_s8", 10).eval()
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    blackbox = BlackBox(teacher, num_classes=10, output="probs")
    return {"params": params, "images": images, "targets": blackbox_labels(blackbox, images), "masks": masks,
            "blackbox": blackbox, "scorer": blackbox, "student": student, "teacher": teacher,
            "chosen": {"weighting": "gradcam", "mode": "max", "normalize": "minmax"}}


def scene_task(task: dict, seed: int) -> tuple[tuple[torch.Tensor, ...], dict]:
    """Conflict scenes for T4 of ``task``'s image size, twice as wide, and :func:`lwcam.study.scorecard.run_scorecard`'s
    keyword arguments; a pure function of ``task`` and ``seed``."""
    from lwcam.study import scorecard

    n, _, size, _ = task["images"].shape
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(n, 3, size, 2 * size, generator=g)
    labels = torch.stack([torch.randperm(10, generator=g)[:2] for _ in range(n)])
    masks = torch.zeros(n, 2, size, 2 * size, dtype=torch.bool)
    masks[:, 0, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    masks[:, 1, size // 4 : 3 * size // 4, 5 * size // 4 : 7 * size // 4] = True
    p = task["params"]
    settings = scorecard.scene_method_params(size, 2 * size, rise_masks=p.rise_masks, lime_samples=p.lime_samples,
                                             seed=seed, fusions={"lwcam_selected": task["chosen"],
                                                                 "lwcam_conflict": task["chosen"]})
    kwargs = dict(methods=scorecard.SCORECARD_METHODS, blackbox=task["blackbox"], scorer=task["scorer"],
                  student=task["student"], teacher=task["teacher"], second_student=task["student"], n_expensive=n,
                  n_road=min(4, n), n_randomisation=min(2, n), randomisation_steps=2, n_robustness=min(2, n),
                  robustness_samples=2, step=max(1, 2 * size * size // p.game_steps), seed=seed,
                  method_params=settings)
    return (images, labels, masks), kwargs


def _evaluate(stage: str, task: dict) -> Any:
    """One sharded evaluation of ``task``: T3's (``t3``), T2's (``t2``) rows or T4's result (``t4``) on rank 0,
    else ``None``."""
    from lwcam.study.sharded import evaluate_t2, evaluate_t3
    from lwcam.study.sharded_t4 import run_scorecard_sharded

    if stage == "t4":
        return run_scorecard_sharded(*task["scenes"], **task["scene_kwargs"])
    inputs = (task["params"], task["images"], task["targets"], task["masks"])
    if stage == "t2":
        return evaluate_t2(*inputs, scorer=task["scorer"], student=task["student"])
    return evaluate_t3(*inputs, blackbox=task["blackbox"], scorer=task["scorer"], student=task["student"],
                       teacher=task["teacher"], chosen=task["chosen"])


def worker(args: argparse.Namespace) -> int:
    """One rank: set up, then time ``evaluate_t3`` ``--rounds`` times from a barrier; rank 0 writes the times."""
    import torch.distributed as dist

    from lwcam.study.sharded import process_group

    torch.set_num_threads(1)
    with process_group() as (rank, world):
        task = make_task(args.n_images, args.image_size, args.seed, args.rise_masks, args.lime_samples,
                         args.game_steps)
        if args.stage == "t4":
            task["scenes"], task["scene_kwargs"] = scene_task(task, args.seed)
        times = []
        for _ in range(args.rounds):
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            rows = _evaluate(args.stage, task)
            times.append(time.perf_counter() - t0)
    if rank == 0 and rows is not None:
        table = rows.per_scene if args.stage == "t4" else rows.per_image
        Path(args.out).write_text(json.dumps({"seconds": times, "rows": len(table)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=["t2", "t3", "t4"], default="t3", help="what to time (T2's, T3's or T4's)")
    ap.add_argument("--n-images", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--rise-masks", type=int, default=200)
    ap.add_argument("--lime-samples", type=int, default=100)
    ap.add_argument("--game-steps", type=int, default=32)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--context", default="", help="what else ran on the machine, for the notes")
    ap.add_argument("--out", default=None, help="(a rank's) file of times; set by the launch")
    ap.add_argument("--csv", default=None, help="the report (default reports/bench_sharded_eval[_t2].csv)")
    args = ap.parse_args(argv)
    if args.out is not None:
        return worker(args)
    from lwcam.study.sharded import launch

    info, rows = machine(), []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in args.nproc:
            out = Path(tmp) / f"nproc{nproc}.json"
            launch([str(Path(__file__).resolve()), "--out", str(out), "--n-images", str(args.n_images),
                    "--image-size", str(args.image_size), "--rise-masks", str(args.rise_masks),
                    "--lime-samples", str(args.lime_samples), "--game-steps", str(args.game_steps),
                    "--rounds", str(args.rounds), "--seed", str(args.seed), "--stage", args.stage], nproc)
            seconds = min(json.loads(out.read_text())["seconds"])
            rows.append({"processes": nproc, "threads_per_process": 1, "images": args.n_images,
                         "seconds": seconds, "images_per_s": args.n_images / seconds})
    table = pd.DataFrame(rows)
    one = table.loc[table["processes"] == 1, "seconds"]
    base = float(one.iloc[0]) if len(one) else float("nan")
    table["efficiency"] = base / (table["processes"] * table["seconds"])
    table["imagenet_hours"] = IMAGENET_VAL * table["seconds"] / table["images"] / 3600
    work = {"t3": f"every T3 method on every image, {args.rise_masks} RISE masks, {args.lime_samples} LIME samples",
            "t2": "T2: every layer's map and the fused map without it",
            "t4": (f"T4 on conflict scenes twice as wide: every T4 method on every scene for both classes, "
                   f"{args.rise_masks} RISE masks, {args.lime_samples} LIME samples, ROAD on the first 4 scenes, "
                   f"randomisation (2 steps) and robustness (2 samples) on the first 2")}[args.stage]
    notes = (f"{args.n_images} images of {args.image_size}x{args.image_size}, {work}, {args.game_steps} game steps, "
             f"best of {args.rounds} round(s), seed {args.seed}; untrained mobilenet_v2_s8 black box and regnet_x_s8 "
             f"student. `efficiency`: seconds on one process / (processes x seconds). `imagenet_hours`: "
             f"{IMAGENET_VAL} images at the measured seconds per image and these settings (ImageNet's 224 px "
             f"images and the paper's settings cost far more per image). Load average at the start "
             f"{info['load_1min']}: other work on the machine slows every column. {args.context}")
    suffix = "" if args.stage == "t3" else f"_{args.stage}"
    csv = args.csv or str(Path(__file__).resolve().parents[1] / "reports" / f"bench_sharded_eval{suffix}.csv")
    title = {"t3": "T3", "t2": "T2's per-layer games", "t4": "T4, the scorecard,"}[args.stage]
    write_report(table, csv, title=f"{title} sharded over processes: wall time on 1 and 2 processes", notes=notes,
                 info=info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
