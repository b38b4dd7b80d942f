"""Foundation benchmark: the default black box and the data set's own sanity check.

1. Trains the default black box from scratch on the synthetic ``train`` split (or reuses the
   ``default`` profile's checkpoint with ``--reuse``) and reports its test accuracy and the
   wall time of training.
2. The oracle check: with the ground-truth mask as saliency, the deletion AUC on the trained
   black box must be at most half the AUC of random saliency (same images, same protocol,
   default zero substrate). Centre-bias saliency is shown too.

Writes ``reports/bench_foundation.csv`` and ``.md``.

    python benchmarks/bench_foundation.py            # train from scratch (about 5 minutes on 2 cores)
    python benchmarks/bench_foundation.py --reuse    # reuse runs/default/teacher.pt when present
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import add_common_args, machine, write_report  # noqa: E402
from lwcam.baselines import center_saliency, random_saliency  # noqa: E402
from lwcam.models import evaluate_accuracy, load_checkpoint, train_teacher  # noqa: E402
from lwcam.scoring.games import deletion_game  # noqa: E402
from lwcam.scoring.stats import bootstrap_ci, paired_test
from lwcam.study import pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--reuse", action="store_true", help="reuse the profile's teacher checkpoint if present")
    parser.add_argument("--n-images", type=int, default=500)
    args = add_common_args(parser).parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    params = pipeline.load_profile(args.profile)
    paths = pipeline.RunPaths.for_profile(args.profile)

    x, y, _ = pipeline.load_split(params, "train", paths)
    xv, yv, _ = pipeline.load_split(params, "val", paths)
    xt, yt, mt = pipeline.load_split(params, "test", paths)
    if args.reuse and paths.teacher.exists():
        teacher, meta = load_checkpoint(paths.teacher)
        seconds, source = float(meta.get("seconds", float("nan"))), f"reused {paths.rel(paths.teacher)}"
    else:
        t0 = time.perf_counter()
        result = train_teacher(params["teacher"], x, y, num_classes=int(params["num_classes"]), val_images=xv,
                               val_labels=yv, epochs=int(params["teacher_epochs"]),
                               batch_size=int(params["teacher_batch_size"]), lr=float(params["teacher_lr"]),
                               seed=args.seed)
        teacher, seconds, source = result.model, time.perf_counter() - t0, "trained from scratch in this run"
    acc = evaluate_accuracy(teacher, xt, yt)

    n = min(args.n_images, len(xt))
    images, masks = xt[:n], mt[:n]
    bb = pipeline.make_blackbox(teacher, params, paths, cache=False)
    targets = pipeline.blackbox_labels(bb, images)
    maps = {"ground-truth mask (oracle)": masks.float(), "random": random_saliency(images, seed=args.seed),
            "centre bias": center_saliency(images)}
    aucs = {k: deletion_game(bb, images, s, targets).auc for k, s in maps.items()}
    rows = [{"check": "teacher test accuracy", "value": acc, "target": ">= 0.95", "holds": acc >= 0.95,
             "note": f"{params['teacher']}, {len(xt)} test images"},
            {"check": "teacher training wall time (s)", "value": seconds, "target": "<= 300",
             "holds": seconds <= 300, "note": f"{source}; {os.cpu_count()} CPUs, {args.threads} threads"}]
    for k, auc in aucs.items():
        mean, lo, hi = bootstrap_ci(auc, seed=args.seed)
        rows.append({"check": f"deletion AUC, {k}", "value": mean, "target": "", "holds": None,
                     "note": f"95% CI [{lo:.4f}, {hi:.4f}], {n} test images"})
    oracle, rand = aucs["ground-truth mask (oracle)"], aucs["random"]
    ratio = float(oracle.mean() / rand.mean())
    test = paired_test(oracle, rand, alternative="less", seed=args.seed)
    rows.append({"check": "oracle / random deletion AUC", "value": ratio, "target": "<= 0.5", "holds": ratio <= 0.5,
                 "note": f"paired Wilcoxon one-sided p = {test.p_value:.2e}"})
    df = pd.DataFrame(rows)
    write_report(df, paths.reports / "bench_foundation.csv", info=info, floatfmt=".4f",
                 title=f"Foundation: the {args.profile} black box and the oracle check",
                 notes=f"Profile {args.profile}, seed {args.seed}.")


if __name__ == "__main__":
    main()
