"""Cross-check of lwcam's deletion/insertion games against torchcam's ``DeletionInsertionMetric``.

torchcam 0.5.0 implements the RISE games too. Its protocol, read from its source, and how each point
is aligned here:

* **Saliency.** torchcam computes the map itself with a CAM extractor, then resizes it bilinearly to
  the input size. Here a small adapter hands it our precomputed (B, H, W) saliency; resizing to the
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

from contextlib import contextmanager
from functools import partial

import pytest
import torch
from torch import nn

from lwcam.metrics import deletion_game, game_auc, gaussian_blur, insertion_game

DeletionInsertionMetric = pytest.importorskip("torchcam.metrics").DeletionInsertionMetric

ATOL = 1e-5
H = W = 32


class FixedSaliency:
    """A torchcam CAM-extractor stand-in that returns a given saliency map instead of computing one."""

    def __init__(self, model: nn.Module, saliency: torch.Tensor) -> None:
        self.model = model
        self.saliency = saliency

    def __call__(self, class_idx=None, scores=None, normalized=True, *, targets=None, **kwargs):
        return [self.saliency]

    def fuse_cams(self, cams: list[torch.Tensor]) -> torch.Tensor:
        return cams[0]

    @contextmanager
    def _hooks_off(self):
        yield


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
        metric = DeletionInsertionMetric(FixedSaliency(model, saliency[i : i + 1]), partial(torch.softmax, dim=-1),
                                         steps=steps, baseline=baseline, batch_size=64)
        metric.update(images[i : i + 1], class_idx=[targets[i]])
        out = metric.summary()
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
    metric = DeletionInsertionMetric(FixedSaliency(model, saliency), partial(torch.softmax, dim=-1), steps=H,
                                     batch_size=32)
    metric.update(images, class_idx=targets)
    peer = metric.summary()
    ours_del = deletion_game(model, images, saliency, targets, batch_size=32)
    ours_ins = insertion_game(model, images, saliency, targets, start="zeros", batch_size=32)
    assert ours_del.auc.mean().item() == pytest.approx(peer["deletion_auc"], abs=ATOL)
    assert ours_ins.auc.mean().item() == pytest.approx(peer["insertion_auc"], abs=ATOL)
