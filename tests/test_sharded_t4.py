"""T4, the scorecard, sharded over processes (lwcam.study.sharded_t4): the result of one process, in its order.

The task is tests/_sharded_worker.py's ``make_scorecard_task``: six 32×64 conflict scenes, untrained
small-input models, every T4 method at small settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lwcam.study import cli, pipeline, scorecard
from lwcam.study.sharded import stage_images, stage_names, stage_outputs
from lwcam.study.sharded_t4 import explain_shard_t4, run_scorecard_sharded

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sharded_worker import make_scorecard_task  # noqa: E402

WORKER = Path(__file__).resolve().parent / "_sharded_worker.py"
ROOT = Path(__file__).resolve().parents[1]
TABLES = ("per_scene", "per_object", "randomisation")


@pytest.fixture(scope="module")
def task() -> tuple[tuple[torch.Tensor, ...], dict]:
    return make_scorecard_task(6)


def test_one_process_is_run_scorecard(task) -> None:
    scenes, kwargs = task
    whole = scorecard.run_scorecard(*scenes, **kwargs, progress=False)
    sharded = run_scorecard_sharded(*scenes, **kwargs)
    assert sharded is not None
    for name in TABLES:
        pd.testing.assert_frame_equal(getattr(sharded, name), getattr(whole, name), check_exact=True)
    assert list(sharded.runs) == list(whole.runs)
    for name, run in whole.runs.items():
        assert torch.equal(sharded.runs[name].indices, run.indices)
        assert torch.equal(sharded.runs[name].saliency, run.saliency)
        assert sharded.runs[name].queries_per_image == run.queries_per_image
    # every first-scene measure was taken: ROAD on 3 scenes, randomisation and robustness on 2
    taken = whole.per_scene.groupby("method")[["road_morf", "randomisation", "max_sensitivity"]].count()
    assert taken["road_morf"].eq(3).all() and taken["randomisation"].eq(2).all()
    assert taken["max_sensitivity"].le(2).all() and taken["max_sensitivity"].sum() > 0


def test_a_shard_explains_its_scenes_and_cuts_the_random_map_from_the_whole_draw(task) -> None:
    (images, labels, masks), kwargs = task
    methods = ["gradcam", "rise", "random"]
    limits = scorecard.scene_limits(methods, len(images), kwargs["n_expensive"])
    models = {k: kwargs[k] for k in ("blackbox", "student", "teacher")}
    params = kwargs["method_params"]
    whole = scorecard.explain_scenes(images, labels, masks, methods=methods, n_expensive=3, method_params=params,
                                     progress=False, **models)
    late = explain_shard_t4(images, labels, masks, torch.tensor([3, 4, 5]), methods=methods, limits=limits,
                            method_params=params, progress=False, **models)
    assert "rise" not in late  # it explains the first 3 scenes only
    for name in ("gradcam", "random"):
        assert late[name].indices.tolist() == [3, 4, 5]
        torch.testing.assert_close(late[name].saliency, whole[name].saliency[3:], rtol=0, atol=1e-6)


def test_scene_limits_refuse_a_bad_n_expensive() -> None:
    with pytest.raises(ValueError, match="n_expensive"):
        scorecard.scene_limits(["rise"], 4, 0)


def test_the_t4_stage_is_named_and_counts_its_scenes() -> None:
    params = pipeline.load_profile("quick")
    assert "t4" in stage_names("all")
    n, key = stage_images(params, "t4")
    assert key == "n_conflict" and n == max(params.n_conflict, params.n_conflict_blackbox, params.n_road,
                                            params.n_randomisation, params.n_robustness)
    outputs = {p.name for p in stage_outputs(pipeline.RunPaths.for_profile("quick"), "t4")}
    assert {"per_object_scorecard.csv", "T4_scorecard.csv", "T4_claims.md"} <= outputs


def _launch(out: Path, nproc: int, *extra: str, limit: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(WORKER), "--launch", str(nproc), "--out", str(out), "--stage", "t4", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT)
    return proc, time.perf_counter() - t0


@pytest.mark.slow
def test_two_processes_give_the_t4_rows_of_one(tmp_path) -> None:
    for nproc in (1, 2):
        proc, _ = _launch(tmp_path / f"nproc{nproc}", nproc)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in TABLES:
        one, two = (pd.read_csv(tmp_path / f"nproc{n}" / f"{name}.csv") for n in (1, 2))
        assert list(one.columns) == list(two.columns) and len(one) == len(two) > 0, name
        numbers = [c for c in one.select_dtypes("number").columns if c not in ("image", "object", "step")]
        for col in (c for c in one.columns if c not in numbers):
            assert one[col].tolist() == two[col].tolist(), (name, col)
        assert one[numbers].isna().equals(two[numbers].isna()), name
        diff = np.nanmax(np.abs(one[numbers].to_numpy(float) - two[numbers].to_numpy(float)))
        assert diff <= 1e-6, f"{name}: largest difference {diff}"
    costs = [json.loads((tmp_path / f"nproc{n}" / "costs.json").read_text()) for n in (1, 2)]
    assert costs[0] == costs[1]  # scenes explained and queries per scene, method by method


@pytest.mark.slow
def test_a_rank_that_dies_in_t4_ends_the_run_naming_it_and_writes_no_table(tmp_path) -> None:
    proc, seconds = _launch(tmp_path, 2, "--die-rank", "1", "--die-after", "10", "--timeout", "30", limit=180)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sharded run failed: rank 1 failed (exit code 17, no error reported" in proc.stderr
    assert not any((tmp_path / f"{name}.csv").exists() for name in TABLES)
    assert seconds < 150


# --------------------------------------------------------------------------- the notebooks, end to end
TINY_SCENES = """n_conflict: 4
n_conflict_blackbox: 2
n_road: 2
n_randomisation: 1
randomisation_steps: 2
n_robustness: 1
robustness_samples: 2
n_explain: 2
n_tradeoff: 2
"""
TABLES_04_05 = ("T3_methods", "T3_claim", "T4_scorecard", "T4_randomisation", "T4_claims", "T4_separation")
WALL_TIME = ("seconds_per_image", "seconds_per_scene")


@pytest.mark.slow
def test_run_with_two_processes_gives_notebooks_04_and_05_the_tables_of_one(tmp_path) -> None:
    """``python -m lwcam.study run --nproc 2`` on a project of its own: notebooks 04 and 05 shard T3 and T4
    over two processes; the same tables as with one, but for the wall-time columns."""
    import shutil

    from test_sharded_eval import TINY_PROFILE, _env

    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "tiny.yaml").write_text(TINY_PROFILE + TINY_SCENES)
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    tables = {}
    for nproc in (2, 1):
        cmd = [sys.executable, "-m", "lwcam.study", "run", "--profile", "tiny", "--nproc", str(nproc),
               "--only", "04_deletion_game", "05_scorecard"]
        scratch = tmp_path / "scratch"  # the run's temporary folder: the sharded results pass through it
        scratch.mkdir(exist_ok=True)
        proc = subprocess.run(cmd, cwd=tmp_path, env={**_env(), "TMPDIR": str(scratch)}, timeout=600,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert not list(scratch.glob("lwcam-sharded-*")), "a sharded result was left behind"
        stages = pd.read_csv(tmp_path / "reports" / "tiny" / "timings.csv")["stage"].tolist()
        sharded = [s for s in stages if "over 2 processes" in s]
        assert len(sharded) == (2 if nproc == 2 else 0), stages
        assert stages.count("conflict-aware fusion selection on val scenes") == 1, stages  # the kernel's alone
        tables[nproc] = {t: pd.read_csv(tmp_path / "reports" / "tiny" / f"{t}.csv") for t in TABLES_04_05}
    for name in TABLES_04_05:
        one, two = (tables[n][name].drop(columns=[c for c in WALL_TIME if c in tables[n][name]]) for n in (1, 2))
        pd.testing.assert_frame_equal(one, two, check_exact=False, atol=1e-6, rtol=0, obj=name)


def test_run_refuses_a_bad_nproc_by_name(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--profile", "quick", "--nproc", "0"])
    assert "argument --nproc: --nproc must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="overrides= needs nproc=1"):
        pipeline.run("quick", nproc=2, overrides={"n_eval": 4})
    with pytest.raises(TypeError, match="nproc must be an int"):
        pipeline.run("quick", nproc=1.5)  # type: ignore[arg-type]


def test_a_notebook_reads_its_process_count_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(pipeline.NPROC_ENV, raising=False)
    assert pipeline.notebook_nproc() == 1
    monkeypatch.setenv(pipeline.NPROC_ENV, "2")
    assert pipeline.notebook_nproc() == 2
    for bad in ("0", "two"):
        monkeypatch.setenv(pipeline.NPROC_ENV, bad)
        with pytest.raises(ValueError, match="LWCAM_NPROC must be a process count"):
            pipeline.notebook_nproc()


@pytest.mark.parametrize("stage, what", [("t4", "T4"), ("all", "T2, T3 and T4")])
def test_the_evaluate_command_names_the_t4_stage(stage, what, capsys, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(cli, "evaluate", lambda *a, **k: calls.append((a, k)) or [])
    assert cli.main(["evaluate", "--profile", "quick", "--stage", stage, "--nproc", "1"]) == 0
    assert calls[0][1]["stage"] == stage
    assert f"profile quick: {what} over 1 processes" in capsys.readouterr().out
