"""Tests of lwcam.cam.fusion: the fusion formulas, normalisation and error handling."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

import lwcam.cam.fusion as fusion
from lwcam.cam.fusion import fuse, minmax_normalize
from lwcam.cam.maps import LayerMaps


def _maps(seed: int = 0, b: int = 3, n_layers: int = 4, h: int = 6, w: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # different ranges per layer, as real Grad-CAM maps of different depths have
    return [torch.rand(b, h, w, generator=g) * (10.0 ** i) for i in range(n_layers)]


def _np_minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    return np.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)


def _layer_maps(maps: list[torch.Tensor]) -> LayerMaps:
    names = [f"layer{i}" for i in range(len(maps))]
    b = maps[0].shape[0]
    return LayerMaps(names=names, raw=dict(zip(names, maps, strict=True)), maps=dict(zip(names, maps, strict=True)),
                     targets=torch.zeros(b, dtype=torch.long), logits=torch.zeros(b, 10),
                     probs=torch.full((b,), 0.1), student_pred=torch.zeros(b, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# minmax_normalize
# ---------------------------------------------------------------------------------------------
def test_minmax_per_image_and_layer():
    x = torch.stack([torch.arange(6.0).reshape(2, 3), 10 + 5 * torch.arange(6.0).reshape(2, 3)])
    out = minmax_normalize(x)
    expected = torch.arange(6.0).reshape(2, 3) / 5
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[1], expected)
    y = torch.randn(2, 3, 4, 5)
    out = minmax_normalize(y)
    for b in range(2):
        for layer in range(3):
            np.testing.assert_allclose(out[b, layer].numpy(), _np_minmax(y[b, layer].numpy()), rtol=1e-6, atol=1e-7)
    assert out.amin(dim=(-2, -1)).eq(0).all() and out.amax(dim=(-2, -1)).eq(1).all()


def test_minmax_constant_maps_are_zeros_never_nan():
    for value in (0.0, 3.5, -2.0, 1e-30):
        out = minmax_normalize(torch.full((2, 4, 4), value))
        assert torch.equal(out, torch.zeros(2, 4, 4))
    mixed = torch.stack([torch.full((3, 3), 7.0), torch.eye(3)])
    out = minmax_normalize(mixed)
    assert torch.equal(out[0], torch.zeros(3, 3)) and torch.equal(out[1], torch.eye(3))
    tiny = torch.tensor([[0.0, 1e-38], [0.0, 0.0]])  # a denormal range must not overflow
    assert torch.isfinite(minmax_normalize(tiny)).all()


def test_minmax_errors_and_int_input():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        minmax_normalize(torch.ones(4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        minmax_normalize(torch.tensor([[0.0, float("nan")]]))
    out = minmax_normalize(torch.tensor([[0, 2], [4, 8]]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.25], [0.5, 1.0]]))


# ---------------------------------------------------------------------------------------------
# fuse: formulas
# ---------------------------------------------------------------------------------------------
def test_default_is_minmax_each_then_sum_then_minmax():
    maps = _maps()
    out = fuse(maps)
    arr = [m.numpy() for m in maps]
    for b in range(3):
        expected = _np_minmax(sum(_np_minmax(a[b]) for a in arr))
        np.testing.assert_allclose(out[b].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert out.shape == (3, 6, 5) and out.dtype == torch.float32
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    # the per-layer normalisation matters: without it the largest layer dominates
    dominated = minmax_normalize(maps[-1])
    assert not torch.allclose(out, dominated, atol=1e-3)


def test_normalize_none_is_raw_sum():
    maps = _maps()
    out = fuse(maps, normalize="none")
    torch.testing.assert_close(out, maps[0] + maps[1] + maps[2] + maps[3])
    assert float(out.max()) > 100  # not normalised
    torch.testing.assert_close(fuse(maps, mode="mean", normalize="none"), sum(maps) / 4)
    torch.testing.assert_close(fuse(maps, mode="max", normalize="none"), torch.stack(maps).amax(0))


def test_mean_equals_sum_once_normalised_and_max_formula():
    maps = _maps(1)
    torch.testing.assert_close(fuse(maps, mode="mean"), fuse(maps, mode="sum"))
    expected = minmax_normalize(minmax_normalize(torch.stack(maps, 1)).amax(1))
    torch.testing.assert_close(fuse(maps, mode="max"), expected)
    assert not torch.allclose(fuse(maps, mode="max"), fuse(maps, mode="sum"), atol=1e-3)


def test_weighted():
    maps = _maps(2)
    norm = [minmax_normalize(m) for m in maps]
    w = [0.5, 0.0, 2.0, 1.0]
    expected = minmax_normalize(0.5 * norm[0] + 2.0 * norm[2] + 1.0 * norm[3])
    torch.testing.assert_close(fuse(maps, mode="weighted", weights=w), expected)
    torch.testing.assert_close(fuse(maps, mode="weighted", weights=torch.tensor(w)), expected)
    torch.testing.assert_close(fuse(maps, mode="weighted", weights=np.array(w)), expected)
    # one non-zero weight selects that layer
    torch.testing.assert_close(fuse(maps, mode="weighted", weights=[0, 0, 3, 0]), norm[2])
    # equal weights = sum
    torch.testing.assert_close(fuse(maps, mode="weighted", weights=[2, 2, 2, 2]), fuse(maps))
    raw = fuse(maps, mode="weighted", normalize="none", weights=w)
    torch.testing.assert_close(raw, 0.5 * maps[0] + 2.0 * maps[2] + maps[3])
    named = {f"layer{i}": m for i, m in enumerate(maps)}
    by_name = fuse(named, mode="weighted", weights={"layer3": 1.0, "layer0": 0.5, "layer2": 2.0, "layer1": 0.0})
    torch.testing.assert_close(by_name, expected)


def test_weighted_by_name_missing_layers_weigh_zero():
    maps = _maps(5)
    named = {f"layer{i}": m for i, m in enumerate(maps)}
    norm = [minmax_normalize(m) for m in maps]
    # layer1 and layer3 are left out: the same as weights 0, i.e. the subset {layer0, layer2}
    out = fuse(named, mode="weighted", weights={"layer2": 3.0, "layer0": 1.0})
    torch.testing.assert_close(out, minmax_normalize(norm[0] + 3.0 * norm[2]))
    torch.testing.assert_close(out, fuse(maps, mode="weighted", weights=[1, 0, 3, 0]))
    torch.testing.assert_close(out, fuse(_layer_maps(maps), mode="weighted", weights={"layer0": 1, "layer2": 3}))
    # a single named layer is that layer's normalised map
    torch.testing.assert_close(fuse(named, mode="weighted", weights={"layer3": 0.5}), norm[3])
    raw = fuse(named, mode="weighted", normalize="none", weights={"layer1": 2.0})
    torch.testing.assert_close(raw, 2.0 * maps[1])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, 1.0, 1.0], r"got 3 weights for 4 layer maps \(weights needs one per layer\)"),
        ([1.0] * 5, "got 5 weights for 4 layer maps"),
        ([], "got 0 weights for 4 layer maps"),
        ([[1.0, 1.0], [1.0, 1.0]], r"weights must be 1-D.*\(2, 2\)"),
        (2.0, r"weights must be 1-D.*\(\)"),
        ([1.0, -0.5, 1.0, 1.0], r"weights must be >= 0, got \[1.0, -0.5, 1.0, 1.0\]"),
        ([1.0, float("nan"), 1.0, 1.0], r"weights must be finite \(no NaN or inf\)"),
        ([1.0, float("inf"), 1.0, 1.0], r"weights must be finite \(no NaN or inf\)"),
        ([1.0, float("-inf"), 1.0, 1.0], r"weights must be finite"),
        ([0.0, 0.0, 0.0, 0.0], "weights are all zero"),
        (torch.tensor([0.0, float("nan"), 0.0, 1.0]), "weights must be finite"),
        (np.array([1.0, 1.0]), "got 2 weights for 4 layer maps"),
        ({"layer0": -1.0}, "weights must be >= 0"),
        ({"layer0": float("inf")}, "weights must be finite"),
        ({"layer0": 0.0, "layer1": 0.0}, "weights are all zero"),
        ({"layer9": 1.0}, r"weights name unknown layers \['layer9'\]"),
    ],
)
def test_weighted_rejects_bad_weights(weights, message):
    named = {f"layer{i}": m for i, m in enumerate(_maps(6))}
    maps = named if isinstance(weights, dict) else list(named.values())
    with pytest.raises(ValueError, match=message):
        fuse(maps, mode="weighted", weights=weights)
    # the same check guards LayerMaps.fuse
    with pytest.raises(ValueError, match="weights"):
        _layer_maps(list(named.values())).fuse(mode="weighted", weights=weights)


@pytest.mark.parametrize("weights", ["1,1,1,1", [1, "a", 1, 1], torch.tensor([True, True, False, True]),
                                     [1j, 1, 1, 1]])
def test_weighted_rejects_non_numeric_weights(weights):
    with pytest.raises(TypeError, match="weights must be"):
        fuse(_maps(7), mode="weighted", weights=weights)


def test_input_forms_agree():
    maps = _maps(3)
    ref = fuse(maps)
    torch.testing.assert_close(fuse(tuple(maps)), ref)
    torch.testing.assert_close(fuse(torch.stack(maps, dim=1)), ref)
    torch.testing.assert_close(fuse({f"layer{i}": m for i, m in enumerate(maps)}), ref)
    lm = _layer_maps(maps)
    torch.testing.assert_close(fuse(lm), ref)
    torch.testing.assert_close(lm.fuse(mode="weighted", weights={n: 1.0 for n in lm.names}), ref)
    torch.testing.assert_close(fuse([m.numpy() for m in maps]), ref)
    torch.testing.assert_close(fuse(torch.stack(maps, 1).double()), ref)  # float32 output
    single = fuse([maps[1]])
    torch.testing.assert_close(single, minmax_normalize(maps[1]))


def test_constant_and_zero_maps_never_nan():
    zeros = [torch.zeros(2, 4, 4) for _ in range(3)]
    for mode in ("sum", "mean", "max"):
        out = fuse(zeros, mode=mode)
        assert torch.equal(out, torch.zeros(2, 4, 4))
    assert torch.equal(fuse(zeros, mode="weighted", weights=[1, 2, 3]), torch.zeros(2, 4, 4))
    # one constant layer contributes nothing; the others still show
    maps = [torch.full((1, 3, 3), 5.0), torch.eye(3)[None]]
    torch.testing.assert_close(fuse(maps), torch.eye(3)[None])


def test_negative_maps_are_allowed():
    maps = [torch.tensor([[[-1.0, 0.0], [1.0, 3.0]]]), torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])]
    out = fuse(maps)
    # (-1,0,1,3) -> (0,.25,.5,1); (0,0,0,1) stays; sum (0,.25,.5,2) -> (0,.125,.25,1)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.125], [0.25, 1.0]]]))


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_errors():
    maps = _maps(4)
    with pytest.raises(ValueError, match=r"unknown fusion mode 'median'"):
        fuse(maps, mode="median")
    with pytest.raises(ValueError, match=r"unknown normalize 'zscore'"):
        fuse(maps, normalize="zscore")
    with pytest.raises(ValueError, match="needs weights"):
        fuse(maps, mode="weighted")
    with pytest.raises(ValueError, match="got 3 weights for 4 layer maps"):
        fuse(maps, mode="weighted", weights=[1, 1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        fuse(maps, mode="weighted", weights=[1, -1, 1, 1])
    with pytest.raises(ValueError, match="finite"):
        fuse(maps, mode="weighted", weights=[1, float("nan"), 1, 1])
    with pytest.raises(ValueError, match="at least one weight must be positive"):
        fuse(maps, mode="weighted", weights=[0, 0, 0, 0])
    with pytest.raises(ValueError, match="only used by mode='weighted'"):
        fuse(maps, weights=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="need named maps"):
        fuse(maps, mode="weighted", weights={"a": 1.0})
    named = {f"layer{i}": m for i, m in enumerate(maps)}
    with pytest.raises(ValueError, match=r"weights name unknown layers \['bogus'\]"):
        fuse(named, mode="weighted", weights={"layer0": 1, "layer1": 1, "layer2": 1, "bogus": 1})
    with pytest.raises(ValueError, match="mismatched shapes"):
        fuse([torch.rand(2, 4, 4), torch.rand(2, 8, 8)])
    with pytest.raises(ValueError, match="mismatched shapes"):
        fuse([torch.rand(2, 4, 4), torch.rand(3, 4, 4)])
    with pytest.raises(ValueError, match=r"must be \(B,H,W\)"):
        fuse([torch.rand(4, 4)])
    with pytest.raises(ValueError, match=r"\(B,L,H,W\)"):
        fuse(torch.rand(2, 4, 4))
    bad = [m.clone() for m in maps]
    bad[2][0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="#2 contains NaN"):
        fuse(bad)
    with pytest.raises(ValueError, match="layer1 contains NaN"):
        fuse({"layer0": maps[0], "layer1": torch.full_like(maps[1], float("inf"))})
    with pytest.raises(ValueError, match="no maps"):
        fuse([])
    with pytest.raises(TypeError, match="LayerMaps"):
        fuse("maps")


def test_doctests():
    assert doctest.testmod(fusion).failed == 0
