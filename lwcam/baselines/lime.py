"""LIME on superpixels (Ribeiro et al., KDD 2016) through captum's ``Lime``, scored by the black box."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr import Lime
from skimage.segmentation import slic

from .._checks import check_images, check_real, check_targets
from .._ops import minmax_normalize
from .._utils import track
from ..blackbox import BlackBox, as_prob_fn
from ._base import Targets, check_seed, finish, require_blackbox

__all__ = ["lime", "superpixels"]

Segmentation = Literal["slic", "grid"]


def _to_display(image: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """(3,H,W) normalised image -> (H,W,3) float array in [0,1] for segmentation."""
    x = image.detach().cpu().float()
    if mean is not None and std is not None:
        scale = torch.tensor(std, dtype=torch.float32)[:, None, None]
        x = x * scale + torch.tensor(mean, dtype=torch.float32)[:, None, None]
        x = x.clamp(0, 1)
    else:  # one affine map for all channels keeps the colours' relations
        x = minmax_normalize(x.reshape(1, -1)).reshape(x.shape)
    return x.permute(1, 2, 0).numpy().astype(np.float64)


def _grid_segments(h: int, w: int, n_segments: int) -> np.ndarray:
    side = max(1, round(math.sqrt(n_segments)))
    rows = np.minimum(np.arange(h) * side // h, side - 1)
    cols = np.minimum(np.arange(w) * side // w, side - 1)
    return rows[:, None] * side + cols[None, :]


def superpixels(image: torch.Tensor, n_segments: int = 50, *, segmentation: Segmentation = "slic",
                compactness: float = 10.0, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> torch.Tensor:
    """Superpixel labels ``(H,W)`` (int64, consecutive from 0) for one ``(3,H,W)`` image.

    ``"slic"`` runs scikit-image's SLIC on the de-normalised image (``x·std + mean`` when
    both are given, else the image rescaled to [0,1] with one affine map); ``"grid"`` cuts a
    regular ``√n × √n`` grid. The grid is also the fallback when scikit-image is missing or
    SLIC returns a single segment (a flat image, or pure noise at a small size).

    Example:
        >>> seg = superpixels(torch.rand(3, 32, 32), 16, segmentation="grid")
        >>> seg.shape, int(seg.max()) + 1
        (torch.Size([32, 32]), 16)
    """
    _, h, w = image.shape
    if segmentation not in ("slic", "grid"):
        raise ValueError(f"segmentation must be 'slic' or 'grid', got {segmentation!r}")
    labels: np.ndarray | None = None
    if segmentation == "slic":
        labels = slic(_to_display(image, mean, std), n_segments=n_segments, compactness=compactness,
                      start_label=0, channel_axis=-1)
    if labels is None or len(np.unique(labels)) < 2:  # SLIC found no structure (e.g. flat or noise)
        labels = _grid_segments(h, w, n_segments)
    _, consecutive = np.unique(labels, return_inverse=True)
    return torch.from_numpy(consecutive.reshape(h, w).astype(np.int64))


def _check_args(seed: int, *, n_samples: int, n_segments: int, batch_size: int, kernel_width: float,
                mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    check_seed(seed)
    for name, v in (("n_samples", n_samples), ("n_segments", n_segments), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not kernel_width > 0:
        raise ValueError(f"kernel_width must be > 0, got {kernel_width!r}")
    # σ² divides the distance: it must neither underflow to 0 nor overflow (Python floats raise there)
    check_real(kernel_width, "kernel_width", math.sqrt(sys.float_info.min), math.sqrt(sys.float_info.max))
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std to de-normalise the images, or neither")


def _similarity(kernel_width: float) -> Callable[..., float]:
    """LIME's sample weight ``π(z) = sqrt(exp(−D(z)² / σ²))``, ``D`` the cosine distance of ``z`` to all ones."""

    def similarity(_orig: object, _pert: object, z: torch.Tensor, **_: object) -> float:
        z = z.float().flatten()
        cos = z.sum() / (z.norm() * math.sqrt(z.numel())) if z.any() else torch.tensor(0.0)
        return math.sqrt(math.exp(-float(1 - cos) ** 2 / kernel_width**2))

    return similarity


def lime(
    blackbox: BlackBox,
    images: torch.Tensor,
    targets: Targets,
    *,
    n_samples: int = 1000,
    n_segments: int = 50,
    segmentation: Segmentation = "slic",
    compactness: float = 10.0,
    kernel_width: float = 0.25,
    alpha: float = 1.0,
    batch_size: int = 250,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> torch.Tensor:
    """LIME: a weighted linear model of the black box's target probability over superpixels.

    For each image, superpixels are found (SLIC), ``n_samples`` binary vectors
    ``z ∈ {0,1}^d`` are drawn (each superpixel kept with probability 1/2), the image with the
    dropped superpixels set to 0 (the dataset mean in normalised space) is sent to the black
    box, and a ridge regression ``P_c(x_z) ≈ β₀ + Σ_j β_j z_j`` is fitted with sample weights
    ``π(z) = sqrt(exp(−D(z)² / σ²))``, ``D`` the cosine distance between ``z`` and the all-ones
    vector and ``σ = kernel_width`` (the kernel and the ridge model of the reference ``lime_image``). Every pixel
    gets its superpixel's coefficient ``β_j``. Sampling, the perturbed images and the fit are
    captum's ``Lime`` (``perturbations_per_eval = batch_size``, one image per call so that no
    extra query is spent).

    Cost: exactly ``n_samples`` black-box queries per image.

    Args:
        blackbox: the model, reachable only through a :class:`~lwcam.BlackBox`.
        images: ``(B,3,H,W)`` images in the model's normalised space.
        targets: the class to explain per image: an int, a sequence or a ``(B,)`` tensor.
        n_samples: perturbed images per image.
        n_segments: the approximate number of superpixels.
        segmentation: ``"slic"`` or ``"grid"``.
        compactness: SLIC's colour/space trade-off.
        kernel_width: σ of the similarity kernel on the cosine distance.
        alpha: ridge penalty of the surrogate linear model.
        batch_size: perturbed images per black-box call.
        mean, std: the normalisation of ``images``, to de-normalise them for SLIC (optional).
        seed: seed of the sampled perturbations; the same seed gives identical maps.
        progress: show a progress bar over images (``None``: only on a TTY).

    Returns:
        ``(B,H,W)`` float32 attribution (surrogate coefficients, probability units).

    Example:
        >>> from torch import nn
        >>> bb = BlackBox(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)), num_classes=10)
        >>> s = lime(bb, torch.rand(2, 3, 16, 16), 0, n_samples=40, n_segments=9)
        >>> s.shape, bb.queries
        (torch.Size([2, 16, 16]), 80)
    """
    bb = require_blackbox(blackbox, "lime")
    images = check_images(images, channels=bb.channels)
    b, _, h, w = images.shape
    targets = check_targets(targets, b, bb.num_classes)
    _check_args(seed, n_samples=n_samples, n_segments=n_segments, batch_size=batch_size, kernel_width=kernel_width,
                mean=mean, std=std)
    prob_fn = as_prob_fn(bb)
    images = images.cpu().float()
    similarity = _similarity(kernel_width)
    out = torch.zeros(b, h, w)
    for i in track(range(b), total=b, desc="LIME", enabled=progress):
        seg = superpixels(images[i], n_segments, segmentation=segmentation, compactness=compactness,
                          mean=mean, std=std)
        d = int(seg.max()) + 1
        g = torch.Generator()  # same stream for every image: a map does not depend on the batch
        g.manual_seed(seed)

        def sample(_inp: object, _g: torch.Generator = g, _d: int = d, **_: object) -> torch.Tensor:
            return torch.bernoulli(torch.full((1, _d), 0.5), generator=_g).long()

        explainer = Lime(prob_fn, interpretable_model=SkLearnRidge(alpha=alpha),
                         similarity_func=similarity, perturb_func=sample)
        attr = explainer.attribute(
            images[i : i + 1],
            target=int(targets[i]),
            baselines=0.0,
            feature_mask=seg[None, None],
            n_samples=n_samples,
            perturbations_per_eval=batch_size,
            return_input_shape=True,
        )
        out[i] = attr[0].float().mean(dim=0)
    return finish(out)
