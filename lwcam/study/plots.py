"""Figures: saliency overlays (F2, F3), deletion/insertion curves (F5) and the scorecard's heat map (F8).

Only matplotlib's object API is used (``matplotlib.figure.Figure``, no pyplot state), so every
function works on a headless machine. Images are passed in the model's normalised input space
together with the ``mean``/``std`` used to normalise them (e.g. ``lwcam.data.MEAN`` and
``lwcam.data.STD``); saliency maps are shown min-max scaled per map on a fixed 0–1 colour
scale, stated by the colour bar.

Example:
    >>> import torch
    >>> fig = plot_method_grid(torch.randn(2, 3, 32, 32), {"a": torch.rand(2, 32, 32)},
    ...                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    >>> len(fig.axes)  # 2 rows x (input + 1 method) + the colour bar
    5
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from scipy import stats

from .._ops import minmax_normalize
from .._utils import atomic_write_bytes
from ..cam.maps import LayerMaps
from ..data import denormalize as _denormalize
from ..scoring.games import game_auc

__all__ = [
    "denormalize",
    "overlay",
    "plot_layer_maps",
    "plot_method_grid",
    "plot_game_curves",
    "plot_deletion_insertion",
    "plot_distillation_curves",
    "plot_layer_importance",
    "plot_query_tradeoff",
    "plot_quality_vs_fidelity",
    "plot_scorecard",
    "save_figure",
    "COLORBAR_LABEL",
    "DISAGREE_LABEL",
]

COLORBAR_LABEL = "normalised saliency (0–1)"
DISAGREE_LABEL = "student ≠ black box"
_RED = "#d62728"


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def denormalize(image: Any, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3,H,W) normalised image -> (H,W,3) float array in [0, 1] for display."""
    img = _np(image)
    if img.ndim != 3 or img.shape[0] != len(mean) or len(mean) != len(std):
        raise ValueError(f"image must be (C,H,W) with C = len(mean) = len(std) = {len(mean)}, "
                         f"got {img.shape} (mean {len(mean)}, std {len(std)})")
    out = _denormalize(torch.from_numpy(img), mean, std).numpy().transpose(1, 2, 0)
    return out[..., 0] if out.shape[-1] == 1 else out


def _scaled(saliency: Any) -> np.ndarray:
    sal = _np(saliency)
    if sal.ndim != 2:
        raise ValueError(f"saliency must be (H,W), got shape {sal.shape}")
    if not np.isfinite(sal).all():
        raise ValueError("saliency contains NaN or infinite values")
    return minmax_normalize(torch.as_tensor(sal)).numpy()


def overlay(ax: Axes, image: Any, saliency: Any | None, *, mean: Sequence[float], std: Sequence[float],
            alpha: float = 0.5, cmap: str = "jet", title: str | None = None) -> AxesImage | None:
    """Draw ``image`` with ``saliency`` on top.

    Args:
        ax: the axes to draw into (ticks are switched off).
        image: (3,H,W) in the model's normalised space.
        saliency: (H,W) map, min-max scaled per map and drawn with ``vmin=0, vmax=1``; ``None``
            draws the image alone.
        mean, std: per-channel normalisation constants used to de-normalise ``image``.
        alpha: opacity of the saliency layer.
        cmap: colour map of the saliency layer.
        title: axes title.

    Returns:
        The saliency ``AxesImage`` (for a colour bar), or ``None`` when ``saliency`` is ``None``.
    """
    img = denormalize(image, mean, std)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
    handle = None
    if saliency is not None:
        sal = _scaled(saliency)
        if sal.shape != img.shape[:2]:
            raise ValueError(f"saliency {sal.shape} and image {img.shape[:2]} differ in size")
        handle = ax.imshow(sal, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=8)
    return handle


def _upsample(m: Any, size: tuple[int, int]) -> torch.Tensor:
    t = torch.as_tensor(_np(m))
    if tuple(t.shape[-2:]) == size:
        return t
    return torch.nn.functional.interpolate(t[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _row_title(i: int, labels: Any, class_names: Sequence[str] | None) -> str | None:
    if labels is None:
        return None
    lab = int(labels[i])
    if class_names is not None and 0 <= lab < len(class_names):
        return f"{class_names[lab]} ({lab})"
    return f"class {lab}"


def _mark_disagreement(axes_row: Sequence[Axes]) -> None:
    for ax in axes_row:
        for spine in ax.spines.values():
            spine.set_edgecolor(_RED)
            spine.set_linewidth(2.5)


def _grid(images: Any, columns: list[tuple[str, torch.Tensor | None]], *, mean: Sequence[float],
          std: Sequence[float], labels: Any, agree: Any, class_names: Sequence[str] | None,
          cell: float = 1.6) -> Figure:
    imgs = _np(images)
    if imgs.ndim != 4:
        raise ValueError(f"images must be (B,3,H,W), got shape {imgs.shape}")
    n, _, h, w = imgs.shape
    for name, m in columns:
        if m is not None and (m.ndim != 3 or m.shape[0] != n or tuple(m.shape[-2:]) != (h, w)):
            raise ValueError(f"maps of {name!r} must be ({n},{h},{w}), got {tuple(m.shape)}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries for {n} images")
    if agree is not None and len(agree) != n:
        raise ValueError(f"agree has {len(agree)} entries for {n} images")
    ncols = len(columns)
    fig = Figure(figsize=(cell * ncols + 0.9, cell * n + 0.5), layout="constrained")
    axes = np.asarray(fig.subplots(n, ncols, squeeze=False))
    handle = None
    for i in range(n):
        disagree = agree is not None and not bool(agree[i])
        for j, (name, m) in enumerate(columns):
            title = name if i == 0 else None
            hnd = overlay(axes[i, j], imgs[i], None if m is None else m[i], mean=mean, std=std, title=title)
            handle = hnd if hnd is not None else handle
        row = _row_title(i, labels, class_names)
        ax0 = axes[i, 0]
        ylabel = row or ""
        if disagree:
            ylabel = f"{ylabel}\n{DISAGREE_LABEL}" if ylabel else DISAGREE_LABEL
            _mark_disagreement(axes[i])
        if ylabel:
            ax0.set_ylabel(ylabel, fontsize=8, color=_RED if disagree else "black")
    if handle is not None:
        # an opaque mappable with the overlays' colour map and 0-1 scale
        mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=handle.get_cmap())
        cb = fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=min(0.9, 0.35 + 0.12 * n), pad=0.02)
        cb.set_label(COLORBAR_LABEL, fontsize=8)
        cb.ax.tick_params(labelsize=7)
    return fig


def plot_layer_maps(images: Any, layer_maps: Any, fused: Any, *, mean: Sequence[float], std: Sequence[float],
                    labels: Any = None, agree: Any = None, class_names: Sequence[str] | None = None,
                    layer_names: Sequence[str] | None = None) -> Figure:
    """F2: one row per image: the input, each layer's Grad-CAM, the fused map.

    Column titles give each layer's name and native resolution h×w. Rows where the student
    disagrees with the black box (``agree[i]`` false) get a red frame and a red
    "student ≠ black box" label.

    Args:
        images: (B,3,H,W) in the model's normalised space.
        layer_maps: a :class:`~lwcam.cam.maps.LayerMaps`, or a dict ``name -> (B,h,w)`` (maps
            smaller than the image are taken as native resolution and upsampled bilinearly).
        fused: (B,H,W) fused saliency.
        mean, std: the normalisation constants of ``images``.
        labels: (B,) class explained per image (the black box's label), for row labels.
        agree: (B,) bool, whether the student's argmax equals the black box's label.
        class_names: names for the class indices in ``labels``.
        layer_names: which layers to show, in this order (default: all, shallow to deep).

    Returns:
        The figure.
    """
    imgs = _np(images)
    if imgs.ndim != 4:
        raise ValueError(f"images must be (B,3,H,W), got shape {imgs.shape}")
    size = (imgs.shape[-2], imgs.shape[-1])
    if isinstance(layer_maps, LayerMaps):
        names = list(layer_maps.names)
        native = layer_maps.resolutions
        source = {n: layer_maps.maps[n] for n in names}
    elif isinstance(layer_maps, Mapping):
        names = list(layer_maps)
        source = dict(layer_maps)
        native = {n: (int(_np(m).shape[-2]), int(_np(m).shape[-1])) for n, m in source.items()}
    else:
        raise TypeError(f"layer_maps must be a LayerMaps or a dict name -> maps, got {type(layer_maps).__name__}")
    if layer_names is not None:
        unknown = [n for n in layer_names if n not in source]
        if unknown:
            raise ValueError(f"unknown layer names {unknown}; available: {names}")
        names = list(layer_names)
    columns: list[tuple[str, torch.Tensor | None]] = [("input", None)]
    for n in names:
        h, w = native[n]
        columns.append((f"{n}\n{h}×{w}", _upsample(source[n], size)))
    columns.append(("fused", torch.as_tensor(_np(fused))))
    return _grid(images, columns, mean=mean, std=std, labels=labels, agree=agree, class_names=class_names)


def plot_method_grid(images: Any, saliencies: Mapping[str, Any], *, mean: Sequence[float], std: Sequence[float],
                     labels: Any = None, agree: Any = None, class_names: Sequence[str] | None = None) -> Figure:
    """F3: one row per image, the input then one column per method (dict order).

    Args:
        images: (B,3,H,W) in the model's normalised space.
        saliencies: ``method -> (B,H,W)``.
        mean, std: the normalisation constants of ``images``.
        labels, agree, class_names: as in :func:`plot_layer_maps`.

    Returns:
        The figure.
    """
    if not saliencies:
        raise ValueError("saliencies is empty")
    columns: list[tuple[str, torch.Tensor | None]] = [("input", None)]
    columns += [(str(k), torch.as_tensor(_np(v))) for k, v in saliencies.items()]
    return _grid(images, columns, mean=mean, std=std, labels=labels, agree=agree, class_names=class_names)


def _mean_auc(curves: np.ndarray) -> float:
    """Mean area under (B, n) curves, :func:`lwcam.scoring.games.game_auc`."""
    return float(game_auc(torch.as_tensor(curves, dtype=torch.float64)).mean())


def _method_style(i: int) -> tuple[Any, str]:
    """A distinct (colour, line style) for the i-th method: tab20's dark then light shades, solid then dashed."""
    tab20 = colormaps["tab20"]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return tab20(order[i % 20]), ("-", "--", ":")[(i // 10) % 3]


def plot_game_curves(fractions: Any, curves: Mapping[str, Any], ax: Axes | None = None,
                     title: str = "deletion", *, xlabel: str | None = None,
                     ylabel: str = "probability of the target class", legend: bool = True) -> Figure:
    """F5 panel: the mean deletion or insertion curve per method with a shaded 95% band.

    The band is the 95% confidence interval of the mean curve at each fraction (Student t,
    B−1 degrees of freedom); the legend gives each method's mean AUC.

    Args:
        fractions: (steps+1,) fraction of pixels moved at each point.
        curves: ``method -> (B, steps+1)`` per-image curves.
        ax: axes to draw into; a new figure is made when ``None``.
        title: panel title (``"deletion"`` or ``"insertion"`` also set the default x label).
        xlabel: x-axis label.
        ylabel: y-axis label.

    Returns:
        The figure holding ``ax``.
    """
    fr = _np(fractions).ravel()
    if not curves:
        raise ValueError("curves is empty")
    if ax is None:
        fig = Figure(figsize=(4.2, 3.2), layout="constrained")
        ax = fig.add_subplot()
    else:
        root = ax.get_figure(root=True)
        assert root is not None  # an Axes always belongs to a figure
        fig = root
    band_alpha = 0.2 if len(curves) <= 6 else 0.07  # many methods: keep every curve readable
    for i, (method, c) in enumerate(curves.items()):
        arr = _np(c)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] != fr.size:
            raise ValueError(f"curves of {method!r} must be (B, {fr.size}), got {arr.shape}")
        mean = arr.mean(0)
        b = arr.shape[0]
        colour, style = _method_style(i)
        line = ax.plot(fr, mean, lw=1.6, color=colour, ls=style, label=f"{method} (AUC {_mean_auc(arr):.3f})")[0]
        if b > 1:
            half = stats.t.ppf(0.975, b - 1) * arr.std(0, ddof=1) / np.sqrt(b)
            ax.fill_between(fr, mean - half, mean + half, color=line.get_color(), alpha=band_alpha, lw=0)
    if xlabel is None:
        verb = {"deletion": "deleted", "insertion": "inserted"}.get(title.lower().split()[0] if title else "", "moved")
        xlabel = f"fraction of pixels {verb}"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(float(fr.min()), float(fr.max()))
    lo, hi = ax.dataLim.y0, ax.dataLim.y1
    ax.set_ylim(min(0.0, lo), max(1.0, hi) + 0.02)  # probabilities: always show the full 0-1 range
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7, frameon=False)
    return fig


def plot_deletion_insertion(fractions: Any, deletion: Mapping[str, Any], insertion: Mapping[str, Any],
                            *, suptitle: str | None = None) -> Figure:
    """F5: deletion (left) and insertion (right) panels side by side, see :func:`plot_game_curves`."""
    fig = Figure(figsize=(12.0, 3.8), layout="constrained")
    ax_d, ax_i = fig.subplots(1, 2, sharey=True)
    plot_game_curves(fractions, deletion, ax=ax_d, title="deletion (lower AUC is better)", legend=False)
    plot_game_curves(fractions, insertion, ax=ax_i, title="insertion (higher AUC is better)", legend=False)
    ax_i.set_ylabel("")
    for ax, word in ((ax_d, "deleted"), (ax_i, "inserted")):
        ax.set_xlabel(f"fraction of pixels {word}")
    # one legend per panel, outside the plotting area, so no curve is hidden
    ax_d.legend(fontsize=6.5, frameon=False, loc="upper left", bbox_to_anchor=(0.0, -0.2), ncol=2)
    ax_i.legend(fontsize=6.5, frameon=False, loc="upper left", bbox_to_anchor=(0.0, -0.2), ncol=2)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def plot_distillation_curves(summaries: Mapping[str, Mapping[str, Any]]) -> Figure:
    """F1: training loss and held-out agreement with the black box per epoch, with the queries spent.

    Distillation pays every query up front (each transfer image is asked once), so the query
    count is a property of the run, given in the legend, rather than an axis.

    Args:
        summaries: ``black-box output mode -> summary`` with a ``history`` list of per-epoch dicts
            (``epoch``, ``loss``, ``agreement``, ``queries``), as kept by the pipeline.

    Returns:
        The figure (two panels).
    """
    if not summaries:
        raise ValueError("summaries is empty")
    fig = Figure(figsize=(8.4, 3.2), layout="constrained")
    ax_loss, ax_agree = fig.subplots(1, 2)
    for mode, summary in summaries.items():
        hist = [h for h in summary["history"] if h.get("epoch", 0) >= 1]
        if not hist:
            continue
        epochs = [h["epoch"] for h in hist]
        ax_loss.plot(epochs, [h["loss"] for h in hist], marker="o", ms=3, label=f"{mode} black box")
        agree = [np.nan if h.get("agreement") is None else h["agreement"] for h in hist]
        spent = int(summary.get("queries", hist[-1].get("queries", 0)))
        ax_agree.plot(epochs, agree, marker="o", ms=3, label=f"{mode} black box ({spent} queries)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (KD: τ²·KL; label: CE)")
    ax_loss.set_yscale("log")
    ax_loss.set_title("distillation loss")
    ax_agree.set_xlabel("epoch (every query is paid before epoch 1; none after)")
    ax_agree.set_ylabel("top-1 agreement with the black box (held out)")
    ax_agree.set_ylim(0, 1.02)
    ax_agree.set_title("fidelity per epoch, at a fixed query budget")
    for ax in (ax_loss, ax_agree):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    return fig


def plot_layer_importance(table: Any) -> Figure:
    """F4: each layer's own deletion/insertion AUC, and its leave-one-out effect on the fused map.

    Args:
        table: T2 as a DataFrame with ``layer``, ``deletion_auc``, ``insertion_auc``,
            ``loo_deletion_delta`` and ``loo_insertion_delta`` (the fused row has NaN deltas).

    Returns:
        The figure (two panels).
    """
    layers = table[table["loo_deletion_delta"].notna()]
    fused = table[table["loo_deletion_delta"].isna()]
    x = np.arange(len(layers))
    resolutions = layers.get("resolution", [""] * len(layers))
    labels = [f"{n}\n{r}" if r else str(n) for n, r in zip(layers["layer"], resolutions, strict=True)]
    fig = Figure(figsize=(9.0, 4.0), layout="constrained")
    ax_auc, ax_loo = fig.subplots(1, 2)
    width = 0.38
    ax_auc.bar(x - width / 2, layers["deletion_auc"], width, label="deletion AUC (lower is better)", color="#1f77b4")
    ax_auc.bar(x + width / 2, layers["insertion_auc"], width, label="insertion AUC (higher is better)", color="#ff7f0e")
    if len(fused):
        ax_auc.axhline(float(fused["deletion_auc"].iloc[0]), color="#1f77b4", ls="--", lw=1, label="fused: deletion")
        ax_auc.axhline(float(fused["insertion_auc"].iloc[0]), color="#ff7f0e", ls="--", lw=1, label="fused: insertion")
    ax_auc.set_xticks(x, labels, fontsize=7)
    ax_auc.set_ylabel("AUC on the black box")
    ax_auc.set_title("each layer's map alone")
    ax_auc.legend(fontsize=6.5, frameon=False, loc="upper left", bbox_to_anchor=(0.0, -0.2), ncol=2)
    ax_loo.bar(x - width / 2, layers["loo_deletion_delta"], width, label="deletion AUC rise without the layer",
               color="#1f77b4")
    ax_loo.bar(x + width / 2, layers["loo_insertion_delta"], width, label="insertion AUC drop without the layer",
               color="#ff7f0e")
    ax_loo.axhline(0, color="k", lw=0.8)
    ax_loo.set_xticks(x, labels, fontsize=7)
    ax_loo.set_ylabel("change of the fused map's AUC")
    ax_loo.set_title("leave one layer out (> 0: the layer helps)")
    ax_loo.legend(fontsize=6.5, frameon=False, loc="upper left", bbox_to_anchor=(0.0, -0.2), ncol=1)
    for ax in (ax_auc, ax_loo):
        ax.grid(alpha=0.3, axis="y")
    return fig


def plot_query_tradeoff(table: Any, *, distill_queries: int, lwcam_auc: float | None = None,
                        max_images: int = 1000) -> Figure:
    """F6: explanation quality against black-box queries, lwcam (distillation amortised) vs RISE.

    Left: deletion AUC (lower is better) against black-box queries per explained image, for RISE
    at several mask counts and for lwcam with its distillation queries spread over 10, 100 and
    1000 explained images. Right: total black-box queries against the number of images explained.

    Args:
        table: rows with ``method`` (``"RISE"`` / ``"lwcam"``), ``queries_per_image`` and ``deletion_auc``.
        distill_queries: queries spent on distillation (paid once).
        lwcam_auc: lwcam's deletion AUC (default: the table's lwcam row).
        max_images: right panel's x range.

    Returns:
        The figure (two panels).
    """
    rise_rows = table[table["method"] == "RISE"].sort_values("queries_per_image")
    lw_rows = table[table["method"] == "lwcam"]
    if lwcam_auc is None:
        lwcam_auc = float(lw_rows["deletion_auc"].iloc[0])
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    ax_q, ax_t = fig.subplots(1, 2)
    ax_q.plot(rise_rows["queries_per_image"], rise_rows["deletion_auc"], "o-", color="#d62728", label="RISE (N masks)")
    for _, r in rise_rows.iterrows():
        ax_q.annotate(r.get("setting", ""), (r["queries_per_image"], r["deletion_auc"]), fontsize=6,
                      textcoords="offset points", xytext=(3, 3))
    amortised = [distill_queries / n for n in (10, 100, 1000)]
    ax_q.plot(amortised, [lwcam_auc] * 3, "s--", color="#1f77b4", label="lwcam (distillation amortised)")
    for n, q in zip((10, 100, 1000), amortised, strict=True):
        ax_q.annotate(f"{n} images", (q, lwcam_auc), fontsize=6, textcoords="offset points", xytext=(3, -9))
    ax_q.set_xscale("log")
    ax_q.set_xlabel("black-box queries per explained image")
    ax_q.set_ylabel("deletion AUC on the black box (lower is better)")
    ax_q.set_title("quality against queries per image")
    counts = np.arange(1, max_images + 1)
    ax_t.plot(counts, np.full(counts.shape, float(distill_queries)), color="#1f77b4", label="lwcam: distillation only")
    for _, r in rise_rows.iterrows():
        ax_t.plot(counts, counts * r["queries_per_image"], lw=1, label=f"RISE {r.get('setting', '')}")
    ax_t.set_xscale("log")
    ax_t.set_yscale("log")
    ax_t.set_xlabel("images explained")
    ax_t.set_ylabel("total black-box queries")
    ax_t.set_title("total cost")
    for ax in (ax_q, ax_t):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, frameon=False)
    return fig


def plot_quality_vs_fidelity(table: Any, reference: Mapping[str, float], reference_label: str = "RISE") -> Figure:
    """F7: deletion and insertion AUC on the black box against the student's agreement, per epoch.

    Args:
        table: rows with ``epoch``, ``setting``, ``agreement``, ``deletion_auc`` and ``insertion_auc``
            (:func:`lwcam.study.analysis.quality_vs_fidelity`).
        reference: ``{"deletion_auc": ..., "insertion_auc": ...}`` of a reference method on the same
            images, drawn as a horizontal line.
        reference_label: its name in the legend.

    Returns:
        The figure (two panels).
    """
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    colours = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b"]
    for ax, metric, title in zip(axes, ("deletion_auc", "insertion_auc"),
                                 ("deletion AUC (lower is better)", "insertion AUC (higher is better)"), strict=True):
        for colour, (setting, rows) in zip(colours, table.groupby("setting", sort=False), strict=False):
            rows = rows.sort_values("epoch")
            ax.plot(rows["agreement"], rows[metric], "o-", color=colour, label=setting, ms=4)
            for _, r in rows.iterrows():
                ax.annotate(str(int(r["epoch"])), (r["agreement"], r[metric]), fontsize=6,
                            textcoords="offset points", xytext=(3, 3), color=colour)
        if metric in reference:
            ax.axhline(float(reference[metric]), color=_RED, ls="--", lw=1.2, label=reference_label)
        ax.set_xlabel("student's top-1 agreement with the black box (test)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle("explanation quality against the student's fidelity (numbers: distillation epoch)", fontsize=9)
    return fig


F8_TITLE = "each method's rank per measure (colour; 1 = best) and its mean (number), T4"


def plot_scorecard(ranks: Any, values: Any, higher_is_better: Mapping[str, bool] | None = None,
                   title: str = F8_TITLE) -> Figure:
    """F8: which method wins where, as a heat map of ranks (rows methods, columns measures) annotated with the values.

    Args:
        ranks: DataFrame (methods × measures) of ranks, 1 = best (e.g. :func:`lwcam.study.scorecard.rank_table`).
        values: DataFrame of the same shape: the values written in the cells.
        higher_is_better: column -> direction; the column labels get ↑ (higher is better) or ↓.
        title: the figure's title.

    Returns:
        The figure (one heat map, a colour bar of the rank).

    Example:
        >>> import pandas as pd
        >>> r = pd.DataFrame({"a": [1.0, 2.0], "b": [2.0, 1.0]}, index=["m1", "m2"])
        >>> len(plot_scorecard(r, r * 0.1, {"a": True, "b": False}).axes)  # the map and its colour bar
        2
    """
    import seaborn as sns  # here: only F8 needs it

    arrows = {c: f"{c} {'↑' if up else '↓'}" for c, up in (higher_is_better or {}).items()}
    shown = ranks.rename(columns=arrows)
    text = values.map(lambda v: f"{float(v):.2f}" if np.isfinite(float(v)) else "–").to_numpy()
    n_rows, n_cols = shown.shape
    fig = Figure(figsize=(1.0 + 0.95 * n_cols, 1.2 + 0.42 * n_rows), layout="constrained")
    ax = fig.subplots()
    sns.heatmap(shown, ax=ax, annot=text, fmt="", cmap="RdYlGn_r", vmin=1, vmax=max(2, n_rows), linewidths=0.5,
                linecolor="white", annot_kws={"fontsize": 7.5}, cbar_kws={"label": "rank (1 = best)", "shrink": 0.6})
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.xaxis.tick_top()
    ax.set_xticks(ax.get_xticks(), shown.columns, rotation=35, ha="left", fontsize=8)
    ax.set_yticks(ax.get_yticks(), shown.index, rotation=0, fontsize=8)
    ax.set_title(title, fontsize=9, pad=8)
    return fig


def plot_resolution(t5: Any, measures: Mapping[str, tuple[str, bool]], methods: Sequence[str] | None = None,
                    title: str = "F9 · the scorecard against object size") -> Figure:
    """F9: each headline measure against object size, one line per method (and line style per student).

    Args:
        t5: T5 (:func:`lwcam.study.resolution.resolution_table`): ``student``, ``size_bin``, ``method``, ``label``,
            each measure with ``_ci_low`` and ``_ci_high``; bins small to large by ``median_size_cells``.
        measures: column -> (axis label, higher is better), one panel each.
        methods: the methods drawn (default all), in legend order.
        title: the figure's title.

    Example:
        >>> import pandas as pd
        >>> t5 = pd.DataFrame({"student": "s", "size_bin": ["small", "large"], "method": "m", "label": "M",
        ...                    "x": [0.2, 0.8], "x_ci_low": [0.1, 0.7], "x_ci_high": [0.3, 0.9]})
        >>> len(plot_resolution(t5, {"x": ("x", True)}).axes)
        1
    """
    order = t5.groupby("size_bin")["median_size_cells"].median() if "median_size_cells" in t5 else None
    bins = list(order.sort_values().index) if order is not None else list(dict.fromkeys(t5["size_bin"]))
    methods = list(dict.fromkeys(t5["method"])) if methods is None else list(methods)
    students = list(dict.fromkeys(t5["student"]))
    fig = Figure(figsize=(3.3 * len(measures), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(measures)))
    for ax, (col, (label, up)) in zip(axes, measures.items(), strict=True):
        for i, method in enumerate(methods):
            colour, _ = _method_style(i)
            for j, student in enumerate(students):
                rows = t5[(t5["method"] == method) & (t5["student"] == student)].set_index("size_bin")
                rows = rows.reindex([b for b in bins if b in rows.index])
                if rows.empty:
                    continue
                x = np.array([bins.index(b) for b in rows.index]) + 0.04 * (i - len(methods) / 2)
                err = np.abs(rows[[f"{col}_ci_low", f"{col}_ci_high"]].to_numpy(float).T - rows[col].to_numpy(float))
                name = rows["label"].iloc[0] + ("" if len(students) == 1 else f" ({student})")
                ax.errorbar(x, rows[col], yerr=err, color=colour, ls=("-", "--", ":")[j % 3], marker="o", ms=3.5,
                            lw=1.3, capsize=2, label=name)
        ax.set_xticks(range(len(bins)), bins, fontsize=8)
        ax.set_xlim(-0.5, len(bins) - 0.5)
        ax.set_title(f"{label} {'↑' if up else '↓'}", fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7.5, frameon=False)
    fig.supxlabel("object size, in cells of the student's last map (its equivalent diameter over the cell width)",
                  fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save ``fig`` atomically (PNG/PDF/SVG by the suffix), tight bounding box, ``dpi`` 120."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(buf.getvalue(), path)
