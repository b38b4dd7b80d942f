"""Deletion/insertion games, ground-truth metrics and statistics on hand-checkable cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lwcam.blackbox import BlackBox
from lwcam.scoring.games import GameResult, deletion_game, game_auc, gaussian_blur, insertion_game
from lwcam.scoring.localisation import pointing_game, relevance_mass
from lwcam.scoring.stats import bootstrap_ci, paired_test


def intact_share_model(region: torch.Tensor):
    """A 2-class "model": p(class 0) = share of ``region`` whose channel-0 pixels are still 1."""
    region = region.bool()

    def fn(x: torch.Tensor) -> torch.Tensor:
        p = x[:, 0][:, region].mean(dim=1).clamp(0, 1)
        return torch.stack([p, 1 - p], dim=1)

    return fn


class Recorder:
    """A callable model that keeps every image it is shown and answers uniform probabilities."""

    def __init__(self, num_classes: int = 3) -> None:
        self.seen: list[torch.Tensor] = []
        self.num_classes = num_classes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return torch.full((x.shape[0], self.num_classes), 1.0 / self.num_classes)

    def images(self) -> torch.Tensor:
        return torch.cat(self.seen)


# --------------------------------------------------------------------------- AUC
@pytest.mark.parametrize("c", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("n", [2, 5, 65])
def test_auc_of_constant_curve_is_the_constant(c: float, n: int) -> None:
    assert game_auc(torch.full((3, n), c)).tolist() == pytest.approx([c] * 3, abs=1e-7)


def test_auc_formula_matches_trapezoid() -> None:
    g = torch.Generator().manual_seed(0)
    curves = torch.rand(4, 9, generator=g, dtype=torch.float64)
    expected = torch.trapezoid(curves, torch.linspace(0, 1, 9, dtype=torch.float64), dim=1)
    torch.testing.assert_close(game_auc(curves), expected)
    s = curves[0]
    manual = (s.sum() - s[0] / 2 - s[-1] / 2) / 8
    assert game_auc(s).item() == pytest.approx(manual.item())


def test_game_with_constant_model_has_auc_equal_to_that_probability() -> None:
    probs = torch.tensor([0.25, 0.75])
    res = deletion_game(lambda x: probs.expand(x.shape[0], 2), torch.rand(2, 3, 6, 6), torch.rand(2, 6, 6), [0, 1])
    assert torch.allclose(res.auc, torch.tensor([0.25, 0.75]))


# --------------------------------------------------------------------------- closed forms
def test_deletion_closed_form_salient_region_first_and_last() -> None:
    h = w = 8
    region = torch.zeros(h, w, dtype=torch.bool)
    region[[0, 1, 3, 5, 6, 7], [2, 7, 4, 0, 1, 6]] = True  # 6 scattered pixels
    region[4, :] = True  # plus a row: 14 pixels in all
    r = int(region.sum())
    model = intact_share_model(region)
    images = torch.ones(1, 3, h, w)
    for saliency, first in ((region.float(), True), (1 - region.float(), False)):
        res = deletion_game(model, images, saliency[None], [0], step=3)
        n_steps = math.ceil(h * w / 3)
        k = torch.clamp(torch.arange(n_steps + 1) * 3, max=h * w)  # pixels deleted at each step
        deleted_in_region = k.clamp(max=r) if first else (k - (h * w - r)).clamp(min=0)
        expected = 1 - deleted_in_region.double() / r
        torch.testing.assert_close(res.curves[0].double(), expected, atol=1e-6, rtol=0)
        manual_auc = (expected.sum() - expected[0] / 2 - expected[-1] / 2) / n_steps
        assert res.auc.item() == pytest.approx(manual_auc.item(), abs=1e-6)
    # Salient-first deletion is the best a map can do here, salient-last the worst.
    best = deletion_game(model, images, region[None].float(), [0], step=3).auc.item()
    worst = deletion_game(model, images, 1 - region[None].float(), [0], step=3).auc.item()
    assert best < 0.2 < 0.8 < worst


def test_insertion_closed_form_from_zeros() -> None:
    h = w = 6
    region = torch.zeros(h, w, dtype=torch.bool)
    region[:2] = True  # the first 12 pixels in raster order
    res = insertion_game(intact_share_model(region), torch.ones(1, 3, h, w), torch.zeros(1, h, w), [0],
                         start="zeros")
    # Constant saliency -> raster order: row t is restored at step t+1.
    assert res.curves[0].tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert res.auc.item() == pytest.approx((5.5 - 0.5) / 6)


# --------------------------------------------------------------------------- order and steps
def test_constant_saliency_is_raster_order() -> None:
    rec = Recorder()
    images = torch.ones(1, 1, 3, 4)
    deletion_game(rec, images, torch.full((1, 3, 4), 0.5), 0, step=1, batch_size=100)
    seen = rec.images()
    assert seen.shape[0] == 13
    for t in range(13):
        expected = torch.ones(12)
        expected[:t] = 0
        assert torch.equal(seen[t].flatten(), expected), t


def test_ties_break_by_lower_index_and_signed_zero_ties() -> None:
    rec = Recorder()
    sal = torch.tensor([[[0.0, 2.0, -0.0], [2.0, 1.0, 0.0]]])  # order: 1, 3, 4, 0, 2, 5
    deletion_game(rec, torch.ones(1, 1, 2, 3), sal, 0, step=1)
    seen = rec.images().flatten(1)
    order = [int((seen[t] != seen[t + 1]).nonzero()) for t in range(6)]
    assert order == [1, 3, 4, 0, 2, 5]


def test_saliency_accepts_channel_dim_and_bool() -> None:
    model = intact_share_model(torch.ones(4, 4, dtype=torch.bool))
    images = torch.ones(2, 3, 4, 4)
    sal = torch.rand(2, 4, 4)
    a = deletion_game(model, images, sal, 0)
    b = deletion_game(model, images, sal[:, None], 0)
    assert torch.equal(a.curves, b.curves)
    c = deletion_game(model, images, sal > 0.5, 0)
    assert c.curves.shape == (2, 5)


def test_default_step_is_width_square_and_rectangular() -> None:
    rec = Recorder()
    res = deletion_game(rec, torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8), [0, 1])
    assert res.step == 8 and res.curves.shape == (2, 9) and res.n_steps == 8
    assert res.fractions.tolist() == pytest.approx([t / 8 for t in range(9)])
    res = deletion_game(Recorder(), torch.rand(1, 3, 6, 10), torch.rand(1, 6, 10), 0)
    assert res.step == 10 and res.curves.shape == (1, 7)


def test_last_partial_step() -> None:
    rec = Recorder()
    res = deletion_game(rec, torch.ones(1, 2, 5, 5), torch.rand(1, 5, 5), 0, step=7)
    assert res.curves.shape == (1, 5)  # 7, 14, 21, then the last 4 pixels
    assert res.fractions.tolist() == pytest.approx([0, 7 / 25, 14 / 25, 21 / 25, 1.0])
    seen = rec.images()
    assert [int((s == 0).all(0).sum()) for s in seen] == [0, 7, 14, 21, 25]


def test_step_larger_than_image() -> None:
    res = deletion_game(Recorder(), torch.rand(1, 3, 3, 3), torch.rand(1, 3, 3), 0, step=100)
    assert res.curves.shape == (1, 2) and res.fractions.tolist() == [0.0, 1.0]


# --------------------------------------------------------------------------- substrates
def test_substrate_variants_reach_the_right_final_image() -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 12, 12, generator=g)
    sal = torch.rand(2, 12, 12, generator=g)
    fill = torch.tensor([0.1, -0.2, 0.3]).view(3, 1, 1)
    cases = {
        "zeros": torch.zeros_like(images),
        "mean": images.mean(dim=(2, 3), keepdim=True).expand_as(images),
        "blur": gaussian_blur(images, 11, 5.0),
        "tensor": fill.expand_as(images),
        "callable": images.flip(-1),
    }
    for name, final in cases.items():
        spec = {"tensor": fill, "callable": lambda x: x.flip(-1)}.get(name, name)
        rec = Recorder()
        res = deletion_game(rec, images, sal, 0, substrate=spec)
        seen = rec.images().view(2, res.n_steps + 1, 3, 12, 12)
        torch.testing.assert_close(seen[:, 0], images)
        torch.testing.assert_close(seen[:, -1], final, atol=1e-6, rtol=0)
        # Half-way: exactly the 12 * t top-ranked pixels come from the substrate.
        t = res.n_steps // 2
        for i in range(2):
            order = np.argsort(-sal[i].flatten().numpy(), kind="stable")
            moved = torch.zeros(144, dtype=torch.bool)
            moved[torch.from_numpy(order[: 12 * t].copy())] = True
            expected = torch.where(moved, final[i].flatten(1), images[i].flatten(1))
            torch.testing.assert_close(seen[i, t].flatten(1), expected, atol=1e-6, rtol=0)
    assert "blur" in deletion_game(Recorder(), images, sal, 0, substrate="blur").canvas


def test_gaussian_blur_matches_torchvision() -> None:
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    images = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gaussian_blur(images, 11, 5.0), tv_blur(images, [11, 11], [5.0, 5.0]),
                               atol=1e-5, rtol=0)
    const = torch.full((1, 3, 9, 9), 0.7)  # blurring a constant image changes nothing
    torch.testing.assert_close(gaussian_blur(const, 11, 5.0), const)
    tiny = torch.rand(1, 1, 3, 3)  # too small for reflect padding: replicate instead
    assert gaussian_blur(tiny, 11, 5.0).shape == tiny.shape


def test_insertion_from_blur_ends_at_the_original_score() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(16, 5))
    images = torch.randn(3, 3, 16, 16)
    targets = torch.tensor([0, 3, 4])
    res = insertion_game(net, images, torch.rand(3, 16, 16), targets)
    with torch.no_grad():
        p_orig = torch.softmax(net(images), 1)[torch.arange(3), targets]
        p_blur = torch.softmax(net(gaussian_blur(images, 11, 5.0)), 1)[torch.arange(3), targets]
    torch.testing.assert_close(res.curves[:, -1], p_orig, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.curves[:, 0], p_blur, atol=1e-5, rtol=0)
    assert res.kind == "insertion" and res.queries == 3 * 17


def test_batching_invariance() -> None:
    g = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, 10, 10, generator=g)
    sal = torch.rand(3, 10, 10, generator=g)
    region = torch.rand(10, 10, generator=g) > 0.6
    model = intact_share_model(region)
    for game in (deletion_game, insertion_game):
        a = game(model, images, sal, 0, batch_size=1)
        b = game(model, images, sal, 0, batch_size=256)
        c = game(model, images, sal, 0, batch_size=7)
        assert torch.equal(a.curves, b.curves) and torch.equal(a.curves, c.curves)
        assert torch.equal(a.auc, b.auc)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(300, 4))
    a = deletion_game(net, images, sal, [0, 1, 2], batch_size=1)
    b = deletion_game(net, images, sal, [0, 1, 2], batch_size=256)
    torch.testing.assert_close(a.curves, b.curves, atol=1e-6, rtol=0)


def test_targets_select_per_image_classes() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[0.1, 0.2, 0.7]]).expand(x.shape[0], 3)

    res = deletion_game(fn, torch.rand(3, 3, 4, 4), torch.rand(3, 4, 4), torch.tensor([2, 0, 1]))
    assert res.auc.tolist() == pytest.approx([0.7, 0.1, 0.2])
    assert res.targets.tolist() == [2, 0, 1]


# --------------------------------------------------------------------------- black box
def test_blackbox_query_counting() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    bb = BlackBox(net, num_classes=4, k=1)
    images, sal = torch.rand(5, 3, 8, 8), torch.rand(5, 8, 8)
    before = bb.queries
    res = deletion_game(bb, images, sal, [0, 1, 2, 3, 0], batch_size=16)
    assert res.queries == 5 * 9 == bb.queries - before == res.blackbox_queries
    res2 = insertion_game(bb, images, sal, 1, step=16)
    assert res2.queries == 5 * 5 and bb.queries == 5 * 9 + 5 * 5
    # The scores are the black box's probabilities, the same as the module's softmax.
    direct = deletion_game(net, images, sal, [0, 1, 2, 3, 0])
    assert direct.blackbox_queries is None
    torch.testing.assert_close(res.curves, direct.curves, atol=1e-6, rtol=0)


def test_topk_blackbox_scores_revealed_probabilities() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6))
    images, sal = torch.rand(2, 3, 4, 4), torch.rand(2, 4, 4)
    full = deletion_game(BlackBox(net, num_classes=6, output="probs"), images, sal, [1, 2])
    top = deletion_game(BlackBox(net, num_classes=6, output="topk", k=6), images, sal, [1, 2])
    torch.testing.assert_close(full.curves, top.curves)


def test_label_blackbox_is_rejected() -> None:
    bb = BlackBox(nn.Sequential(nn.Flatten(), nn.Linear(48, 3)), num_classes=3, output="label", k=1)
    with pytest.raises(ValueError, match="label"):
        deletion_game(bb, torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4), 0)
    assert bb.queries == 0


# --------------------------------------------------------------------------- bad inputs
def _uniform(x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0], 3), 1 / 3)


IM, SAL = torch.rand(2, 3, 4, 4), torch.rand(2, 4, 4)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"images": torch.rand(3, 4, 4)}, ValueError, r"\(B,C,H,W\)"),
        ({"images": torch.ones(2, 3, 4, 4, dtype=torch.uint8)}, TypeError, "floating-point"),
        ({"images": np.zeros((2, 3, 4, 4))}, TypeError, "torch.Tensor"),
        ({"saliency": torch.rand(2, 4, 5)}, ValueError, r"saliency must have shape \(B,H,W\)=\(2,4,4\)"),
        ({"saliency": torch.rand(3, 4, 4)}, ValueError, "saliency must have shape"),
        ({"saliency": torch.rand(2, 2, 4, 4)}, ValueError, "saliency must have shape"),
        ({"saliency": torch.full((2, 4, 4), float("nan"))}, ValueError, "NaN or Inf"),
        ({"saliency": torch.full((2, 4, 4), float("inf"))}, ValueError, "NaN or Inf"),
        ({"step": 0}, ValueError, "step must be a positive int"),
        ({"step": -3}, ValueError, "step must be a positive int"),
        ({"step": 2.5}, TypeError, "step must be a positive int"),
        ({"step": True}, TypeError, "step must be a positive int"),
        ({"targets": [0, 3]}, ValueError, r"\[0, 3\)"),
        ({"targets": [0, -1]}, ValueError, ">= 0"),
        ({"targets": [0, 1, 2]}, ValueError, "got 3 targets for a batch of 2 images"),
        ({"targets": torch.tensor([0.0, 1.0])}, TypeError, "integer class indices"),
        ({"targets": torch.zeros(2, 1, dtype=torch.long)}, ValueError, "one class index per image"),
        ({"substrate": "noise"}, ValueError, "substrate must be one of"),
        ({"substrate": torch.zeros(5, 4, 4)}, ValueError, "does not broadcast"),
        ({"substrate": lambda x: 0.0}, TypeError, "must return a tensor"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"blur_kernel": 4, "substrate": "blur"}, ValueError, "odd positive int"),
    ],
)
def test_bad_inputs_raise(kwargs: dict, exc: type, match: str) -> None:
    args = {"model": _uniform, "images": IM, "saliency": SAL, "targets": [0, 1]} | kwargs
    with pytest.raises(exc, match=match):
        deletion_game(**args)


def test_bad_model_output_and_blackbox_targets() -> None:
    with pytest.raises(ValueError, match="expected \\(B, C\\)"):
        deletion_game(lambda x: torch.ones(x.shape[0]), IM, SAL, [0, 1])
    bb = BlackBox(nn.Sequential(nn.Flatten(), nn.Linear(48, 3)), num_classes=3, k=1)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        deletion_game(bb, IM, SAL, [0, 5])
    assert bb.queries == 0  # checked before anything was spent
    with pytest.raises(ValueError, match="start must be one of"):
        insertion_game(_uniform, IM, SAL, [0, 1], start="gray")


def test_constant_saliency_is_valid() -> None:
    res = deletion_game(_uniform, IM, torch.zeros(2, 4, 4), [0, 1])
    assert torch.isfinite(res.auc).all()


# --------------------------------------------------------------------------- result object
def test_game_result_summary() -> None:
    res = deletion_game(_uniform, IM, SAL, [0, 1])
    assert isinstance(res, GameResult)
    m, lo, hi = res.mean_ci(n_boot=200)
    assert m == pytest.approx(1 / 3) and lo <= m <= hi
    assert res.mean_curve().shape == (5,)
    assert "deletion" in repr(res)


# --------------------------------------------------------------------------- ground truth
def test_pointing_game() -> None:
    sal = torch.zeros(4, 3, 3)
    masks = torch.zeros(4, 3, 3, dtype=torch.bool)
    sal[0, 1, 1] = 1.0
    masks[0, 1, 1] = True  # hit
    sal[1, 0, 2] = 1.0
    masks[1, 2, 2] = True  # miss
    masks[2, 0, 0] = True  # constant map: argmax = first pixel (0, 0) -> hit
    hit, valid = pointing_game(sal, masks, return_valid=True)  # image 3 has an empty mask
    assert hit.tolist() == [True, False, True, False]
    assert valid.tolist() == [True, True, True, False]
    assert pointing_game(sal[:, None], masks.float()).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="only 0 and 1"):
        pointing_game(sal, masks.float() * 2)
    with pytest.raises(ValueError, match="masks must have shape"):
        pointing_game(sal, masks[:, :2])


def test_relevance_mass() -> None:
    sal = torch.tensor([
        [[3.0, 1.0], [-2.0, 0.0]],
        [[0.0, 0.0], [0.0, 0.0]],
        [[-1.0, -1.0], [-1.0, -1.0]],
        [[1.0, 1.0], [1.0, 1.0]],
    ])
    masks = torch.tensor([[[True, False], [True, False]]] * 3 + [[[True, True], [True, False]]])
    out = relevance_mass(sal, masks)
    assert out.tolist() == pytest.approx([0.75, 0.0, 0.0, 0.75])
    assert not torch.isnan(out).any()
    with pytest.raises(ValueError, match="NaN"):
        relevance_mass(torch.full((1, 2, 2), float("nan")), masks[:1])


# --------------------------------------------------------------------------- statistics
def test_bootstrap_ci() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0.4, 0.1, size=200)
    m, lo, hi = bootstrap_ci(x, n_boot=2000, seed=1)
    assert m == pytest.approx(x.mean()) and lo < m < hi
    assert hi - lo == pytest.approx(2 * 1.96 * x.std(ddof=1) / np.sqrt(200), rel=0.15)
    assert bootstrap_ci(x, n_boot=2000, seed=1) == (m, lo, hi)  # deterministic
    assert bootstrap_ci(x, n_boot=2000, seed=2) != (m, lo, hi)
    assert bootstrap_ci(torch.tensor(x), n_boot=2000, seed=1) == pytest.approx((m, lo, hi))
    # NaN values are dropped.
    assert bootstrap_ci(np.append(x, np.nan), n_boot=2000, seed=1) == (m, lo, hi)
    assert bootstrap_ci([0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="only NaN"):
        bootstrap_ci([float("nan")])
    with pytest.raises(ValueError, match="ci must be"):
        bootstrap_ci(x, ci=1.5)


def test_paired_test() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, size=60)
    b = a + 0.05 + rng.normal(0, 0.02, size=60)
    r = paired_test(a, b, n_boot=2000)
    assert r.mean_diff == pytest.approx(np.mean(a - b))
    assert r.ci_low < r.mean_diff < r.ci_high < 0
    assert r.p_value < 1e-6 and r.n == 60 and r.test == "wilcoxon"
    assert paired_test(a, b, alternative="less", n_boot=200).p_value < 1e-6
    assert paired_test(a, b, alternative="greater", n_boot=200).p_value > 0.99
    same = paired_test(a, a.copy(), n_boot=200)  # all differences zero: no warning, p = 1
    assert same.p_value == 1.0 and same.mean_diff == 0.0 and same.ci_low == same.ci_high == 0.0
    assert paired_test(a[:3], b[:3], n_boot=200) == paired_test(a[:3], b[:3], n_boot=200)
    with pytest.raises(ValueError, match="same shape"):
        paired_test(a, b[:-1])
    with pytest.raises(ValueError, match="alternative"):
        paired_test(a, b, alternative="bigger")  # type: ignore[arg-type]
