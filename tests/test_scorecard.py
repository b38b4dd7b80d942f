"""The scorecard: class-conflict scenes, every method on non-square images, the T4 runner, its tables and F8."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import lwcam.baselines as bl
from lwcam import BlackBox
from lwcam.data import ConflictScenes, object_area_fractions, render_conflict, render_synthetic
from lwcam.scoring.evaluation import MethodRun
from lwcam.study import scorecard
from lwcam.study.analysis import select_fusion
from lwcam.study.plots import plot_scorecard


def _net(classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, classes)).eval()


# ----------------------------------------------------------------------------- scenes
def test_conflict_scenes_are_a_pure_function_of_seed_split_index():
    a, b = render_conflict(0, "test", 3, 32, 4), render_conflict(0, "test", 3, 32, 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], render_conflict(1, "test", 3, 32, 4)[0])
    assert not np.array_equal(a[0], render_conflict(0, "val", 3, 32, 4)[0])
    small, large = ConflictScenes("test", n=4, image_size=32, num_classes=4), ConflictScenes("test", n=6, image_size=32,
                                                                                            num_classes=4)
    x4, y4, m4 = small.tensors()
    x6, y6, m6 = large.tensors()
    torch.testing.assert_close(x4, x6[:4])  # a scene does not depend on how many are rendered
    assert torch.equal(y4, y6[:4]) and torch.equal(m4, m6[:4])
    image, labels, masks = small[3]
    torch.testing.assert_close(image, x4[3])
    assert torch.equal(labels, y4[3]) and torch.equal(masks, m4[3])


def test_conflict_scenes_hold_two_classes_in_two_disjoint_halves(tmp_path):
    ds = ConflictScenes("val", n=24, image_size=32, num_classes=4, cache_dir=tmp_path)
    images, labels, masks = ds.tensors()
    assert images.shape == (24, 3, 32, 64) and labels.shape == (24, 2) and masks.shape == (24, 2, 32, 64)
    assert (labels[:, 0] != labels[:, 1]).all() and labels.min() >= 0 and labels.max() < 4
    assert not (masks[:, 0] & masks[:, 1]).any() and masks.flatten(2).any(2).all()
    left = masks[..., :32].flatten(2).any(2)  # (n, 2): which object lies in the left half
    assert (left[:, 0] != left[:, 1]).all()  # one object per half
    assert 0 < int(left[:, 0].sum()) < 24  # object a is sometimes left, sometimes right
    assert len(list(tmp_path.glob("conflict_*.npz"))) == 1
    again = ConflictScenes("val", n=24, image_size=32, num_classes=4, cache_dir=tmp_path).tensors()
    assert all(torch.equal(u, v) for u, v in zip(again, (images, labels, masks), strict=True))
    share = object_area_fractions(masks)
    assert share.shape == (24, 2) and ((share > 0.03) & (share < 0.25)).all()


def test_a_forced_class_keeps_the_object_and_changes_its_texture():
    own, label, mask = render_synthetic(0, "test", 7, 32, 4)
    assert render_synthetic(0, "test", 7, 32, 4, label=None)[1] == label
    other = (label + 1) % 4
    img, got, m = render_synthetic(0, "test", 7, 32, 4, label=other)
    assert got == other and np.array_equal(m, mask)  # same silhouette and place
    inside, outside = np.abs(img - own)[mask].mean(), np.abs(img - own)[~mask].mean()
    assert inside > 0.1 and outside < 0.05  # the texture changed; around it, only the sensor noise
    with pytest.raises(ValueError, match="label"):
        render_synthetic(0, "test", 7, 32, 4, label=4)


def test_object_sizes_and_top_two_rate():
    masks = torch.zeros(2, 2, 8, 16, dtype=torch.bool)
    masks[:, 0, :4, :4] = True
    masks[:, 1, :2, 8:12] = True
    table = scorecard.object_size_table(masks)
    assert table.set_index("statistic").loc["max", "share_of_scene"] == pytest.approx(16 / 128)
    assert table.set_index("statistic").loc["min", "share_of_half"] == pytest.approx(8 / 64)
    probs = torch.tensor([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]])
    for output in ("probs", "topk"):
        bb = BlackBox(lambda x: probs, num_classes=3, output=output, k=2)
        assert scorecard.top_two_hits(bb, torch.zeros(2, 3, 8, 16), torch.tensor([[2, 1], [2, 0]])).tolist() == [
            True, False]


# ----------------------------------------------------------------------------- non-square images
def test_every_registered_method_explains_non_square_images():
    student, teacher = _net(5), _net(5, seed=1)
    bb = BlackBox(teacher, num_classes=5)
    images = torch.randn(2, 3, 16, 40, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, 16, 40, dtype=torch.bool)
    masks[:, 4:9, 20:30] = True
    params = scorecard.scene_method_params(16, 40, rise_masks=40, lime_samples=20)
    params["meaningful_perturbation"]["iters"] = 3
    for name in bl.METHODS:
        out = bl.explain(name, images, [1, 4], blackbox=bb, student=student, teacher=teacher, masks=masks,
                         **params.get(name, {})).saliency
        assert out.shape == (2, 16, 40) and torch.isfinite(out).all(), name
    centre = bl.center_saliency(images)[0]
    assert divmod(int(centre.argmax()), 40) in {(7, 19), (7, 20), (8, 19), (8, 20)}


def test_rise_reads_every_class_from_one_set_of_queries_with_square_cells():
    bb = BlackBox(_net(4), num_classes=4)
    x = torch.randn(2, 3, 16, 32, generator=torch.Generator().manual_seed(2))
    both = bl.rise_classes(bb, x, torch.tensor([[0, 1], [2, 3]]), n_masks=30, grid_size=(4, 8), batch_size=7)
    assert bb.queries == 2 * 30
    for j, targets in enumerate(([0, 2], [1, 3])):
        torch.testing.assert_close(both[:, j], bl.rise(bb, x, targets, n_masks=30, grid_size=(4, 8)))
    masks = bl.rise_masks(1, (16, 32), grid_size=(4, 8))
    assert masks.shape == (1, 16, 32)
    with pytest.raises(ValueError, match="grid_size"):
        bl.rise(bb, x, 0, n_masks=2, grid_size=(4, 0))
    assert scorecard.scene_method_params(64, 128)["rise"]["grid_size"] == (8, 16)


# ----------------------------------------------------------------------------- the runner
@pytest.fixture(scope="module")
def scenes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ConflictScenes("test", n=3, image_size=16, num_classes=4).tensors()


@pytest.fixture(scope="module")
def result(scenes) -> scorecard.ScorecardResult:
    images, labels, masks = scenes
    student, teacher = _net(), _net(seed=1)
    params = scorecard.scene_method_params(16, 32, rise_masks=30, lime_samples=16,
                                           fusions={"lwcam_conflict": {"weighting": "layercam"}})
    return scorecard.run_scorecard(images, labels, masks, methods=scorecard.SCORECARD_METHODS,
                                   blackbox=BlackBox(teacher, num_classes=4), student=student, teacher=teacher,
                                   second_student=_net(seed=2), n_expensive=2, n_road=2, n_randomisation=2,
                                   randomisation_steps=2, n_robustness=2, robustness_samples=2,
                                   road_percentages=(30, 70), method_params=params)


def test_the_runner_fills_every_t4_column(result):
    t4 = scorecard.scorecard_table(result, n_boot=100)
    assert t4["method"].tolist() == list(scorecard.SCORECARD_METHODS)
    for m in scorecard.MEASURES:
        assert {m, f"{m}_ci_low", f"{m}_ci_high"} <= set(t4), m
    assert not t4[[*scorecard.MEASURES, "seconds_per_scene", "queries_per_scene"]].isna().any().any()
    by = t4.set_index("method")
    assert by.loc["rise", "queries_per_scene"] == 30  # both classes from one set of masks
    assert by.loc["lime", "queries_per_scene"] == 2 * 16 and by.loc["lwcam", "queries_per_scene"] == 0
    assert by.loc["scorecam", "n_scenes"] == 2 and by.loc["lwcam", "n_scenes"] == 3
    assert by.loc["mask", "class_sensitivity"] == -1 and by.loc["mask", "targeted_pointing"] == 1
    assert by.loc["random", "class_sensitivity"] == 1 and by.loc["center", "class_sensitivity"] == 1
    assert by.loc["lwcam_conflict", "label"] == "lwcam (selected on val, conflict-aware)"
    steps = result.randomisation.groupby("method")["step"].max()
    assert (steps == 2).all() and set(steps.index) == set(scorecard.SCORECARD_METHODS)
    assert (result.randomisation.loc[result.randomisation["method"] == "mask", "rank_correlation"] == 1).all()


def test_claims_separation_ranks_and_f8(result):
    t4 = scorecard.scorecard_table(result, n_boot=100)
    claims = scorecard.scorecard_claims(result.per_scene, seed=0)
    assert len(claims) == len(scorecard.CLAIM_PAIRS) * len(scorecard.MEASURES)
    assert set(claims["alternative"]) == {"less", "greater"} and claims["p_value"].between(0, 1).all()
    sep = scorecard.separation_table(result.per_scene, t4)
    assert sep["measure"].tolist() == list(scorecard.MEASURES)
    assert sep.set_index("measure").loc["targeted_pointing", "oracle_leads"] is True
    assert sep.set_index("measure").loc["class_sensitivity", "blind_fail"] is True
    ranks, values = scorecard.rank_table(t4)
    assert ranks.shape == (len(t4), len(scorecard.MEASURES)) and ranks.min().min() == 1
    fig = plot_scorecard(ranks, values, {m.label: m.higher_is_better for m in scorecard.MEASURES.values()})
    assert len(fig.axes) == 2


def test_the_oracle_leads_targeted_pointing_on_a_hand_made_case():
    images = torch.zeros(4, 3, 8, 16)
    labels = torch.tensor([[0, 1]] * 4)
    masks = torch.zeros(4, 2, 8, 16, dtype=torch.bool)
    masks[:, 0, 2:6, 2:6] = True
    masks[:, 1, 2:6, 10:14] = True
    both = (masks[:, 0] | masks[:, 1]).float()
    g = torch.Generator().manual_seed(0)
    maps = {"mask": masks.float(),                                                     # each map its own object
            "blind": (both + 0.1 * torch.rand(4, 8, 16, generator=g))[:, None].expand(4, 2, 8, 16),  # both objects
            "center": bl.center_saliency(images)[:, None].expand(4, 2, 8, 16)}
    runs = {k: MethodRun(k, k, "none", torch.arange(4), v.contiguous(), 0.0, 0.0) for k, v in maps.items()}
    probs = BlackBox(lambda x: torch.softmax(torch.stack([x[:, 0, 2:6, 2:6].mean((1, 2)), x[:, 0, 2:6, 10:14].mean(
        (1, 2)), torch.zeros(len(x))], 1), 1), num_classes=3)
    per_scene = scorecard.score_scenes(probs, images + 1.0, labels, masks, runs)
    mean = per_scene.groupby("method")[["targeted_pointing", "targeted_mass", "class_sensitivity"]].mean()
    assert mean.loc["mask", "targeted_pointing"] == 1 and mean.loc["center", "targeted_pointing"] == 0
    assert mean.loc["blind", "targeted_pointing"] < 1 and mean.loc["blind", "targeted_mass"] == pytest.approx(0.5, 0.05)
    assert mean.loc["mask", "class_sensitivity"] == -1 and mean.loc["blind", "class_sensitivity"] == 1
    dele = per_scene.groupby("method")["deletion_gap"].mean()
    assert dele["mask"] > dele["blind"]  # deleting the asked object spares the other class


# ----------------------------------------------------------------------------- randomisation groups
def test_cascade_groups_cover_every_layer_once_and_leave_the_function_alone():
    net = _net()
    groups = scorecard.cascade_groups(net, 3)
    flat = [n for g in groups for n in g]
    assert groups[0] == ["7"] and sorted(flat) == sorted(["0", "2", "3", "7"]) and len(flat) == len(set(flat))
    build, names = scorecard._grouped_factory(net, groups)
    copy = build()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(copy(x), net(x))  # the groups never change the forward pass
    before = [p.clone() for p in net.parameters()]
    copy.get_submodule(names[-1]).reset_parameters()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))  # the original is untouched
    with pytest.raises(ValueError, match="steps"):
        scorecard.cascade_groups(net, 0)


# ----------------------------------------------------------------------------- fusion on val
def test_conflict_aware_selection_stays_within_the_deletion_tolerance(scenes):
    images, labels, masks = scenes
    student = _net()
    table, _ = select_fusion(student, BlackBox(_net(seed=1), num_classes=4), torch.randn(4, 3, 16, 16),
                             torch.tensor([0, 1, 2, 3]))
    table = table.iloc[:4].copy()
    table["val_deletion_auc"] = [0.20, 0.205, 0.30, 0.40]  # the last two lie outside a 0.01 tolerance
    chosen_table, chosen = scorecard.select_fusion_conflict(student, table, images, labels, masks, tolerance=0.01)
    assert chosen_table["within_tolerance"].tolist() == [True, True, False, False]
    pick = chosen_table[chosen_table["selected_conflict_aware"]]
    assert len(pick) == 1 and bool(pick["within_tolerance"].item())
    assert pick["val_targeted_mass"].item() == chosen_table.loc[:1, "val_targeted_mass"].max()
    assert chosen["weighting"] == pick["weighting"].item() and isinstance(chosen_table, pd.DataFrame)
