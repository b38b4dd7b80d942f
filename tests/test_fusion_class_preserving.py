"""Tests of the class-preserving fusion modes (deep_gated, product, polycam, recursive): hand-made
cases with known answers, the Poly-CAM reference formula, mass preservation, two-object scenes,
extreme and constant maps, and the refusal of bad options."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcam.cam.recursive as fusion_recursive
from lwcam._ops import area_resize
from lwcam.cam.batched import explain_lwcam, raw_layer_maps
from lwcam.cam.fusion import CLASS_PRESERVING_MODES, MODES, fuse, minmax_normalize
from lwcam.cam.maps import LayerMaps
from lwcam.cam.recursive import refine

MODE_IDS = list(CLASS_PRESERVING_MODES)


def _pyramid(seed: int, b: int = 3, sizes: tuple[int, ...] = (16, 8, 4, 2), sparse: bool = True) -> list[torch.Tensor]:
    """Random non-negative maps shallow (fine) to deep (coarse), with zeros as ReLU'd CAMs have."""
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(b, s, s, generator=g) * (3.0 ** i) for i, s in enumerate(sizes)]
    return [torch.relu(m) if sparse else m.abs() for m in maps]


def _layer_maps(raw: list[torch.Tensor], size: tuple[int, int]) -> LayerMaps:
    names = [f"layer{i}" for i in range(len(raw))]
    ups = [F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for m in raw]
    b = raw[0].shape[0]
    return LayerMaps(names=names, raw=dict(zip(names, raw, strict=True)), maps=dict(zip(names, ups, strict=True)),
                     targets=torch.zeros(b, dtype=torch.long), logits=torch.zeros(b, 10),
                     probs=torch.full((b,), 0.1), student_pred=torch.zeros(b, dtype=torch.long))


def test_modes_are_exposed():
    assert CLASS_PRESERVING_MODES == ("deep_gated", "product", "polycam", "recursive")
    assert MODES[:4] == ("sum", "mean", "max", "weighted") and set(CLASS_PRESERVING_MODES) < set(MODES)


# ---------------------------------------------------------------------------------------------
# hand-made cases, known answers
# ---------------------------------------------------------------------------------------------
def test_deep_gated_hand_made():
    shallow = torch.arange(16.0).reshape(1, 4, 4) / 15  # already in [0, 1]
    deep = torch.tensor([[[3.0, 1.0], [1.0, 2.0]]])  # min-max: [[1, 0], [0, 0.5]], nearest to 4x4
    # product: top-left block x1, bottom-right block x0.5 -> max 7.5/15, so divide by 7.5/15
    expected = torch.tensor([[[0.0, 1.0, 0.0, 0.0], [4.0, 5.0, 0.0, 0.0],
                              [0.0, 0.0, 5.0, 5.5], [0.0, 0.0, 7.0, 7.5]]]) / 7.5
    torch.testing.assert_close(fuse([shallow, deep], mode="deep_gated"), expected)
    # two shallow maps are summed (each min-max normalised) before the gate
    torch.testing.assert_close(fuse([shallow, 2 * shallow + 1, deep], mode="deep_gated"), expected)
    # one map alone: its min-max, nearest-upsampled
    torch.testing.assert_close(fuse([deep], mode="deep_gated", size=(4, 4))[0, :, 1],
                               torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_product_hand_made():
    a = torch.tensor([[[0.0, 2.0], [1.0, 2.0]]])  # min-max [[0, 1], [0.5, 1]]
    d = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    f = [[math.sqrt(0.05 * 1.0), math.sqrt(1.0 * 0.05)], [math.sqrt(0.525 * 1.0), 1.0]]  # ε=0.05: ε + (1-ε)m
    lo = math.sqrt(0.05)
    expected = (torch.tensor([f], dtype=torch.float64) - lo) / (1.0 - lo)
    torch.testing.assert_close(fuse([a, d], mode="product"), expected.float())
    # eps=0.36: factors 0.36 or 1 -> geometric means 0.6 and 1; (0.68 · 1)^(1/2) at the 0.5 pixel
    expected = (torch.tensor([[[0.6, 0.6], [math.sqrt(0.68), 1.0]]], dtype=torch.float64) - 0.6) / 0.4
    torch.testing.assert_close(fuse([a, d], mode="product", eps=0.36), expected.float())


def test_product_floor_keeps_a_small_object_one_map_misses():
    deep = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    layer1 = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # misses the object at (0, 1)
    layer2 = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    out = fuse([layer1, layer2, deep], mode="product")
    assert out[0, 0, 0] == 1.0 and out[0, 1, 0] == 0.0
    assert out[0, 0, 1] > 0.3  # (0.05 · 1 · 1)^(1/3) = 0.37 before the min-max: not erased
    plain = fuse([layer1, layer2, deep], mode="product", eps=1e-9)
    assert plain[0, 0, 1] < 1e-3  # without a floor one zero all but erases it


def test_polycam_hand_made():
    deep = torch.tensor([[[4.0, 0.0], [0.0, 0.0]]])
    shallow = torch.ones(1, 4, 4)
    shallow[0, :2, :2] = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # every 2x2 block averages 1: LNorm(S) = S
    # bilinear 2x2 -> 4x4 (align_corners=False) takes rows/columns (1, .75, .25, 0) of the top-left cell
    r = torch.tensor([1.0, 0.75, 0.25, 0.0])
    up = 4.0 * torch.outer(r, r)
    torch.testing.assert_close(up[1, 1], torch.tensor(2.25))
    expected = torch.tensor([[[8.0, 0.0, 1.0, 0.0], [0.0, 4.5, 0.75, 0.0],
                              [1.0, 0.75, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]]]) / 8.0
    torch.testing.assert_close(shallow * up / 8.0, expected)  # the hand computation
    torch.testing.assert_close(fuse([shallow, deep], mode="polycam"), expected)


@pytest.mark.parametrize(("alpha", "top_left", "peak"), [
    (0.5, [[8.0, 4.0], [2.0, 2.0]], 8.0),     # 4 · (0.5 + 0.5 · N), N = (3, 1, 0, 0)
    (None, [[11.2, 4.0], [0.4, 0.4]], 11.2),  # default α = 0.1: 4 · (0.1 + 0.9 · N)
    (0.0, [[12.0, 4.0], [0.0, 0.0]], 12.0),
    (1.0, [[4.0, 4.0], [4.0, 4.0]], 4.0),     # the deep map, nearest-upsampled
])
def test_recursive_hand_made(alpha, top_left, peak):
    deep = torch.tensor([[[4.0, 0.0], [0.0, 2.0]]])
    shallow = torch.full((1, 4, 4), 5.0)
    shallow[0, :2, :2] = torch.tensor([[3.0, 1.0], [0.0, 0.0]])  # block mean 1: N = S / 1
    shallow[0, 2:, 2:] = 0.0  # an empty block: N = 1, the deep cell stays flat
    expected = torch.zeros(1, 4, 4, dtype=torch.float64)
    expected[0, :2, :2] = torch.tensor(top_left, dtype=torch.float64)
    expected[0, 2:, 2:] = 2.0
    out = fuse([shallow, deep], mode="recursive", alpha=alpha)
    torch.testing.assert_close(out, (expected / peak).float())
    # unnormalised, the chain keeps each deep cell's mass: block means = the deep map
    chain = refine([shallow, deep], "recursive", 0.1 if alpha is None else alpha)
    torch.testing.assert_close(chain[-1], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(area_resize(chain[-1], (2, 2)), deep.double(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Poly-CAM: the reference code's formula (github aenglebert/polycam, polycam/core.py, compute_cams)
# ---------------------------------------------------------------------------------------------
def _reference_local_normalization(input_tensor: torch.Tensor, norm_size) -> torch.Tensor:
    """The reference's local_relevance_normalization, restated: bilinear down, bilinear up, floor 1e-12."""
    norm_factor = F.interpolate(input_tensor, norm_size, mode="bilinear")
    norm_factor = F.interpolate(norm_factor, input_tensor.shape[-2:], mode="bilinear")
    norm_factor = torch.maximum(norm_factor, torch.tensor(1e-12, dtype=input_tensor.dtype))
    return input_tensor / norm_factor


def _reference_polycam(cams_shallow_to_deep: list[torch.Tensor]) -> torch.Tensor:
    """The reference's compute_cams loop on given per-layer CAMs (B,1,h,w): the last running map, unnormalised."""
    prev_cam = None
    for activation_map in reversed(cams_shallow_to_deep):
        activation_map = torch.relu(activation_map)
        if prev_cam is None:
            prev_cam = activation_map
        else:
            activation_map = _reference_local_normalization(activation_map, prev_cam.shape[-2:])
            prev_cam = activation_map * F.interpolate(prev_cam, activation_map.shape[-2:], mode="bilinear")
        prev_cam = torch.relu(prev_cam)
    assert prev_cam is not None
    return prev_cam


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_polycam_matches_the_reference_formula(seed):
    maps = _pyramid(seed)  # 16 -> 8 -> 4 -> 2, ReLU'd random maps of different scales
    ref = _reference_polycam([m.double()[:, None] for m in maps])[:, 0]
    chain = refine(maps, "polycam")
    assert [tuple(p.shape[-2:]) for p in chain] == [(2, 2), (4, 4), (8, 8), (16, 16)]
    torch.testing.assert_close(chain[-1], ref, rtol=1e-12, atol=1e-12 * float(ref.max()))
    out = fuse(maps, mode="polycam")  # default size: the finest map's, 16x16
    torch.testing.assert_close(out, minmax_normalize(ref).float(), rtol=1e-6, atol=1e-6)
    # upsampled to the input size like the reference's last map (bilinear), then min-max
    out64 = fuse(maps, mode="polycam", size=(64, 64))
    up = F.interpolate(ref[:, None], (64, 64), mode="bilinear")[:, 0]
    torch.testing.assert_close(out64, minmax_normalize(up).float(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# mass preservation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3, 1.0])
def test_recursive_keeps_each_deep_cells_mass(alpha):
    maps = _pyramid(3)
    chain = refine(maps, "recursive", alpha)
    for coarse, fine in zip(chain, chain[1:], strict=False):
        k = fine.shape[-1] // coarse.shape[-1]
        pooled = F.avg_pool2d(fine[:, None], k)[:, 0]
        torch.testing.assert_close(pooled, coarse, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(F.avg_pool2d(chain[-1][:, None], 8)[:, 0], chain[0], rtol=1e-12, atol=1e-15)


def test_recursive_targeted_mass_equals_the_deep_maps():
    maps = _pyramid(4)
    for m in (maps[-1],):
        m[:, 1, 1] = 0.0  # a zero deep cell: the fused map's minimum is 0, so min-max is a pure rescale
    out = fuse(maps, mode="recursive").double()
    deep = maps[-1].double()
    for b in range(3):
        for i in range(2):
            for j in range(2):
                region = out[b, 8 * i : 8 * (i + 1), 8 * j : 8 * (j + 1)].sum() / out[b].sum()
                torch.testing.assert_close(region, deep[b, i, j] / deep[b].sum(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sizes", [(10, 3), (64, 7), (64, 20, 7)])
def test_recursive_mass_with_non_integer_ratios(sizes):
    maps = _pyramid(5, sizes=sizes)
    chain = refine(maps, "recursive", 0.1)
    # exact on the blocks that nearest upsampling fills from each cell (not an adaptive pool's
    # overlapping bins, under which it holds only approximately)
    for coarse, fine in zip(chain, chain[1:], strict=False):
        torch.testing.assert_close(area_resize(fine, tuple(coarse.shape[-2:])), coarse, rtol=1e-12, atol=1e-15)
    out = fuse(maps, mode="recursive", size=(9, 9))  # shrinking takes block means: still finite, in [0, 1]
    assert out.shape == (3, 9, 9) and float(out.min()) == 0.0 and float(out.max()) == 1.0


# ---------------------------------------------------------------------------------------------
# two objects: a class-blind shallow map
# ---------------------------------------------------------------------------------------------
def _two_objects() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """8x8 scene, object A top-left (the class), B bottom-right; shallow maps light both, the 2x2 deep map A's cell."""
    s1 = torch.zeros(1, 8, 8)
    s1[0, :2, :2] = 1.0
    s1[0, 6:, 6:] = 1.0
    s2 = torch.zeros(1, 4, 4)
    s2[0, 0, 0] = s2[0, 3, 3] = 1.0
    deep = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    a = torch.zeros(8, 8, dtype=torch.bool)
    a[:2, :2] = True
    b = torch.zeros(8, 8, dtype=torch.bool)
    b[6:, 6:] = True
    return [s1, s2, deep], a, b


def test_a_class_blind_shallow_map_cannot_move_mass_to_the_other_object():
    maps, a, b = _two_objects()
    lm = _layer_maps(maps, (8, 8))
    summed = lm.fuse()  # the paper's sum of upsampled maps: B lights up
    assert float(summed[0][b].max()) >= 0.5
    quadrant_b = torch.zeros(8, 8, dtype=torch.bool)
    quadrant_b[4:, 4:] = True  # B's deep cell
    for mode in ("deep_gated", "polycam", "recursive"):
        out = lm.fuse(mode=mode)
        assert out.shape == (1, 8, 8), mode
        assert float(out[0][a].max()) == 1.0, mode
        assert float(out[0][quadrant_b].sum()) == 0.0, mode
    product = lm.fuse(mode="product")
    assert float(product[0][b].max()) < float(product[0][a].min())  # ranked below A, not erased


def test_gate_replaces_the_deepest_map():
    maps = _pyramid(6)
    gate = _pyramid(7, sizes=(2,))[0]
    for mode in CLASS_PRESERVING_MODES:
        torch.testing.assert_close(fuse(maps, mode=mode, gate=gate), fuse([*maps[:-1], gate], mode=mode))
    # a gate at another resolution than the deepest map: Grad-CAM's last layer over LayerCAM's 4x4
    coarse = fuse(maps[:3], mode="recursive", gate=gate, size=16)
    torch.testing.assert_close(area_resize(coarse.double(), (2, 2)) / area_resize(coarse.double(), (2, 2)).amax(
        dim=(1, 2), keepdim=True), gate.double() / gate.double().amax(dim=(1, 2), keepdim=True))


# ---------------------------------------------------------------------------------------------
# inputs, sizes, extreme and constant maps
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODE_IDS)
def test_input_forms_and_default_size(mode):
    maps = _pyramid(8)
    ref = fuse(maps, mode=mode)
    assert ref.shape == (3, 16, 16) and ref.dtype == torch.float32  # the finest map's size
    torch.testing.assert_close(fuse(tuple(maps), mode=mode), ref)
    torch.testing.assert_close(fuse({f"l{i}": m for i, m in enumerate(maps)}, mode=mode), ref)
    torch.testing.assert_close(fuse([m.double() for m in maps], mode=mode), ref)
    lm = _layer_maps(maps, (32, 32))  # a LayerMaps: its raw maps, at its input size
    assert lm.fuse(mode=mode).shape == (3, 32, 32)
    torch.testing.assert_close(lm.fuse(mode=mode), fuse(maps, mode=mode, size=(32, 32)))
    torch.testing.assert_close(fuse(maps, mode=mode, size=16), ref)
    assert fuse(maps, mode=mode, size=(12, 20)).shape == (3, 12, 20)
    same = torch.stack([F.interpolate(m[:, None], (4, 4), mode="area")[:, 0] for m in maps], 1)
    assert fuse(same, mode=mode).shape == (3, 4, 4)  # a (B,L,H,W) tensor: equal resolutions


@pytest.mark.parametrize("mode", MODE_IDS)
def test_extreme_values_give_finite_results(mode):
    maps = _pyramid(9, sparse=False)
    huge = [m / m.amax(dim=(1, 2), keepdim=True) * 3.0e38 for m in maps]
    out = fuse(huge, mode=mode)
    assert torch.isfinite(out).all() and float(out.min()) == 0.0 and float(out.max()) == 1.0
    # every mode is scale-free per map (Poly-CAM's floor applies relative to each map's peak)
    torch.testing.assert_close(out, fuse(maps, mode=mode), rtol=1e-5, atol=1e-5)
    signed = [torch.where(m > m.median(), m, -m) for m in huge]  # -3e38 .. 3e38
    out = fuse(signed, mode=mode, gate=huge[-1])
    assert torch.isfinite(out).all() and 0.0 <= float(out.min()) <= float(out.max()) <= 1.0
    tiny = [m * 1e-38 for m in maps]  # down to denormals
    assert torch.isfinite(fuse(tiny, mode=mode)).all()


@pytest.mark.parametrize("mode", MODE_IDS)
def test_constant_maps_give_zeros(mode):
    for value in (0.0, 5.0):
        maps = [torch.full((2, 8, 8), value), torch.full((2, 4, 4), value), torch.full((2, 2, 2), value)]
        out = fuse(maps, mode=mode)
        assert torch.equal(out, torch.zeros(2, 8, 8)), (mode, value)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"mode": "deep_gated", "size": 0}, ValueError, r"size must be a positive int or a pair \(H, W\)"),
    ({"mode": "deep_gated", "size": (0, 4)}, ValueError, "size must be"),
    ({"mode": "product", "size": (4,)}, ValueError, "size must be"),
    ({"mode": "polycam", "size": "16"}, ValueError, "size must be"),
    ({"mode": "recursive", "size": (4.0, 4)}, ValueError, "size must be"),
    ({"mode": "recursive", "size": True}, ValueError, "size must be"),
    ({"mode": "deep_gated", "gate": torch.rand(3, 2, 2)}, ValueError, r"gate must be a \(B,h,w\) tensor with B=2"),
    ({"mode": "polycam", "gate": torch.rand(2, 2)}, ValueError, r"gate must be a \(B,h,w\) tensor"),
    ({"mode": "recursive", "gate": torch.full((2, 2, 2), float("nan"))}, ValueError, "gate contains NaN"),
    ({"mode": "product", "gate": torch.ones(2, 2, 2, dtype=torch.complex64)}, TypeError, "gate must be real"),
    ({"mode": "product", "gate": "gate"}, TypeError, r"gate must be a \(B,h,w\) tensor"),
    ({"mode": "product", "eps": 0.0}, ValueError, r"eps must be a number in \(0, 1\), got 0.0"),
    ({"mode": "product", "eps": 1.0}, ValueError, r"eps must be a number in \(0, 1\)"),
    ({"mode": "product", "eps": -0.1}, ValueError, "eps must be"),
    ({"mode": "product", "eps": float("nan")}, ValueError, "eps must be"),
    ({"mode": "product", "eps": "0.1"}, ValueError, "eps must be"),
    ({"mode": "recursive", "alpha": -0.1}, ValueError, r"alpha must be a number in \[0, 1\], got -0.1"),
    ({"mode": "recursive", "alpha": 1.5}, ValueError, r"alpha must be a number in \[0, 1\]"),
    ({"mode": "recursive", "alpha": float("inf")}, ValueError, "alpha must be"),
    ({"mode": "sum", "size": (8, 8)}, ValueError, r"size is only used by the class-preserving modes .*not mode='sum'"),
    ({"mode": "max", "gate": torch.rand(2, 2, 2)}, ValueError, r"gate is only used by the class-preserving modes"),
    ({"mode": "deep_gated", "eps": 0.1}, ValueError, r"eps is only used by mode='product', not mode='deep_gated'"),
    ({"mode": "polycam", "alpha": 0.1}, ValueError, r"alpha is only used by mode='recursive', not mode='polycam'"),
    ({"mode": "weighted", "weights": [1, 1, 1], "eps": 0.1}, ValueError, "eps is only used by mode='product'"),
    ({"mode": "product", "weights": [1, 1, 1]}, ValueError, r"weights are only used by mode='weighted'"),
    ({"mode": "recursive", "normalize": "none"}, ValueError, r"mode='recursive' always min-max normalises"),
])
def test_bad_options_are_refused_by_name(kwargs, error, message):
    maps = [torch.rand(2, 8, 8), torch.rand(2, 4, 4), torch.rand(2, 2, 2)]
    if kwargs["mode"] in ("sum", "max", "weighted"):
        maps = [torch.rand(2, 8, 8) for _ in range(3)]
    with pytest.raises(error, match=message):
        fuse(maps, **kwargs)


@pytest.mark.parametrize("mode", MODE_IDS)
def test_bad_maps_are_refused(mode):
    with pytest.raises(ValueError, match="#1 contains NaN or infinite values"):
        fuse([torch.rand(2, 8, 8), torch.full((2, 4, 4), float("nan"))], mode=mode)
    with pytest.raises(ValueError, match=r"mismatched batch sizes: #0 has 2 images, #1 has 3"):
        fuse([torch.rand(2, 8, 8), torch.rand(3, 4, 4)], mode=mode)
    with pytest.raises(ValueError, match="at least one image"):
        fuse([torch.rand(0, 8, 8), torch.rand(0, 4, 4)], mode=mode)
    with pytest.raises(ValueError, match=r"must be \(B,H,W\)"):
        fuse([torch.rand(8, 8)], mode=mode)
    with pytest.raises(ValueError, match="no maps"):
        fuse([], mode=mode)


@pytest.mark.parametrize("mode", ["polycam", "recursive"])
def test_recursions_refuse_resolutions_that_grow_with_depth(mode):
    with pytest.raises(ValueError, match=r"resolution does not grow: #1 is 8x8, finer than #0 \(4x4\)"):
        fuse([torch.rand(2, 4, 4), torch.rand(2, 8, 8)], mode=mode)
    with pytest.raises(ValueError, match=r"gate is 8x8"):
        fuse([torch.rand(2, 4, 4), torch.rand(2, 2, 2)], mode=mode, gate=torch.rand(2, 8, 8))
    # deep_gated and product resize every map to the output grid: any order works
    assert fuse([torch.rand(2, 4, 4), torch.rand(2, 8, 8)], mode="deep_gated").shape == (2, 8, 8)


def test_old_modes_still_need_equal_shapes():
    with pytest.raises(ValueError, match="mismatched shapes"):
        fuse([torch.rand(2, 8, 8), torch.rand(2, 4, 4)])


# ---------------------------------------------------------------------------------------------
# the student end to end
# ---------------------------------------------------------------------------------------------
def test_explain_lwcam_with_a_class_preserving_mode_and_a_gate():
    torch.manual_seed(21)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 5)).eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(22))
    t = torch.tensor([0, 2, 4])
    names, raw = raw_layer_maps(net, x, t, ("layercam", "gradcam"))
    assert [tuple(m.shape[-2:]) for m in raw["layercam"]] == [(16, 16), (8, 8), (4, 4)]
    out = explain_lwcam(net, x, t, weighting="layercam", mode="recursive", gate_weighting="gradcam", alpha=0.2)
    expected = fuse(raw["layercam"], mode="recursive", gate=raw["gradcam"][-1], alpha=0.2, size=(16, 16))
    torch.testing.assert_close(out, expected)
    plain = explain_lwcam(net, x, t, weighting="layercam", mode="deep_gated")
    torch.testing.assert_close(plain, fuse(raw["layercam"], mode="deep_gated", size=(16, 16)))
    with pytest.raises(ValueError, match="gate_weighting is only used by the class-preserving modes"):
        explain_lwcam(net, x, t, gate_weighting="gradcam")
    with pytest.raises(ValueError, match="alpha must be"):
        explain_lwcam(net, x, t, mode="recursive", alpha=2.0)


def test_doctests():
    assert doctest.testmod(fusion_recursive).failed == 0
