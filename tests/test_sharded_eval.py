"""T2's per-layer games and T3's explanations and games sharded over processes (lwcam.study.sharded): the rows of
one process, in its order.

The task is tests/_sharded_worker.py's: six 32×32 images, untrained small-input models, every T3 method.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lwcam.cam import fuse, layer_maps_batched
from lwcam.scoring.evaluation import (
    FUSED_LAYER,
    layer_importance,
    layer_table,
    score_methods,
    score_saliency,
    summarize,
)
from lwcam.study import cli, pipeline
from lwcam.study.sharded import (
    T3Inputs,
    check_nproc,
    evaluate_t2,
    evaluate_t3,
    merge_layer_shards,
    ordered_rows,
    shard_positions,
    t2_shard,
    t3_tables,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sharded_worker import make_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_sharded_worker.py"
FLOATS = ["deletion_auc", "insertion_auc", "pointing", "mass"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", LWCAM_PROGRESS="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _launch(out: Path, nproc: int, *extra: str, limit: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """The worker in ``nproc`` processes (127.0.0.1, a free port), ended after ``limit`` seconds at most."""
    cmd = [sys.executable, str(WORKER), "--launch", str(nproc), "--out", str(out), *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=_env(), timeout=limit, capture_output=True, text=True)
    return proc, time.monotonic() - t0


# --------------------------------------------------------------------------- shares and bad inputs
def test_shards_are_contiguous_and_cover_every_image_once() -> None:
    for n in range(1, 8):
        for world in range(1, n + 1):
            parts = [shard_positions(n, r, world) for r in range(world)]
            assert torch.equal(torch.cat(parts), torch.arange(n))
            assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-2, ValueError), ("2", TypeError), (2.0, TypeError),
                                        (True, TypeError), (None, TypeError)])
def test_bad_nproc_names_the_argument(bad, error) -> None:
    with pytest.raises(error, match="nproc"):
        check_nproc(bad)


def test_more_processes_than_images_is_refused() -> None:
    with pytest.raises(ValueError, match=r"nproc=3 processes for 2 images"):
        check_nproc(3, 2)
    with pytest.raises(ValueError, match=r"world size=3 processes for 2 images"):
        shard_positions(2, 0, 3)
    with pytest.raises(ValueError, match="rank must be"):
        shard_positions(4, 2, 2)


@pytest.mark.parametrize("value, words", [("0", "must be at least 1"), ("-1", "must be at least 1"),
                                          ("two", "invalid int value"), ("17", "17 processes for 16 images")])
def test_cli_refuses_a_bad_nproc_before_any_work(value, words, capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", "--profile", "quick", "--nproc", value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--nproc" in err and words in err


@pytest.mark.parametrize("stage, value, words", [("t2", "9", "nproc=9 processes for 8 images"),
                                                 ("all", "9", "stage t2: n_layer_eval=8 images"),
                                                 ("t2", "0", "must be at least 1")])
def test_cli_checks_nproc_against_the_stages_images(stage, value, words, capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", "--profile", "quick", "--stage", stage, "--nproc", value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--nproc" in err and words in err


def test_cli_refuses_an_unknown_stage(capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", "--profile", "quick", "--stage", "t5", "--nproc", "1"])
    assert stop.value.code == 2
    assert "--stage" in capsys.readouterr().err


def test_rows_out_of_order_are_refused() -> None:
    a = pd.DataFrame({"layer": ["x"], "image": [1]})
    b = pd.DataFrame({"layer": ["x"], "image": [0]})
    with pytest.raises(ValueError, match="repeat an image or are out of order"):
        ordered_rows([a, b], "layer", ["x"])
    with pytest.raises(ValueError, match=r"layer \['y'\] outside"):
        ordered_rows([a.assign(layer="y")], "layer", ["x"])


# --------------------------------------------------------------------------- one process: notebook 04's rows
def test_one_process_gives_notebook_04s_rows_and_tables(tmp_path) -> None:
    task = make_task(6)
    p, images, targets, masks = task["params"], task["images"], task["targets"], task["masks"]
    models = {k: task[k] for k in ("student", "teacher", "chosen")}
    rows = evaluate_t3(p, images, targets, masks, blackbox=task["blackbox"], scorer=task["scorer"], **models)
    assert rows is not None
    # notebook 04, cells 7 and 9
    runs = pipeline.explain_t3(p, images, targets, masks, blackbox=task["blackbox"], **models)
    per_image, _ = score_methods(task["scorer"], images, targets, masks, runs, step=p.game_step())
    agree = pipeline.student_agreement(task["student"], images, targets)
    per_image["agrees"] = agree[per_image["image"].to_numpy(copy=True)].numpy()
    pd.testing.assert_frame_equal(rows.per_image, per_image, check_exact=True)
    assert list(rows.costs) == list(runs)
    for name, run in runs.items():
        assert rows.costs[name][1:] == (run.queries_per_image * len(run.indices), len(run.indices))
    inputs = T3Inputs(params=p, paths=pipeline.RunPaths(profile="t", root=tmp_path), teacher=task["teacher"],
                      student=task["student"], blackbox=task["blackbox"], scorer=task["scorer"], images=images,
                      targets=targets, masks=masks, chosen=task["chosen"])
    t3, claims = t3_tables(rows, inputs)
    reference = summarize(per_image, runs, seed=p.seed)
    timing = ["seconds_per_image"]
    pd.testing.assert_frame_equal(t3.drop(columns=[*timing, "resolution"]), reference.drop(columns=timing),
                                  check_exact=True)
    from lwcam.study.analysis import claim_table

    pd.testing.assert_frame_equal(claims, claim_table(per_image, seed=p.seed), check_exact=True)


# --------------------------------------------------------------------------- T2: notebook 03's rows and table
def _t2_reference(task: dict) -> tuple[list[str], torch.Tensor, dict]:
    """Notebook 03, cell 3: the student's per-layer maps of the whole batch."""
    return layer_maps_batched(task["student"], task["images"], task["targets"])


def test_t2_in_one_process_is_notebook_03s_table() -> None:
    task = make_task(6)
    p, images, targets, masks = task["params"], task["images"], task["targets"], task["masks"]
    rows = evaluate_t2(p, images, targets, masks, scorer=task["scorer"], student=task["student"])
    assert rows is not None
    names, stack, resolutions = _t2_reference(task)
    assert rows.names == names
    # notebook 03, cell 4
    t2 = layer_importance(task["scorer"], images, targets, masks, names, stack, resolutions=resolutions,
                          step=p.game_step(), seed=p.seed)
    pd.testing.assert_frame_equal(layer_table(rows.per_image, resolutions=rows.resolutions, seed=p.seed), t2,
                                  check_exact=True)
    assert t2["layer"].tolist() == [*names, FUSED_LAYER]
    # the rows hold what T2 summarises: layer 0's map alone, and the fused map without it
    step = p.game_step()
    alone, _, _ = score_saliency(task["scorer"], images, stack[:, 0], targets, masks, step=step)
    full, _, _ = score_saliency(task["scorer"], images, fuse(stack), targets, None, step=step)
    loo, _, _ = score_saliency(task["scorer"], images, fuse(stack[:, 1:]), targets, None, step=step)
    first = rows.per_image[rows.per_image["layer"] == names[0]]
    assert first["image"].tolist() == list(range(6))
    assert np.array_equal(first["deletion_auc"].to_numpy(), alone["deletion_auc"].to_numpy())
    assert np.array_equal(first["loo_deletion_auc"].to_numpy(), loo["deletion_auc"].to_numpy())
    delta = (loo["deletion_auc"].to_numpy() - full["deletion_auc"].to_numpy()).mean()
    assert t2.loc[0, "loo_deletion_delta"] == float(delta)
    assert t2.loc[0, "deletion_auc"] == alone["deletion_auc"].mean()


def test_t2_shards_merged_give_the_rows_and_table_of_the_whole_batch() -> None:
    task = make_task(6)
    p, images, targets, masks = task["params"], task["images"], task["targets"], task["masks"]
    whole = t2_shard(p, images, targets, masks, torch.arange(6), scorer=task["scorer"], student=task["student"])
    parts = [t2_shard(p, images, targets, masks, shard_positions(6, r, 2), scorer=task["scorer"],
                      student=task["student"]) for r in (1, 0)][::-1]  # rank 1 computed first: no shared state
    merged = merge_layer_shards(parts)
    pd.testing.assert_frame_equal(merged.per_image, whole.per_image, check_exact=False, atol=1e-6, rtol=0)
    one = layer_table(whole.per_image, resolutions=whole.resolutions, seed=p.seed)
    two = layer_table(merged.per_image, resolutions=merged.resolutions, seed=p.seed)
    pd.testing.assert_frame_equal(one, two, check_exact=False, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="repeat an image or are out of order"):
        merge_layer_shards(parts[::-1])


# --------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_processes_give_the_rows_of_one(tmp_path) -> None:
    frames, costs = {}, {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        proc, _ = _launch(out, nproc)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        frames[nproc] = pd.read_csv(out / "rows.csv")
        costs[nproc] = json.loads((out / "costs.json").read_text())
    one, two = frames[1], frames[2]
    assert len(one) == len(two) > 0
    for col in ("method", "image", "agrees"):
        assert one[col].tolist() == two[col].tolist(), col
    assert list(one["method"].unique()) == [m for m in pipeline.T3_METHODS if m in set(one["method"])]
    diff = np.nanmax(np.abs(one[FLOATS].to_numpy(float) - two[FLOATS].to_numpy(float)))
    assert diff <= 1e-6, f"largest difference {diff}"
    assert one[FLOATS].isna().equals(two[FLOATS].isna())
    # queries and images explained per method: the same; seconds are wall time
    assert {k: v[1:] for k, v in costs[1].items()} == {k: v[1:] for k, v in costs[2].items()}


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_run_naming_it_and_writes_no_table(tmp_path) -> None:
    proc, seconds = _launch(tmp_path, 2, "--die-rank", "1", "--die-after", "20", "--timeout", "30", limit=180)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sharded run failed: rank 1 failed (exit code 17, no error reported" in proc.stderr
    assert "no table was written" in proc.stderr
    assert not (tmp_path / "rows.csv").exists() and not (tmp_path / "costs.json").exists()
    assert seconds < 150


@pytest.mark.slow
def test_a_rerun_after_a_dead_rank_reuses_the_cached_answers(tmp_path) -> None:
    """The black box's answer cache, shared by the ranks, keeps what the failed run asked: a rerun runs the
    black box on fewer images than a run from an empty cache, and gives the same rows."""
    cache = tmp_path / "cache"
    dead, _ = _launch(tmp_path / "dead", 2, "--die-rank", "1", "--die-after", "20", "--timeout", "30",
                      "--cache", str(cache), limit=180)
    assert dead.returncode == 3 and "rank 1 failed" in dead.stderr, dead.stderr[-3000:]
    assert not (tmp_path / "dead" / "rows.csv").exists()
    for name, folder in (("rerun", cache), ("cold", tmp_path / "empty-cache")):
        proc, _ = _launch(tmp_path / name, 2, "--cache", str(folder))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = {name: sum(json.loads((tmp_path / name / f"forwards{r}.json").read_text()) for r in (0, 1))
            for name in ("rerun", "cold")}
    assert 0 < seen["rerun"] < seen["cold"], seen
    rows = [pd.read_csv(tmp_path / name / "rows.csv") for name in ("rerun", "cold")]
    pd.testing.assert_frame_equal(rows[0], rows[1], check_exact=False, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_more_ranks_than_images_fails_on_every_rank_with_the_reason(tmp_path) -> None:
    proc, _ = _launch(tmp_path, 3, "--num-images", "2", limit=180)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size=3 processes for 2 images" in proc.stderr
    assert not (tmp_path / "rows.csv").exists()


T2_FLOATS = ["deletion_auc", "insertion_auc", "pointing", "mass", "loo_deletion_auc", "loo_insertion_auc"]


@pytest.mark.slow
def test_two_processes_give_the_t2_rows_of_one(tmp_path) -> None:
    frames, layers = {}, {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        proc, _ = _launch(out, nproc, "--stage", "t2")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        frames[nproc] = pd.read_csv(out / "rows.csv")
        layers[nproc] = json.loads((out / "layers.json").read_text())
    one, two = frames[1], frames[2]
    assert layers[1] == layers[2] and len(one) == len(two) == 6 * (len(layers[1]) + 1)
    for col in ("layer", "depth", "image"):
        assert one[col].tolist() == two[col].tolist(), col
    assert list(one["layer"].unique()) == [*layers[1], FUSED_LAYER]
    diff = np.nanmax(np.abs(one[T2_FLOATS].to_numpy(float) - two[T2_FLOATS].to_numpy(float)))
    assert diff <= 1e-6, f"largest difference {diff}"
    assert one[T2_FLOATS].isna().equals(two[T2_FLOATS].isna())


@pytest.mark.slow
def test_a_rank_that_dies_in_t2_ends_the_run_naming_it_and_writes_no_table(tmp_path) -> None:
    proc, seconds = _launch(tmp_path, 2, "--stage", "t2", "--die-rank", "1", "--die-after", "10", "--timeout", "30",
                            limit=180)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sharded run failed: rank 1 failed (exit code 17, no error reported" in proc.stderr
    assert "no table was written" in proc.stderr
    assert not (tmp_path / "rows.csv").exists() and not (tmp_path / "layers.json").exists()
    assert seconds < 150


# --------------------------------------------------------------------------- the command, end to end
TINY_PROFILE = """profile: tiny
image_size: 32
num_classes: 4
object_radius: [5, 8]
n_train: 64
n_transfer: 64
n_val: 8
n_test: 8
teacher_epochs: 1
distill_epochs: 1
n_eval: 6
n_eval_blackbox: 2
n_eval_mp: 2
rise_masks: 20
lime_samples: 10
n_fusion_val: 4
game_steps: 8
"""


@pytest.mark.slow
def test_the_evaluate_command_on_two_processes_writes_one_process_tables(tmp_path) -> None:
    """``python -m lwcam.study evaluate`` on a project of its own: teacher, student and fusion made first,
    then T3 over two processes, then over one; the same rows and tables but for the seconds."""
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "tiny.yaml").write_text(TINY_PROFILE)
    rows, tables = {}, {}
    for nproc in (2, 1):
        cmd = [sys.executable, "-m", "lwcam.study", "evaluate", "--profile", "tiny", "--nproc", str(nproc)]
        proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), timeout=400, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"T3 over {nproc} processes" in proc.stdout
        rows[nproc] = pd.read_csv(tmp_path / "runs" / "tiny" / "per_image_methods.csv")
        tables[nproc] = [pd.read_csv(tmp_path / "reports" / "tiny" / f"{t}.csv") for t in ("T3_methods", "T3_claim")]
    pd.testing.assert_frame_equal(rows[1], rows[2], check_exact=False, atol=1e-6, rtol=0)
    assert set(rows[1]["method"]) == set(pipeline.T3_METHODS)
    t3_one, t3_two = (tables[n][0].drop(columns="seconds_per_image") for n in (1, 2))
    pd.testing.assert_frame_equal(t3_one, t3_two, check_exact=False, atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(tables[1][1], tables[2][1], check_exact=False, atol=1e-6, rtol=0)


def test_nccl_only_where_every_local_process_has_a_gpu(monkeypatch) -> None:
    from lwcam.study import sharded

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert sharded._backend() == "gloo"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert sharded._backend() == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sharded._backend() == "gloo"
