"""The parallel-training benchmark runs end to end on a few steps and writes its table."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_train_parallel  # noqa: E402


def test_the_benchmark_writes_one_and_two_process_rows_per_model(tmp_path) -> None:
    out = tmp_path / "bench.csv"
    assert bench_train_parallel.main(["--steps", "2", "--warmup", "1", "--batch-size", "2", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert table["model"].tolist() == [m for m in bench_train_parallel.MODELS for _ in range(2)]
    assert (table["seconds"] > 0).all() and (table["images_per_s"] > 0).all()
    one = table["layout"].str.startswith("one process")
    assert (table.loc[one, "speedup"] == 1.0).all()
    assert out.with_suffix(".md").read_text().startswith("# Two trainings at once")
