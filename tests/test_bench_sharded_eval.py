"""The sharded-evaluation benchmark runs end to end on a tiny task and writes its table (T4 here; T2 and T3
share its launcher and its table)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_sharded_eval  # noqa: E402


@pytest.mark.slow
def test_the_t4_benchmark_writes_a_row_per_process_count(tmp_path) -> None:
    csv = tmp_path / "bench.csv"
    args = ["--stage", "t4", "--n-images", "2", "--image-size", "32", "--rise-masks", "4", "--lime-samples", "4",
            "--game-steps", "4", "--nproc", "1", "2", "--csv", str(csv)]
    assert bench_sharded_eval.main(args) == 0
    table = pd.read_csv(csv)
    assert table["processes"].tolist() == [1, 2]
    assert (table["seconds"] > 0).all() and table.loc[0, "efficiency"] == 1.0
    assert csv.with_suffix(".md").read_text().startswith("# T4, the scorecard, sharded over processes")
