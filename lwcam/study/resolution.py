"""The scorecard by object size (T5, F9): where does the resolution of an explanation matter?

Each object of a class-conflict scene is given its size in **cells of the student's last map**: its
equivalent diameter :math:`2\\sqrt{A/\\pi}` (:func:`lwcam.data.object_size_cells`) over the width of a
cell, the input size divided by the last map's size (8 px for an 8×8 map of a 64-px image, 32 px for
a 2×2 map). An object of one cell is a single value of last-layer Grad-CAM; the class-preserving
fusions of :mod:`lwcam.cam.fusion` may only move the deep map's mass inside its cells.

The objects are binned by that size (:data:`SIZE_EDGES`: ≤ 1.5, 1.5–3, > 3 cells). Within a bin the
unit is the **scene**: a method's measures on the objects of one scene that fall in the bin are
averaged, so a scene whose two objects share a bin counts once and the paired tests treat independent
units. T5 is every T4 measure per method and bin with its 95% bootstrap CI; T5_claims are one-sided
paired tests per bin (:data:`RESOLUTION_PAIRS`); T5_goals checks the goals declared before ``test``
was read (:func:`resolution_goals`).

Example:
    >>> import torch
    >>> masks = torch.zeros(1, 2, 8, 16, dtype=torch.bool); masks[0, 0, :2, :2] = True; masks[0, 1, :, 8:] = True
    >>> object_sizes(masks, cell_px=2.0)[["object", "size_bin"]].to_dict("records")
    [{'object': 0, 'size_bin': '≤ 1.5'}, {'object': 1, 'size_bin': '> 3'}]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..data import object_size_cells
from ..scoring.evaluation import compare
from ..scoring.stats import bootstrap_ci
from .scorecard import MEASURES

__all__ = ["SIZE_EDGES", "RESOLUTION_PAIRS", "HEADLINE_MEASURES", "GOAL_TOLERANCE", "size_bin_labels",
           "object_sizes", "accuracy_by_size", "size_units", "resolution_table", "resolution_claims",
           "resolution_goals"]

#: Bin edges of T5, in cells of the student's last map: ``(≤ 1.5], (1.5, 3], (> 3)``.
SIZE_EDGES: tuple[float, ...] = (1.5, 3.0)

#: T5's claims: ``a`` better than ``b``, tested per bin on every measure in its better direction.
RESOLUTION_PAIRS = (("lwcam_conflict", "gradcam"), ("lwcam_gated", "gradcam"), ("lwcam_selected", "gradcam"),
                    ("lwcam", "gradcam"), ("lwcam_conflict", "rise"), ("lwcam_gated", "rise"))

#: The measures F9 draws against object size.
HEADLINE_MEASURES = ("targeted_pointing", "targeted_mass", "class_sensitivity", "deletion_asked")

#: "Not worse by more than": the goals' margin on a mean difference.
GOAL_TOLERANCE = 0.02


def size_bin_labels(edges: Sequence[float] = SIZE_EDGES) -> list[str]:
    """The bins' labels, small to large.

    Example:
        >>> size_bin_labels((1.5, 3.0))
        ['≤ 1.5', '1.5–3', '> 3']
    """
    e = _check_edges(edges)
    return [f"≤ {e[0]:g}", *[f"{lo:g}–{hi:g}" for lo, hi in zip(e[:-1], e[1:], strict=True)], f"> {e[-1]:g}"]


def _bin_labels_of(cells: np.ndarray, edges: Sequence[float]) -> list[str]:
    """The bin label of each size in ``cells`` (a bin is closed on the right)."""
    labels = size_bin_labels(edges)
    return [labels[i] for i in np.searchsorted(np.asarray(_check_edges(edges)), cells, side="left")]


def _check_edges(edges: Sequence[float]) -> list[float]:
    e = [float(x) for x in edges]
    increasing = all(b > a for a, b in zip(e, e[1:], strict=False))
    if not e or not all(np.isfinite(e)) or any(x <= 0 for x in e) or not increasing:
        raise ValueError(f"edges must be positive, finite and increasing, got {list(edges)!r}")
    return e


def object_sizes(masks: torch.Tensor, cell_px: float, edges: Sequence[float] = SIZE_EDGES) -> pd.DataFrame:
    """Each scene object's size in cells and its bin: columns ``image``, ``object``, ``size_cells``, ``size_bin``.

    Args:
        masks: ``(n,2,H,W)`` masks of the scenes' two objects.
        cell_px: pixels per cell of the student's last map (input width over map width).
        edges: the bin edges in cells (:data:`SIZE_EDGES`).
    """
    if masks.ndim != 4 or masks.shape[1] != 2:
        raise ValueError(f"masks must be (n,2,H,W), got shape {tuple(masks.shape)}")
    cells = object_size_cells(masks, cell_px).reshape(-1)
    n = masks.shape[0]
    return pd.DataFrame({"image": np.repeat(np.arange(n), 2), "object": np.tile([0, 1], n),
                         "size_cells": cells, "size_bin": _bin_labels_of(cells, edges)})


def accuracy_by_size(correct: torch.Tensor, masks: torch.Tensor, cell_px: float,
                     edges: Sequence[float] = SIZE_EDGES) -> pd.DataFrame:
    """A classifier's accuracy per object-size bin: columns ``size_bin``, ``n``, ``accuracy`` (and ``all``).

    Args:
        correct: ``(N,)`` bool, the classifier's answer was the label.
        masks: ``(N,H,W)`` object masks of the single-object images.
        cell_px: pixels per cell of the map the sizes are counted in.

    Example:
        >>> m = torch.zeros(3, 16, 16, dtype=torch.bool); m[0, :2, :2] = True; m[1:, :, :8] = True
        >>> accuracy_by_size(torch.tensor([False, True, True]), m, 2.0)["accuracy"].tolist()
        [0.0, 1.0, 0.6666666666666666]
    """
    if correct.shape[0] != masks.shape[0]:
        raise ValueError(f"correct has {correct.shape[0]} entries but masks {masks.shape[0]}")
    which = np.array(_bin_labels_of(object_size_cells(masks, cell_px), edges))
    ok = correct.cpu().numpy().astype(bool)
    rows = [{"size_bin": lab, "n": int((which == lab).sum()), "accuracy": float(ok[which == lab].mean())}
            for lab in size_bin_labels(edges) if (which == lab).any()]
    rows.append({"size_bin": "all", "n": len(ok), "accuracy": float(ok.mean())})
    return pd.DataFrame(rows)


def size_units(per_object: pd.DataFrame, sizes: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, bin, scene): each measure's mean over the scene's objects in that bin.

    ``per_object`` is :attr:`lwcam.study.scorecard.ScorecardResult.per_object`; ``sizes`` is :func:`object_sizes`.
    """
    merged = per_object.merge(sizes, on=["image", "object"], how="left", validate="many_to_one")
    if merged["size_bin"].isna().any():
        raise ValueError("per_object names scenes or objects that sizes does not cover")
    measures = [m for m in MEASURES if m in merged]
    units = merged.groupby(["method", "size_bin", "image"], sort=False)[[*measures, "size_cells"]].mean()
    return units.reset_index()


def resolution_table(units: pd.DataFrame, t4: pd.DataFrame, *, student: str, edges: Sequence[float] = SIZE_EDGES,
                     n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """T5 for one student: per bin and method, every T4 measure's mean with its 95% bootstrap CI over scenes.

    ``t4`` (T4, or any table with ``method``, ``label`` and ``queries_per_scene``) gives the rows' labels,
    their order and the queries per scene; the methods of ``units`` that it does not list are left out.
    """
    rows = []
    for size_bin in size_bin_labels(edges):
        sub = units[units["size_bin"] == size_bin]
        for row in t4.to_dict("records"):
            mine = sub[sub["method"] == row["method"]]
            if mine.empty:
                continue
            out: dict[str, Any] = {"student": student, "size_bin": size_bin, "method": row["method"],
                                   "label": row["label"], "n_scenes": len(mine),
                                   "median_size_cells": float(mine["size_cells"].median())}
            for m in MEASURES:
                values = mine[m].to_numpy(dtype=float) if m in mine else np.array([np.nan])
                ci = bootstrap_ci(values, n_boot=n_boot, seed=seed) if np.isfinite(values).any() else (np.nan,) * 3
                out[m], out[f"{m}_ci_low"], out[f"{m}_ci_high"] = ci
            out["queries_per_scene"] = row.get("queries_per_scene", np.nan)
            rows.append(out)
    return pd.DataFrame(rows)


def resolution_claims(units: pd.DataFrame, *, student: str, pairs: Sequence[tuple[str, str]] = RESOLUTION_PAIRS,
                      edges: Sequence[float] = SIZE_EDGES, seed: int = 0) -> pd.DataFrame:
    """T5_claims: per bin, one-sided paired tests (Wilcoxon, paired bootstrap CI) of ``a`` better than ``b``.

    Each pair is tested on every measure both methods were measured on, over the bin's scenes both explained.
    """
    rows = []
    for size_bin in size_bin_labels(edges):
        sub = units[units["size_bin"] == size_bin]
        present = set(sub["method"])
        for a, b in pairs:
            if a not in present or b not in present:
                continue
            for name, measure in MEASURES.items():
                both = sub.dropna(subset=[name])
                if not {a, b} <= set(both["method"]) or not _shared(both, a, b):
                    continue
                alternative = "greater" if measure.higher_is_better else "less"
                rows.append({"student": student, "size_bin": size_bin,
                             **compare(both, a, b, name, alternative, seed), "family": measure.family})
    return pd.DataFrame(rows)


def _shared(frame: pd.DataFrame, a: str, b: str) -> bool:
    ia = set(frame.loc[frame["method"] == a, "image"])
    return bool(ia & set(frame.loc[frame["method"] == b, "image"]))


def _better_by(t5: pd.DataFrame, size_bin: str, a: str, b: str, measure: str) -> float:
    """How much ``a``'s mean beats ``b``'s on ``measure`` in ``size_bin`` (positive: better), NaN if absent."""
    sub = t5[t5["size_bin"] == size_bin].set_index("method")
    if a not in sub.index or b not in sub.index:
        return float("nan")
    values = sub[measure].astype(float)
    diff = float(values[a]) - float(values[b])
    return diff if MEASURES[measure].higher_is_better else -diff


def _p(claims: pd.DataFrame, size_bin: str, a: str, b: str, measure: str) -> float:
    hit = claims[(claims["size_bin"] == size_bin) & (claims["a"] == a) & (claims["b"] == b)
                 & (claims["metric"] == measure)]
    return float(hit["p_value"].iloc[0]) if len(hit) else float("nan")


def resolution_goals(t5: pd.DataFrame, claims: pd.DataFrame, units: pd.DataFrame, *,
                     method: str = "lwcam_conflict", alpha: float = 0.01, tolerance: float = GOAL_TOLERANCE,
                     edges: Sequence[float] = SIZE_EDGES) -> pd.DataFrame:
    """T5_goals: the goals declared before ``test`` was read, each with its value and whether it is met.

    1. smallest bin: ``method`` beats Grad-CAM on targeted pointing and on the asked class's deletion
       at ``p < alpha``, and is not worse than Grad-CAM by more than ``tolerance`` on targeted mass and
       class sensitivity;
    2. largest bin: not worse than Grad-CAM by more than ``tolerance`` on any T4 measure;
    3. ρ after full randomisation ≤ 0.2 (the mean over the scenes where it was measured);
    4. every T4 measure, every bin: at or above RISE (means).

    ``t5``, ``claims`` and ``units`` are one student's T5, T5_claims and :func:`size_units`. A goal whose
    numbers are missing (NaN: no object of that size for this student) is not met, and says so.
    """
    bins = size_bin_labels(edges)
    small, large = bins[0], bins[-1]
    rows: list[dict[str, Any]] = []
    for m in ("targeted_pointing", "deletion_asked"):
        p = _p(claims, small, method, "gradcam", m)
        rows.append(_goal(f"{small} cells: beats Grad-CAM on {MEASURES[m].label} at p < {alpha:g}", p, p < alpha))
    for m in ("targeted_mass", "class_sensitivity"):
        d = _better_by(t5, small, method, "gradcam", m)
        rows.append(_goal(f"{small} cells: {MEASURES[m].label} within {tolerance:g} of Grad-CAM", d, d >= -tolerance))
    worst = _worst(t5, large, method, "gradcam")
    rows.append(_goal(f"{large} cells: every measure within {tolerance:g} of Grad-CAM (worst: {worst[0]})",
                      worst[1], worst[1] >= -tolerance))
    mine = (units.loc[units["method"] == method, "randomisation"].dropna().to_numpy(float)
            if "randomisation" in units else np.array([]))
    rand = float(mine.mean()) if mine.size else float("nan")
    rows.append(_goal("ρ after full randomisation ≤ 0.2", rand, rand <= 0.2))
    below = [(b, m, _better_by(t5, b, method, "rise", m)) for b in bins for m in MEASURES]
    short = [(b, m, d) for b, m, d in below if np.isfinite(d) and d < 0]
    compared = sum(np.isfinite(d) for _, _, d in below)
    text = "; ".join(f"{b} {MEASURES[m].label} {d:+.3f}" for b, m, d in short) or "none"
    rows.append(_goal(f"at or above RISE on every measure and bin ({compared} compared; below: {text})",
                      float(min((d for _, _, d in below if np.isfinite(d)), default=float("nan"))),
                      compared > 0 and not short))
    out = pd.DataFrame(rows)
    out.insert(0, "method", method)
    return out


def _worst(t5: pd.DataFrame, size_bin: str, a: str, b: str) -> tuple[str, float]:
    diffs = {m: _better_by(t5, size_bin, a, b, m) for m in MEASURES}
    finite = {m: d for m, d in diffs.items() if np.isfinite(d)}
    if not finite:
        return "none measured", float("nan")
    m = min(finite, key=lambda k: finite[k])
    return MEASURES[m].label, finite[m]


def _goal(goal: str, value: float, met: bool) -> dict[str, Any]:
    return {"goal": goal, "value": float(value), "met": bool(met) and bool(np.isfinite(value))}
