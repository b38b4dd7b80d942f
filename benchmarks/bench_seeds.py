"""How far the headline numbers travel: their spread over training seeds.

For each seed, the profile's pipeline is rebuilt with only ``seed`` changed (the data set,
``data_seed``, stays the same): the black box is trained, the ``probs`` student distilled, and
lwcam (paper) and last-layer Grad-CAM explain the first ``n_eval`` test images, scored by
the deletion game on the black box, exactly as notebook 04 does. The profile's own seed reuses
its run folder (``runs/<profile>/``); every other seed gets ``runs/bench-seeds-<profile>-<seed>/``.

Writes ``reports/bench_seeds.{csv,md}``: one row per seed, then mean, standard deviation,
min and max. The README's bars (teacher accuracy >= 0.95, agreement >= 0.95) should hold
at the minimum, not only at the mean.

Usage:
    python benchmarks/bench_seeds.py --profile default --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import machine, write_report  # noqa: E402
from lwcam import evaluation, pipeline  # noqa: E402
from lwcam.models import evaluate_accuracy  # noqa: E402
from lwcam.profiles import Profile  # noqa: E402

HEADLINES = ("teacher_test_acc", "agreement_test", "deletion_lwcam", "deletion_gradcam")


def paths_for(profile: Profile, seed: int, root: Path) -> pipeline.RunPaths:
    """The profile's own run folder for its seed, a separate one for every other seed."""
    name = profile.profile if seed == profile.seed else f"bench-seeds-{profile.profile}-{seed}"
    return pipeline.RunPaths(profile=name, root=root)


def one_seed(profile: Profile, seed: int, root: Path) -> dict[str, float]:
    """Train, distil, explain and score one seed; return its headline numbers."""
    p = profile.replace(seed=seed)
    paths = paths_for(profile, seed, root)
    paths.run.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher, _ = pipeline.get_teacher(p, paths)
    student, summary = pipeline.get_student(p, paths, teacher, output="probs")
    test_x, test_y, test_m = pipeline.load_split(p, "test", paths)
    scorer = pipeline.make_blackbox(teacher, p, paths, cache=False, output="probs")
    images, masks = test_x[: p.n_eval], test_m[: p.n_eval]
    targets = pipeline.blackbox_labels(scorer, images)
    runs = evaluation.run_methods(images, targets, masks, methods=["lwcam", "gradcam"], student=student)
    per_image, _ = evaluation.score_methods(scorer, images, targets, None, runs)
    deletion = per_image.groupby("method")["deletion_auc"].mean()
    return {
        "seed": seed,
        "teacher_test_acc": evaluate_accuracy(teacher, test_x, test_y),
        "agreement_test": float(summary["fidelity"]["eval_agreement"]),
        "deletion_lwcam": float(deletion["lwcam"]),
        "deletion_gradcam": float(deletion["gradcam"]),
        "n_eval": len(images),
        "seconds": time.perf_counter() - t0,
    }


def spread(rows: list[dict[str, float]]) -> pd.DataFrame:
    """Per-seed rows followed by mean, std, min and max of each headline number."""
    df = pd.DataFrame(rows)
    stats = df[list(HEADLINES)].agg(["mean", "std", "min", "max"])
    stats.insert(0, "seed", stats.index)
    return pd.concat([df.astype({"seed": str}), stats.reset_index(drop=True)], ignore_index=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="CSV path (default: reports/bench_seeds.csv)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) < 3:
        raise SystemExit("--seeds: give at least 3 different seeds for a spread")
    torch.set_num_threads(args.threads)
    info = machine()
    root = pipeline.project_root()
    profile = pipeline.load_profile(args.profile, root)
    rows = [one_seed(profile, s, root) for s in args.seeds]
    notes = (f"profile `{profile.profile}`, data_seed {profile.data_seed} for every seed; teacher "
             f"{profile.teacher} ({profile.teacher_epochs} epochs), student {profile.student} "
             f"({profile.distill_epochs} epochs, probs); deletion AUC on the first {profile.n_eval} test images, "
             "scored on each seed's black box. Bars: teacher_test_acc >= 0.95, agreement_test >= 0.95.")
    out = args.out or root / "reports" / "bench_seeds.csv"
    write_report(spread(rows), out, title="Headline numbers over training seeds", notes=notes, info=info)


if __name__ == "__main__":
    main()
