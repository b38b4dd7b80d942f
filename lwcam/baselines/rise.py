"""RISE: randomized input sampling for explanation (Petsiuk et al., BMVC 2018)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import check_images, check_targets
from .._utils import track
from ..blackbox import BlackBox
from ..scoring.games import _evaluation_prob_fn
from ._base import Targets, finish, generator, require_blackbox

__all__ = ["rise", "rise_classes", "rise_masks"]

Grid = int | tuple[int, int]


class _MaskBank:
    """RISE masks, all drawn up front as small grids and shifts, rendered in chunks on demand.

    Rendering per chunk keeps memory bounded at any image size, and because the grids and
    shifts are drawn once, the masks do not depend on the chunk size.
    """

    def __init__(self, n_masks: int, size: tuple[int, int], grid_size: Grid, p_keep: float, seed: int) -> None:
        g = generator(seed)
        h, w = size
        gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
        self.size = size
        self.n = n_masks
        self.grid_size = grid_size
        self.cell = (math.ceil(h / gh), math.ceil(w / gw))
        self.up = ((gh + 1) * self.cell[0], (gw + 1) * self.cell[1])
        self.grids = (torch.rand(n_masks, 1, gh, gw, generator=g) < p_keep).float()
        self.dy = torch.randint(0, self.cell[0], (n_masks,), generator=g)
        self.dx = torch.randint(0, self.cell[1], (n_masks,), generator=g)

    def render(self, start: int, stop: int) -> torch.Tensor:
        """Masks ``start:stop`` as a ``(n,H,W)`` tensor in [0,1]."""
        up = F.interpolate(self.grids[start:stop], size=self.up, mode="bilinear", align_corners=False)[:, 0]
        h, w = self.size
        ys = self.dy[start:stop, None] + torch.arange(h)  # (n,H)
        xs = self.dx[start:stop, None] + torch.arange(w)  # (n,W)
        rows = up.gather(1, ys[:, :, None].expand(-1, -1, up.shape[2]))
        return rows.gather(2, xs[:, None, :].expand(-1, h, -1)).clamp_(0, 1)  # clamp float round-off


def rise_masks(n_masks: int, size: tuple[int, int], grid_size: Grid = 8, p_keep: float = 0.5,
               seed: int = 0) -> torch.Tensor:
    """The ``(n_masks,H,W)`` random masks :func:`rise` uses for these parameters.

    Example:
        >>> m = rise_masks(3, (16, 16), grid_size=4)
        >>> m.shape, bool(((m >= 0) & (m <= 1)).all())
        (torch.Size([3, 16, 16]), True)
    """
    _check(n_masks, grid_size, p_keep, 1)
    return _MaskBank(n_masks, size, grid_size, p_keep, seed).render(0, n_masks)


#: The most grid cells a side: RISE's cells are upsampled, so a grid finer than the image is meaningless.
MAX_GRID = 4096


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check(n_masks: int, grid_size: Grid, p_keep: float, batch_size: int) -> None:
    if not _positive_int(n_masks):
        raise ValueError(f"n_masks must be a positive int, got {n_masks!r}")
    sides = list(grid_size) if isinstance(grid_size, tuple | list) else [grid_size]
    if len(sides) not in (1, 2) or not all(_positive_int(v) for v in sides):
        raise ValueError(f"grid_size must be a positive int or two of them (rows, cols), got {grid_size!r}")
    if max(sides) > MAX_GRID:
        raise ValueError(f"grid_size must be at most {MAX_GRID} cells a side (a cell of at least one pixel), "
                         f"got {grid_size!r}")
    if not 0 < p_keep < 1:
        raise ValueError(f"p_keep must be in (0, 1), got {p_keep!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def rise(
    blackbox: BlackBox,
    images: torch.Tensor,
    targets: Targets,
    *,
    n_masks: int = 4000,
    grid_size: Grid = 8,
    p_keep: float = 0.5,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool | None = None,
) -> torch.Tensor:
    """RISE saliency from black-box queries on randomly masked copies of each image.

    Each mask ``M_i`` is a random ``s×s`` binary grid (each cell kept with probability
    ``p``), upsampled bilinearly to ``(s+1)·cell`` pixels (``cell = ceil(H/s)``) and cropped
    at a random offset in ``[0, cell)``, so the masks are smooth and not tied to a fixed
    grid. The masked image is ``x ⊙ M_i``: removed pixels become 0, the dataset mean in
    the model's normalised input space. The saliency of class ``c`` is the expected score
    given that a pixel is kept::

        S_c(x) = 1 / (N · p) · Σ_i P_c(x ⊙ M_i) · M_i

    with ``P_c`` the black box's probability of the target class. One set of N masks is drawn
    (from ``seed``) and shared by every image in the batch, as in the reference code.

    Cost: exactly ``N`` black-box queries per image (``B·N`` in all; cache hits are free).

    Args:
        blackbox: the model, reachable only through a :class:`~lwcam.BlackBox` with
            ``output`` ``"probs"``, ``"logits"`` or ``"topk"`` (unrevealed classes score 0).
        images: ``(B,3,H,W)`` images in the model's normalised space.
        targets: the class to explain per image: an int, a sequence or a ``(B,)`` tensor.
        n_masks: N, the number of random masks (4000 in the paper for ResNet-50).
        grid_size: s, the number of grid cells per side (8 in the reference code), or
            ``(rows, cols)`` to keep the cells square on a non-square image.
        p_keep: p, the probability that a grid cell is kept.
        batch_size: how many masked images are sent per black-box call.
        seed: seed of the masks; the same seed gives identical maps.
        progress: show a progress bar (``None``: only on a TTY).

    Returns:
        ``(B,H,W)`` float32 saliency, in probability units (about ``P_c`` where the class
        evidence is kept).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
        >>> bb = BlackBox(net, num_classes=10)
        >>> s = rise(bb, torch.rand(2, 3, 16, 16), [0, 1], n_masks=50, grid_size=4)
        >>> s.shape, bb.queries
        (torch.Size([2, 16, 16]), 100)
    """
    bb = require_blackbox(blackbox, "rise")
    images = check_images(images, channels=bb.channels)
    targets = check_targets(targets, images.shape[0], bb.num_classes)
    return rise_classes(bb, images, targets[:, None], n_masks=n_masks, grid_size=grid_size, p_keep=p_keep,
                        batch_size=batch_size, seed=seed, progress=progress)[:, 0]


def rise_classes(
    blackbox: BlackBox,
    images: torch.Tensor,
    classes: torch.Tensor,
    *,
    n_masks: int = 4000,
    grid_size: Grid = 8,
    p_keep: float = 0.5,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool | None = None,
) -> torch.Tensor:
    """:func:`rise` for several classes per image from one set of masked queries.

    Every masked image's answer holds every class's score, so ``S_c`` of the ``K`` classes in
    ``classes[i]`` all come from the same ``N`` queries: ``K`` maps cost what one costs. Each map
    equals :func:`rise`'s for that class with the same arguments.

    Args:
        classes: ``(B,K)`` class indices, the classes to explain for each image.
        The other arguments are :func:`rise`'s.

    Returns:
        ``(B,K,H,W)`` float32 saliency.

    Example:
        >>> from torch import nn
        >>> bb = BlackBox(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), num_classes=4)
        >>> x = torch.rand(2, 3, 8, 8)
        >>> both = rise_classes(bb, x, torch.tensor([[0, 1], [2, 3]]), n_masks=20, grid_size=(2, 2))
        >>> both.shape, bb.queries, torch.allclose(both[:, 1], rise(bb, x, [1, 3], n_masks=20, grid_size=2))
        (torch.Size([2, 2, 8, 8]), 40, True)
    """
    bb = require_blackbox(blackbox, "rise")
    images = check_images(images, channels=bb.channels)
    b, _, h, w = images.shape
    if not isinstance(classes, torch.Tensor) or classes.dim() != 2 or classes.shape[0] != b or classes.shape[1] < 1:
        raise ValueError(f"classes must be a (B,K) tensor with B = {b}, got "
                         f"{tuple(classes.shape) if isinstance(classes, torch.Tensor) else type(classes).__name__}")
    classes = torch.stack([check_targets(c, b, bb.num_classes, name="classes") for c in classes.T], dim=1)
    _check(n_masks, grid_size, p_keep, batch_size)
    prob_fn = _evaluation_prob_fn(bb)  # inference_mode, channels_last for a CPU convnet
    bank = _MaskBank(n_masks, (h, w), grid_size, p_keep, seed)
    images = images.cpu().float()
    sal = torch.zeros(b, classes.shape[1], h * w, dtype=torch.float64)
    starts = range(0, n_masks, batch_size)
    for s in track(starts, total=len(starts), desc="RISE", enabled=progress):
        masks = bank.render(s, min(s + batch_size, n_masks))  # (n,H,W)
        flat = masks.reshape(masks.shape[0], -1).double()
        # masked images built straight in channels_last, the layout a CPU convnet runs fastest in
        batch = torch.empty(masks.shape[0], *images.shape[1:]).contiguous(memory_format=torch.channels_last)
        for i in range(b):
            probs = prob_fn(torch.mul(images[i : i + 1], masks[:, None], out=batch))  # (n,C)
            sal[i] += probs[:, classes[i]].double().T @ flat
    sal = sal / (n_masks * p_keep)
    return finish(sal.reshape(b, classes.shape[1], h, w))
