"""The paper's analyses: the fusion grid chosen on val, learned layer weights, the claims, F7."""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from lwcam import BlackBox
from lwcam.models import SMALL_INPUT_ARCHITECTURES, build_model
from lwcam.study.analysis import (
    claim_table,
    fusion_grid,
    learned_layer_weights,
    quality_vs_fidelity,
    select_fusion,
)


def _tiny_cnn(seed: int, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    ).eval()


class _Recorder(nn.Module):
    """A black-box model that keeps every image it is asked about."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


def _derived_from(x: torch.Tensor, pool: torch.Tensor) -> bool:
    """Is ``x`` one of ``pool``'s images with some pixels set to 0 (the deletion substrate)?"""
    return bool((((x[None] == pool) | (x[None] == 0)).flatten(1).all(1)).any())


def test_learned_weights_formula_and_no_signal() -> None:
    assert learned_layer_weights([0.2, 0.6, 0.4], 0.5) == pytest.approx([0.3, 0.0, 0.1])
    assert learned_layer_weights([0.6, 0.7], 0.5) is None
    with pytest.raises(ValueError, match="finite"):
        learned_layer_weights([float("nan")], 0.5)


def test_fusion_grid_declares_every_axis() -> None:
    grid = fusion_grid(["a", "b", "c"], {"gradcam": [1.0, 0.0, 2.0], "layercam": None})
    sums = {k: g for k, g in grid.items() if "gate_weighting" not in g}
    assert {g["weighting"] for g in sums.values()} == {"gradcam", "layercam"}
    assert {g["normalize"] for g in grid.values()} == {"minmax", "none"}
    assert {g["mode"] for g in sums.values()} == {"sum", "max", "weighted"}
    assert grid["Grad-CAM: weighted by val importance"]["weights"] == [1.0, 0.0, 2.0]
    assert "LayerCAM: weighted by val importance" not in grid  # no layer beat random
    assert grid["LayerCAM: without layer b"]["weights"] == [1.0, 0.0, 1.0]
    assert grid["Grad-CAM: layer c only"]["weights"] == [0.0, 0.0, 1.0]
    # per weighting: 3 fixed modes, each layer alone, each layer left out (+ learned where it exists);
    # then 4 class-preserving modes on 3 weightings of the shallow maps
    assert len(grid) == 2 * (3 + 3 + 3) + 1 + 4 * 3


def test_selection_reads_only_the_validation_images() -> None:
    student, recorder = _tiny_cnn(0), _Recorder(_tiny_cnn(1))
    scorer = BlackBox(recorder, num_classes=3)
    g = torch.Generator().manual_seed(0)
    val = torch.rand(6, 3, 16, 16, generator=g) + 0.1
    test = torch.rand(6, 3, 16, 16, generator=g) + 0.1
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    assert not any("test" in p for p in inspect.signature(select_fusion).parameters)
    table, chosen = select_fusion(student, scorer, val, targets, seed=0)
    seen = torch.cat(recorder.seen)
    assert len(seen) > 0
    assert all(_derived_from(x, val) for x in seen)
    informative = [x for x in seen if (x != 0).float().mean() > 0.1]  # an all-substrate image matches anything
    assert len(informative) > len(seen) // 2
    assert not any(_derived_from(x, test) for x in informative)
    assert table["selected_on_val"].sum() == 1
    best = table.loc[table["selected_on_val"]].iloc[0]
    assert best["val_deletion_auc"] == table["val_deletion_auc"].min()
    assert chosen["weighting"] == best["weighting"] and chosen["mode"] == best["mode"]
    assert set(table["n_val"]) == {6}


def test_selection_is_deterministic() -> None:
    student, teacher = _tiny_cnn(0), _tiny_cnn(1)
    val = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 1, 2, 0, 1])
    a, ca = select_fusion(student, BlackBox(teacher, num_classes=3), val, t, seed=2)
    b, cb = select_fusion(student, BlackBox(teacher, num_classes=3), val, t, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert ca == cb


def _per_image(methods: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for m, values in methods.items():
        for i, v in enumerate(values):
            rows.append({"method": m, "image": i, "deletion_auc": v, "insertion_auc": 1 - v,
                         "pointing": float(v < 0.3), "agrees": i % 2 == 0})
    return pd.DataFrame(rows)


def test_claim_table_pairs_and_directions() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.6, 40)
    per = _per_image({"lwcam": list(base - 0.1), "gradcam": list(base), "lwcam_selected": list(base - 0.2),
                      "rise": list(base[:10] - 0.25), "center": list(base)})
    claims = claim_table(per, seed=0)
    first = claims.iloc[0]
    assert (first.a, first.b, first.metric, first.alternative) == ("lwcam", "gradcam", "deletion_auc", "less")
    assert first.mean_diff == pytest.approx(-0.1) and first.p_value < 1e-6
    rise_del = claims[(claims.a == "lwcam_selected") & (claims.b == "rise") & (claims.metric == "deletion_auc")].iloc[0]
    assert rise_del.n == 10 and rise_del.mean_diff == pytest.approx(0.05)  # paired on RISE's images only
    assert rise_del.p_value > 0.5  # one-sided "less": lwcam_selected is worse here
    ins = claims[(claims.a == "lwcam_selected") & (claims.b == "center") & (claims.metric == "insertion_auc")].iloc[0]
    assert ins.alternative == "greater" and ins.mean_diff == pytest.approx(0.2)
    assert ((claims.b == "center") & (claims.metric == "pointing")).any()


def test_quality_vs_fidelity_rows() -> None:
    teacher = _tiny_cnn(1)
    snapshots = {1: _tiny_cnn(5), 2: _tiny_cnn(6)}
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = teacher(x).argmax(1)
    table = quality_vs_fidelity(snapshots, BlackBox(teacher, num_classes=3), x, labels, x, labels,
                                {"paper": {}, "max": {"mode": "max"}})
    assert list(table["epoch"]) == [1, 1, 2, 2] and list(table["setting"]) == ["paper", "max"] * 2
    assert table[["deletion_auc", "insertion_auc", "agreement"]].stack().between(0, 1).all()
    agree = [(m(x).argmax(1) == labels).float().mean().item() for m in snapshots.values()]
    assert table.groupby("epoch")["agreement"].first().tolist() == pytest.approx(agree)


@pytest.mark.parametrize("name", sorted(SMALL_INPUT_ARCHITECTURES))
def test_small_input_architectures_keep_an_8x8_last_map(name: str) -> None:
    from lwcam.scoring.evaluation import layer_resolutions

    model = build_model(name, num_classes=10).eval()
    res = layer_resolutions(model, 64)
    assert list(res.values())[-1] == ((16, 16) if name == "regnet_x_s4" else (8, 8))  # s4: T5's ablation
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 10)
