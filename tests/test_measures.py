"""The scorecard's measures (lwcam.scoring): hand-made maps with known answers and cross-checks against
pytorch-grad-cam's ROAD, Quantus' MPRT and scipy's Spearman."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lwcam.blackbox import BlackBox
from lwcam.scoring.complexity import sparseness
from lwcam.scoring.correlation import map_rank_correlation
from lwcam.scoring.faithfulness import road, road_score, targeted_deletion
from lwcam.scoring.games import deletion_game
from lwcam.scoring.localisation import class_sensitivity, targeted_mass, targeted_pointing
from lwcam.scoring.randomisation import model_randomisation
from lwcam.scoring.robustness import max_sensitivity


def _masks() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 1×4 objects side by side on a 2×6 image: asked in columns 0-1, other in columns 3-4."""
    asked = torch.zeros(1, 2, 6, dtype=torch.bool)
    other = torch.zeros(1, 2, 6, dtype=torch.bool)
    asked[0, :, 0:2] = True
    other[0, :, 3:5] = True
    return asked, other


def _small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)).eval()


def _gradient_map(model: nn.Module, images: torch.Tensor | np.ndarray, targets: object) -> torch.Tensor:
    """|∂ logit_target / ∂ x| summed over channels: a map that depends on every layer."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32).clone().requires_grad_(True)
    t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    model(x).gather(1, t.view(-1, 1)).sum().backward()
    assert x.grad is not None
    return x.grad.abs().sum(dim=1)


# --------------------------------------------------------------------------- class-conflict measures
def test_targeted_pointing_hand_made() -> None:
    asked, other = _masks()
    s = torch.zeros(4, 2, 6)
    s[0, 1, 1] = 1.0  # in the asked object
    s[1, 0, 3] = 1.0  # in the other object
    s[2, 0, 5] = 1.0  # in the background
    s[3, 1, 0] = s[3, 0, 4] = 1.0  # a tie: the lower flat index (0, 4) wins, in the other object
    got = targeted_pointing(s, asked.expand(4, -1, -1), other.expand(4, -1, -1))
    assert got.dtype == torch.float64 and got.tolist() == [1.0, 0.0, 0.0, 0.0]
    # a constant map points at pixel (0, 0), the asked object's here; a pixel in both masks is not targeted
    assert targeted_pointing(torch.ones(1, 2, 6), asked, other).tolist() == [1.0]
    assert targeted_pointing(torch.ones(1, 2, 6), asked, asked | other).tolist() == [0.0]


def test_targeted_mass_hand_made_and_uniform_is_area_share() -> None:
    asked, other = _masks()
    s = torch.zeros(1, 2, 6)
    s[0, 0, 0], s[0, 0, 3], s[0, 1, 4], s[0, 0, 5] = 3.0, 1.0, -4.0, 9.0  # background and negatives ignored
    assert targeted_mass(s, asked, other).tolist() == [0.75]
    other_big = other.clone()
    other_big[0, :, 5] = True  # asked 4 pixels, other 6 pixels
    for flat in (torch.ones(1, 2, 6), torch.zeros(1, 2, 6), -torch.ones(1, 2, 6)):
        assert targeted_mass(flat, asked, other_big).tolist() == [0.4]
    # the oracle scores 1, extreme finite values do not overflow, 0/1 masks work
    assert targeted_mass(asked.float(), asked, other).tolist() == [1.0]
    huge = torch.full((1, 2, 6), 3e38)
    assert targeted_mass(huge, asked.int(), other.int()).tolist() == [0.5]
    assert targeted_mass(torch.full((1, 2, 6), 1e308, dtype=torch.float64), asked, other).tolist() == [0.5]


def test_class_sensitivity_oracle_blind_and_constant_maps() -> None:
    asked, other = _masks()
    assert class_sensitivity(asked.float(), other.float(), asked, other).tolist() == [-1.0]
    centre = torch.rand(1, 2, 6)
    assert class_sensitivity(centre, centre.clone(), asked, other).tolist() == [1.0]
    # background pixels do not count: maps that differ only there are still class-blind
    b = centre.clone()
    b[0, :, 2] = -b[0, :, 2]
    b[0, :, 5] = 7.0
    assert class_sensitivity(centre, b, asked, other).tolist() == [1.0]
    assert class_sensitivity(torch.zeros(1, 2, 6), torch.ones(1, 2, 6), asked, other).tolist() == [1.0]
    assert class_sensitivity(torch.zeros(1, 2, 6), centre, asked, other).tolist() == [0.0]


def test_rank_correlation_matches_scipy_with_ties_and_masks() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 7, 9), generator=g).double()  # many ties
    b = a + torch.randint(0, 3, (6, 7, 9), generator=g).double()
    mask = torch.rand(6, 7, 9, generator=g) > 0.5
    mask[:, 0, 0] = True
    full = map_rank_correlation(a, b)
    part = map_rank_correlation(a, b, mask=mask)
    for i in range(6):
        assert full[i].item() == pytest.approx(stats.spearmanr(a[i].flatten(), b[i].flatten())[0], abs=1e-12)
        ref = stats.spearmanr(a[i][mask[i]].numpy(), b[i][mask[i]].numpy())[0]
        assert part[i].item() == pytest.approx(ref, abs=1e-12)
    assert torch.allclose(map_rank_correlation(a, b.exp() * 1e30), full)  # ranks ignore monotone rescaling
    assert map_rank_correlation(a, torch.full_like(a, 2.0)).tolist() == [0.0] * 6


# --------------------------------------------------------------------------- targeted deletion
def test_targeted_deletion_equals_two_deletion_games_from_one_set_of_queries() -> None:
    net = _small_cnn()
    x, s = torch.randn(3, 3, 6, 6), torch.rand(3, 6, 6)
    asked, other = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    bb = BlackBox(net, num_classes=3, batch_size=64)
    auc_a, auc_o = targeted_deletion(bb, x, s, asked, other, step=4)
    assert bb.queries == 3 * 10  # one game: 9 steps + the start, per image
    assert torch.equal(auc_a, deletion_game(net, x, s, asked, step=4).auc)
    assert torch.equal(auc_o, deletion_game(net, x, s, other, step=4).auc)
    with pytest.raises(ValueError, match="asked and other name the same class"):
        targeted_deletion(net, x, s, asked, [1, 1, 1])
    with pytest.raises(ValueError, match="other"):
        targeted_deletion(net, x, s, asked, [1, 2])


# --------------------------------------------------------------------------- ROAD
def _grad_cam_road(net: nn.Module, x: torch.Tensor, cams: np.ndarray, targets: list[int], percentages: list[int],
                   order: str, noise: float) -> np.ndarray:
    """pytorch-grad-cam's ROAD, probabilities (return_diff=False), with our q mapped to its 100 - q."""
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    remove = RemoveMostRelevantFirst if order == "morf" else RemoveLeastRelevantFirst
    tg = [ClassifierOutputSoftmaxTarget(t) for t in targets]
    cols = [PerturbationConfidenceMetric(remove(100 - q, NoisyLinearImputer(noise=noise)))(x, cams, tg, net,
                                                                                            return_diff=False)
            for q in percentages]
    return np.stack(cols, axis=1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytorch-grad-cam's np.float32(tensor)
@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_equals_pytorch_grad_cam(order: str) -> None:
    """A shared case: 10×10 images, so pytorch-grad-cam's percentile threshold removes exactly q % of the pixels
    (distinct map values, exact in float32 also as 1 - map); the same imputation; noise off, then the same
    seeded noise (its global generator seeded as ours). The linear model's probabilities move by up to 0.5
    between percentages and by 5e-3 with the noise, so an imputation off by much less than that would show."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(300, 3)).eval()
    with torch.no_grad():
        net[1].weight.mul_(3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, 10, generator=g)
    cams = np.stack([torch.randperm(100, generator=g).view(10, 10).numpy() / 128 for _ in range(2)]).astype(np.float32)
    qs = [10, 20, 30, 40, 50, 60, 70, 80, 90]
    ours = road(net, x, torch.from_numpy(cams), [0, 2], qs, order, noise=0.0).numpy()
    ref = _grad_cam_road(net, x, cams, [0, 2], qs, order, noise=0.0)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert np.ptp(ours) > 0.3
    torch.manual_seed(5)
    ref_noisy = _grad_cam_road(net, x, cams, [0, 2], qs, order, noise=0.01)
    ours_noisy = road(net, x, torch.from_numpy(cams), [0, 2], qs, order, noise=0.01, seed=5).numpy()
    np.testing.assert_allclose(ours_noisy, ref_noisy, atol=1e-4, rtol=0)
    assert np.abs(ours_noisy - ours).max() > 1e-3  # the noise did act


def test_road_imputation_hand_made() -> None:
    """One probe pixel read by the model: a removed interior pixel becomes the 1/6-1/12 weighted mean of its
    8 neighbours; a constant image is imputed as itself; 0 % removes nothing."""
    def probe(x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0, 1, 1]
        return torch.stack([v, 1 - v], dim=1)

    img = torch.zeros(1, 3, 3, 3)
    img[0, :, 0, 1] = img[0, :, 1, 0] = 0.6  # edge neighbours
    img[0, :, 0, 0] = 0.3  # a diagonal one
    img[0, :, 1, 1] = 0.9
    s = torch.zeros(1, 3, 3)
    s[0, 1, 1] = 1.0
    got = road(probe, img, s, 0, percentages=(0, 10), noise=0.0)  # 10 % of 9 pixels rounds to 1 pixel
    assert got[0].tolist() == pytest.approx([0.9, 2 * 0.6 / 6 + 0.3 / 12], abs=1e-6)
    flat = torch.full((1, 3, 5, 5), 0.25)
    assert road(probe, flat, torch.rand(1, 5, 5), 0, (50, 90), "lerf", noise=0.0)[0].tolist() == [0.25, 0.25]
    assert road_score(got).tolist() == pytest.approx([(0.9 + 0.2 + 0.025) / 2])


# --------------------------------------------------------------------------- randomisation
def test_model_randomisation_equals_quantus_mprt() -> None:
    quantus = pytest.importorskip("quantus")
    net = _small_cnn(3)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = np.array([0, 1, 2])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng_before = torch.get_rng_state()
    df = model_randomisation(net, _gradient_map, x, torch.from_numpy(y), seed=7)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # caller's model untouched
    assert torch.equal(rng_before, torch.get_rng_state())  # and the global RNG state restored

    def quantus_explain(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **_: object) -> np.ndarray:
        return _gradient_map(model, inputs, targets).numpy()

    metric = quantus.MPRT(layer_order="top_down", seed=7, abs=False, normalise=False, disable_warnings=True)
    ref = metric(model=net, x_batch=x.numpy(), y_batch=y, a_batch=None, explain_func=quantus_explain,
                 channel_first=True, device="cpu")
    layers = [k for k in ref if k != "original"]
    assert layers == ["6", "2", "0"] == list(dict.fromkeys(df["layer"]))
    for step, name in enumerate(layers, 1):
        ours = df[df["step"] == step].sort_values("image")["rank_correlation"].to_numpy()
        np.testing.assert_allclose(ours, np.asarray(ref[name]), atol=1e-10)


def test_model_randomisation_exact_hand_made() -> None:
    """A map that reads only the first layer's weights keeps ρ = 1 until that layer is reset; with Quantus'
    convention the reset layer holds the weights drawn after torch.manual_seed(seed + 1)."""
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.arange(16.0).view(4, 4))

    def explain(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return m[0].weight.detach().abs().sum(0).view(1, 2, 2).expand(len(x), 2, 2)

    df = model_randomisation(lambda: net, explain, torch.zeros(2, 3, 2, 2), [0, 1], seed=0)
    torch.manual_seed(1)
    fresh = nn.Linear(4, 4).weight.detach().abs().sum(0)
    expected = stats.spearmanr(np.arange(4), fresh.numpy())[0]
    assert df["layer"].tolist() == ["2", "2", "0", "0"] and df["step"].tolist() == [1, 1, 2, 2]
    assert df["rank_correlation"].tolist() == pytest.approx([1.0, 1.0, expected, expected], abs=1e-12)
    assert model_randomisation(net, explain, torch.zeros(1, 3, 2, 2), 0, layers=["0"])["layer"].tolist() == ["0"]
    with pytest.raises(ValueError, match="layers"):
        model_randomisation(net, explain, torch.zeros(1, 3, 2, 2), 0, layers=["fc"])
    with pytest.raises(ValueError, match="explain_fn"):
        model_randomisation(net, lambda m, x, y: torch.zeros(1, 3, 3), torch.zeros(1, 3, 2, 2), 0)


# --------------------------------------------------------------------------- robustness and complexity
def test_max_sensitivity_exact_for_a_linear_explainer() -> None:
    """Φ(x) = channel mean, so Φ(x + δ) − Φ(x) = mean_c δ, with δ redrawn here from the same seeded generator."""
    x = torch.rand(2, 3, 4, 5) + 1.0
    got = max_sensitivity(lambda im, t: im.mean(1), x, [0, 1], radius=0.05, n_samples=4, seed=3)
    gen = torch.Generator().manual_seed(3)
    deltas = [((torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2 - 1) * 0.05).float() for _ in range(4)]
    base = x.mean(1).double()
    diffs = torch.stack([((x + d).mean(1).double() - base).flatten(1).norm(dim=1) for d in deltas])
    expected = diffs.max(dim=0).values / base.flatten(1).norm(dim=1)
    assert torch.allclose(got, expected, rtol=1e-6, atol=0)
    fixed = torch.rand(2, 4, 5)
    assert max_sensitivity(lambda im, t: fixed, x, [0, 1]).tolist() == [0.0, 0.0]
    assert max_sensitivity(lambda im, t: torch.zeros(2, 4, 5), x, [0, 1]).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="on_zero"):
        max_sensitivity(lambda im, t: im.mean(1), x, [0, 1], saliency=torch.zeros(2, 4, 5))
    nan = max_sensitivity(lambda im, t: im.mean(1), x, [0, 1], saliency=torch.zeros(2, 4, 5), on_zero="nan")
    assert torch.isnan(nan).all()


def test_sparseness_gini_known_values_and_quantus_formula() -> None:
    assert sparseness(torch.full((1, 4, 4), -3.0)).tolist() == [0.0]
    assert sparseness(torch.zeros(1, 4, 4)).tolist() == [0.0]
    one_hot = torch.zeros(1, 4, 4)
    one_hot[0, 2, 1] = -2.0
    assert sparseness(one_hot).tolist() == [15 / 16]
    s = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(0)).double()
    a = np.sort(np.abs(s.flatten(1).numpy()) / np.abs(s.flatten(1).numpy()).max(1, keepdims=True) + 1e-7, axis=1)
    k = np.arange(1, 31)
    quantus_gini = ((2 * k - 30 - 1) * a).sum(1) / (30 * a.sum(1))  # quantus.Sparseness.evaluate_batch
    np.testing.assert_allclose(sparseness(s).numpy(), quantus_gini, atol=1e-6)


# --------------------------------------------------------------------------- input checks
def test_bad_maps_and_masks_raise_naming_the_argument() -> None:
    asked, other = _masks()
    nan = torch.ones(1, 2, 6)
    nan[0, 0, 0] = math.nan
    for fn in (targeted_pointing, targeted_mass):
        with pytest.raises(ValueError, match="saliency contains NaN"):
            fn(nan, asked, other)
        with pytest.raises(ValueError, match="mask_other must have shape"):
            fn(torch.ones(1, 2, 6), asked, other[:, :, :5])
        with pytest.raises(ValueError, match="mask_asked is empty on image 0"):
            fn(torch.ones(1, 2, 6), torch.zeros_like(asked), other)
        with pytest.raises(ValueError, match="saliency is empty"):
            fn(torch.ones(0, 2, 6), asked[:0], other[:0])
    with pytest.raises(ValueError, match="mask_asked must be boolean or contain only 0 and 1"):
        targeted_mass(torch.ones(1, 2, 6), asked.float() * 2, other)
    with pytest.raises(ValueError, match="saliency_b must have shape"):
        class_sensitivity(torch.ones(1, 2, 6), torch.ones(1, 2, 5), asked, other)
    with pytest.raises(ValueError, match="saliency_b contains NaN"):
        map_rank_correlation(torch.ones(1, 2, 6), nan)
    with pytest.raises(ValueError, match="saliency_a is empty"):
        map_rank_correlation(torch.ones(1, 0, 6), torch.ones(1, 0, 6))
    with pytest.raises(ValueError, match="saliency contains NaN"):
        sparseness(nan)
    with pytest.raises(ValueError, match="scores"):
        road_score(torch.ones(2, 0))


def test_road_argument_checks() -> None:
    net = _small_cnn()
    x, s = torch.randn(1, 3, 4, 4), torch.rand(1, 4, 4)
    with pytest.raises(ValueError, match="percentages"):
        road(net, x, s, 0, percentages=(50, 100))
    with pytest.raises(ValueError, match="order"):
        road(net, x, s, 0, order="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="saliency must have shape"):
        road(net, x, torch.rand(1, 4, 5), 0)
    with pytest.raises(ValueError, match="images is an empty batch"):
        road(net, x[:0], s[:0], 0)
    with pytest.raises(ValueError, match="noise"):
        road(net, x, s, 0, noise=math.inf)
    with pytest.raises(ValueError, match="radius"):
        max_sensitivity(lambda im, t: im.mean(1), x, 0, radius=0.0)
