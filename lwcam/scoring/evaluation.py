"""Evaluation: run explainers on a test set and score them on the black box.

This module orchestrates what :mod:`lwcam.scoring` measures: it explains a batch of images
with lwcam (the fused layer-wise Grad-CAM of the student) and with the baselines of
:mod:`lwcam.baselines`, each given only the model access it is allowed, then plays the
deletion and insertion games on the **black box** and scores the maps against the
ground-truth masks. Per-image results come back as a tidy ``pandas.DataFrame`` so that
tables and paired tests are one ``groupby`` away.

Example:
    >>> from lwcam import BlackBox
    >>> def net():
    ...     return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
    ...                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    >>> _ = torch.manual_seed(0)
    >>> student, blackbox = net(), BlackBox(net(), num_classes=3)
    >>> images, masks = torch.rand(4, 3, 16, 16), torch.zeros(4, 16, 16, dtype=torch.bool)
    >>> masks[:, 4:12, 4:12] = True
    >>> targets = blackbox(images).argmax(1)
    >>> runs = run_methods(images, targets, masks, methods=["lwcam", "random"], student=student)
    >>> per_image, games = score_methods(blackbox, images, targets, masks, runs)
    >>> per_image.shape, summarize(per_image, runs, n_boot=100)["method"].tolist()
    ((8, 6), ['lwcam', 'random'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .._checks import check_positive_int
from .._utils import track
from ..baselines import LWCAM_LABEL, METHODS, Explanation
from ..cam.batched import explain_lwcam
from ..cam.fusion import fuse
from ..cam.layerwise import LayerwiseGradCAM
from ..cam.maps import LayerMaps
from .games import GameResult, deletion_game, insertion_game
from .localisation import pointing_game, relevance_mass
from .stats import bootstrap_ci, paired_test

if TYPE_CHECKING:  # pandas is imported only by the functions that make a table
    import pandas as pd

__all__ = [
    "MethodRun",
    "run_methods",
    "score_methods",
    "score_saliency",
    "summarize",
    "compare",
    "LWCAM_LABEL",
    "LWCAM_METHODS",
    "FUSED_LAYER",
    "layer_rows",
    "layer_table",
    "layer_importance",
    "layer_resolutions",
    "method_resolution",
]

#: lwcam's variants among :data:`lwcam.baselines.METHODS`: name -> display label. ``lwcam`` is the
#: paper's fusion, fixed in advance; ``lwcam_selected`` takes the fusion chosen on ``val`` through
#: ``method_params``.
LWCAM_METHODS = {name: m.label for name, m in METHODS.items() if m.fn is explain_lwcam}


@dataclass
class MethodRun:
    """One method's saliency on (a subset of) the evaluation images.

    Attributes:
        name: method key (a key of :data:`lwcam.baselines.METHODS`, ``"lwcam"`` included).
        label: display name.
        access: what the method saw (``"white-box student"``, ``"black-box"``, ...).
        indices: (n,) positions of the explained images within the evaluation batch.
        saliency: (n,H,W) float maps.
        seconds_per_image: wall time per explained image.
        queries_per_image: black-box queries per explained image (explanation only).
        params: the settings used.
    """

    name: str
    label: str
    access: str
    indices: torch.Tensor
    saliency: torch.Tensor
    seconds_per_image: float
    queries_per_image: float
    params: dict[str, Any] = field(default_factory=dict)


def run_methods(images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, *, methods: Sequence[str],
                blackbox: Any = None, student: nn.Module | None = None, teacher: nn.Module | None = None,
                subset: Sequence[int] | torch.Tensor | None = None, subset_methods: Sequence[str] = (),
                method_params: Mapping[str, dict[str, Any]] | None = None, chunk: int = 50,
                progress: bool | None = None) -> dict[str, MethodRun]:
    """Explain ``images`` with each method, handing each only the model it may see.

    Every method runs through the registry (:data:`lwcam.baselines.METHODS`), which measures each
    call's cost (:class:`~lwcam.baselines.Explanation`); the costs of a method's chunks add up to
    its ``seconds_per_image`` and ``queries_per_image``.

    Args:
        images, targets, masks: the evaluation batch; ``targets`` are the black box's labels.
        methods: keys of :data:`lwcam.baselines.METHODS` (``"lwcam"``, ``"lwcam_selected"``, ``"rise"``, ...).
        blackbox: the :class:`~lwcam.blackbox.BlackBox` for black-box methods (its queries are counted).
        student: the distilled student (white-box methods, lwcam included).
        teacher: the teacher as a white-box **oracle** (``gradcam_teacher`` only).
        subset: positions of the images that the methods in ``subset_methods`` explain
            (expensive methods run on fewer images); the others explain every image.
        subset_methods: methods restricted to ``subset``.
        method_params: extra keyword arguments per method.
        chunk: images per call, so a long run shows progress and bounded memory.
        progress: show progress (``None``: only on a TTY).

    Returns:
        ``name -> MethodRun`` in ``methods`` order.
    """
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; expected one of {sorted(METHODS)}")
    method_params = dict(method_params or {})
    check_positive_int(chunk, "chunk")
    all_idx = torch.arange(len(images))
    sub_idx = all_idx if subset is None else torch.as_tensor(subset, dtype=torch.long)
    if all_idx.numel() == 0 or (sub_idx.numel() == 0 and set(methods) & set(subset_methods)):
        empty = "images" if all_idx.numel() == 0 else "subset"  # a cost per image of no image would be 0/0
        raise ValueError(f"{empty} is empty: every method needs at least one image to explain")
    runs: dict[str, MethodRun] = {}
    for name in track(methods, total=len(methods), desc="methods", enabled=progress):
        method = METHODS[name]
        idx = sub_idx if name in subset_methods else all_idx
        params = dict(method_params.get(name, {}))
        results: list[Explanation] = [
            method(images[part], targets[part], blackbox=blackbox, student=student, teacher=teacher,
                   masks=masks[part], **params)
            for part in idx.split(chunk)
        ]
        runs[name] = MethodRun(name=name, label=method.label, access=method.access, indices=idx,
                               saliency=torch.cat([r.saliency for r in results]),
                               seconds_per_image=sum(r.seconds for r in results) / len(idx),
                               queries_per_image=sum(r.queries for r in results) / len(idx), params=params)
    return runs


def score_saliency(blackbox: Any, images: torch.Tensor, saliency: torch.Tensor, targets: torch.Tensor,
                   masks: torch.Tensor | None = None, *, step: int | None = None, batch_size: int = 512,
                   substrate: Any = "zeros", start: Any = "blur") -> tuple[pd.DataFrame, GameResult, GameResult]:
    """Deletion and insertion AUCs on the black box, and (with masks) pointing and relevance mass, per image."""
    import pandas as pd
    dele = deletion_game(blackbox, images, saliency, targets, step=step, substrate=substrate, batch_size=batch_size)
    ins = insertion_game(blackbox, images, saliency, targets, step=step, start=start, batch_size=batch_size)
    df = pd.DataFrame({"deletion_auc": dele.auc.numpy(), "insertion_auc": ins.auc.numpy()})
    if masks is not None:
        hit, valid = pointing_game(saliency, masks, return_valid=True)
        df["pointing"] = np.where(valid.numpy(), hit.numpy().astype(float), np.nan)
        df["mass"] = np.where(valid.numpy(), relevance_mass(saliency, masks).numpy(), np.nan)
    return df, dele, ins


def score_methods(blackbox: Any, images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor | None,
                  runs: Mapping[str, MethodRun], *, step: int | None = None, batch_size: int = 512,
                  progress: bool | None = None) -> tuple[pd.DataFrame, dict[str, tuple[GameResult, GameResult]]]:
    """Score every method's maps on the black box.

    Returns:
        ``(per_image, games)``: a long DataFrame with one row per (method, image) holding
        ``method, image, deletion_auc, insertion_auc, pointing, mass``, and
        ``name -> (deletion GameResult, insertion GameResult)``.
    """
    import pandas as pd
    frames, games = [], {}
    for name, run in track(runs.items(), total=len(runs), desc="deletion/insertion", enabled=progress):
        idx = run.indices
        df, dele, ins = score_saliency(blackbox, images[idx], run.saliency, targets[idx],
                                       None if masks is None else masks[idx], step=step, batch_size=batch_size)
        df.insert(0, "image", idx.numpy())
        df.insert(0, "method", name)
        frames.append(df)
        games[name] = (dele, ins)
    return pd.concat(frames, ignore_index=True), games


def _check_columns(per_image: pd.DataFrame, wanted: Sequence[str], name: str) -> None:
    """``ValueError`` naming ``name`` when one of ``wanted`` is not a column of ``per_image`` (not a bare KeyError)."""
    missing = [c for c in wanted if c not in per_image.columns]
    if missing:
        raise ValueError(f"{name}: {missing[0]!r} is not a column of the per-image table; the columns are "
                         f"{list(per_image.columns)}")


def summarize(per_image: pd.DataFrame, runs: Mapping[str, MethodRun], *, n_boot: int = 10000,
              seed: int = 0, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """A table with one row per method: the mean of each metric with its 95% bootstrap CI, time and queries.

    ``metrics`` names the columns of ``per_image`` to summarise (default: deletion and
    insertion AUC, pointing and mass, those present).
    """
    import pandas as pd
    rows = []
    if metrics is None:
        metrics = [m for m in ("deletion_auc", "insertion_auc", "pointing", "mass") if m in per_image]
    _check_columns(per_image, metrics, "metrics")
    for name, run in runs.items():
        sub = per_image[per_image["method"] == name]
        row: dict[str, Any] = {"method": name, "label": run.label, "access": run.access, "n_images": len(sub)}
        for m in metrics:
            values = sub[m].to_numpy(dtype=float)
            if np.isnan(values).all():
                mean = low = high = float("nan")
            else:
                mean, low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
            row[m] = mean
            row[f"{m}_ci_low"] = low
            row[f"{m}_ci_high"] = high
        row["seconds_per_image"] = run.seconds_per_image
        row["queries_per_image"] = run.queries_per_image
        rows.append(row)
    return pd.DataFrame(rows)


def compare(per_image: pd.DataFrame, a: str, b: str, metric: str = "deletion_auc",
            alternative: str = "less", seed: int = 0) -> dict[str, Any]:
    """Paired comparison of methods ``a`` and ``b`` on the images both explained (Wilcoxon + bootstrap CI)."""
    _check_columns(per_image, [metric], "metric")
    pa = per_image[per_image["method"] == a].set_index("image")[metric]
    pb = per_image[per_image["method"] == b].set_index("image")[metric]
    common = pa.index.intersection(pb.index)
    if len(common) == 0:
        raise ValueError(f"methods {a!r} and {b!r} share no image")
    res = paired_test(pa.loc[common].to_numpy(), pb.loc[common].to_numpy(), seed=seed,
                      alternative=alternative)  # type: ignore[arg-type]
    return {"a": a, "b": b, "metric": metric, "n": int(res.n), "mean_a": float(pa.loc[common].mean()),
            "mean_b": float(pb.loc[common].mean()), "mean_diff": res.mean_diff, "ci_low": res.ci_low,
            "ci_high": res.ci_high, "p_value": res.p_value, "alternative": alternative}


#: The layer name of the fused map of every layer in :func:`layer_rows` (its last row, at depth ``len(names)``).
FUSED_LAYER = "fused (all layers)"


def _nan_like(values: pd.Series) -> np.ndarray:
    """NaNs of ``values``' dtype (a float32 AUC column stays float32 when rows are concatenated)."""
    return np.full(len(values), np.nan, dtype=values.to_numpy().dtype)


def _keyed(scores: pd.DataFrame, layer: str, depth: int, image: np.ndarray) -> pd.DataFrame:
    """``scores`` (one row per image) with the key columns ``layer, depth, image`` in front."""
    import pandas as pd
    return pd.concat([pd.DataFrame({"layer": layer, "depth": depth, "image": image}, index=scores.index), scores],
                     axis=1)


def layer_rows(scorer: Any, images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor | None,
               names: Sequence[str], stack: torch.Tensor, *, mode: str = "sum", normalize: str = "minmax",
               step: int | None = None, positions: torch.Tensor | None = None) -> pd.DataFrame:
    """Per-image rows of the layer study: each layer's map alone and the fused map without it, then the fused map.

    One row per (layer, image), layers shallow to deep and then :data:`FUSED_LAYER`, images in order:
    ``layer, depth, image, deletion_auc, insertion_auc[, pointing, mass], loo_deletion_auc,
    loo_insertion_auc``. For layer ``l`` the AUCs, pointing and mass are those of its map alone and
    ``loo_*`` those of ``fuse(stack without l)``; for the fused row they are the full fusion's and
    ``loo_*`` is NaN. Every value depends on its own image only (maps are normalised per image), so
    the rows of a slice of the images are the rows of the whole batch at those images.
    ``positions`` (default ``0..B-1``) are the images' positions in the whole batch, for ``image``.
    """
    import pandas as pd
    if stack.shape[1] != len(names):
        raise ValueError(f"stack has {stack.shape[1]} layers but {len(names)} names were given")
    image = np.arange(len(images)) if positions is None else torch.as_tensor(positions).numpy()
    if len(image) != len(images):
        raise ValueError(f"positions has {len(image)} entries for {len(images)} images")
    full = fuse(stack, mode=mode, normalize=normalize)
    full_df, _, _ = score_saliency(scorer, images, full, targets, masks, step=step)
    frames = []
    for i, name in enumerate(names):
        alone, _, _ = score_saliency(scorer, images, stack[:, i], targets, masks, step=step)
        keep = [j for j in range(len(names)) if j != i]
        without = fuse(stack[:, keep], mode=mode, normalize=normalize) if keep else torch.zeros_like(full)
        loo, _, _ = score_saliency(scorer, images, without, targets, None, step=step)
        frames.append(_keyed(alone.assign(loo_deletion_auc=loo["deletion_auc"], loo_insertion_auc=loo["insertion_auc"]),
                             name, i, image))
    fused = full_df.assign(loo_deletion_auc=_nan_like(full_df["deletion_auc"]),
                           loo_insertion_auc=_nan_like(full_df["insertion_auc"]))
    return pd.concat([*frames, _keyed(fused, FUSED_LAYER, len(names), image)], ignore_index=True)


def layer_table(rows: pd.DataFrame, *, resolutions: Mapping[str, Any] | None = None, seed: int = 0) -> pd.DataFrame:
    """A table from :func:`layer_rows`' per-image rows (of every image, in that order): one row per layer, then fused.

    Per layer the means of its map's AUCs (and pointing and mass, where the rows hold them); the
    leave-one-out effect ``loo_deletion_delta = mean(AUC_del(fused without l) − AUC_del(fused))``
    (positive: the layer helps), its paired two-sided Wilcoxon p-value (``seed`` for the bootstrap), and
    ``loo_insertion_delta = mean(AUC_ins(fused) − AUC_ins(fused without l))``.
    """
    import pandas as pd
    _check_columns(rows, ["layer", "depth", "image", "deletion_auc", "insertion_auc", "loo_deletion_auc",
                          "loo_insertion_auc"], "rows")
    full = rows[rows["layer"] == FUSED_LAYER]
    if full.empty:
        raise ValueError(f"rows: no {FUSED_LAYER!r} row; pass the rows of layer_rows()")
    with_masks = "pointing" in rows
    out = []
    for key, alone in rows[rows["layer"] != FUSED_LAYER].groupby("layer", sort=False):
        name = str(key)
        if not np.array_equal(alone["image"].to_numpy(), full["image"].to_numpy()):
            raise ValueError(f"rows: layer {name!r} holds other images than {FUSED_LAYER!r}")
        loo_del, full_del = alone["loo_deletion_auc"].to_numpy(), full["deletion_auc"].to_numpy()
        d_ins = full["insertion_auc"].to_numpy() - alone["loo_insertion_auc"].to_numpy()
        row = {"layer": name, "depth": int(alone["depth"].iloc[0]),
               "resolution": "x".join(map(str, resolutions[name])) if resolutions else "",
               "deletion_auc": alone["deletion_auc"].mean(), "insertion_auc": alone["insertion_auc"].mean()}
        if with_masks:
            row["pointing"], row["mass"] = alone["pointing"].mean(), alone["mass"].mean()
        row.update({"loo_deletion_delta": float((loo_del - full_del).mean()),
                    "loo_deletion_p": paired_test(loo_del, full_del, seed=seed).p_value,
                    "loo_insertion_delta": float(d_ins.mean())})
        out.append(row)
    fused_row = {"layer": FUSED_LAYER, "depth": int(full["depth"].iloc[0]), "resolution": "",
                 "deletion_auc": full["deletion_auc"].mean(), "insertion_auc": full["insertion_auc"].mean()}
    if with_masks:
        fused_row["pointing"], fused_row["mass"] = full["pointing"].mean(), full["mass"].mean()
    out.append(fused_row)
    return pd.DataFrame(out)


def layer_importance(scorer: Any, images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor | None,
                     names: Sequence[str], stack: torch.Tensor, *, resolutions: Mapping[str, Any] | None = None,
                     mode: str = "sum", normalize: str = "minmax", step: int | None = None,
                     seed: int = 0) -> pd.DataFrame:
    """Layer importance: each layer's own map scored on the black box, and its leave-one-out effect on the fused map.

    For layer ``l``: deletion/insertion AUC, pointing and relevance mass of its map alone; then
    the fused map without ``l`` (``weights`` zero at ``l``) against the full fused map:
    ``loo_deletion_delta = AUC_del(fused without l) − AUC_del(fused)`` (positive: the fused map
    deletes worse without the layer, so the layer helps), with a paired two-sided Wilcoxon p-value.
    Insertion likewise, with the sign flipped so that positive again means the layer helps.
    It is :func:`layer_table` of :func:`layer_rows` (which :mod:`lwcam.study.sharded` splits over processes).
    """
    rows = layer_rows(scorer, images, targets, masks, names, stack, mode=mode, normalize=normalize, step=step)
    return layer_table(rows, resolutions=resolutions, seed=seed)


#: Methods whose saliency is one layer map of a white-box model (the student's, or the teacher's for
#: the oracle), at that layer's native resolution.
_LAST_LAYER_METHODS = ("gradcam", "gradcampp", "scorecam", "cam", "gradcam_teacher")


def layer_resolutions(model: nn.Module, image_size: int) -> dict[str, tuple[int, int]]:
    """Native (h, w) of each ``layers="auto"`` layer of ``model`` for ``image_size`` px inputs, shallow to deep."""
    param = next(model.parameters())
    probe = torch.zeros(1, 3, image_size, image_size, device=param.device)
    with LayerwiseGradCAM(model, "auto", verbose=False) as cam:
        maps = cam(probe, targets=0)
    assert isinstance(maps, LayerMaps)  # one weighting gives one LayerMaps
    return maps.resolutions


def method_resolution(run: MethodRun, student: nn.Module, teacher: nn.Module | None, image_size: int) -> str:
    """The native resolution of the layer maps behind a method's saliency, e.g. ``"32x32+16x16+8x8"``.

    Empty for methods that do not read a layer map (black-box methods, random, centre bias, the mask).
    For ``lwcam_selected`` only the layers with a positive weight are listed.
    """
    if run.name not in (*LWCAM_METHODS, "layercam", *_LAST_LAYER_METHODS):
        return ""
    model = teacher if run.name == "gradcam_teacher" else student
    if model is None:
        return ""
    res = layer_resolutions(model, image_size)
    names = list(res)
    if run.name in _LAST_LAYER_METHODS:
        names = names[-1:]
    elif run.params.get("weights") is not None:
        weights = run.params["weights"]
        names = [n for i, n in enumerate(names) if float(weights[i]) > 0]
    return "+".join(f"{res[n][0]}x{res[n][1]}" for n in names)
