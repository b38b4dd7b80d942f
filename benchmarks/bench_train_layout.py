"""Training in the ``channels_last`` layout: as fast as it looks, and the same result?

The profile's teacher and two of its students (``probs``, the most faithful answers, and ``label``,
the weakest) are trained twice from the same seed on the same data, once in PyTorch's default
contiguous layout (the default) and once ``channels_last`` (:func:`lwcam._utils.training_layout`,
``channels_last=True`` in :func:`lwcam.models.train_teacher` and :func:`lwcam.distill`). Both students
learn from the ``channels_last`` teacher's answers, so a student pair differs in its own layout only.

Per row: wall seconds of the whole training (teacher: every epoch with its val check; student:
answers, epochs, held-out and test checks), images per second, the teacher's test accuracy or
the student's top-1 agreement with the black box on the test split, and, for each
``channels_last`` row, the change against the contiguous row. The profiles would use the layout
only if every result were the same within ±0.002 (one test image in 500) and the run measurably faster.

Writes ``reports/bench_train_layout.{csv,md}``; the data splits are rendered afresh (no cache),
and nothing under ``runs/`` is read or written.

Usage:
    python benchmarks/bench_train_layout.py --profile default
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
from lwcam import BlackBox, distill
from lwcam.models import evaluate_accuracy, train_teacher  # noqa: E402
from lwcam.study import pipeline  # noqa: E402
from lwcam.study.profiles import Profile  # noqa: E402

TOLERANCE = 0.002


def teacher_rows(p: Profile) -> tuple[list[dict], torch.nn.Module]:
    """Train the teacher in both layouts; return the rows and the ``channels_last`` teacher."""
    x, y, _ = pipeline.load_split(p, "train")
    xv, yv, _ = pipeline.load_split(p, "val")
    xt, yt, _ = pipeline.load_split(p, "test")
    rows, model = [], None
    for layout in (False, True):
        t0 = time.perf_counter()
        result = train_teacher(p.teacher, x, y, num_classes=p.num_classes, val_images=xv, val_labels=yv,
                               epochs=p.teacher_epochs, batch_size=p.teacher_batch_size, lr=p.teacher_lr,
                               seed=p.seed, pixel_dropout=p.teacher_pixel_dropout, channels_last=layout,
                               progress=False)
        seconds = time.perf_counter() - t0
        rows.append({"what": f"teacher ({p.teacher})", "layout": "channels_last" if layout else "contiguous",
                     "seconds": seconds, "images_per_s": p.teacher_epochs * len(x) / seconds,
                     "result": "test accuracy", "value": evaluate_accuracy(result.model, xt, yt)})
        model = result.model
    assert model is not None
    return rows, model


def student_rows(p: Profile, teacher: torch.nn.Module, output: str) -> list[dict]:
    """Distil the ``output`` student in both layouts from the same teacher's answers."""
    transfer, _, _ = pipeline.load_split(p, "transfer")
    xt, yt, _ = pipeline.load_split(p, "test")
    rows = []
    for layout in (False, True):
        bb = BlackBox(teacher, num_classes=p.num_classes, fn_returns="logits", output=output, k=p.topk,
                      batch_size=p.blackbox_batch_size)
        t0 = time.perf_counter()
        result = distill(bb, transfer, student=p.student, temperature=p.temperature, epochs=p.distill_epochs,
                         batch_size=p.distill_batch_size, query_budget=p.query_budget, holdout=p.holdout,
                         eval_images=xt, eval_labels=yt, seed=p.seed, progress=False, channels_last=layout)
        seconds = time.perf_counter() - t0
        n_train = result.config["n_train"] * p.distill_epochs
        rows.append({"what": f"student ({output}, {p.student})", "layout": "channels_last" if layout else "contiguous",
                     "seconds": seconds, "images_per_s": n_train / seconds, "result": "test agreement",
                     "value": float(result.fidelity["eval_agreement"])})
    return rows


def compare(rows: list[dict]) -> pd.DataFrame:
    """Add, on each ``channels_last`` row, its speed-up and result change over the contiguous row before it."""
    df = pd.DataFrame(rows)
    df["speedup"] = float("nan")
    df["value_change"] = float("nan")
    for i in range(1, len(df), 2):
        df.loc[i, "speedup"] = df.loc[i - 1, "seconds"] / df.loc[i, "seconds"]
        df.loc[i, "value_change"] = df.loc[i, "value"] - df.loc[i - 1, "value"]
    df["same_result"] = [("" if pd.isna(c) else "yes" if abs(c) <= TOLERANCE + 1e-9 else "no")  # 1e-9: float noise
                         for c in df["value_change"]]
    return df


def main(argv: list[str] | None = None) -> None:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--profile", default="default")
    parser.add_argument("--out", default=None, help="CSV path (default: reports/bench_train_layout.csv)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    root = pipeline.project_root()
    p = pipeline.load_profile(args.profile, root).replace(seed=args.seed)
    t0 = time.perf_counter()
    rows, teacher = teacher_rows(p)
    for output in ("probs", "label"):
        rows += student_rows(p, teacher, output)
    df = compare(rows)
    notes = (f"profile `{p.profile}`, seed {p.seed}: teacher {p.teacher_epochs} epochs on {p.n_train} images "
             f"(batch {p.teacher_batch_size}); students {p.distill_epochs} epochs on {p.query_budget} queries "
             f"(batch {p.distill_batch_size}); agreement and accuracy on the {p.n_test} test images. "
             f"same_result: |value_change| <= {TOLERANCE}. Each training ran alone, one after the other, "
             f"{time.perf_counter() - t0:.0f} s in all.")
    out = args.out or root / "reports" / "bench_train_layout.csv"
    write_report(df, out, title="Training layout: contiguous against channels_last", notes=notes, info=info,
                 columns=["what", "layout", "seconds", "images_per_s", "result", "value", "speedup", "value_change",
                          "same_result"])


if __name__ == "__main__":
    main()
