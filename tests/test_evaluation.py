"""Evaluation orchestration and the pipeline's cached artefacts, on tiny models and data."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

from lwcam import BlackBox
from lwcam.cam.batched import layer_maps_batched
from lwcam.scoring import evaluation
from lwcam.study import analysis, pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn(num_classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    ).eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 16, 16, generator=g)
    masks = torch.zeros(6, 16, 16, dtype=torch.bool)
    masks[:, 4:10, 4:10] = True
    return images, masks


def _run(batch, seed=0):
    images, masks = batch
    teacher, student = _cnn(seed=1), _cnn(seed=2)
    bb = BlackBox(teacher, 4)
    targets = pipeline.blackbox_labels(bb, images)
    runs = evaluation.run_methods(
        images, targets, masks, methods=["lwcam", "gradcam", "rise", "random", "mask"], blackbox=bb,
        student=student, teacher=teacher, subset=[0, 2, 4], subset_methods=["rise"],
        method_params={"rise": {"n_masks": 50, "seed": seed}, "random": {"seed": seed}}, chunk=4,
    )
    scorer = BlackBox(teacher, 4)
    per_image, games = evaluation.score_methods(scorer, images, targets, masks, runs, batch_size=64)
    return runs, per_image, games, bb, scorer, targets


def test_run_and_score_methods(batch):
    runs, per_image, games, bb, scorer, targets = _run(batch)
    assert list(runs) == ["lwcam", "gradcam", "rise", "random", "mask"]
    assert runs["rise"].indices.tolist() == [0, 2, 4] and runs["rise"].saliency.shape == (3, 16, 16)
    assert runs["lwcam"].saliency.shape == (6, 16, 16)
    assert runs["rise"].queries_per_image == 50 and runs["lwcam"].queries_per_image == 0
    assert bb.queries == 6 + 3 * 50  # the labels, then RISE's masks
    # every (image, step) of both games was sent to the scorer: 17 points per 16x16 image
    n_rows = 6 * 4 + 3
    assert scorer.queries == 2 * n_rows * 17
    assert len(per_image) == n_rows
    assert per_image[["deletion_auc", "insertion_auc"]].stack().between(0, 1).all()
    assert per_image.query("method == 'mask'")["pointing"].eq(1.0).all()
    t3 = evaluation.summarize(per_image, runs, n_boot=200)
    assert set(t3["method"]) == set(runs)
    row = t3.set_index("method").loc["lwcam"]
    assert row["deletion_auc_ci_low"] <= row["deletion_auc"] <= row["deletion_auc_ci_high"]
    assert t3.set_index("method").loc["rise", "n_images"] == 3


def test_same_seed_same_maps_and_scores(batch):
    a = _run(batch, seed=3)
    b = _run(batch, seed=3)
    c = _run(batch, seed=4)
    for name in a[0]:
        assert torch.equal(a[0][name].saliency, b[0][name].saliency)
    assert a[1].equals(b[1])
    assert not torch.equal(a[0]["rise"].saliency, c[0]["rise"].saliency)


def test_compare_and_claim_table(batch):
    _, per_image, _, _, _, _ = _run(batch)
    res = evaluation.compare(per_image, "lwcam", "rise")
    assert res["n"] == 3  # paired on the images both explained
    claims = analysis.claim_table(per_image)
    assert claims.iloc[0][["a", "b", "metric"]].tolist() == ["lwcam", "gradcam", "deletion_auc"]
    assert claims["p_value"].between(0, 1).all()
    with pytest.raises(ValueError, match="share no image"):
        evaluation.compare(per_image[per_image["method"] != "rise"], "lwcam", "rise")


def test_layer_importance_rows_and_loo(batch):
    images, masks = batch
    teacher, student = _cnn(seed=1), _cnn(seed=2)
    scorer = BlackBox(teacher, 4)
    targets = pipeline.blackbox_labels(scorer, images)
    names, stack, res = layer_maps_batched(student, images, targets, batch_size=4)
    assert stack.shape == (6, len(names), 16, 16) and set(res) == set(names)
    t2 = evaluation.layer_importance(scorer, images, targets, masks, names, stack, resolutions=res)
    assert len(t2) == len(names) + 1
    assert t2["layer"].iloc[-1] == "fused (all layers)"
    assert t2["loo_deletion_delta"].iloc[:-1].notna().all()
    with pytest.raises(ValueError, match="layers"):
        evaluation.layer_importance(scorer, images, targets, masks, names[:-1], stack)


def test_unknown_method_is_named(batch):
    images, masks = batch
    with pytest.raises(ValueError, match="unknown method 'grad-cam'"):
        evaluation.run_methods(images, torch.zeros(6, dtype=torch.long), masks, methods=["grad-cam"])


# ----------------------------------------------------------------------------- pipeline
def _tiny_project(tmp_path, **overrides):
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    (tmp_path / "params").mkdir(exist_ok=True)
    params = {"profile": "tiny", "dataset": "synthetic", "image_size": 32, "num_classes": 3, "seed": 0,
              "data_seed": 0, "n_train": 48, "n_val": 16, "n_test": 16, "n_transfer": 64, "teacher": "squeezenet1_1",
              "teacher_epochs": 1, "teacher_batch_size": 16, "teacher_lr": 0.001, "student": "mobilenet_v3_small",
              "distill_epochs": 1, "distill_batch_size": 16, "query_budget": 200, "blackbox_output": "probs", "topk": 2}
    params.update(overrides)
    (tmp_path / "params" / "tiny.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in params.items()))
    return pipeline.load_profile("tiny", tmp_path)


def test_profiles_and_paths(tmp_path):
    params = _tiny_project(tmp_path)
    assert params["teacher"] == "squeezenet1_1"
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        pipeline.load_profile("nope", tmp_path)
    tiny = pipeline.RunPaths.for_profile("tiny", tmp_path)
    default = pipeline.RunPaths(profile="default", root=tiny.root)
    assert tiny.figures == tiny.root / "figures" / "tiny" and default.figures == tiny.root / "figures"
    assert tiny.rel(tiny.teacher) == "runs/tiny/teacher.pt"
    real = pipeline.load_profile("quick")
    assert set(pipeline.TEACHER_KEYS) <= set(real) | {"holdout", "distill_batch_size"}


def test_artefacts_are_cached_and_invalidated(tmp_path):
    params = _tiny_project(tmp_path)
    paths = pipeline.RunPaths.for_profile("tiny", tmp_path)
    _, meta = pipeline.get_teacher(params, paths)
    stamp = paths.teacher.stat().st_mtime_ns
    pipeline.get_teacher(params, paths)
    assert paths.teacher.stat().st_mtime_ns == stamp  # reused
    student, summary = pipeline.get_student(params, paths, pipeline.get_teacher(params, paths)[0])
    assert summary["queries"] <= 200 and (paths.run / "student_probs.json").exists()
    snapshots = pipeline.load_snapshots(params, paths)  # one student per distillation epoch (F7)
    assert sorted(snapshots) == [1] and all(not m.training for m in snapshots.values())
    again, summary2 = pipeline.get_student(params, paths, pipeline.get_teacher(params, paths)[0])
    assert summary2["fingerprint"] == summary["fingerprint"]
    for p, q in zip(student.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)
    params = _tiny_project(tmp_path, teacher_epochs=2)  # a changed setting retrains
    _, meta2 = pipeline.get_teacher(params, paths)
    assert paths.teacher.stat().st_mtime_ns != stamp and meta2["epochs"] == 2


def test_stage_timings_are_written(tmp_path, monkeypatch):
    _tiny_project(tmp_path)
    paths = pipeline.RunPaths.for_profile("tiny", tmp_path)
    monkeypatch.setenv("LWCAM_NOTEBOOK", "01_distill")
    with pipeline.stage("teacher training", paths):
        pass
    pipeline.record_stage("distillation (probs)", 2.5, paths)
    table = pipeline.timings_table(paths, {"01_distill": 4.0, "02_explain": 1.0}, {"seed": 3})
    assert table["stage"].tolist() == ["(whole notebook)", "teacher training", "distillation (probs)",
                                       "(whole notebook)", "(total)"]
    assert table["seconds"].iloc[-1] == 5.0 and table["seconds"].iloc[2] == 2.5
    assert {"profile", "seed", "commit", "torch", "threads", "machine"} <= set(table.columns)
    assert set(table["seed"]) == {3} and set(table["profile"]) == {"tiny"}


def _tables_of_a_run(root):
    root.mkdir()
    params = _tiny_project(root)
    paths = pipeline.RunPaths.for_profile("tiny", root)
    teacher, meta = pipeline.get_teacher(params, paths)
    student, summary = pipeline.get_student(params, paths, teacher)
    x, y, m = pipeline.load_split(params, "test", paths)
    bb = pipeline.make_blackbox(teacher, params, paths, cache=False)
    t = pipeline.blackbox_labels(bb, x)
    runs = evaluation.run_methods(x, t, m, methods=["lwcam", "gradcam", "rise", "random"], blackbox=bb,
                                  student=student, subset=range(4), subset_methods=["rise"],
                                  method_params={"rise": {"n_masks": 50, "seed": 0}, "random": {"seed": 0}})
    per_image, _ = evaluation.score_methods(bb, x, t, m, runs)
    t1 = analysis.table_t1(params, meta, float((pipeline.blackbox_labels(bb, x) == y).float().mean()),
                           {"probs": summary})
    names, stack, res = layer_maps_batched(student, x, t)
    t2 = evaluation.layer_importance(bb, x, t, m, names, stack, resolutions=res)
    t3 = evaluation.summarize(per_image, runs, n_boot=200)
    timeless = [c for c in (*t1.columns, *t3.columns) if "seconds" in c]
    return (t1.drop(columns=[c for c in timeless if c in t1]), t2,
            t3.drop(columns=[c for c in timeless if c in t3]))


def test_same_seed_gives_identical_tables(tmp_path):
    """Determinism: two runs from scratch in separate folders give identical T1-T3 (time columns aside)."""
    first = _tables_of_a_run(tmp_path / "a")
    second = _tables_of_a_run(tmp_path / "b")
    for a, b in zip(first, second, strict=True):
        pd.testing.assert_frame_equal(a, b)
    assert first[0]["queries"].iloc[0] > 0
