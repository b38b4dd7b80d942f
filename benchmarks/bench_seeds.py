"""Do the floors hold over training seeds? The profile's recipe, trained with three seeds.

For each seed the profile is rebuilt with only ``seed`` changed (the data set, ``data_seed``,
stays the same): the black box is trained, and one student is distilled per black-box output
mode (``probs``, ``topk``, ``label``), exactly as notebook 01 does. lwcam (paper) and last-layer
Grad-CAM then explain the first ``n_eval`` test images, scored by the deletion game on that
seed's black box, as notebook 04 does. The profile's own seed reuses its run folder
(``runs/<profile>/``, so after ``make reproduce`` it costs no training); every other seed gets
``runs/bench-seeds-<profile>-<seed>/``.

Floors (the protocol's): the black box's test accuracy >= 0.97 overall and >= 0.90 on the
smallest objects (the smallest size bin of T1_size_bins with objects in it), and each student's
test agreement with the black box >= 0.97. Each floor's margin is the value minus the floor; the
recipe holds when the minimum over seeds keeps a margin >= 0.

Writes ``reports/bench_seeds.{csv,md}``: one row per seed, then mean, standard deviation, min
and max, then each floor's margin at the minimum.

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
from lwcam.models import evaluate_accuracy  # noqa: E402
from lwcam.scoring import evaluation
from lwcam.study import pipeline  # noqa: E402
from lwcam.study.answers import TRAINING_FLOORS  # noqa: E402
from lwcam.study.profiles import Profile  # noqa: E402

MODES = ("probs", "topk", "label")
#: the floors' columns (lwcam.study.answers.TRAINING_FLOORS), then numbers reported without a floor
HEADLINES = (*TRAINING_FLOORS, "deletion_lwcam", "deletion_gradcam")


def paths_for(profile: Profile, seed: int, root: Path) -> pipeline.RunPaths:
    """The profile's own run folder for its seed, a separate one for every other seed."""
    name = profile.profile if seed == profile.seed else f"bench-seeds-{profile.profile}-{seed}"
    return pipeline.RunPaths(profile=name, root=root)


def smallest_bin_accuracy(p: Profile, paths: pipeline.RunPaths, teacher: torch.nn.Module) -> tuple[str, float]:
    """The black box's test accuracy on the smallest size bin that holds objects (T1_size_bins)."""
    table = pipeline.blackbox_accuracy_by_size(p, paths, teacher)
    bins = table[(table["split"] == "test") & (table["size_bin"] != "all") & (table["n"] > 0)]
    first = bins.iloc[0]
    return str(first["size_bin"]), float(first["accuracy"])


def deletion_aucs(p: Profile, paths: pipeline.RunPaths, teacher: torch.nn.Module,
                  student: torch.nn.Module) -> dict[str, float]:
    """Mean deletion AUC of lwcam (paper) and last-layer Grad-CAM on the first ``n_eval`` test images."""
    test_x, _, test_m = pipeline.load_split(p, "test", paths)
    scorer = pipeline.make_blackbox(teacher, p, paths, cache=False, output="probs")
    images, masks = test_x[: p.n_eval], test_m[: p.n_eval]
    targets = pipeline.blackbox_labels(scorer, images)
    runs = evaluation.run_methods(images, targets, masks, methods=["lwcam", "gradcam"], student=student)
    per_image, _ = evaluation.score_methods(scorer, images, targets, None, runs)
    deletion = per_image.groupby("method")["deletion_auc"].mean()
    return {"deletion_lwcam": float(deletion["lwcam"]), "deletion_gradcam": float(deletion["gradcam"])}


def one_seed(profile: Profile, seed: int, root: Path) -> dict[str, float | str]:
    """Train, distil (every mode), explain and score one seed; return its numbers."""
    p = profile.replace(seed=seed)
    paths = paths_for(profile, seed, root)
    paths.run.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher, _ = pipeline.get_teacher(p, paths)
    test_x, test_y, _ = pipeline.load_split(p, "test", paths)
    small_bin, small_acc = smallest_bin_accuracy(p, paths, teacher)
    row: dict[str, float | str] = {"seed": seed, "teacher_test_acc": evaluate_accuracy(teacher, test_x, test_y),
                                   "teacher_small_acc": small_acc, "small_bin": small_bin}
    students = {mode: pipeline.get_student(p, paths, teacher, output=mode) for mode in MODES}
    for mode, (_, summary) in students.items():
        row[f"agreement_{mode}"] = float(summary["fidelity"]["eval_agreement"])
    row.update(deletion_aucs(p, paths, teacher, students["probs"][0]))
    row["n_eval"] = p.n_eval
    row["seconds"] = time.perf_counter() - t0
    return row


def spread(rows: list[dict[str, float | str]]) -> pd.DataFrame:
    """Per-seed rows, then mean, std, min and max of each number, then each floor's margin at the minimum."""
    df = pd.DataFrame(rows)
    stats = df[list(HEADLINES)].agg(["mean", "std", "min", "max"])
    margin = pd.DataFrame([{k: stats.loc["min", k] - floor for k, floor in TRAINING_FLOORS.items()}],
                          index=["margin at min"])
    stats = pd.concat([stats, margin])
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
    floors = ", ".join(f"{k} >= {v}" for k, v in TRAINING_FLOORS.items())
    notes = (f"profile `{profile.profile}`, data_seed {profile.data_seed} for every seed; teacher {profile.teacher} "
             f"({profile.teacher_epochs} epochs), students {profile.student} ({profile.distill_epochs} epochs; "
             f"label smoothing {profile.label_smoothing} for `label`), channels_last training "
             f"{profile.train_channels_last}; accuracy and agreement on the {profile.n_test} test images; deletion "
             f"AUC on the first {profile.n_eval} test images, scored on each seed's black box (probs student). "
             f"Floors: {floors}. small_bin: the smallest size bin (cells of the student's last map) holding test "
             "objects. seconds: that seed's training and scoring (0 training for a seed whose run folder was "
             "already made).")
    out = args.out or root / "reports" / "bench_seeds.csv"
    write_report(spread(rows), out, title="Floors over training seeds", notes=notes, info=info)


if __name__ == "__main__":
    main()
