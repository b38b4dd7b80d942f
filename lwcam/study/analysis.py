"""The paper's analyses: T1, the fusion grid chosen on ``val``, the claim tests, F6 and F7.

:mod:`lwcam.study.pipeline` finds and caches artefacts; this module turns them into the tables and
figure data that the notebooks save. Each function takes tensors and models, never a split name,
so what it reads is exactly what it is handed: :func:`select_fusion` is given ``val`` images
only and cannot see ``test``.

The fusion grid (:func:`fusion_grid`) is declared once: weighting (Grad-CAM, LayerCAM) ×
normalisation (per-layer min-max, none) × mode (sum, max, weighted) × layer weights (uniform,
one layer, all but one layer, and weights learned on ``val``), and beside those sums the
class-preserving fusions of :data:`lwcam.cam.fusion.CLASS_PRESERVING_MODES` (deep-gated, geometric-mean
product, Poly-CAM, mass-preserving recursive refinement), each on Grad-CAM, LayerCAM and HiResCAM
shallow maps, all gated by the student's last-layer Grad-CAM, fused from the maps at their own
resolutions. The learned weights are

    w_l = max(0, A_random − A_l)

where ``A_l`` is the deletion AUC of layer ``l``'s map alone on the validation images and
``A_random`` that of a random map on the same images: a layer weighs what it deletes better
than chance, and a layer no better than chance weighs 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._checks import check_positive_int, check_real
from .._utils import track
from ..baselines import random_saliency, rise
from ..cam.batched import explain_lwcam, raw_layer_maps
from ..cam.fusion import CLASS_PRESERVING_MODES, fuse
from ..cam.maps import upsample_layers
from ..models import predict_logits
from ..scoring.evaluation import compare
from ..scoring.games import deletion_game, insertion_game

__all__ = [
    "table_t1",
    "learned_layer_weights",
    "fusion_grid",
    "fused_maps",
    "select_fusion",
    "claim_table",
    "queries_tradeoff",
    "quality_vs_fidelity",
]

WEIGHTING_LABELS = {"gradcam": "Grad-CAM", "layercam": "LayerCAM"}
#: The grid's version: a cached selection made on another grid is not reused (2: the class-preserving fusions).
FUSION_GRID_VERSION = 2
#: The shallow maps' weightings of the class-preserving fusions, and the weighting of their gate.
GATED_WEIGHTINGS = {"gradcam": "Grad-CAM", "layercam": "LayerCAM", "hirescam": "HiResCAM"}
GATE_WEIGHTING = "gradcam"
#: The class-preserving modes of the grid, with their labels and options (declared before ``test`` is read).
GATED_MODES = {"deep_gated": ("deep-gated sum", {}), "product": ("geometric-mean product", {"eps": 0.05}),
               "polycam": ("Poly-CAM", {}), "recursive": ("mass-preserving refinement", {"alpha": 0.1})}


def table_t1(params: Mapping[str, Any], teacher_meta: Mapping[str, Any], teacher_accuracy: float,
             students: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """T1: teacher accuracy, student accuracy, agreement, KL, queries and time, one row per black-box mode."""
    rows = []
    for mode, summary in students.items():
        fid = summary["fidelity"]
        rows.append({
            "blackbox_output": mode,
            "teacher": params["teacher"],
            "teacher_test_acc": teacher_accuracy,
            "student": params["student"],
            "student_test_acc": fid.get("accuracy"),
            "agreement_test": fid.get("eval_agreement"),
            "kl_test": fid.get("eval_kl"),
            "agreement_holdout": fid.get("agreement"),
            "queries": summary["queries"],
            "distill_seconds": round(float(summary["seconds"]), 1),
            "teacher_train_seconds": round(float(teacher_meta.get("seconds", float("nan"))), 1),
        })
    return pd.DataFrame(rows)


def learned_layer_weights(layer_auc: Sequence[float], random_auc: float) -> list[float] | None:
    """Layer weights from validation deletion AUCs: ``w_l = max(0, A_random − A_l)``.

    Returns ``None`` when no layer deletes better than the random map (nothing to weigh).

    Example:
        >>> learned_layer_weights([0.2, 0.6, 0.4], random_auc=0.5)
        [0.3, 0.0, 0.09999999999999998]
    """
    if not np.isfinite(random_auc) or not all(np.isfinite(a) for a in layer_auc):
        raise ValueError(f"layer_auc and random_auc must be finite, got {list(layer_auc)} and {random_auc}")
    check_real(random_auc, "random_auc", 0.0, 1.0)  # deletion AUCs lie in [0, 1]
    for a in layer_auc:
        check_real(a, "layer_auc", 0.0, 1.0)
    weights = [max(0.0, float(random_auc) - float(a)) for a in layer_auc]
    return weights if sum(weights) > 0 else None


def _one_hot(n: int, i: int, value: float = 1.0, rest: float = 0.0) -> list[float]:
    return [value if j == i else rest for j in range(n)]


def fusion_grid(names: Sequence[str], learned: Mapping[str, list[float] | None]) -> dict[str, dict[str, Any]]:
    """The declared grid of fusion settings: label -> keyword arguments of :func:`explain_lwcam`.

    For each weighting: sum of min-max maps (the paper's fusion), raw sum, max of min-max maps,
    the val-learned weights (when some layer beats random), each layer alone, and each layer left out.
    """
    n = len(names)
    grid: dict[str, dict[str, Any]] = {}
    for weighting, tag in WEIGHTING_LABELS.items():
        grid[f"{tag}: sum of min-max maps"] = {"weighting": weighting, "mode": "sum", "normalize": "minmax"}
        grid[f"{tag}: raw sum"] = {"weighting": weighting, "mode": "sum", "normalize": "none"}
        grid[f"{tag}: max of min-max maps"] = {"weighting": weighting, "mode": "max", "normalize": "minmax"}
        if learned.get(weighting):
            grid[f"{tag}: weighted by val importance"] = {"weighting": weighting, "mode": "weighted",
                                                         "normalize": "minmax", "weights": learned[weighting]}
        for i, name in enumerate(names):
            grid[f"{tag}: layer {name} only"] = {"weighting": weighting, "mode": "weighted",
                                                 "normalize": "minmax", "weights": _one_hot(n, i)}
        if n > 2:
            for i, name in enumerate(names):
                grid[f"{tag}: without layer {name}"] = {"weighting": weighting, "mode": "weighted",
                                                        "normalize": "minmax", "weights": _one_hot(n, i, 0.0, 1.0)}
    if n > 1:
        for weighting, tag in GATED_WEIGHTINGS.items():
            for mode, (label, options) in GATED_MODES.items():
                grid[f"{tag} under Grad-CAM (last layer): {label}"] = {
                    "weighting": weighting, "mode": mode, "normalize": "minmax", "gate_weighting": GATE_WEIGHTING,
                    **options}
    return grid


def fused_maps(stacks: Mapping[str, torch.Tensor], raws: Mapping[str, Sequence[torch.Tensor]],
               spec: Mapping[str, Any], size: tuple[int, int]) -> torch.Tensor:
    """One grid setting's saliency from maps already computed: ``stacks`` (weighting -> upsampled (B,L,H,W),
    :func:`~lwcam.cam.maps.upsample_layers`) for the sums, ``raws`` (weighting -> native maps,
    :func:`~lwcam.cam.batched.raw_layer_maps`) for the class-preserving modes; equal to :func:`explain_lwcam`."""
    kw = {k: v for k, v in spec.items() if k not in ("weighting", "gate_weighting")}
    if spec["mode"] not in CLASS_PRESERVING_MODES:
        return fuse(stacks[spec["weighting"]], **kw)
    gate = raws[spec["gate_weighting"]][-1] if spec.get("gate_weighting") else None
    return fuse(list(raws[spec["weighting"]]), size=size, gate=gate, **kw)


def select_fusion(student: nn.Module, scorer: Any, val_images: torch.Tensor, val_targets: torch.Tensor, *,
                  seed: int = 0, step: int | None = None,
                  progress: bool | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score every setting of :func:`fusion_grid` by deletion AUC on validation images; pick the lowest.

    Args:
        student: the distilled student.
        scorer: the black box the games query (probabilities).
        val_images, val_targets: ``val`` images and the black box's labels for them. Nothing else is read.
        seed: seed of the random map behind the learned weights.
        step: pixels per step of the deletion game (``None``: the image width).

    Returns:
        ``(table, chosen)``: one row per setting with its validation deletion AUC and a
        ``selected_on_val`` flag, and the chosen setting's keyword arguments for :func:`explain_lwcam`.
    """
    size = (int(val_images.shape[-2]), int(val_images.shape[-1]))
    names, raws = raw_layer_maps(student, val_images, val_targets, tuple(GATED_WEIGHTINGS), progress=progress)
    stacks = {w: upsample_layers(raws[w], size) for w in WEIGHTING_LABELS}  # the same pass serves the sums
    resolutions = {n: (int(m.shape[-2]), int(m.shape[-1])) for n, m in zip(names, raws[GATE_WEIGHTING], strict=True)}

    def auc(sal: torch.Tensor) -> float:
        return float(deletion_game(scorer, val_images, sal, val_targets, step=step).auc.mean())

    random_auc = auc(random_saliency(val_images, seed=seed))
    n = len(names)
    single = {w: [auc(fused_maps(stacks, raws, {"weighting": w, "mode": "weighted", "normalize": "minmax",
                                                "weights": _one_hot(n, i)}, size)) for i in range(n)] for w in stacks}
    grid = fusion_grid(names, {w: learned_layer_weights(a, random_auc) for w, a in single.items()})
    rows = []
    for label, spec in grid.items():
        weights = spec.get("weights")
        if weights is not None and sorted(weights) == _one_hot(n, n - 1):
            value = single[spec["weighting"]][weights.index(1.0)]
        else:
            value = auc(fused_maps(stacks, raws, spec, size))
        rows.append({"fusion": label, "weighting": spec["weighting"], "normalize": spec["normalize"],
                     "mode": spec["mode"], "weights": "" if weights is None else
                     " ".join(f"{w:.3g}" for w in weights), "gate_weighting": spec.get("gate_weighting", ""),
                     "eps": spec.get("eps", np.nan), "alpha": spec.get("alpha", np.nan),
                     "val_deletion_auc": value, "n_val": len(val_images)})
    table = pd.DataFrame(rows)
    table["selected_on_val"] = table.index == table["val_deletion_auc"].idxmin()
    table.attrs.update(layers=names, resolutions=resolutions, random_val_deletion_auc=random_auc)
    return table, dict(grid[str(table.loc[table["selected_on_val"], "fusion"].iloc[0])])


def claim_table(per_image: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The claims as one-sided paired tests on the images both methods explained.

    Rows: the paper's claim (``lwcam`` (paper) below Grad-CAM on deletion; also on the images
    where student and black box agree, and on insertion), then ``lwcam_selected`` against
    Grad-CAM, RISE, LIME and the centre bias (deletion lower, insertion higher; pointing higher
    against the centre bias), then the paper's lwcam against every other method on deletion.
    """
    methods = set(per_image["method"])
    rows = [dict(compare(per_image, "lwcam", "gradcam", "deletion_auc", "less", seed), subset="all images")]
    if "agrees" in per_image:
        agreeing = per_image[per_image["agrees"].astype(bool)]
        if agreeing["method"].eq("lwcam").any():
            rows.append(dict(compare(agreeing, "lwcam", "gradcam", "deletion_auc", "less", seed),
                             subset="student agrees with black box"))
    rows.append(dict(compare(per_image, "lwcam", "gradcam", "insertion_auc", "greater", seed), subset="all images"))
    if "lwcam_selected" in methods:
        for other in [m for m in ("gradcam", "rise", "lime", "center") if m in methods]:
            tests = [("deletion_auc", "less"), ("insertion_auc", "greater")]
            if other == "center" and "pointing" in per_image:
                tests.append(("pointing", "greater"))
            for metric, alternative in tests:
                rows.append(dict(compare(per_image, "lwcam_selected", other, metric, alternative, seed),
                                 subset="all images"))
    for other in sorted(methods - {"lwcam", "gradcam", "lwcam_selected"}):
        rows.append(dict(compare(per_image, "lwcam", other, "deletion_auc", "less", seed), subset="all images"))
    cols = ["a", "b", "metric", "subset", "n", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "p_value",
            "alternative"]
    return pd.DataFrame(rows)[cols]


def queries_tradeoff(params: Mapping[str, Any], blackbox: Any, scorer: Any, images: torch.Tensor,
                     targets: torch.Tensor, runs: Mapping[str, Any], distill_queries: int, *, seed: int = 0,
                     lwcam_method: str = "lwcam_selected", n_images: int | None = None,
                     n_masks: tuple[int, ...] = (100, 300, 1000), step: int | None = None) -> tuple[pd.DataFrame, str]:
    """F6 data: RISE's deletion AUC at several mask counts against lwcam's amortised queries.

    Returns the table (one row per RISE setting plus lwcam) and a sentence with the break-even
    image count: lwcam's distillation queries divided by RISE's queries per image. ``step``: pixels per
    step of the games (``None``: the image width).
    """
    n_default = int(params["rise_masks"])
    n = (min(int(params["n_tradeoff"]), len(runs["rise"].indices)) if n_images is None
         else check_positive_int(n_images, "n_images"))
    idx = runs["rise"].indices[:n]
    x, t = images[idx], targets[idx]

    def row(method: str, setting: str, q: float, sal: torch.Tensor) -> dict[str, Any]:
        return {"method": method, "setting": setting, "queries_per_image": q, "n_images": n,
                "deletion_auc": float(deletion_game(scorer, x, sal, t, step=step).auc.mean()),
                "insertion_auc": float(insertion_game(scorer, x, sal, t, step=step).auc.mean())}

    rows = []
    for n_m in sorted({*n_masks, n_default}):
        sal = runs["rise"].saliency[:n] if n_m == n_default else rise(blackbox, x, t, n_masks=n_m, seed=seed)
        rows.append(row("RISE", f"N={n_m}", float(n_m), sal))
    lw = runs[lwcam_method]
    pos = [int((lw.indices == i).nonzero()) for i in idx]
    rows.append(row("lwcam", f"{lw.label}; distillation: {distill_queries} queries, once", 0.0, lw.saliency[pos]))
    sentence = (f"break-even: lwcam's {distill_queries} distillation queries equal RISE (N={n_default}) on "
                f"{distill_queries / n_default:.1f} images; beyond that lwcam needs fewer black-box queries in total")
    return pd.DataFrame(rows), sentence


def quality_vs_fidelity(snapshots: Mapping[int, nn.Module], scorer: Any, images: torch.Tensor,
                        targets: torch.Tensor, fidelity_images: torch.Tensor, fidelity_labels: torch.Tensor,
                        specs: Mapping[str, Mapping[str, Any]], *, step: int | None = None,
                        progress: bool | None = None) -> pd.DataFrame:
    """F7 data: explanation quality of each distillation epoch's student against its fidelity.

    Args:
        snapshots: epoch -> student after that epoch.
        scorer: the black box the games query.
        images, targets: the images explained (and the black box's labels for them).
        fidelity_images, fidelity_labels: images and black-box labels on which agreement is measured.
        specs: display name -> :func:`explain_lwcam` settings (e.g. the paper's and the selected fusion).
        step: pixels per step of the games (``None``: the image width).
        progress: show a progress bar over epochs (``None``: only on a TTY).

    Returns:
        One row per (epoch, setting): ``agreement``, ``deletion_auc``, ``insertion_auc``, ``n_images``.
    """
    rows = []
    for epoch in track(sorted(snapshots), total=len(snapshots), desc="F7 epochs", enabled=progress):
        student = snapshots[epoch]
        agree = float((predict_logits(student, fidelity_images).argmax(1) == fidelity_labels).float().mean())
        for name, spec in specs.items():
            sal = explain_lwcam(student, images, targets, **spec)
            rows.append({"epoch": epoch, "setting": name, "agreement": agree,
                         "deletion_auc": float(deletion_game(scorer, images, sal, targets, step=step).auc.mean()),
                         "insertion_auc": float(insertion_game(scorer, images, sal, targets, step=step).auc.mean()),
                         "n_images": len(images), "n_fidelity": len(fidelity_images)})
    return pd.DataFrame(rows)
