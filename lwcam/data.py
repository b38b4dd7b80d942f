"""Data sets: the embedded synthetic default and loaders for the paper's four data sets.

Every data set yields ``(image, label, mask)``:

* ``image``: float tensor (3,H,W) in the model's normalised space, ``(x - mean) / std``;
* ``label``: int class index;
* ``mask``: bool tensor (H,W), the ground-truth object (all False where none is known;
  CUB-200-2011's mask is its bounding box).

The embedded default, :class:`SyntheticTextures`, runs anywhere without downloads. Each
image holds one class-carrying object on a photographic background (crops of the photos
bundled with scikit-image) with distractor objects. **The class is the object's internal
texture** (stripes, checkerboard, dots, rings, ...), drawn in two random colours, inside a
random silhouette with random position, scale and rotation. Distractors share the
silhouettes and colours but are filled with smooth, texture-free shading, so neither
colour, shape, position nor the image border tells the class. Deleting the object's
pixels (the deletion game's default zero substrate) removes the class evidence, which is
what makes the oracle check of the benchmark hold.

Every image is a pure function of ``(seed, split, index)``.

Example:
    >>> ds = get_dataset("synthetic", split="test", n=4)
    >>> image, label, mask = ds[0]
    >>> image.shape, mask.shape, mask.dtype
    (torch.Size([3, 64, 64]), torch.Size([64, 64]), torch.bool)

Why one file: the embedded generator, its class-conflict scenes and the real loaders are three sources
behind one contract, ``(image, label, mask)`` in the normalised space, and they share the normalisation,
the mask conventions and :func:`render_arrays`. Each source is a marked section; the file becomes a
package when a fifth data set arrives.
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import os
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data as skd
import torch
import torchvision.datasets as tvd
from PIL import Image
from torch.utils.data import Dataset

from ._checks import check_positive_int
from ._utils import atomic_write_bytes, track

__all__ = [
    "CLASS_NAMES",
    "SPLITS",
    "SPLIT_SIZES",
    "SYNTHETIC_MEAN",
    "SYNTHETIC_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MEAN",
    "STD",
    "SyntheticTextures",
    "CONFLICT_OFFSET",
    "ConflictScenes",
    "conflict_classes",
    "render_conflict",
    "object_area_fractions",
    "ImageFolderWithMasks",
    "CUB200",
    "get_dataset",
    "normalization",
    "denormalize",
    "load_tensors",
    "render_synthetic",
    "render_arrays",
    "DEFAULT_OBJECT_RADIUS",
    "check_object_radius",
    "object_size_cells",
    "RENDER_CHUNK",
]

SPLITS = ("train", "transfer", "val", "test")
_SPLIT_IDS = {s: i for i, s in enumerate(SPLITS)}
#: Default number of images per split of the synthetic set.
SPLIT_SIZES = {"train": 12000, "transfer": 20000, "val": 1000, "test": 1000}

CLASS_NAMES = (
    "stripes",
    "checkerboard",
    "dots",
    "rings",
    "spokes",
    "grid",
    "waves",
    "spots",
    "chevrons",
    "speckle",
)

#: Per-channel pixel statistics of the synthetic set (measured on 4000 train images at 64x64,
#: seed 0; ``tests/test_data.py`` re-measures them).
SYNTHETIC_MEAN = (0.4903, 0.4678, 0.4574)
SYNTHETIC_STD = (0.1895, 0.1936, 0.1869)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN, STD = SYNTHETIC_MEAN, SYNTHETIC_STD


def normalization(name: str = "synthetic") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of the normalised input space for a data set name."""
    return (SYNTHETIC_MEAN, SYNTHETIC_STD) if name == "synthetic" else (IMAGENET_MEAN, IMAGENET_STD)


def denormalize(images: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """Map normalised images (...,3,H,W) back to [0,1] pixel space (clamped)."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images * s + m).clamp(0, 1)


# --------------------------------------------------------------------------- synthetic
@functools.lru_cache(maxsize=1)
def _backgrounds() -> tuple[np.ndarray, ...]:
    """Photos bundled with scikit-image, as float32 RGB in [0,1], downsampled to <= 256 px."""
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera", "grass", "gravel", "brick")
    out = []
    for name in names:
        img = np.asarray(getattr(skd, name)())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        pil = Image.fromarray(img[..., :3].astype(np.uint8))
        scale = 256 / max(pil.size)
        if scale < 1:
            pil = pil.resize((round(pil.size[0] * scale), round(pil.size[1] * scale)), Image.Resampling.BILINEAR)
        out.append(np.asarray(pil, dtype=np.float32) / 255.0)
    return tuple(out)


def _smoothstep(x: np.ndarray, sharp: float) -> np.ndarray:
    """Anti-aliased binarisation of a signed field: ~0 for x<0, ~1 for x>0."""
    return 0.5 * (1.0 + np.tanh(sharp * x))


def _texture(cls: int, u: np.ndarray, v: np.ndarray, r: np.ndarray, theta: np.ndarray, period: float,
             rng: np.random.Generator) -> np.ndarray:
    """Class texture in [0,1] at object-frame coordinates ``u, v`` (pixels), polar ``r, theta``."""
    p = period
    tau = 2 * np.pi
    s = 3.0  # edge sharpness of the smooth binarisation
    if cls == 0:  # stripes
        return _smoothstep(np.sin(tau * u / p), s)
    if cls == 1:  # checkerboard
        return _smoothstep(np.sin(tau * u / (1.6 * p)) * np.sin(tau * v / (1.6 * p)), 2 * s)
    if cls == 2:  # dots on a square lattice
        q = 1.3 * p
        du = (u / q - np.round(u / q)) * q
        dv = (v / q - np.round(v / q)) * q
        return _smoothstep(0.3 * q - np.sqrt(du**2 + dv**2), 1.5)
    if cls == 3:  # concentric rings around the object centre
        return _smoothstep(np.sin(tau * r / p), s)
    if cls == 4:  # radial spokes
        n = int(rng.integers(5, 8))
        return _smoothstep(np.sin(n * theta), s)
    if cls == 5:  # grid lines
        q = 1.6 * p
        du = np.abs((u / q - np.round(u / q)) * q)
        dv = np.abs((v / q - np.round(v / q)) * q)
        return _smoothstep(0.17 * q - np.minimum(du, dv), 2.0)
    if cls == 6:  # wavy stripes
        return _smoothstep(np.sin(tau * (u + 0.35 * p * np.sin(tau * v / (2.2 * p))) / p), s)
    if cls == 7:  # spots: smooth random blobs, coarser than the speckle
        h, w = u.shape
        cell = max(2, int(round(p * 0.8)))
        noise = rng.standard_normal(((h + cell - 1) // cell + 1, (w + cell - 1) // cell + 1)).astype(np.float32)
        up = np.asarray(Image.fromarray(noise).resize(((noise.shape[1]) * cell, (noise.shape[0]) * cell),
                                                      Image.Resampling.BICUBIC))[:h, :w]
        return _smoothstep(up - 0.3, 3.0)
    if cls == 8:  # chevrons: sharp zigzag stripes
        q = 1.4 * p
        tri = np.abs((v / q - np.floor(v / q)) * 2 - 1) * q  # triangle wave in v
        return _smoothstep(np.sin(tau * (u + tri) / (1.25 * p)), s)
    if cls == 9:  # speckle: fine random binary noise, upsampled 2x
        h, w = u.shape
        bits = rng.random(((h + 1) // 2, (w + 1) // 2)) > 0.5
        return np.kron(bits, np.ones((2, 2)))[:h, :w].astype(np.float32)
    raise ValueError(f"class index must be in [0, {len(CLASS_NAMES)}), got {cls}")


def _silhouette(kind: int, u: np.ndarray, v: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A soft-edged shape (0..1) in object coordinates: ellipse, rounded square, polygon or blob."""
    if kind == 0:  # ellipse
        a = radius
        b = radius * rng.uniform(0.65, 1.0)
        d = 1 - np.sqrt((u / a) ** 2 + (v / b) ** 2)
        return np.clip(d * radius + 0.5, 0, 1)
    if kind == 1:  # rounded square / rectangle
        a = radius * 0.85
        b = a * rng.uniform(0.7, 1.0)
        d = np.minimum(a - np.abs(u), b - np.abs(v))
        return np.clip(d + 0.5, 0, 1)
    theta = np.arctan2(v, u)
    rr = np.sqrt(u**2 + v**2)
    if kind == 2:  # regular polygon
        n = int(rng.integers(3, 7))
        apothem = radius * np.cos(np.pi / n) * (1.1 if n == 3 else 1.0)
        sector = np.mod(theta, 2 * np.pi / n) - np.pi / n
        d = apothem - rr * np.cos(sector)
        return np.clip(d + 0.5, 0, 1)
    # kind == 3: smooth blob with random harmonics
    coef = rng.uniform(-0.12, 0.12, size=3)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    wobble = sum(c * np.cos((k + 2) * theta + ph) for k, (c, ph) in enumerate(zip(coef, phase, strict=True)))
    rad = radius * (1 + wobble)
    return np.clip(rad - rr + 0.5, 0, 1)


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours with a clear luminance difference."""
    lum = np.array([0.299, 0.587, 0.114])
    while True:
        c1, c2 = rng.uniform(0, 1, size=3), rng.uniform(0, 1, size=3)
        if abs(lum @ c1 - lum @ c2) > 0.4:
            return c1.astype(np.float32), c2.astype(np.float32)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    photos = _backgrounds()
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    crop = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
    y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    patch = photo[y0 : y0 + crop, x0 : x0 + crop]
    pil = Image.fromarray((patch * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    bg = np.asarray(pil, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        bg = bg[:, ::-1]
    if rng.random() < 0.5:
        bg = bg[::-1]
    bg = np.rot90(bg, int(rng.integers(4)))
    tint = rng.uniform(0.6, 1.2, size=3).astype(np.float32)
    contrast = rng.uniform(0.3, 0.6)
    bg = (bg - bg.mean()) * contrast + rng.uniform(0.3, 0.7)
    return np.clip(bg * tint, 0, 1).astype(np.float32)


def _check_image_size(image_size: object) -> None:
    """The synthetic renderer's sizes: 16 px (room for an object and clutter) to 1024 px."""
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer) or not 16 <= image_size <= 1024:
        raise ValueError(f"image_size must be an int in [16, 1024], got {image_size!r}")


#: Below this radius (px at 64 px) the class texture's period shrinks in proportion (:func:`render_synthetic`).
SMALL_RADIUS = 8.0

#: The class object's radius range of :func:`render_synthetic`, in pixels of a 64-px image (scaled with the
#: image): the range of the first data sets, where objects span about four cells of an 8×8 last map.
DEFAULT_OBJECT_RADIUS = (14.0, 20.0)


def check_object_radius(object_radius: object, image_size: int = 64) -> tuple[float, float]:
    """``object_radius`` as ``(lo, hi)`` floats, or a ValueError naming it.

    Both ends are finite, ``0 < lo <= hi``, given in pixels of a 64-px image, and the largest object
    (``hi`` scaled to ``image_size``, plus a pixel of margin) must fit inside the image.

    Example:
        >>> check_object_radius([5, 20])
        (5.0, 20.0)
        >>> check_object_radius((20, 5))
        Traceback (most recent call last):
        ...
        ValueError: object_radius must be (lo, hi) with 0 < lo <= hi, got (20, 5)
    """
    if (isinstance(object_radius, (str, bytes)) or not isinstance(object_radius, (tuple, list))
            or len(object_radius) != 2
            or not all(isinstance(r, (int, float, np.integer, np.floating)) and not isinstance(r, bool)
                       for r in object_radius)):
        raise ValueError(f"object_radius must be a pair (lo, hi) of numbers, got {object_radius!r}")
    lo, hi = float(object_radius[0]), float(object_radius[1])
    if not (np.isfinite(lo) and np.isfinite(hi)) or not 0 < lo <= hi:
        raise ValueError(f"object_radius must be (lo, hi) with 0 < lo <= hi, got {tuple(object_radius)!r}")
    if hi * image_size / 64.0 + 1 >= image_size / 2:
        raise ValueError(f"object_radius {tuple(object_radius)!r} (pixels at 64 px) does not fit a "
                         f"{image_size}-px image: the largest radius must stay below {32 - 64 / image_size:g}")
    return lo, hi


def render_synthetic(seed: int, split: str, index: int, image_size: int = 64, num_classes: int = 10,
                     n_distractors: tuple[int, int] = (1, 2), *, label: int | None = None,
                     object_radius: tuple[float, float] = DEFAULT_OBJECT_RADIUS
                     ) -> tuple[np.ndarray, int, np.ndarray]:
    """Render one synthetic image: a pure function of ``(seed, split, index)``, the sizes and ``label``.

    ``label`` forces the object's class (``None``: the image's own class). The background, the
    distractors and the object's silhouette, position and scale are drawn from the same stream
    either way, so a forced class changes the object's texture (and, for classes whose texture
    draws random numbers, its colours). ``object_radius`` is the class object's radius range
    ``(lo, hi)`` in pixels of a 64-px image (:func:`check_object_radius`); the radius is drawn
    log-uniformly from it (as many objects between 5 and 10 px as between 10 and 20), and the
    texture period, 5 to 6.5 px, shrinks in proportion below a radius of :data:`SMALL_RADIUS`, so that
    a radius of 5 still holds about three periods across.

    Returns:
        ``(image, label, mask)``: float32 RGB (H,W,3) in [0,1], the class index, bool mask (H,W).
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in [2, {len(CLASS_NAMES)}], got {num_classes}")
    _check_image_size(image_size)
    r_lo, r_hi = check_object_radius(object_radius, image_size)
    if label is not None and (isinstance(label, bool) or not isinstance(label, int | np.integer)
                              or not 0 <= label < num_classes):
        raise ValueError(f"label must be None or an int in [0, {num_classes}), got {label!r}")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, 7919])
    size = image_size
    own = int(rng.integers(num_classes))  # drawn either way: a forced label leaves the stream alone
    label = own if label is None else int(label)
    img = _background(size, rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    unit = size / 64.0  # geometry scales with the image

    def place(radius: float) -> tuple[np.ndarray, np.ndarray, float, float]:
        margin = radius + 1
        cx, cy = rng.uniform(margin, size - margin, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        ca, sa = np.cos(angle), np.sin(angle)
        u = ca * (xx - cx) + sa * (yy - cy)
        v = -sa * (xx - cx) + ca * (yy - cy)
        return u, v, cx, cy

    # distractors first (they may be partly covered by the object)
    for _ in range(int(rng.integers(n_distractors[0], n_distractors[1] + 1))):
        radius = rng.uniform(7, 13) * unit
        u, v, _, _ = place(radius)
        alpha = _silhouette(int(rng.integers(4)), u, v, radius, rng)[..., None]
        c1, c2 = _colour_pair(rng)
        g = np.clip(0.5 + (u * np.cos(rng.uniform(0, 6.3)) + v * np.sin(rng.uniform(0, 6.3))) / (2.5 * radius), 0, 1)
        fill = c1 * (1 - g[..., None]) + c2 * g[..., None]  # smooth two-colour gradient: no texture
        img = img * (1 - alpha) + fill * alpha

    radius = np.exp(rng.uniform(np.log(r_lo), np.log(r_hi))) * unit  # log-uniform: as many small as large
    u, v, cx, cy = place(radius)
    alpha = _silhouette(int(rng.integers(4)), u, v, radius, rng)
    # the period shrinks with objects below a radius of 8 px, so the smallest keep about three periods
    period = rng.uniform(5.0, 6.5) * unit * min(1.0, radius / (SMALL_RADIUS * unit))
    u_t = u + rng.uniform(0, period)
    v_t = v + rng.uniform(0, period)
    rr = np.sqrt(u**2 + v**2)
    theta = np.arctan2(v, u)
    tex = _texture(label, u_t, v_t, rr, theta, period, rng)[..., None]
    c1, c2 = _colour_pair(rng)
    fill = c1 * (1 - tex) + c2 * tex
    img = img * (1 - alpha[..., None]) + fill * alpha[..., None]
    img = img + rng.normal(0, 0.02, size=img.shape).astype(np.float32)  # sensor noise
    mask = alpha >= 0.5
    return np.clip(img, 0, 1).astype(np.float32), label, mask


def _radius_tag(object_radius: tuple[float, float]) -> str:
    """``object_radius`` in a cache file name: ``(5.0, 20.0)`` -> ``"5-20"``."""
    return "-".join(f"{r:g}" for r in object_radius)


#: Images per task of the parallel renderer: a smooth progress bar, and a negligible cost per task.
RENDER_CHUNK = 200

RenderFn = Callable[[int], tuple[np.ndarray, Any, np.ndarray]]


def _render_block(render: RenderFn, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items ``lo .. hi - 1`` of ``render`` as stacked uint8 images, int64 labels and bool masks."""
    items = [render(i) for i in range(lo, hi)]
    images = np.stack([np.round(img * 255).astype(np.uint8) for img, _, _ in items])
    labels = np.array([label for _, label, _ in items], dtype=np.int64)
    return images, labels, np.stack([mask for _, _, mask in items]).astype(bool)


def _render_workers(n: int, workers: int | None) -> int:
    """``workers`` if given; else one process per CPU this process may use (one for fewer than two chunks)."""
    if workers is not None:
        return check_positive_int(workers, "workers")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, n // RENDER_CHUNK))


def render_arrays(render: RenderFn, n: int, *, desc: str = "render", progress: bool | None = None,
                  workers: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render items ``0 .. n - 1`` in index order as uint8 images, int64 labels and bool masks.

    ``render(i)`` returns ``(float image in [0, 1], label, mask)`` and must be a pure function of ``i``
    (picklable, e.g. a ``functools.partial`` of :func:`render_synthetic`). Chunks of
    :data:`RENDER_CHUNK` items go to ``workers`` processes (default: one per usable CPU), forked
    where the platform can; the result is byte for byte what one process renders.

    Example:
        >>> render = functools.partial(render_synthetic, 0, "val", image_size=16, num_classes=4)
        >>> images, labels, masks = render_arrays(render, 3, workers=1)
        >>> images.shape, images.dtype, labels.tolist() == [render(i)[1] for i in range(3)], masks.shape
        ((3, 16, 16, 3), dtype('uint8'), True, (3, 16, 16))
    """
    check_positive_int(n, "n")
    k = _render_workers(n, workers)
    starts = list(range(0, n, RENDER_CHUNK))
    stops = [min(lo + RENDER_CHUNK, n) for lo in starts]
    if k == 1:
        return _join((_render_block(render, lo, hi) for lo, hi in zip(starts, stops, strict=True)), len(starts),
                     desc, progress)
    _backgrounds()  # loaded once, here: forked workers inherit it
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=k, mp_context=ctx) as pool:
        return _join(pool.map(_render_block, [render] * len(starts), starts, stops), len(starts), desc, progress)


def _join(blocks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], total: int, desc: str,
          progress: bool | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts = list(track(blocks, total=total, desc=desc, enabled=progress))
    images, labels, masks = (np.concatenate([p[j] for p in parts]) for j in range(3))
    return images, labels, masks


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def _read_cached(path: Path | None) -> Arrays | None:
    """``(images, labels, masks)`` from a rendered split's cache file, or ``None`` when there is none."""
    if path is None or not path.exists():
        return None
    try:
        with np.load(path) as z:
            return z["images"], z["labels"], z["masks"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"the cache file {path} cannot be read ({type(err).__name__}: {err}); delete it to render "
                         f"the split again") from err


def _write_cached(path: Path | None, arrays: Arrays) -> None:
    """Write ``(images, labels, masks)`` to a cache file atomically (nothing when ``path`` is ``None``)."""
    if path is None:
        return
    buf = io.BytesIO()
    np.savez(buf, images=arrays[0], labels=arrays[1], masks=arrays[2])
    atomic_write_bytes(buf.getvalue(), path)


def _memoised(owner: Any, render: Callable[[], Arrays]) -> Arrays:
    """``owner._arrays`` once set; else the arrays in ``owner._cache_file()``; else ``render()``, written
    there. Whichever it is is kept on ``owner`` (one render or read per data set object)."""
    if owner._arrays is None:
        path = owner._cache_file()
        cached = _read_cached(path)
        if cached is None:
            cached = render()
            _write_cached(path, cached)
        owner._arrays = cached
    return owner._arrays


class SyntheticTextures(Dataset):
    """The embedded default: textured objects on photographic clutter, with object masks.

    Args:
        split: ``"train"`` (teacher only), ``"transfer"`` (unlabelled distillation images),
            ``"val"`` or ``"test"``. The splits are disjoint: each draws from its own stream.
        n: number of images (default :data:`SPLIT_SIZES` of the split).
        image_size: side length H = W in pixels.
        num_classes: number of texture classes (2..10).
        seed: data seed; every image is a pure function of ``(seed, split, index)``.
        cache_dir: optional folder where a rendered split is kept as one ``.npz`` file and
            reused (written atomically).
        transform: optional callable applied to the normalised image tensor.
        object_radius: the class object's radius range ``(lo, hi)`` in pixels of a 64-px image
            (:func:`render_synthetic`).

    Example:
        >>> ds = SyntheticTextures("val", n=2, image_size=32)
        >>> [tuple(t.shape) if hasattr(t, "shape") else t for t in ds[1]][:1]
        [(3, 32, 32)]
    """

    mean = SYNTHETIC_MEAN
    std = SYNTHETIC_STD

    def __init__(self, split: str = "test", n: int | None = None, image_size: int = 64, num_classes: int = 10,
                 seed: int = 0, cache_dir: str | os.PathLike | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 object_radius: tuple[float, float] = DEFAULT_OBJECT_RADIUS) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        n = SPLIT_SIZES[split] if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if not 2 <= num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in [2, {len(CLASS_NAMES)}], got {num_classes}")
        _check_image_size(image_size)
        self.object_radius = check_object_radius(object_radius, image_size)
        self.split, self.n, self.image_size = split, n, image_size
        self.num_classes, self.seed, self.transform = num_classes, seed, transform
        self.classes = list(CLASS_NAMES[:num_classes])
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._norm = (
            torch.tensor(SYNTHETIC_MEAN).view(3, 1, 1),
            torch.tensor(SYNTHETIC_STD).view(3, 1, 1),
        )

    def __len__(self) -> int:
        return self.n

    def _render(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        return render_synthetic(self.seed, self.split, index, self.image_size, self.num_classes,
                                object_radius=self.object_radius)

    def _cache_file(self) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / (
            f"synthetic_v4_s{self.seed}_{self.split}_n{self.n}_{self.image_size}px_c{self.num_classes}"
            f"_r{_radius_tag(self.object_radius)}.npz"
        )

    def arrays(self, progress: bool | None = None, workers: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Render (or load) the whole split: uint8 images (N,H,W,3), int64 labels, bool masks.

        Rendering runs on ``workers`` processes (default: one per usable CPU; see :func:`render_arrays`).
        """
        render = functools.partial(render_synthetic, self.seed, self.split, image_size=self.image_size,
                                   num_classes=self.num_classes, object_radius=self.object_radius)
        return _memoised(self, lambda: render_arrays(render, self.n, desc=f"render {self.split}",
                                                     progress=progress, workers=workers))

    def _to_tensor(self, img_u8: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(img_u8)).permute(2, 0, 1).float() / 255.0
        mean, std = self._norm
        return (x - mean) / std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} images")
        index %= self.n
        if self._arrays is not None:
            img_u8, lab, m = self._arrays[0][index], int(self._arrays[1][index]), self._arrays[2][index]
        else:
            img, lab, m = self._render(index)
            img_u8 = np.round(img * 255).astype(np.uint8)
        x = self._to_tensor(img_u8)
        if self.transform is not None:
            x = self.transform(x)
        return x, lab, torch.from_numpy(np.ascontiguousarray(m))

    def tensors(self, progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole split as ``(images (N,3,H,W) normalised float, labels (N,), masks (N,H,W))``."""
        images, labels, masks = self.arrays(progress)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
        mean, std = self._norm
        x = (x - mean) / std
        if self.transform is not None:
            x = torch.stack([self.transform(xi) for xi in x])
        return x, torch.from_numpy(labels), torch.from_numpy(masks)


# ------------------------------------------------------------------ class-conflict scenes
#: The halves of conflict scene ``i`` are rendered at indices ``CONFLICT_OFFSET + 2i`` and ``+ 2i + 1`` of
#: its split: far beyond every split's single-object images, so no half repeats one of them.
CONFLICT_OFFSET = 10_000_000


def conflict_classes(seed: int, split: str, index: int, first: int, num_classes: int = 10) -> tuple[int, bool]:
    """The second class of conflict scene ``index`` and whether its halves swap sides.

    The second class is uniform over the classes other than ``first``, so the two always differ.

    Example:
        >>> second, swap = conflict_classes(0, "test", 3, first=2, num_classes=4)
        >>> second != 2, second in range(4), isinstance(swap, bool)
        (True, True, True)
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_positive_int(num_classes, "num_classes", minimum=2)  # a second class must exist
    if not 0 <= first < num_classes:
        raise ValueError(f"first must be in [0, {num_classes}), got {first!r}")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, 104729])
    second = (first + 1 + int(rng.integers(num_classes - 1))) % num_classes
    return second, bool(rng.random() < 0.5)


def render_conflict(seed: int, split: str, index: int, image_size: int = 64, num_classes: int = 10,
                    object_radius: tuple[float, float] = DEFAULT_OBJECT_RADIUS
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one class-conflict scene: two single-object images of different classes side by side.

    The scene is ``image_size × 2·image_size`` (the grid pointing game's layout, Böhle et al. 2022).
    Object ``a`` is the class of the first half as rendered; object ``b`` is the second half rendered
    with a forced class (:func:`conflict_classes`), so the classes differ; the halves swap sides at
    random. Each half keeps its own distractors, and its object's radius is drawn from ``object_radius``
    (:func:`render_synthetic`). A pure function of ``(seed, split, index)`` and the sizes.

    Returns:
        ``(image, labels, masks)``: float32 RGB (H,2H,3) in [0,1], int64 ``(2,)`` classes ``(a, b)``,
        bool ``(2,H,2H)`` masks of object ``a`` and object ``b`` (disjoint).

    Example:
        >>> image, labels, masks = render_conflict(0, "test", 0, image_size=32, num_classes=4)
        >>> image.shape, masks.shape, bool(labels[0] != labels[1]), bool((masks[0] & masks[1]).any())
        ((32, 64, 3), (2, 32, 64), True, False)
    """
    img_a, lab_a, m_a = render_synthetic(seed, split, CONFLICT_OFFSET + 2 * index, image_size, num_classes,
                                         object_radius=object_radius)
    lab_b, swap = conflict_classes(seed, split, index, lab_a, num_classes)
    img_b, _, m_b = render_synthetic(seed, split, CONFLICT_OFFSET + 2 * index + 1, image_size, num_classes,
                                     label=lab_b, object_radius=object_radius)
    empty = np.zeros_like(m_a)
    if swap:
        image = np.concatenate([img_b, img_a], axis=1)
        masks = np.stack([np.concatenate([empty, m_a], axis=1), np.concatenate([m_b, empty], axis=1)])
    else:
        image = np.concatenate([img_a, img_b], axis=1)
        masks = np.stack([np.concatenate([m_a, empty], axis=1), np.concatenate([empty, m_b], axis=1)])
    return image, np.array([lab_a, lab_b], dtype=np.int64), masks


class ConflictScenes(Dataset):
    """Class-conflict scenes of the embedded data set: two objects of different classes, one per half.

    Items are ``(image (3,H,2H), labels (2,), masks (2,H,2H))``: the normalised scene, the classes
    of object ``a`` and object ``b``, and their masks. See :func:`render_conflict`.

    Args:
        split: the split the halves are drawn from (``"val"`` for selection, ``"test"`` for the scorecard).
        n: number of scenes.
        image_size: side H of each half (the scene is H × 2H).
        num_classes: number of texture classes (2..10).
        seed: data seed; every scene is a pure function of ``(seed, split, index)``.
        cache_dir: optional folder where the rendered scenes are kept as one ``.npz`` file.
        object_radius: each object's radius range ``(lo, hi)`` in pixels of a 64-px half (:func:`render_synthetic`).

    Example:
        >>> images, labels, masks = ConflictScenes("val", n=2, image_size=32, num_classes=4).tensors()
        >>> tuple(images.shape), tuple(labels.shape), tuple(masks.shape)
        ((2, 3, 32, 64), (2, 2), (2, 2, 32, 64))
    """

    mean = SYNTHETIC_MEAN
    std = SYNTHETIC_STD

    def __init__(self, split: str = "test", n: int = 100, image_size: int = 64, num_classes: int = 10, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None,
                 object_radius: tuple[float, float] = DEFAULT_OBJECT_RADIUS) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if not 2 <= num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in [2, {len(CLASS_NAMES)}], got {num_classes}")
        _check_image_size(image_size)
        self.object_radius = check_object_radius(object_radius, image_size)
        self.split, self.n, self.image_size, self.num_classes, self.seed = split, n, image_size, num_classes, seed
        self.classes = list(CLASS_NAMES[:num_classes])
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n

    def _cache_file(self) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / (
            f"conflict_v2_s{self.seed}_{self.split}_n{self.n}_{self.image_size}px_c{self.num_classes}"
            f"_r{_radius_tag(self.object_radius)}.npz")

    def arrays(self, progress: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Render (or load) every scene: uint8 images (n,H,2H,3), int64 labels (n,2), bool masks (n,2,H,2H)."""
        return _memoised(self, lambda: self._render(progress))

    def _render(self, progress: bool | None) -> Arrays:
        s = self.image_size
        images = np.empty((self.n, s, 2 * s, 3), dtype=np.uint8)
        labels = np.empty((self.n, 2), dtype=np.int64)
        masks = np.empty((self.n, 2, s, 2 * s), dtype=bool)
        for i in track(range(self.n), total=self.n, desc=f"render {self.split} conflict scenes", enabled=progress):
            img, labels[i], masks[i] = render_conflict(self.seed, self.split, i, s, self.num_classes,
                                                       self.object_radius)
            images[i] = np.round(img * 255).astype(np.uint8)
        return images, labels, masks

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} scenes")
        images, labels, masks = self.arrays()
        index %= self.n
        return self._normalise(images[index : index + 1])[0], torch.from_numpy(labels[index]), \
            torch.from_numpy(masks[index])

    def _normalise(self, images_u8: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)

    def tensors(self, progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every scene as ``(images (n,3,H,2H) normalised, labels (n,2), masks (n,2,H,2H))``."""
        images, labels, masks = self.arrays(progress)
        return self._normalise(images), torch.from_numpy(labels), torch.from_numpy(masks)


def object_area_fractions(masks: torch.Tensor | np.ndarray) -> np.ndarray:
    """Each object's mask area as a fraction of its image: ``(..., H, W)`` masks -> ``(...)`` floats.

    Example:
        >>> m = np.zeros((1, 2, 4, 8), dtype=bool); m[0, 0, :2, :2] = True
        >>> object_area_fractions(m).tolist()
        [[0.125, 0.0]]
    """
    arr = masks.numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if arr.ndim < 2 or arr.shape[-1] * arr.shape[-2] == 0:
        raise ValueError(f"masks must have shape (..., H, W) with at least one pixel, got {arr.shape}")
    if arr.dtype != bool and not bool(np.isin(arr, (0, 1)).all()):
        raise ValueError("masks must be boolean or contain only 0 and 1")
    return arr.reshape(*arr.shape[:-2], -1).astype(np.float64).mean(axis=-1)


def object_size_cells(masks: torch.Tensor | np.ndarray, cell_px: float) -> np.ndarray:
    """Each object's size in cells of a feature map whose cells are ``cell_px`` pixels wide.

    The size is the object's equivalent diameter, :math:`2\\sqrt{A/\\pi}` for a mask of area
    :math:`A` pixels, divided by ``cell_px`` (the input size over the map size: 8 for an 8×8 map of a
    64-px image). A disc of radius 12 px spans 3 cells of that map.

    Example:
        >>> yy, xx = np.mgrid[0:64, 0:64] + 0.5
        >>> disc = (yy - 32) ** 2 + (xx - 32) ** 2 <= 12 ** 2
        >>> round(float(object_size_cells(disc[None], cell_px=8)[0]), 1)
        3.0
    """
    if isinstance(cell_px, bool) or not isinstance(cell_px, (int, float)) or not 0 < cell_px < float("inf"):
        raise ValueError(f"cell_px must be a positive finite number, got {cell_px!r}")
    arr = masks.numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if arr.ndim < 2:
        raise ValueError(f"masks must have shape (..., H, W), got {arr.shape}")
    area = arr.reshape(*arr.shape[:-2], -1).astype(np.float64).sum(axis=-1)
    return 2.0 * np.sqrt(area / np.pi) / float(cell_px)


# ----------------------------------------------------------------------- real data sets
class _PairTransform:
    """Resize the shorter side to ``resize``, centre-crop ``size``, normalise; the mask follows."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], resize: int | None = None) -> None:
        self.size = size
        self.resize = resize if resize is not None else round(size * 256 / 224)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def _geom(self, img: Image.Image, resample: int) -> Image.Image:
        w, h = img.size
        scale = self.resize / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))

    def __call__(self, img: Image.Image, mask: Image.Image | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        img = self._geom(img.convert("RGB"), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = (x - self.mean) / self.std
        if mask is None:
            m = torch.zeros(self.size, self.size, dtype=torch.bool)
        else:
            m = torch.from_numpy(np.asarray(self._geom(mask, Image.Resampling.NEAREST)) > 0)
        return x, m


class _Wrapped(Dataset):
    """Wrap a torchvision (image, label) data set into (image, label, all-False mask)."""

    def __init__(self, base: Any, pair: _PairTransform, transform: Callable | None) -> None:
        self.base, self.pair, self.transform = base, pair, transform
        self.classes = list(getattr(base, "classes", []))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        img, label = self.base[index]
        x, m = self.pair(img)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(label), m


class ImageFolderWithMasks(_Wrapped):
    """ImageNet in ``torchvision.datasets.ImageFolder`` layout: ``root/<split>/<wnid>/<image>.JPEG``."""


class CUB200(Dataset):
    """CUB-200-2011 in its release layout; the mask is the bounding box.

    ``root`` holds ``CUB_200_2011/`` (or is it), with ``images.txt``, ``image_class_labels.txt``,
    ``train_test_split.txt``, ``bounding_boxes.txt``, ``classes.txt`` and ``images/<class>/<file>.jpg``.
    Split ``"train"`` is ``is_training_image == 1``; ``"test"`` (and ``"val"``) the rest.
    """

    def __init__(self, root: str | os.PathLike, split: str, pair: _PairTransform,
                 transform: Callable | None = None) -> None:
        base = Path(root)
        if (base / "CUB_200_2011").is_dir():
            base = base / "CUB_200_2011"
        need = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "images"]
        missing = [f for f in need if not (base / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"CUB-200-2011 root {base} lacks {missing}; expected the CUB_200_2011 release layout")

        def table(name: str) -> dict[int, list[str]]:
            rows = {}
            for line in (base / name).read_text().splitlines():
                if line.strip():
                    parts = line.split()
                    rows[int(parts[0])] = parts[1:]
            return rows

        paths, labels, split_of, boxes = (table(n) for n in need[:4])
        want = 1 if split == "train" else 0
        self.items = [
            (base / "images" / paths[i][0], int(labels[i][0]) - 1, tuple(float(b) for b in boxes[i]))
            for i in sorted(paths)
            if int(split_of[i][0]) == want
        ]
        classes_file = base / "classes.txt"
        self.classes = (
            [line.split(maxsplit=1)[1] for line in classes_file.read_text().splitlines() if line.strip()]
            if classes_file.exists()
            else []
        )
        self.pair, self.transform = pair, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        path, label, (bx, by, bw, bh) = self.items[index]
        img = Image.open(path).convert("RGB")
        box = np.zeros((img.size[1], img.size[0]), dtype=np.uint8)
        box[int(round(by)) : int(round(by + bh)), int(round(bx)) : int(round(bx + bw))] = 255
        x, m = self.pair(img, Image.fromarray(box))
        if self.transform is not None:
            x = self.transform(x)
        return x, label, m


def get_dataset(name: str, root: str | os.PathLike | None = None, split: str = "test", image_size: int | None = None,
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs: Any) -> Dataset:
    """Build a data set by name.

    Args:
        name: ``"synthetic"`` (embedded default), ``"imagenet"`` (ImageFolder layout),
            ``"cub200"`` (CUB-200-2011 release layout), ``"cars"`` (``torchvision.datasets.StanfordCars``)
            or ``"aircraft"`` (``torchvision.datasets.FGVCAircraft``, variant level).
        root: data root; required for all but ``synthetic``. Nothing is downloaded.
        split: ``train``/``transfer``/``val``/``test`` for synthetic; ``train``/``val``/``test`` for the rest
            (ImageNet's ``test`` reads ``val``; CUB's and Cars' ``val`` read ``test``).
        image_size: output side length (default 64 for synthetic, 224 otherwise).
        transform: optional callable on the normalised image tensor.
        **kwargs: passed to :class:`SyntheticTextures` (``n``, ``num_classes``, ``seed``, ``cache_dir``).

    Returns:
        a ``Dataset`` of ``(image, label, mask)``.
    """
    name = name.lower()
    if name == "synthetic":
        return SyntheticTextures(split=split, image_size=64 if image_size is None else image_size, transform=transform,
                                 **kwargs)
    if name not in ("imagenet", "cub200", "cars", "aircraft"):
        raise ValueError(f"unknown data set {name!r}; expected one of synthetic, imagenet, cub200, cars, aircraft")
    if kwargs:
        raise TypeError(f"unexpected arguments for {name}: {sorted(kwargs)}")
    if root is None:
        raise ValueError(f"data set {name!r} needs root= (nothing is downloaded)")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split for {name!r} must be 'train', 'val' or 'test', got {split!r}")
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data root {root} does not exist")
    pair = _PairTransform(224 if image_size is None else check_positive_int(image_size, "image_size"),
                          IMAGENET_MEAN, IMAGENET_STD)
    if name == "imagenet":
        folder = root / ("train" if split == "train" else "val")
        if not folder.is_dir():
            raise FileNotFoundError(
                f"ImageNet split folder {folder} does not exist (ImageFolder layout: root/train, root/val)")
        return ImageFolderWithMasks(tvd.ImageFolder(str(folder)), pair, transform)
    if name == "cub200":
        return CUB200(root, split, pair, transform)
    if name == "cars":
        return _Wrapped(tvd.StanfordCars(str(root), split="train" if split == "train" else "test", download=False),
                        pair, transform)
    aircraft = tvd.FGVCAircraft(str(root), split=split, annotation_level="variant", download=False)
    return _Wrapped(aircraft, pair, transform)


def load_tensors(dataset: Dataset, indices: Sequence[int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack ``(image, label, mask)`` items into tensors ``(N,3,H,W)``, ``(N,)``, ``(N,H,W)``."""
    if isinstance(dataset, SyntheticTextures) and indices is None:
        return dataset.tensors()
    idx = range(len(dataset)) if indices is None else indices  # type: ignore[arg-type]
    items = [dataset[i] for i in idx]
    if not items:
        raise ValueError("no items to load: the data set (or the index list) is empty")
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
    masks = torch.stack([it[2] for it in items])
    return images, labels, masks
