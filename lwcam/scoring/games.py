"""The deletion and insertion games (Petsiuk et al., 2018, "RISE"): faithfulness on the model being explained.

They score a saliency map on the model being explained, which in lwcam is the black box:

* Pixels are ranked by saliency, descending. Ties are broken by flat pixel index
  (row-major, lower index first), so the order is deterministic.
* At step ``t`` the first ``min(t * step, H * W)`` ranked pixels (all channels) are taken from the
  *finish* image and every other pixel from the *start* image:

  - deletion: start = the image, finish = a substrate (zeros in the model's normalised space by
    default);
  - insertion: start = a Gaussian-blurred copy of the image (kernel 11, sigma 5), finish = the image.

* The curve ``s_0, ..., s_{n-1}`` is the softmax probability of the target class at each of the
  ``n = ceil(H * W / step) + 1`` steps, and

  .. math:: \\mathrm{AUC} = \frac{1}{n - 1}\\Big(\\sum_{t=0}^{n-1} s_t - \frac{s_0}{2} - \frac{s_{n-1}}{2}\\Big),

  the trapezoid rule on ``n`` equally spaced points of ``[0, 1]``. The AUC lies in ``[0, 1]``.
  Deletion: lower is better. Insertion: higher is better.

Every (image, step) pair is built with one vectorised ``torch.where`` on a pixel-rank map, and the
pairs are sent to the model in chunks of ``batch_size`` images, so there is no Python loop over
pixels or steps.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    >>> images, saliency = torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8)
    >>> res = deletion_game(net, images, saliency, targets=[0, 1])
    >>> res.curves.shape, res.auc.shape, res.queries
    (torch.Size([2, 9]), torch.Size([2]), 18)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from .._checks import check_classes, check_images, check_map, check_targets
from .._ops import gaussian_blur, pow2_scale
from .._utils import is_cpu_convnet, track
from ..blackbox import BlackBox, as_prob_fn
from ._meta import score
from .stats import bootstrap_ci

__all__ = ["GameResult", "deletion_game", "insertion_game", "game_auc", "gaussian_blur", "Model", "Canvas", "Targets"]

Model = BlackBox | nn.Module | Callable[[torch.Tensor], torch.Tensor]
Canvas = str | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


Targets = int | Sequence[int] | torch.Tensor | np.ndarray

_NAMED_CANVASES = ("zeros", "mean", "blur")


# --------------------------------------------------------------------------- results
@dataclass
class GameResult:
    """The outcome of a deletion or insertion game on B images.

    Attributes:
        kind: ``"deletion"`` or ``"insertion"``.
        curves: (B, n) float32, the target-class probability after each step; column 0 is the
            start image, column ``n - 1`` the finish image.
        auc: (B,) float32, the area under each curve, see :func:`game_auc`.
        fractions: (n,) float32, the share of pixels taken from the finish image at each step,
            ``min(t * step, H * W) / (H * W)``.
        queries: the number of images this call sent to the model, ``B * n``.
        blackbox_queries: for a :class:`~lwcam.blackbox.BlackBox`, how much its ``queries``
            counter grew during the call (less than ``queries`` only when its cache answered);
            ``None`` for a module or a plain callable.
        step: pixels moved per step.
        targets: (B,) int64, the class scored on each image.
        canvas: a description of the substrate (deletion) or start image (insertion).
    """

    kind: Literal["deletion", "insertion"]
    curves: torch.Tensor
    auc: torch.Tensor
    fractions: torch.Tensor
    queries: int
    step: int
    targets: torch.Tensor
    canvas: str
    blackbox_queries: int | None = field(default=None)

    @property
    def n_images(self) -> int:
        return int(self.curves.shape[0])

    @property
    def n_steps(self) -> int:
        """Number of steps, one fewer than the points on each curve."""
        return int(self.curves.shape[1]) - 1

    def mean_curve(self) -> torch.Tensor:
        """(n,) the curve averaged over images."""
        return self.curves.mean(dim=0)

    def mean_ci(self, n_boot: int = 10000, ci: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
        """Mean AUC with a percentile bootstrap confidence interval: ``(mean, low, high)``.

        See :func:`bootstrap_ci`.
        """
        return bootstrap_ci(self.auc, n_boot=n_boot, ci=ci, seed=seed)

    def __repr__(self) -> str:
        m = float(self.auc.mean()) if self.auc.numel() else float("nan")
        return (
            f"GameResult(kind={self.kind!r}, images={self.n_images}, steps={self.n_steps}, step={self.step}, "
            f"canvas={self.canvas!r}, mean_auc={m:.4f}, queries={self.queries})"
        )


# --------------------------------------------------------------------------- helpers
def game_auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under equally spaced curves on ``[0, 1]`` by the trapezoid rule.

    For a curve of ``n >= 2`` points ``s_0 .. s_{n-1}``:
    ``AUC = (sum(s) - s_0 / 2 - s_{n-1} / 2) / (n - 1)``. A constant curve ``c`` has AUC ``c``.

    Args:
        curves: (n,) or (B, n) tensor, finite (NaN or Inf raises).

    Returns:
        A 0-d or (B,) tensor of the input's floating dtype (float32 for integer input).

    Example:
        >>> game_auc(torch.tensor([1.0, 0.5, 0.0])).item()
        0.5
    """
    if not isinstance(curves, torch.Tensor):
        curves = torch.as_tensor(curves)
    if curves.dim() not in (1, 2):
        raise ValueError(f"curves must be (n,) or (B, n), got shape {tuple(curves.shape)}")
    n = curves.shape[-1]
    if n < 2:
        raise ValueError(f"a curve needs at least 2 points to have an area, got {n}")
    out_dtype = curves.dtype if curves.is_floating_point() else torch.float32
    c = curves.to(torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise ValueError("curves contains NaN or Inf")
    auc = (c.sum(dim=-1) - c[..., 0] / 2 - c[..., -1] / 2) / (n - 1)
    if not bool(torch.isfinite(auc).all()):  # float64 points near 1e308: their sum overflows, their mean does not
        scale = pow2_scale(c)
        c = c / scale
        auc = (c.sum(dim=-1) - c[..., 0] / 2 - c[..., -1] / 2) / (n - 1) * scale.squeeze(-1)
    return auc.to(out_dtype)


#: The ``"blur"`` canvas (the insertion game's default start): :func:`gaussian_blur` with ``blur_kernel``
#: (default 11) and ``blur_sigma`` (default 5), a reflect border and kernel weights computed in float64.
BLUR_BORDER: Literal["reflect"] = "reflect"


BLUR_KERNEL_DTYPE = torch.float64


def _check_step(step: object, w: int) -> int:
    if step is None:
        return w
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be a positive int (pixels per step), got {type(step).__name__} {step!r}")
    if step <= 0:
        raise ValueError(f"step must be a positive int (pixels per step), got {step}")
    return int(step)


def _check_probs(probs: torch.Tensor, plain: bool) -> torch.Tensor:
    """Scores must be probabilities: in [0, 1] and, from a plain callable, rows summing to 1.

    A top-k :class:`~lwcam.blackbox.BlackBox` gives rows that sum to less than 1 (unrevealed
    classes score 0), so the sum is checked for plain callables only. Returns ``probs`` clamped to
    [0, 1], so that every AUC lies in [0, 1].
    """
    tol = max(1e-3, torch.finfo(probs.dtype).eps) if probs.is_floating_point() else 1e-3
    p = probs.detach().to(torch.float64)
    hint = ("; a plain callable must return probabilities: wrap a function that returns logits as "
            "BlackBox(fn, num_classes, fn_returns='logits'), or pass the nn.Module itself")
    if (p < -tol).any() or (p > 1 + tol).any():
        raise ValueError(f"the model returned scores outside [0, 1] (min {p.min().item():.4g}, max "
                         f"{p.max().item():.4g}), so they are not probabilities{hint if plain else ''}")
    if plain:
        sums = p.sum(dim=1)
        bad = (sums - 1).abs() > tol
        if bad.any():
            row = int(torch.nonzero(bad)[0])
            raise ValueError(f"the model's probabilities do not sum to 1 ({int(bad.sum())} rows of {len(p)}; row "
                             f"{row} sums to {sums[row].item():.4f}){hint}")
    return probs.clamp(0, 1)


def _make_canvas(spec: Canvas, images: torch.Tensor, role: str, blur_kernel: int, blur_sigma: float
                 ) -> tuple[torch.Tensor, str]:
    """The substrate / start image for every input image, shape (B,C,H,W), and its description."""
    if isinstance(spec, str):
        if spec == "zeros":
            return torch.zeros_like(images), "zeros"
        if spec == "mean":
            return images.mean(dim=(2, 3), keepdim=True).expand_as(images).clone(), "mean"
        if spec == "blur":
            blurred = gaussian_blur(images, blur_kernel, blur_sigma, border=BLUR_BORDER,
                                    kernel_dtype=BLUR_KERNEL_DTYPE)
            return blurred, f"blur(k={blur_kernel}, sigma={blur_sigma:g})"
        raise ValueError(f"{role} must be one of {_NAMED_CANVASES}, a tensor or a callable, got {spec!r}")
    if isinstance(spec, torch.Tensor):
        out, desc = spec, "tensor"
    elif callable(spec):
        out = spec(images)
        desc = f"callable {getattr(spec, '__name__', type(spec).__name__)}"
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the {role} callable must return a tensor, got {type(out).__name__}")
    else:
        raise TypeError(f"{role} must be one of {_NAMED_CANVASES}, a tensor or a callable, got {type(spec).__name__}")
    try:
        out = torch.broadcast_to(out.detach().to(device=images.device, dtype=images.dtype), images.shape)
    except RuntimeError as err:
        raise ValueError(
            f"{role} of shape {tuple(out.shape)} does not broadcast to the images' shape {tuple(images.shape)}"
        ) from err
    if not torch.isfinite(out).all():
        raise ValueError(f"{role} contains NaN or Inf")
    return out, desc


def _is_cpu_convnet(model: Model) -> bool:
    """:func:`~lwcam._utils.is_cpu_convnet` of ``model``, or of the module a BlackBox wraps."""
    return is_cpu_convnet(model.fn if isinstance(model, BlackBox) else model)


def _evaluation_prob_fn(model: Model) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`~lwcam.blackbox.as_prob_fn` for scoring many perturbed images: each call runs under
    ``torch.inference_mode()``, and a convolutional ``nn.Module`` on CPU (reached directly or through
    a BlackBox) gets its inputs laid out ``channels_last``, which its convolutions run 1.3-1.6x faster
    (``benchmarks/bench_games.py``). A model that rejects that layout on the first call (a ``.view``
    of its input, say) gets contiguous inputs from then on. The layout changes float rounding only
    (about 1e-7 on a probability); a plain callable always gets the tensor as built.

    Raises:
        ValueError: a ``label`` BlackBox (see :func:`~lwcam.blackbox.as_prob_fn`).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
        >>> _evaluation_prob_fn(net)(torch.rand(5, 3, 8, 8)).shape
        torch.Size([5, 2])
    """
    prob_fn = as_prob_fn(model)
    state = {"channels_last": _is_cpu_convnet(model), "first": True}

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if state["channels_last"]:
                try:
                    return prob_fn(x.contiguous(memory_format=torch.channels_last))
                except RuntimeError:
                    if not state["first"]:
                        raise
                    state["channels_last"] = False
                finally:
                    state["first"] = False
            return prob_fn(x)

    return fn


def _pixel_ranks(saliency: torch.Tensor) -> torch.Tensor:
    """(B, H*W) int64: the position of each pixel in the descending-saliency order.

    Ties keep raster order (a stable sort on ``-saliency``).
    """
    flat = saliency.flatten(1).to(torch.float64)
    order = torch.sort(-flat, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks


def _step_images(lo: int, hi: int, n_points: int, ranks: torch.Tensor, counts: torch.Tensor,
                 start: torch.Tensor, finish: torch.Tensor) -> torch.Tensor:
    """The step images for flat (image, step) pairs ``lo .. hi - 1`` (pair ``p`` = image ``p // n_points``,
    step ``p % n_points``), as a (hi - lo, C, H*W) tensor.

    The chunk is cut into one run of consecutive steps per image; each run is a single broadcast
    ``where(rank < count_t, finish, start)`` written straight into the output, so no per-pair copy of
    the start and finish images is made.
    """
    b, c, hw = start.shape
    out = torch.empty(hi - lo, c, hw, dtype=start.dtype, device=start.device)
    p = lo
    while p < hi:
        i, t0 = divmod(p, n_points)
        t1 = min(n_points, t0 + hi - p)
        moved = ranks[i] < counts[t0:t1].unsqueeze(1)  # (k, H*W): pixel already taken from finish
        torch.where(moved.unsqueeze(1), finish[i], start[i], out=out[p - lo : p - lo + t1 - t0])
        p += t1 - t0
    return out


def _checked_probs(prob_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, model: Model,
                   tgt: torch.Tensor, num_classes: int | None) -> tuple[torch.Tensor, int]:
    """The model's probabilities for the step images ``x``, validated; and the number of classes.

    The first answer of a model that is not a BlackBox fixes the number of classes, against which
    the targets are checked.
    """
    n = x.shape[0]
    probs = prob_fn(x)
    if not isinstance(probs, torch.Tensor):
        probs = torch.as_tensor(np.asarray(probs))
    if probs.dim() != 2 or probs.shape[0] != n:
        raise ValueError(f"the model returned shape {tuple(probs.shape)} for {n} images; expected (B, C)")
    if num_classes is None:
        num_classes = int(probs.shape[1])
        check_classes(tgt, num_classes)
    elif probs.shape[1] != num_classes:
        raise ValueError(f"the model returned {probs.shape[1]} classes, expected {num_classes}")
    if not torch.isfinite(probs).all():
        raise ValueError("the model returned NaN or Inf probabilities")
    return _check_probs(probs, plain=not isinstance(model, (BlackBox, nn.Module))), num_classes


def _play(kind: Literal["deletion", "insertion"], model: Model, images: torch.Tensor, saliency: torch.Tensor,
          targets: Targets, *, step: int | None, canvas: Canvas, blur_kernel: int, blur_sigma: float,
          batch_size: int, progress: bool | None) -> GameResult:
    return _play_targets(kind, model, images, saliency, [targets], step=step, canvas=canvas, blur_kernel=blur_kernel,
                         blur_sigma=blur_sigma, batch_size=batch_size, progress=progress)[0]


def _play_targets(kind: Literal["deletion", "insertion"], model: Model, images: torch.Tensor, saliency: torch.Tensor,
                  target_sets: Sequence[Targets], *, step: int | None, canvas: Canvas, blur_kernel: int,
                  blur_sigma: float, batch_size: int, progress: bool | None,
                  names: Sequence[str] | None = None) -> list[GameResult]:
    """One game (one ordering, one set of step images) scored for each entry of ``target_sets``.

    Every step image is sent to the model once; the answer is read at each target set's classes,
    giving one :class:`GameResult` per entry (all with the same ``queries``, counted once per image).
    With a single target set the result is exactly that of :func:`deletion_game` / :func:`insertion_game`.
    ``names`` label the target sets in the checks' error messages (default ``"targets"``).

    Example:
        >>> probs = lambda x: torch.stack([x.mean((1, 2, 3)), 1 - x.mean((1, 2, 3))], 1)
        >>> a, b = _play_targets("deletion", probs, torch.ones(1, 3, 1, 2), torch.rand(1, 1, 2), [0, 1], step=1,
        ...                      canvas="zeros", blur_kernel=11, blur_sigma=5.0, batch_size=8, progress=False)
        >>> a.curves.tolist(), b.curves.tolist()
        ([[1.0, 0.5, 0.0]], [[0.0, 0.5, 1.0]])
    """
    images = check_images(images)
    b, c, h, w = images.shape
    sal = check_map(saliency, b, h, w)
    num_classes: int | None = model.num_classes if isinstance(model, BlackBox) else None
    labels = list(names) if names is not None else ["targets"] * len(target_sets)
    tgts = [check_targets(t, b, num_classes, name=n) for t, n in zip(target_sets, labels, strict=True)]
    tgt_all = torch.cat(tgts)
    step = _check_step(step, w)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    prob_fn = _evaluation_prob_fn(model)  # raises for a label-only BlackBox

    canvas_img, desc = _make_canvas(canvas, images, "substrate" if kind == "deletion" else "start",
                                    blur_kernel, blur_sigma)
    start, finish = (images, canvas_img) if kind == "deletion" else (canvas_img, images)

    hw = h * w
    n_points = -(-hw // step) + 1
    counts = (torch.arange(n_points, dtype=torch.long) * step).clamp_(max=hw)
    fractions = counts.to(torch.float64).div(hw).to(torch.float32)

    device = images.device
    ranks = _pixel_ranks(sal.to(device))
    counts_d = counts.to(device)
    start_flat = start.reshape(b, c, hw)
    finish_flat = finish.reshape(b, c, hw)
    tgt_d = torch.stack(tgts, dim=1).to(device)  # (B, K)

    total = b * n_points
    scores = torch.empty(len(tgts), total, dtype=torch.float32)
    before = model.queries if isinstance(model, BlackBox) else None
    chunks = range(0, total, batch_size)
    for lo in track(chunks, total=len(chunks), desc=f"{kind} game", enabled=progress):
        hi = min(lo + batch_size, total)
        x = _step_images(lo, hi, n_points, ranks, counts_d, start_flat, finish_flat).view(hi - lo, c, h, w)
        img = torch.arange(lo, hi, device=device) // n_points
        probs, num_classes = _checked_probs(prob_fn, x, model, tgt_all, num_classes)
        for k in range(len(tgts)):
            got = probs.gather(1, tgt_d[img, k].to(probs.device).unsqueeze(1)).squeeze(1)
            scores[k, lo:hi] = got.detach().to("cpu", torch.float32)

    spent = None if not isinstance(model, BlackBox) or before is None else int(model.queries - before)
    return [GameResult(kind=kind, curves=scores[k].view(b, n_points), auc=game_auc(scores[k].view(b, n_points)),
                       fractions=fractions, queries=total, step=step, targets=tgt, canvas=desc,
                       blackbox_queries=spent) for k, tgt in enumerate(tgts)]


# --------------------------------------------------------------------------- games
@score("faithfulness", "lower", needs=("model",))
def deletion_game(model: Model, images: torch.Tensor, saliency: torch.Tensor, targets: Targets, *,
                  step: int | None = None, substrate: Canvas = "zeros", blur_kernel: int = 11,
                  blur_sigma: float = 5.0, batch_size: int = 256, progress: bool | None = None) -> GameResult:
    """Deletion game: replace the most salient pixels first and watch the target probability fall.

    The image at step ``t`` (``t = 0 .. n-1``, ``n = ceil(H*W / step) + 1``) is

    ``x_t = where(rank < min(t * step, H*W), substrate, image)``

    where ``rank`` is each pixel's position in the descending-saliency order (ties: lower flat
    index first). Its score is ``p(target | x_t)``, the softmax probability from ``model``, and
    the AUC is the equally spaced trapezoid rule (see :func:`game_auc`). Lower is better.

    Args:
        model: the model being explained: a :class:`~lwcam.blackbox.BlackBox` (``probs``,
            ``logits`` or ``topk`` output; a ``label`` black box reveals no score and raises),
            an ``nn.Module`` returning logits, or a callable returning (B, C) probabilities.
        images: (B, C, H, W) float images in the model's input space.
        saliency: (B, H, W) or (B, 1, H, W) maps; any real dtype (a bool mask works too).
            Constant maps are valid: every pixel ties and the order is raster order.
        targets: the class scored on each image: an int for all, or B ints.
        step: pixels moved per step; ``None`` means the image width W (so H steps). The last step
            moves fewer pixels when ``H*W`` is not a multiple of ``step``.
        substrate: what deleted pixels become: ``"zeros"`` (zeros in the model's normalised
            space, i.e. the data set mean in pixel space), ``"mean"`` (each image's per-channel
            mean), ``"blur"`` (Gaussian blur, see :func:`gaussian_blur`), a tensor that broadcasts
            to ``images``, or a callable ``images -> substrate``.
        blur_kernel: kernel size for ``"blur"``.
        blur_sigma: sigma for ``"blur"``.
        batch_size: how many (image, step) inputs are built and sent to the model at once.
        progress: show a progress bar (``None``: only on a TTY).

    Returns:
        A :class:`GameResult`; ``.queries == B * n`` model evaluations.

    Raises:
        TypeError: images not a float tensor, non-integer ``step`` or ``targets``.
        ValueError: wrong shapes, NaN/Inf, ``step <= 0``, targets out of ``[0, C)``, a
            ``label`` black box.

    Example:
        >>> probs = lambda x: torch.stack([x.mean((1, 2, 3)), 1 - x.mean((1, 2, 3))], 1)
        >>> res = deletion_game(probs, torch.ones(1, 3, 2, 2), torch.rand(1, 2, 2), 0, step=1)
        >>> res.curves.tolist(), round(res.auc.item(), 4)
        ([[1.0, 0.75, 0.5, 0.25, 0.0]], 0.5)
    """
    return _play("deletion", model, images, saliency, targets, step=step, canvas=substrate,
                 blur_kernel=blur_kernel, blur_sigma=blur_sigma, batch_size=batch_size, progress=progress)


@score("faithfulness", "higher", needs=("model",))
def insertion_game(model: Model, images: torch.Tensor, saliency: torch.Tensor, targets: Targets, *,
                   step: int | None = None, start: Canvas = "blur", blur_kernel: int = 11,
                   blur_sigma: float = 5.0, batch_size: int = 256, progress: bool | None = None) -> GameResult:
    """Insertion game: restore the most salient pixels first, starting from a blurred image.

    The image at step ``t`` is ``x_t = where(rank < min(t * step, H*W), image, start)``, so
    ``x_0`` is the start image and ``x_{n-1}`` the original image. Higher AUC is better.
    All arguments are as in :func:`deletion_game`, except:

    Args:
        start: the image insertion starts from: ``"blur"`` (default: Gaussian blur with
            ``blur_kernel``, ``blur_sigma``), ``"zeros"``, ``"mean"``, a tensor that broadcasts to
            ``images``, or a callable ``images -> start``.

    Returns:
        A :class:`GameResult` of kind ``"insertion"``; ``.queries == B * n``.

    Example:
        >>> probs = lambda x: torch.stack([x.mean((1, 2, 3)), 1 - x.mean((1, 2, 3))], 1)
        >>> res = insertion_game(probs, torch.ones(1, 3, 2, 2), torch.rand(1, 2, 2), 0, step=2, start="zeros")
        >>> res.curves.tolist(), res.fractions.tolist()
        ([[0.0, 0.5, 1.0]], [0.0, 0.5, 1.0])
    """
    return _play("insertion", model, images, saliency, targets, step=step, canvas=start,
                 blur_kernel=blur_kernel, blur_sigma=blur_sigma, batch_size=batch_size, progress=progress)
