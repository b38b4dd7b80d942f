"""Coarser game steps: do any method's mean AUC or any verdict move?

The protocol plays the deletion and insertion games one row of pixels per step (H steps). A profile
may set ``game_steps`` coarser only if, on the same maps, no method's mean AUC moves by more than
0.005 and no verdict changes. This script measures that on a profile's trained run
(``runs/<profile>/``: run ``make reproduce`` or notebook 01 first): notebook 04's explanations of the
first ``n_eval`` test images (:func:`lwcam.study.pipeline.explain_t3`, the fusion selected on ``val``), then
T3's games and claims twice on those maps, at the protocol's steps and at ``--steps``, and the fusion
selection on ``val`` at both.

Writes ``reports/bench_game_steps.{csv,md}``: per method the mean deletion and insertion AUC at both
step counts and their difference; per T3 claim its verdict (holds: better and p < 0.05) at both; the
fusion chosen at both; the games' seconds at both.

Usage:
    python benchmarks/bench_game_steps.py --profile default --steps 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import add_common_args, machine, write_report  # noqa: E402
from lwcam.scoring import evaluation  # noqa: E402
from lwcam.study import analysis, pipeline
from lwcam.study.profiles import Profile  # noqa: E402

TOLERANCE = 0.005


def holds(claims: pd.DataFrame) -> pd.Series:
    """A claim holds when its direction is right and its one-sided p-value is below 0.05 (notebook 04's verdict)."""
    better = (claims.mean_diff < 0).where(claims.alternative == "less", claims.mean_diff > 0)
    return better & (claims.p_value < 0.05)


def play(p: Profile, scorer, images, targets, masks, runs) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """T3's per-image scores and claims at the profile's ``game_steps``, and the games' seconds."""
    t0 = time.perf_counter()
    per_image, _ = evaluation.score_methods(scorer, images, targets, masks, runs, step=p.game_step())
    seconds = time.perf_counter() - t0
    return per_image, analysis.claim_table(per_image, seed=p.seed), seconds


def main(argv: list[str] | None = None) -> None:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--profile", default="default")
    parser.add_argument("--steps", type=int, default=32, help="the coarser step count to test")
    parser.add_argument("--out", default=None, help="CSV path (default: reports/bench_game_steps.csv)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    root = pipeline.project_root()
    fine = pipeline.load_profile(args.profile, root).replace(game_steps=None, seed=args.seed)
    coarse = fine.replace(game_steps=args.steps)
    paths = pipeline.RunPaths(profile=fine.profile, root=root)
    teacher, _ = pipeline.get_teacher(fine, paths)
    student, _ = pipeline.get_student(fine, paths, teacher)
    blackbox = pipeline.make_blackbox(teacher, fine, paths, cache=False)
    scorer = pipeline.make_blackbox(teacher, fine, paths, cache=False, output="probs")
    test_x, _, test_m = pipeline.load_split(fine, "test", paths)
    images, masks = test_x[: fine.n_eval], test_m[: fine.n_eval]
    targets = pipeline.blackbox_labels(blackbox, images)
    chosen = {name: pipeline.fusion_selection(p, paths, student, scorer)[1] for name, p in (("fine", fine),
                                                                                             ("coarse", coarse))}
    runs = pipeline.explain_t3(fine, images, targets, masks, blackbox=blackbox, student=student, teacher=teacher,
                               chosen=chosen["fine"])
    (pf, cf, sf), (pc, cc, sc) = (play(p, scorer, images, targets, masks, runs) for p in (fine, coarse))
    means = [df.groupby("method", sort=False)[["deletion_auc", "insertion_auc"]].mean() for df in (pf, pc)]
    rows = []
    for method in means[0].index:
        row = {"what": "method", "name": method}
        for col in ("deletion_auc", "insertion_auc"):
            a, b = means[0].loc[method, col], means[1].loc[method, col]
            row.update({f"{col}_fine": a, f"{col}_coarse": b, f"{col}_change": b - a})
        rows.append(row)
    verdicts = pd.DataFrame({"fine": holds(cf), "coarse": holds(cc)})
    for (_, c), (_, v) in zip(cf.iterrows(), verdicts.iterrows(), strict=True):
        rows.append({"what": "claim", "name": f"{c.a} vs {c.b}, {c.metric}, {c.subset}",
                     "verdict_fine": "holds" if v.fine else "does not hold",
                     "verdict_coarse": "holds" if v.coarse else "does not hold"})
    same_fusion = chosen["fine"] == chosen["coarse"]
    rows.append({"what": "fusion selected on val", "name": str(chosen["fine"]),
                 "verdict_fine": "chosen", "verdict_coarse": "chosen" if same_fusion else str(chosen["coarse"])})
    df = pd.DataFrame(rows)
    moved = df[["deletion_auc_change", "insertion_auc_change"]].abs().max().max()
    changed = int((verdicts.fine != verdicts.coarse).sum()) + (not same_fusion)
    h = fine.image_size
    notes = (f"profile `{fine.profile}`, its run's teacher and `probs` student; {len(images)} test images "
             f"({fine.n_eval_blackbox} for RISE, LIME, occlusion and Score-CAM, {fine.n_eval_mp} for meaningful "
             f"perturbation). Fine: {h} steps of {h} pixels (the protocol); coarse: {args.steps} steps of "
             f"{coarse.game_step()} pixels. Largest |mean AUC change| over methods and games: {moved:.4f} "
             f"(bound {TOLERANCE}); verdicts changed: {changed} of {len(verdicts) + 1} (T3's claims and the fusion "
             f"selected on val). Games of every method: {sf:.1f} s fine, {sc:.1f} s coarse ({sf / sc:.2f}x). "
             f"Coarser steps {'are' if moved <= TOLERANCE and changed == 0 else 'are NOT'} allowed by the protocol.")
    out = args.out or root / "reports" / "bench_game_steps.csv"
    write_report(df, out, title=f"Deletion and insertion games at {h} and at {args.steps} steps, on the same maps",
                 notes=notes, info=info)


if __name__ == "__main__":
    main()
