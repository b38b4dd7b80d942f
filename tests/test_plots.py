"""Tests of lwcam.study.plots: figure structure, labels, colour scale, saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from torch import nn

from lwcam.cam.layerwise import LayerwiseGradCAM
from lwcam.study import plots

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RED = "#d62728"


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    images = torch.randn(3, 3, 32, 32)
    lm = LayerwiseGradCAM(net, verbose=False)(images, [1, 2, 3])
    return images, lm


def _png_ok(path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_denormalize_inverts_normalisation():
    img = torch.rand(3, 8, 6)
    norm = (img - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    out = plots.denormalize(norm, MEAN, STD)
    assert out.shape == (8, 6, 3)
    np.testing.assert_allclose(out, img.permute(1, 2, 0).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="C = len"):
        plots.denormalize(torch.rand(8, 6), MEAN, STD)


def test_overlay_scales_saliency_to_fixed_0_1():
    fig = Figure()
    ax = fig.add_subplot()
    sal = torch.rand(16, 16) * 50 + 7
    handle = plots.overlay(ax, torch.randn(3, 16, 16), sal, mean=MEAN, std=STD, title="t")
    assert handle.get_clim() == (0.0, 1.0)
    arr = np.asarray(handle.get_array())
    assert arr.min() == pytest.approx(0.0) and arr.max() == pytest.approx(1.0)
    assert handle.get_alpha() == 0.5 and handle.get_cmap().name == "jet"
    assert ax.get_title() == "t"
    const = plots.overlay(ax, torch.randn(3, 16, 16), torch.full((16, 16), 3.0), mean=MEAN, std=STD)
    assert np.all(np.asarray(const.get_array()) == 0)
    assert plots.overlay(ax, torch.randn(3, 16, 16), None, mean=MEAN, std=STD) is None
    with pytest.raises(ValueError, match="differ in size"):
        plots.overlay(ax, torch.randn(3, 16, 16), torch.rand(8, 8), mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="NaN"):
        plots.overlay(ax, torch.randn(3, 16, 16), torch.full((16, 16), float("nan")), mean=MEAN, std=STD)


def test_plot_layer_maps_structure_and_disagreement(batch, tmp_path):
    images, lm = batch
    agree = torch.tensor([True, False, True])
    names = [f"c{i}" for i in range(10)]
    fig = plots.plot_layer_maps(images, lm, lm.fuse(), mean=MEAN, std=STD, labels=lm.targets, agree=agree,
                                class_names=names)
    n_layers = len(lm.names)
    assert n_layers == 3
    image_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 3 * (n_layers + 2)
    assert len(fig.axes) == len(image_axes) + 1  # one shared colour bar
    titles = [ax.get_title() for ax in image_axes[: n_layers + 2]]
    assert titles == ["input", "1\n32×32", "4\n16×16", "7\n8×8", "fused"]
    cbar = fig.axes[-1]
    assert cbar.get_ylabel() == plots.COLORBAR_LABEL == "normalised saliency (0–1)"
    assert cbar.get_ylim() == (0.0, 1.0)
    row_labels = [image_axes[r * (n_layers + 2)].get_ylabel() for r in range(3)]
    assert row_labels[0] == "c1 (1)"
    assert row_labels[1] == f"c2 (2)\n{plots.DISAGREE_LABEL}"
    assert plots.DISAGREE_LABEL not in row_labels[0] + row_labels[2]
    label_color = to_hex(image_axes[n_layers + 2].yaxis.label.get_color())
    assert label_color == RED
    assert to_hex(image_axes[0].yaxis.label.get_color()) != RED
    disagree_spines = {to_hex(s.get_edgecolor()) for ax in image_axes[n_layers + 2: 2 * (n_layers + 2)]
                       for s in ax.spines.values()}
    agree_spines = {to_hex(s.get_edgecolor()) for ax in image_axes[: n_layers + 2] for s in ax.spines.values()}
    assert disagree_spines == {RED} and RED not in agree_spines
    path = plots.save_figure(fig, tmp_path / "F2_layer_maps.png")
    _png_ok(path)


def test_plot_layer_maps_from_dict_of_native_maps_and_subset(batch, tmp_path):
    images, lm = batch
    fig = plots.plot_layer_maps(images, dict(lm.raw), lm.fuse(), mean=MEAN, std=STD, layer_names=["7", "1"])
    image_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 3 * 4
    assert [ax.get_title() for ax in image_axes[:4]] == ["input", "7\n8×8", "1\n32×32", "fused"]
    assert all(ax.get_ylabel() == "" for ax in image_axes)  # no labels given
    with pytest.raises(ValueError, match="unknown layer names"):
        plots.plot_layer_maps(images, lm, lm.fuse(), mean=MEAN, std=STD, layer_names=["nope"])
    with pytest.raises(ValueError, match="maps of 'fused'"):
        plots.plot_layer_maps(images, lm, lm.fuse()[:2], mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="agree has 2 entries"):
        plots.plot_layer_maps(images, lm, lm.fuse(), mean=MEAN, std=STD, agree=[True, False])
    _png_ok(plots.save_figure(fig, tmp_path / "f2_dict.png"))


def test_plot_method_grid(batch, tmp_path):
    images, lm = batch
    sal = {"lwcam": lm.fuse(), "Grad-CAM (last)": lm.maps["7"], "random": torch.rand(3, 32, 32)}
    fig = plots.plot_method_grid(images, sal, mean=MEAN, std=STD, labels=[1, 2, 3], agree=[True, True, False])
    image_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 3 * 4 and len(fig.axes) == 13
    assert [ax.get_title() for ax in image_axes[:4]] == ["input", "lwcam", "Grad-CAM (last)", "random"]
    assert all(ax.get_title() == "" for ax in image_axes[4:])  # titles on the first row only
    assert image_axes[8].get_ylabel() == f"class 3\n{plots.DISAGREE_LABEL}"
    with pytest.raises(ValueError, match="empty"):
        plots.plot_method_grid(images, {}, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"must be \(3,32,32\)"):
        plots.plot_method_grid(images, {"x": torch.rand(3, 16, 16)}, mean=MEAN, std=STD)
    _png_ok(plots.save_figure(fig, tmp_path / "F3_methods.png"))


def test_plot_game_curves_mean_band_and_auc(tmp_path):
    g = torch.Generator().manual_seed(0)
    fr = torch.linspace(0, 1, 33)
    a = torch.exp(-4 * fr)[None] * (0.5 + 0.5 * torch.rand(12, 1, generator=g))
    b = torch.exp(-1 * fr)[None] * (0.5 + 0.5 * torch.rand(12, 1, generator=g))
    fig = plots.plot_game_curves(fr, {"a": a, "b": b}, title="deletion")
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 2
    np.testing.assert_allclose(lines[0].get_ydata(), a.mean(0).numpy(), rtol=1e-6)
    assert len(ax.collections) == 2  # one shaded band per method
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    auc_a = float(((a.sum(1) - a[:, 0] / 2 - a[:, -1] / 2) / 32).mean())
    assert legend[0] == f"a (AUC {auc_a:.3f})"
    assert ax.get_xlabel() == "fraction of pixels deleted" and ax.get_title() == "deletion"
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() < float(a.mean(0).min()) and band.max() > float(a.mean(0).max())
    lo, hi = ax.get_ylim()
    assert lo == 0.0 and hi >= 1.0
    _png_ok(plots.save_figure(fig, tmp_path / "curve.png"))
    with pytest.raises(ValueError, match=r"must be \(B, 33\)"):
        plots.plot_game_curves(fr, {"a": a[:, :10]})


def test_plot_deletion_insertion_two_panels(tmp_path):
    fr = np.linspace(0, 1, 17)
    curves = {"m": np.tile(np.linspace(1, 0, 17), (5, 1)) + 0.01 * np.arange(5)[:, None]}
    fig = plots.plot_deletion_insertion(fr, curves, {"m": 1 - curves["m"]}, suptitle="F5")
    assert [ax.get_title() for ax in fig.axes] == ["deletion (lower AUC is better)", "insertion (higher AUC is better)"]
    assert fig.axes[1].get_xlabel() == "fraction of pixels inserted"
    _png_ok(plots.save_figure(fig, tmp_path / "F5_curves.png"))


def test_doctests():
    import doctest

    assert doctest.testmod(plots).failed == 0


def test_show_figure_saves_closes_and_displays_the_png_as_saved(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from IPython import display as ipd

    from lwcam.study import pipeline

    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "params").mkdir()
    paths = pipeline.RunPaths.for_profile("tiny", tmp_path)
    shown = []
    monkeypatch.setattr(ipd, "display", lambda obj: shown.append(obj))
    fig = plt.figure()
    fig.gca().plot([0, 1], [1, 0])
    assert pipeline.show_figure(fig, "F0_line", paths) is None  # nothing for a notebook cell to echo
    png = (tmp_path / "figures" / "tiny" / "F0_line.png").read_bytes()
    assert [type(o) for o in shown] == [ipd.Image] and shown[0].data == png
    assert not plt.fignum_exists(fig.number)
