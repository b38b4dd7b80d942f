"""Let torchcam's ``DeletionInsertionMetric`` (torchcam 0.5.0) score precomputed saliency maps.

torchcam computes its map with a CAM extractor; :class:`FixedSaliency` stands in for that extractor
and hands it a given (B, H, W) map instead. Resizing to the input size is then the identity, so
torchcam ranks exactly the numbers lwcam ranks. Shared by ``tests/test_games_peer.py`` (the
cross-check) and ``benchmarks/bench_games.py`` (the timing). Importing this module has no side
effects; torchcam is imported when :func:`torchcam_games` runs.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).eval()
    >>> out = torchcam_games(net, torch.rand(2, 3, 4, 4), torch.rand(2, 4, 4), [0, 1], steps=4)
    >>> sorted(out)
    ['deletion_auc', 'insertion_auc']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

__all__ = ["FixedSaliency", "torchcam_games"]


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


def torchcam_games(model: nn.Module, images: torch.Tensor, saliency: torch.Tensor,
                   targets: Sequence[int] | torch.Tensor, *, steps: int,
                   baseline: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
                   batch_size: int = 64) -> dict[str, float]:
    """torchcam's mean deletion and insertion AUCs of ``saliency`` over ``images``, from one ``update``.

    Args:
        model: the classifier (logits); scored with a softmax, as lwcam's games do.
        images: (B, C, H, W) images.
        saliency: (B, H, W) maps, one per image.
        targets: the class scored on each image.
        steps: torchcam's number of intervals (``steps=H`` is lwcam's default step of W pixels).
        baseline: torchcam's canvas, shared by both games (``None``: zeros).
        batch_size: torchcam's model batch size.

    Returns:
        torchcam's ``summary()``: ``{"deletion_auc": ..., "insertion_auc": ...}``.
    """
    from torchcam.metrics import DeletionInsertionMetric

    metric = DeletionInsertionMetric(FixedSaliency(model, saliency), partial(torch.softmax, dim=-1),
                                     steps=steps, baseline=baseline, batch_size=batch_size)
    metric.update(images, class_idx=[int(t) for t in targets])
    return metric.summary()
