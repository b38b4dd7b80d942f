"""Cross-check of lwcam's deletion/insertion games against torchcam's ``DeletionInsertionMetric``.

torchcam 0.5.0 implements the RISE games too. Its protocol, read from its source, and how each point
is aligned here:

* **Saliency.** torchcam computes the map itself with a CAM extractor, then resizes it bilinearly to
  the input size. Here a small adapter (``benchmarks/torchcam_adapter.py``, shared with the timing
  benchmark) hands it our precomputed (B, H, W) saliency; resizing to the
  same size is the identity, so both rank exactly the same numbers.
* **Ranking and ties.** torchcam: ``argsort(cam, descending=True, stable=True)``. Ours: a stable sort
  of ``-saliency``. Both rank descending with ties in raster order (lower flat index first), so the
  orders are identical; the batch below holds a constant map and a coarsely quantised map
  (many ties) to exercise that.
* **Step schedule.** torchcam takes a number of intervals ``steps`` and moves
  ``ceil(H*W / steps)`` pixels per step, the last step moving the remainder. Ours takes the pixels
  per step (default W). ``steps=H`` in torchcam equals our default ``step=W``; ``steps=10`` on
  32x32 (103 pixels, last step 97) equals our ``step=103``. Schedules it cannot express (e.g. 100
  pixels per step on 32x32) are not compared.
* **Substrate.** torchcam has one ``baseline`` shared by both games: deletion replaces pixels with it
  and insertion starts from it (zeros by default). Our deletion substrate defaults to zeros, as
  torchcam's; our insertion starts from a Gaussian blur. Each game is compared with both sides set
  to the same canvas: zeros, then the blur (passed to torchcam as a ``baseline`` callable).
* **Score.** torchcam applies ``logits_fn`` (here softmax) to the model output and picks the class
  given in ``class_idx``; ours is the softmax probability of ``targets``: the same numbers. torchcam
  scores the unperturbed image in a separate full-batch forward pass; batch composition differs
  between the two, which changes float32 results by ~1e-7.
* **AUC.** torchcam integrates with ``torch.trapezoid`` against the actual fraction of pixels moved;
  ours uses equally spaced points on [0, 1] (``(sum - s0/2 - s_last/2) / (n - 1)``), the protocol
  formula. With equal steps (``step`` divides H*W) the two are identical. With a partial last step
  they differ, and the test checks that torchcam's value equals our curve integrated against our
  ``fractions`` (so the curves agree) while our AUC follows the protocol formula.
* **NaN maps.** torchcam silently drops images whose CAM has NaN; ours raises. Not exercised.

Tolerance: 1e-5 absolute on per-image AUCs and on means. Both sides evaluate the same float32
model on bit-identical perturbed images; only float32 rounding from different batch composition
separates them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from lwcam.blackbox import BlackBox
from lwcam.scoring.games import deletion_game, game_auc, gaussian_blur, insertion_game

pytest.importorskip("torchcam.metrics")

ATOL = 1e-5
H = W = 32


def _load_adapter():
    """``benchmarks/torchcam_adapter.py`` (no side effects), the adapter the timing benchmark uses too."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "torchcam_adapter.py"
    spec = importlib.util.spec_from_file_location("torchcam_adapter", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


torchcam_games = _load_adapter().torchcam_games


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 10),
    ).eval()
    with torch.no_grad():
        model[-1].weight.mul_(30.0)  # spread the softmax so the curves move
    images = torch.randn(6, 3, H, W, generator=g)
    saliency = torch.rand(6, H, W, generator=g)
    saliency[0] = 0.5  # constant: pure raster order
    saliency[1] = (saliency[1] * 4).floor()  # four levels: many ties
    with torch.no_grad():
        targets = model(images).argmax(1).tolist()
    return model, images, saliency, targets


def peer_aucs(model, images, saliency, targets, *, steps, baseline=None) -> tuple[list[float], list[float]]:
    """Per-image deletion and insertion AUCs from torchcam (one image per update)."""
    dels, inss = [], []
    for i in range(images.shape[0]):
        out = torchcam_games(model, images[i : i + 1], saliency[i : i + 1], [targets[i]], steps=steps,
                             baseline=baseline)
        dels.append(out["deletion_auc"])
        inss.append(out["insertion_auc"])
    return dels, inss


def test_peer_test_is_not_trivial(setup) -> None:
    model, images, saliency, targets = setup
    res = deletion_game(model, images, saliency, targets)
    assert res.curves[:, 0].min() > 0.2  # well above chance (0.1) on its own class
    assert (res.curves.max(1).values - res.curves.min(1).values).min() > 0.05  # and the curves move
    assert res.auc.std() > 0.02
    assert len(set(targets)) > 1


def test_zero_baseline_equal_steps(setup) -> None:
    model, images, saliency, targets = setup
    peer_del, peer_ins = peer_aucs(model, images, saliency, targets, steps=H)
    ours_del = deletion_game(model, images, saliency, targets, substrate="zeros")
    ours_ins = insertion_game(model, images, saliency, targets, start="zeros")
    assert ours_del.step == W and ours_del.n_steps == H
    torch.testing.assert_close(ours_del.auc, torch.tensor(peer_del), atol=ATOL, rtol=0)
    torch.testing.assert_close(ours_ins.auc, torch.tensor(peer_ins), atol=ATOL, rtol=0)


def test_blur_baseline_equal_steps(setup) -> None:
    model, images, saliency, targets = setup
    peer_del, peer_ins = peer_aucs(model, images, saliency, targets, steps=H,
                                   baseline=lambda x: gaussian_blur(x, 11, 5.0))
    ours_ins = insertion_game(model, images, saliency, targets)  # default start: blur(11, 5)
    ours_del = deletion_game(model, images, saliency, targets, substrate="blur")
    torch.testing.assert_close(ours_ins.auc, torch.tensor(peer_ins), atol=ATOL, rtol=0)
    torch.testing.assert_close(ours_del.auc, torch.tensor(peer_del), atol=ATOL, rtol=0)


def test_partial_last_step_differs_only_in_auc_normalisation(setup) -> None:
    model, images, saliency, targets = setup
    peer_del, peer_ins = peer_aucs(model, images, saliency, targets, steps=10)  # ceil(1024/10) = 103
    ours_del = deletion_game(model, images, saliency, targets, step=103)
    ours_ins = insertion_game(model, images, saliency, targets, step=103, start="zeros")
    assert ours_del.fractions[-2].item() == pytest.approx(927 / 1024)  # last step moves 97 pixels
    for ours, peer in ((ours_del, peer_del), (ours_ins, peer_ins)):
        against_fraction = torch.trapezoid(ours.curves, ours.fractions, dim=1)
        torch.testing.assert_close(against_fraction, torch.tensor(peer), atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.auc, game_auc(ours.curves))
    # The normalisations genuinely differ here, by the weight of the short last interval.
    assert (ours_del.auc - torch.tensor(peer_del)).abs().max() > 1e-4


def test_batched_means_match(setup) -> None:
    """One batched torchcam update against one batched call of ours: mean AUCs agree."""
    model, images, saliency, targets = setup
    peer = torchcam_games(model, images, saliency, targets, steps=H, batch_size=32)
    ours_del = deletion_game(model, images, saliency, targets, batch_size=32)
    ours_ins = insertion_game(model, images, saliency, targets, start="zeros", batch_size=32)
    assert ours_del.auc.mean().item() == pytest.approx(peer["deletion_auc"], abs=ATOL)
    assert ours_ins.auc.mean().item() == pytest.approx(peer["insertion_auc"], abs=ATOL)


class _ViewFlatten(nn.Module):
    """A convnet whose head flattens with ``.view``, which a channels_last activation cannot take."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        self.layouts: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        a = self.conv(x)
        return self.fc(a.view(a.shape[0], -1)) * 30


def test_convnet_gets_channels_last_inputs_in_inference_mode(setup) -> None:
    model, images, saliency, targets = setup
    seen: list[tuple[bool, bool]] = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(
        (args[0].is_contiguous(memory_format=torch.channels_last), torch.is_inference_mode_enabled())))
    try:
        deletion_game(model, images[:2], saliency[:2], targets[:2], batch_size=40)
        deletion_game(BlackBox(model, num_classes=10), images[:2], saliency[:2], targets[:2], batch_size=40)
    finally:
        handle.remove()
    assert seen == [(True, True)] * 4


def test_model_that_rejects_channels_last_falls_back_and_matches_torchcam(setup) -> None:
    _, images, saliency, _ = setup
    model = _ViewFlatten().eval()
    with torch.no_grad():
        targets = model(images).argmax(1).tolist()
    model.layouts.clear()
    peer_del, peer_ins = peer_aucs(model, images, saliency, targets, steps=H)
    model.layouts.clear()
    bb = BlackBox(model, num_classes=10)
    ours_del = deletion_game(bb, images, saliency, targets, batch_size=64)
    assert model.layouts[:2] == [True, False] and not any(model.layouts[1:])  # one refusal, then NCHW
    assert bb.queries == ours_del.queries == images.shape[0] * (H + 1)  # the refused call costs nothing
    ours_ins = insertion_game(model, images, saliency, targets, start="zeros", batch_size=64)
    torch.testing.assert_close(ours_del.auc, torch.tensor(peer_del), atol=ATOL, rtol=0)
    torch.testing.assert_close(ours_ins.auc, torch.tensor(peer_ins), atol=ATOL, rtol=0)
