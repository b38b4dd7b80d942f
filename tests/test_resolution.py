"""The object-size axis: the renderer's radius range, object sizes in cells, T5's units, table, claims and goals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lwcam.cam.fusion import fuse
from lwcam.data import (
    ConflictScenes,
    SyntheticTextures,
    check_object_radius,
    object_size_cells,
    render_synthetic,
)
from lwcam.study.analysis import GATED_MODES, GATED_WEIGHTINGS, fused_maps, fusion_grid
from lwcam.study.profiles import Profile, ProfileError
from lwcam.study.resolution import (
    object_sizes,
    resolution_claims,
    resolution_goals,
    resolution_table,
    size_bin_labels,
    size_units,
)
from lwcam.study.scorecard import MEASURES, scene_means


# ----------------------------------------------------------------------------- the renderer's radius
@pytest.mark.parametrize("bad", [(0, 5), (-3, 5), (0.0, 0.0), (12, 8), (5, 31), (5, 1e308), (float("nan"), 5),
                                 (5, float("inf")), (5,), (1, 2, 3), "5-20", None, (True, 5)])
def test_a_bad_object_radius_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="object_radius"):
        render_synthetic(0, "val", 0, object_radius=bad)
    with pytest.raises(ValueError, match="object_radius"):
        SyntheticTextures("val", n=1, object_radius=bad)
    with pytest.raises(ValueError, match="object_radius"):
        ConflictScenes("val", n=1, object_radius=bad)


def test_a_radius_larger_than_a_small_image_is_refused():
    check_object_radius((5, 20), image_size=64)
    with pytest.raises(ValueError, match="does not fit a 32-px image"):
        check_object_radius((5, 30), image_size=32)  # 15 px at 32 px + 1 px of margin reaches the centre


def test_the_radius_range_sets_the_object_size_and_each_image_stays_a_pure_function():
    small = [render_synthetic(0, "val", i, object_radius=(5, 6))[2] for i in range(12)]
    large = [render_synthetic(0, "val", i, object_radius=(19, 20))[2] for i in range(12)]
    d_small = object_size_cells(np.stack(small), 1.0)
    d_large = object_size_cells(np.stack(large), 1.0)
    assert d_small.max() < 14 and d_large.min() > 26  # diameters in px: about 2r, silhouettes vary
    again = render_synthetic(0, "val", 5, object_radius=(5, 6))
    assert np.array_equal(again[2], small[5])


def test_the_cache_file_names_the_radius(tmp_path):
    a = SyntheticTextures("val", n=2, image_size=32, cache_dir=tmp_path, object_radius=(5, 20))
    b = SyntheticTextures("val", n=2, image_size=32, cache_dir=tmp_path)
    assert a._cache_file() != b._cache_file() and "r5-20" in a._cache_file().name and "_v4_" in a._cache_file().name


def test_the_profile_validates_object_radius():
    assert Profile(object_radius=[5, 20]).object_radius == [5.0, 20.0]
    for bad in ([0, 5], [20, 5], [5, 40], [5]):
        with pytest.raises(ProfileError, match="object_radius"):
            Profile(object_radius=bad)
    with pytest.raises(ProfileError, match="resolution_students"):
        Profile(resolution_students=["", 3])


# ----------------------------------------------------------------------------- sizes and bins
def test_object_size_cells_is_the_equivalent_diameter_over_the_cell():
    m = np.zeros((2, 16, 16), dtype=bool)
    m[0, :4, :4] = True  # 16 px: a disc of diameter 2·sqrt(16/π) = 4.514 px
    assert object_size_cells(m, 2.0)[0] == pytest.approx(2 * np.sqrt(16 / np.pi) / 2)
    assert object_size_cells(m, 2.0)[1] == 0.0
    for bad in (0, -1.0, float("inf"), True, "8"):
        with pytest.raises(ValueError, match="cell_px"):
            object_size_cells(m, bad)


def test_bins_are_closed_on_the_right():
    masks = torch.zeros(3, 2, 64, 128, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(128) + 0.5, indexing="ij")
    for i, diameter_cells in enumerate((1.0, 2.0, 4.0)):
        r = diameter_cells * 8 / 2
        masks[i, 0] = (yy - 32) ** 2 + (xx - 32) ** 2 <= r**2
        masks[i, 1] = (yy - 32) ** 2 + (xx - 96) ** 2 <= (1.5 * 8 / 2) ** 2 - 1e-6
    sizes = object_sizes(masks, 8.0)
    assert sizes.loc[sizes["object"] == 0, "size_bin"].tolist() == ["≤ 1.5", "1.5–3", "> 3"]
    assert (sizes.loc[sizes["object"] == 1, "size_bin"] == "≤ 1.5").all()
    with pytest.raises(ValueError, match="edges"):
        size_bin_labels((3.0, 1.5))
    with pytest.raises(ValueError, match="masks"):
        object_sizes(masks[:, 0], 8.0)


def _per_object() -> pd.DataFrame:
    """Two methods, four scenes: ``good`` points right on every object, ``bad`` only on the large ones."""
    rows = []
    for method in ("good", "bad"):
        for image in range(4):
            for obj in (0, 1):
                small = obj == 0
                hit = 1.0 if method == "good" or not small else 0.0
                rows.append({"method": method, "image": image, "object": obj,
                             **{m: np.nan for m in MEASURES}, "targeted_pointing": hit,
                             "targeted_mass": 0.5 + 0.1 * hit, "class_sensitivity": -0.5})
    return pd.DataFrame(rows)


def _sizes() -> pd.DataFrame:
    return pd.DataFrame({"image": np.repeat(np.arange(4), 2), "object": np.tile([0, 1], 4),
                         "size_cells": np.tile([1.0, 4.0], 4), "size_bin": np.tile(["≤ 1.5", "> 3"], 4)})


def test_units_average_a_scenes_objects_within_a_bin():
    sizes = _sizes()
    sizes.loc[sizes["image"] == 3, "size_bin"] = "> 3"  # both objects of scene 3 in the large bin
    units = size_units(_per_object(), sizes)
    bad3 = units[(units["method"] == "bad") & (units["image"] == 3)]
    assert len(bad3) == 1 and bad3["targeted_pointing"].item() == 0.5  # (0 + 1) / 2, one unit
    with pytest.raises(ValueError, match="sizes"):
        size_units(_per_object(), sizes[sizes["image"] < 3])


def test_table_claims_and_goals_read_per_bin():
    units = size_units(_per_object(), _sizes())
    t4 = pd.DataFrame({"method": ["good", "bad"], "label": ["Good", "Bad"], "queries_per_scene": [0.0, 0.0],
                       "randomisation": [0.1, 0.9]})
    t5 = resolution_table(units, t4, student="s", n_boot=200)
    small = t5[t5["size_bin"] == "≤ 1.5"].set_index("method")
    assert small.loc["good", "targeted_pointing"] == 1.0 and small.loc["bad", "targeted_pointing"] == 0.0
    assert (t5["n_scenes"] == 4).all() and list(t5["label"].unique()) == ["Good", "Bad"]
    claims = resolution_claims(units, student="s", pairs=[("good", "bad")])
    point = claims[claims["metric"] == "targeted_pointing"].set_index("size_bin")
    assert point.loc["≤ 1.5", "mean_diff"] == 1.0 and point.loc["> 3", "mean_diff"] == 0.0
    t5g = t5.replace({"method": {"good": "lwcam_conflict", "bad": "gradcam"}})
    claims_g = claims.replace({"a": {"good": "lwcam_conflict"}, "b": {"bad": "gradcam"}})
    units_g = units.replace({"method": {"good": "lwcam_conflict", "bad": "gradcam"}})
    units_g["randomisation"] = 0.1
    goals = resolution_goals(t5g, claims_g, units_g)
    assert len(goals) == 7 and goals["met"].dtype == bool
    # four scenes cannot reach p < 0.01, the largest bin ties, the randomisation goal is met, no RISE row
    assert goals["met"].tolist() == [False, False, True, True, True, True, False]


# ----------------------------------------------------------------------------- per-object scoring
def test_scene_means_are_the_old_per_scene_means():
    po = _per_object()
    scenes = scene_means(po)
    assert len(scenes) == 8 and list(scenes.columns[:2]) == ["method", "image"]
    bad = scenes[scenes["method"] == "bad"]
    assert bad["targeted_pointing"].tolist() == [0.5] * 4


# ----------------------------------------------------------------------------- the declared grid
def test_the_grid_declares_every_class_preserving_fusion_gated_by_grad_cam():
    grid = fusion_grid(["a", "b", "c"], {"gradcam": None, "layercam": None})
    gated = {k: v for k, v in grid.items() if "gate_weighting" in v}
    assert len(gated) == len(GATED_WEIGHTINGS) * len(GATED_MODES)
    assert {v["gate_weighting"] for v in gated.values()} == {"gradcam"}
    assert {v["mode"] for v in gated.values()} == set(GATED_MODES)
    assert not any("gate_weighting" in v for v in fusion_grid(["a"], {"gradcam": None}).values())


def test_fused_maps_uses_native_maps_for_the_gated_modes():
    g = torch.Generator().manual_seed(0)
    raws = {w: [torch.rand(2, 8, 8, generator=g), torch.rand(2, 2, 2, generator=g)] for w in GATED_WEIGHTINGS}
    stacks = {"gradcam": torch.rand(2, 2, 8, 8, generator=g)}
    spec = {"weighting": "layercam", "mode": "deep_gated", "normalize": "minmax", "gate_weighting": "gradcam"}
    out = fused_maps(stacks, raws, spec, (8, 8))
    want = fuse(raws["layercam"], mode="deep_gated", size=(8, 8), gate=raws["gradcam"][-1])
    assert torch.equal(out, want)
    plain = fused_maps(stacks, raws, {"weighting": "gradcam", "mode": "sum", "normalize": "minmax"}, (8, 8))
    assert torch.equal(plain, fuse(stacks["gradcam"]))
