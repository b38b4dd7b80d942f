"""The scorecard (T4, F8): every method held to localisation, faithfulness, randomisation, robustness and complexity.

Each class-conflict scene (:class:`lwcam.data.ConflictScenes`: two objects of different classes side
by side) is explained **twice**, once per object class, by every method through the registry
(:func:`lwcam.scoring.evaluation.run_methods`), each method seeing only the model it may see. RISE reads both
classes from one set of masked queries (:func:`lwcam.baselines.rise_classes`); every other method is
simply run once per class, with the same settings, so a method that ignores the class (random noise
with a fixed seed, the centre bias) gives the same map twice. The measures of :mod:`lwcam.scoring`
are then taken per scene, on the black box:

* **localisation**: targeted pointing, targeted mass (mean of the two maps), class sensitivity (the
  two maps' rank correlation over the objects' pixels; lower is better), targeted deletion (the asked
  class's deletion AUC, the other class's AUC under the same deletion, and their gap);
* **faithfulness beyond the zero substrate**: ROAD (noisy linear imputation), MoRF and LeRF, the
  mean probability over :data:`SCORECARD_ROAD_PERCENTAGES`, on the map of object ``a`` of the first
  ``n_road`` scenes, the very maps T4 scores (no extra explanation);
* **randomisation**: cascading parameter randomisation, top first, of the student for student-side
  methods and of the black box (the benchmark owns it) for black-box ones, in ``steps`` groups of
  layers (:func:`cascade_groups`); the Spearman correlation per step (``reports/T4_randomisation``)
  and after the last step, when every layer is randomised (T4);
* **robustness**: max-sensitivity under uniform noise of half-width :data:`NOISE_RADIUS`, and the rank
  correlation between two runs that differ only in the method's own source of variance: a second
  student distilled from the same black box with another seed for student-side methods, another seed
  for seeded black-box methods (RISE, LIME) and for random noise, and the same call again for
  deterministic ones;
* **complexity**: sparseness (Gini index), mean of the two maps.

Randomisation and robustness use the map of object ``a`` on the first scenes only: they cost one
explanation per cascade step or noise sample. Every measure is one value per (method, scene), so that
T4's bootstrap CIs and the paired tests treat scenes as the independent units.

Example:
    >>> from lwcam import BlackBox
    >>> from lwcam.data import ConflictScenes
    >>> def net():
    ...     return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
    ...                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4)).eval()
    >>> _ = torch.manual_seed(0)
    >>> images, labels, masks = ConflictScenes("test", n=2, image_size=16, num_classes=4).tensors()
    >>> student, teacher = net(), net()
    >>> result = run_scorecard(images, labels, masks, methods=["lwcam", "center", "mask"],
    ...                        blackbox=BlackBox(teacher, num_classes=4), student=student, teacher=teacher,
    ...                        second_student=net(), n_randomisation=1, n_robustness=1, n_road=1,
    ...                        robustness_samples=1, road_percentages=(50,))
    >>> t4 = scorecard_table(result, n_boot=100)
    >>> t4["method"].tolist(), bool(t4[list(MEASURES)].notna().all().all())
    (['lwcam', 'center', 'mask'], True)
"""

from __future__ import annotations

import copy
import inspect
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._checks import check_positive_int, check_real
from .._utils import track
from ..baselines import METHODS, rise_classes
from ..blackbox import BlackBox
from ..cam.batched import raw_layer_maps
from ..cam.maps import upsample_layers
from ..data import object_area_fractions
from ..scoring.complexity import sparseness
from ..scoring.correlation import map_rank_correlation
from ..scoring.evaluation import MethodRun, compare, run_methods, summarize
from ..scoring.faithfulness import road, road_score, targeted_deletion
from ..scoring.localisation import class_sensitivity, targeted_mass, targeted_pointing
from ..scoring.randomisation import model_randomisation
from ..scoring.robustness import max_sensitivity
from ..scoring.stats import paired_test
from .analysis import GATED_WEIGHTINGS, WEIGHTING_LABELS, fused_maps

__all__ = [
    "Measure",
    "MEASURES",
    "SCORECARD_METHODS",
    "EXPENSIVE_METHODS",
    "VARIANTS",
    "GATED_FUSION",
    "SCORECARD_ROAD_PERCENTAGES",
    "NOISE_RADIUS",
    "CONFLICT_TOLERANCE",
    "ScorecardResult",
    "scene_method_params",
    "top_two_hits",
    "object_size_table",
    "scene_table",
    "scene_limits",
    "explain_scenes",
    "score_objects",
    "road_values",
    "scene_means",
    "score_scenes",
    "cascade_groups",
    "randomisation_check",
    "robustness",
    "run_scorecard",
    "FirstSceneMeasures",
    "first_scene_measures",
    "finish_scorecard",
    "scorecard_table",
    "scorecard_claims",
    "separation_table",
    "rank_table",
    "select_fusion_conflict",
]


class Measure(NamedTuple):
    """A T4 column: its display label, whether higher is better, and its family."""

    label: str
    higher_is_better: bool
    family: str


#: T4's measures, in column order: name -> (label, higher is better, family).
MEASURES: dict[str, Measure] = {
    "targeted_pointing": Measure("targeted pointing", True, "localisation"),
    "targeted_mass": Measure("targeted mass", True, "localisation"),
    "class_sensitivity": Measure("class sensitivity ρ", False, "localisation"),
    "deletion_asked": Measure("deletion AUC, asked", False, "localisation"),
    "deletion_other": Measure("deletion AUC, other", True, "localisation"),
    "deletion_gap": Measure("deletion gap", True, "localisation"),
    "road_morf": Measure("ROAD MoRF", False, "faithfulness"),
    "road_lerf": Measure("ROAD LeRF", True, "faithfulness"),
    "randomisation": Measure("ρ after randomisation", False, "randomisation"),
    "max_sensitivity": Measure("max-sensitivity", False, "robustness"),
    "two_run_correlation": Measure("ρ of two runs", True, "robustness"),
    "sparseness": Measure("sparseness", True, "complexity"),
}

#: Methods of T4, in row order. ``lwcam_conflict`` is ``lwcam_selected`` with the conflict-aware fusion.
SCORECARD_METHODS = ("lwcam", "lwcam_selected", "lwcam_conflict", "lwcam_gated", "gradcam", "layercam", "gradcampp",
                     "scorecam", "gradcam_teacher", "cam", "rise", "lime", "occlusion", "random", "center", "mask")

#: Methods that explain only the first ``n_conflict_blackbox`` scenes (their cost per map is high).
EXPENSIVE_METHODS = ("scorecam", "rise", "lime", "occlusion", "meaningful_perturbation")

#: Rows that are a registry method under other settings: name -> (registry method, display label).
VARIANTS = {"lwcam_conflict": ("lwcam_selected", "lwcam (selected on val, conflict-aware)"),
            "lwcam_gated": ("lwcam_selected", "lwcam (deep-gated, declared)")}

#: ``lwcam_gated``'s fusion, declared before ``test`` was read (not selected): min-max(last-layer Grad-CAM) ×
#: Σ min-max(LayerCAM of every layer), the class-preserving form whose deep class map gates the shallow maps.
GATED_FUSION = {"weighting": "layercam", "mode": "deep_gated", "normalize": "minmax", "gate_weighting": "gradcam"}

#: ROAD's removal percentages in T4 (a subset of Rong et al.'s 10..90, to bound the imputation cost).
SCORECARD_ROAD_PERCENTAGES: tuple[float, ...] = (10, 30, 50, 70, 90)

#: Half-width of max-sensitivity's uniform noise, in the normalised input space (about 2/255 in pixels).
NOISE_RADIUS = 0.05

#: The conflict-aware fusion criterion's tolerance: settings whose ``val`` deletion AUC is within this
#: of the best compete on ``val`` targeted mass (declared before ``test`` is read).
CONFLICT_TOLERANCE = 0.01


@dataclass
class ScorecardResult:
    """What :func:`run_scorecard` measured.

    Attributes:
        per_scene: one row per (method, scene): ``method``, ``image`` (scene index) and every
            :data:`MEASURES` column (NaN where a measure was not taken on that scene).
        runs: name -> :class:`~lwcam.scoring.evaluation.MethodRun` whose ``saliency`` is ``(n,2,H,W)`` (the
            maps for object ``a`` and object ``b``) and whose costs are **per scene** (both maps).
        randomisation: one row per (method, step, scene) with ``rank_correlation``.
        per_object: one row per (method, scene, object) (:func:`score_objects`); the randomisation and
            robustness measures, taken on object ``a``, stand on its rows. T5 bins these by object size.
    """

    per_scene: pd.DataFrame
    runs: dict[str, MethodRun]
    randomisation: pd.DataFrame
    per_object: pd.DataFrame = field(default_factory=pd.DataFrame)


# ----------------------------------------------------------------------------- scenes
def scene_method_params(height: int, width: int, *, rise_masks: int = 4000, lime_samples: int = 500, seed: int = 0,
                        fusions: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Method settings for ``height × width`` scenes that match those of ``height × height`` single images.

    RISE keeps square cells (8 per ``height``: an ``8 × 8·width/height`` grid) and LIME the superpixel
    size (50 per ``height²``); both, and the random map, take ``seed``. ``fusions`` gives the lwcam
    variants' settings chosen on ``val`` (``lwcam_selected``, ``lwcam_conflict``); ``lwcam_gated`` is
    :data:`GATED_FUSION`.

    Example:
        >>> scene_method_params(64, 128, rise_masks=100)["rise"]["grid_size"]
        (8, 16)
    """
    ratio = check_positive_int(width, "width") / check_positive_int(height, "height")
    params: dict[str, dict[str, Any]] = {
        "rise": {"n_masks": rise_masks, "seed": seed, "grid_size": (8, max(1, round(8 * ratio)))},
        "lime": {"n_samples": lime_samples, "seed": seed, "n_segments": max(1, round(50 * ratio))},
        "random": {"seed": seed},
        "meaningful_perturbation": {"seed": seed},
        "lwcam_gated": dict(GATED_FUSION),
    }
    for name, fusion in (fusions or {}).items():
        params[name] = dict(fusion)
    return params


def top_two_hits(blackbox: Any, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bool ``(n,)``: are the black box's two top classes the scene's two object classes?

    Example:
        >>> bb = BlackBox(lambda x: torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]]), num_classes=3)
        >>> top_two_hits(bb, torch.zeros(2, 3, 4, 8), torch.tensor([[1, 0], [0, 1]])).tolist()
        [True, False]
    """
    out = blackbox(images)
    if getattr(blackbox, "output", "probs") == "topk":
        top = out.indices[:, :2]
    else:
        top = out.topk(2, dim=1).indices
    top, want = top.sort(dim=1).values.cpu(), labels.sort(dim=1).values.cpu()
    return (top == want).all(dim=1)


def object_size_table(masks: torch.Tensor) -> pd.DataFrame:
    """The objects' size distribution: area as a share of the scene and of its half, and equivalent diameter.

    Args:
        masks: ``(n,2,H,W)`` masks of the scenes' two objects.

    Returns:
        One row per statistic (min, 10 %, 25 %, median, 75 %, 90 %, max, mean) over the ``2n`` objects.

    Example:
        >>> m = torch.zeros(1, 2, 4, 8, dtype=torch.bool); m[0, 0, :2, :2] = True; m[0, 1, :2, 4:8] = True
        >>> object_size_table(m).loc[lambda t: t["statistic"] == "max", "share_of_scene"].item()
        0.25
    """
    if masks.dim() != 4 or masks.shape[0] == 0 or masks.shape[1] != 2:
        raise ValueError(f"masks must be (n,2,H,W) with n >= 1 scenes, got shape {tuple(masks.shape)}")
    share = object_area_fractions(masks).reshape(-1)
    h, w = masks.shape[-2:]
    pixels = share * h * w
    stats = {"min": 0.0, "10 %": 0.1, "25 %": 0.25, "median": 0.5, "75 %": 0.75, "90 %": 0.9, "max": 1.0}
    rows = [{"statistic": k, "share_of_scene": float(np.quantile(share, q)),
             "share_of_half": float(np.quantile(share, q)) * w / h,
             "diameter_px": float(2 * np.sqrt(np.quantile(pixels, q) / np.pi))} for k, q in stats.items()]
    mean = float(share.mean())
    rows.append({"statistic": "mean", "share_of_scene": mean, "share_of_half": mean * w / h,
                 "diameter_px": float(np.mean(2 * np.sqrt(pixels / np.pi)))})
    table = pd.DataFrame(rows)
    table["n_objects"] = share.size
    return table


def scene_table(top_two: torch.Tensor, masks: torch.Tensor) -> pd.DataFrame:
    """The scenes T4 explains, in long form (``quantity, statistic, value, n``): the black box's top-two
    rate (:func:`top_two_hits`) and the objects' sizes (:func:`object_size_table`).

    Example:
        >>> m = torch.zeros(2, 2, 4, 8, dtype=torch.bool); m[:, 0, :2, :2] = True; m[:, 1, :2, 4:6] = True
        >>> t = scene_table(torch.tensor([True, False]), m)
        >>> float(t.loc[0, "value"]), int(t.loc[0, "n"]), t["quantity"].nunique()
        (0.5, 2, 4)
    """
    rows = [{"quantity": "black box's two top classes are the objects' classes", "statistic": "share of scenes",
             "value": float(top_two.float().mean()), "n": int(top_two.numel())}]
    sizes = object_size_table(masks)
    for column, quantity in (("share_of_scene", "object area / scene"), ("share_of_half", "object area / its half"),
                             ("diameter_px", "object diameter (px, a disc of the same area)")):
        rows.extend({"quantity": quantity, "statistic": st, "value": float(v), "n": int(n)}
                    for st, v, n in zip(sizes["statistic"], sizes[column], sizes["n_objects"], strict=True))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- explanation
def _models(blackbox: Any, student: nn.Module | None, teacher: nn.Module | None) -> dict[str, Any]:
    return {"blackbox": blackbox, "student": student, "teacher": teacher}


def _rise_both(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, blackbox: BlackBox,
               params: Mapping[str, Any]) -> MethodRun:
    """RISE for both classes of each scene from one set of masked queries, timed and counted per scene."""
    q0, t0 = blackbox.queries, time.perf_counter()
    sal = rise_classes(blackbox, images[idx], labels[idx], **params)
    seconds, queries = time.perf_counter() - t0, blackbox.queries - q0
    return MethodRun(name="rise", label=METHODS["rise"].label, access=METHODS["rise"].access, indices=idx,
                     saliency=sal, seconds_per_image=seconds / len(idx), queries_per_image=queries / len(idx),
                     params=dict(params))


def _run_twice(name: str, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, idx: torch.Tensor,
               models: Mapping[str, Any], params: Mapping[str, Any]) -> MethodRun:
    """A registry method run once per object class on the same scenes; costs summed per scene."""
    base, label = VARIANTS.get(name, (name, METHODS[name].label if name in METHODS else name))
    settings = {base: dict(params)}
    per_class = [run_methods(images[idx], labels[idx, j], masks[idx, j], methods=[base], method_params=settings,
                             progress=False, **models)[base] for j in (0, 1)]
    sal = torch.stack([r.saliency for r in per_class], dim=1)
    return MethodRun(name=name, label=label, access=per_class[0].access, indices=idx, saliency=sal,
                     seconds_per_image=sum(r.seconds_per_image for r in per_class),
                     queries_per_image=sum(r.queries_per_image for r in per_class), params=dict(params))


def scene_limits(methods: Sequence[str], n: int, n_expensive: int | None) -> dict[str, int]:
    """How many scenes (the first ones) each method explains: ``n``, or ``n_expensive`` for
    :data:`EXPENSIVE_METHODS` (default all).

    >>> scene_limits(["gradcam", "rise"], 10, 4)
    {'gradcam': 10, 'rise': 4}
    """
    costly = n if n_expensive is None else min(n, check_positive_int(n_expensive, "n_expensive"))
    return {m: costly if VARIANTS.get(m, (m,))[0] in EXPENSIVE_METHODS else n for m in methods}


def explain_scenes(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, *, methods: Sequence[str],
                   blackbox: Any = None, student: nn.Module | None = None, teacher: nn.Module | None = None,
                   n_expensive: int | None = None, method_params: Mapping[str, Mapping[str, Any]] | None = None,
                   progress: bool | None = None) -> dict[str, MethodRun]:
    """Explain every scene once per object class with each method.

    Args:
        images: ``(n,3,H,W)`` scenes; labels ``(n,2)`` classes of objects ``a`` and ``b``; masks ``(n,2,H,W)``.
        methods: registry names or :data:`VARIANTS` names.
        blackbox, student, teacher: the models, each handed only to the methods allowed to see it.
        n_expensive: :data:`EXPENSIVE_METHODS` explain only the first ``n_expensive`` scenes (default all).
        method_params: settings per method name (e.g. :func:`scene_method_params`).
        progress: show a progress bar over methods (``None``: only on a TTY).

    Returns:
        name -> :class:`~lwcam.scoring.evaluation.MethodRun` with ``(k,2,H,W)`` saliency and per-scene costs.
    """
    if isinstance(methods, str) or len(methods) == 0:
        raise ValueError(f"methods must be a non-empty sequence of method names, got {methods!r}")
    unknown = [m for m in methods if m not in METHODS and m not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; expected one of {sorted([*METHODS, *VARIANTS])}")
    limits = scene_limits(methods, len(images), n_expensive)
    method_params = method_params or {}
    models = _models(blackbox, student, teacher)
    runs: dict[str, MethodRun] = {}
    for name in track(methods, total=len(methods), desc="explain scenes (both classes)", enabled=progress):
        idx = torch.arange(limits[name])
        params = dict(method_params.get(name, {}))
        if name == "rise" and isinstance(blackbox, BlackBox):
            runs[name] = _rise_both(images, labels, idx, blackbox, params)
        else:
            runs[name] = _run_twice(name, images, labels, masks, idx, models, params)
    return runs


# ----------------------------------------------------------------------------- measures per scene
def _localisation(scorer: Any, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                  sal: torch.Tensor, step: int | None) -> dict[str, np.ndarray]:
    """Per object, ``2k`` values (every scene's object ``a``, then every scene's object ``b``): targeted
    pointing, mass, deletion and sparseness of the map asked for that object, and its scene's class sensitivity."""
    both = torch.cat([sal[:, 0], sal[:, 1]])
    asked = torch.cat([labels[:, 0], labels[:, 1]])
    other = torch.cat([labels[:, 1], labels[:, 0]])
    m_asked, m_other = torch.cat([masks[:, 0], masks[:, 1]]), torch.cat([masks[:, 1], masks[:, 0]])
    auc_asked, auc_other = targeted_deletion(scorer, torch.cat([images, images]), both, asked, other, step=step)
    sens = class_sensitivity(sal[:, 0], sal[:, 1], masks[:, 0], masks[:, 1]).double().numpy()
    values = {
        "targeted_pointing": targeted_pointing(both, m_asked, m_other),
        "targeted_mass": targeted_mass(both, m_asked, m_other),
        "deletion_asked": auc_asked,
        "deletion_other": auc_other,
        "deletion_gap": auc_other - auc_asked,
        "sparseness": sparseness(both),
    }
    out = {name: v.double().numpy() for name, v in values.items()}
    out["class_sensitivity"] = np.concatenate([sens, sens])
    return out


def score_objects(scorer: Any, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                  runs: Mapping[str, MethodRun], *, n_road: int = 0,
                  road_percentages: Sequence[float] = SCORECARD_ROAD_PERCENTAGES, step: int | None = None,
                  seed: int = 0, progress: bool | None = None) -> pd.DataFrame:
    """Localisation, ROAD and complexity of every method's maps, scored on the black box, one row per object.

    Columns ``method``, ``image`` (scene: the run's ``indices`` into ``images``), ``object`` (0: ``a``,
    1: ``b``) and the measures of the map asked for that object; ``class_sensitivity`` is its scene's, on
    both of the scene's rows. ROAD (MoRF and LeRF, :func:`road_values`) is taken on the map of object ``a``
    with ``a`` as the target, on the first ``n_road`` scenes of each method (NaN elsewhere).
    """
    n_road = check_positive_int(n_road, "n_road", minimum=0)
    frames = []
    for name, run in track(runs.items(), total=len(runs), desc="score scenes", enabled=progress):
        idx = run.indices
        df = pd.DataFrame(_localisation(scorer, images[idx], labels[idx], masks[idx], run.saliency, step))
        df.insert(0, "object", np.repeat([0, 1], len(idx)))
        df.insert(0, "image", np.tile(idx.numpy(), 2))
        df.insert(0, "method", name)
        df["road_morf"] = df["road_lerf"] = np.nan
        if min(n_road, len(idx)):
            values = road_values(scorer, images, labels, run, n_road, road_percentages=road_percentages, seed=seed)
            df.loc[: len(values) - 1, ["road_morf", "road_lerf"]] = values[["road_morf", "road_lerf"]].to_numpy()
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def road_values(scorer: Any, images: torch.Tensor, labels: torch.Tensor, run: MethodRun, n_road: int, *,
                road_percentages: Sequence[float] = SCORECARD_ROAD_PERCENTAGES, seed: int = 0) -> pd.DataFrame:
    """ROAD MoRF and LeRF (:func:`~lwcam.scoring.faithfulness.road_score`) of ``run``'s map of object ``a``, with
    ``a`` as the target, on its first ``n_road`` scenes: columns ``image``, ``road_morf``, ``road_lerf``.

    The imputation noise comes from ``seed`` afresh on every call, so one method's values do not depend on
    which other methods were scored before it.
    """
    idx = run.indices[: check_positive_int(n_road, "n_road", minimum=0)]
    out: dict[str, Any] = {"image": idx.numpy()}
    for order in ("morf", "lerf"):
        curve = road(scorer, images[idx], run.saliency[: len(idx), 0], labels[idx, 0], percentages=road_percentages,
                     order=order, seed=seed)
        out[f"road_{order}"] = road_score(curve).double().numpy()
    return pd.DataFrame(out)


def scene_means(per_object: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, scene): each measure's mean over the scene's objects where it was taken.

    Example:
        >>> po = pd.DataFrame({"method": ["m"] * 2, "image": [0, 0], "object": [0, 1], "targeted_mass": [0.5, 1.0],
        ...                    "road_morf": [0.2, float("nan")]})
        >>> scene_means(po).to_dict("records")
        [{'method': 'm', 'image': 0, 'targeted_mass': 0.75, 'road_morf': 0.2}]
    """
    measures = [c for c in per_object.columns if c not in ("method", "image", "object")]
    return per_object.groupby(["method", "image"], sort=False)[measures].mean().reset_index()


def score_scenes(scorer: Any, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                 runs: Mapping[str, MethodRun], *, n_road: int = 0,
                 road_percentages: Sequence[float] = SCORECARD_ROAD_PERCENTAGES, step: int | None = None,
                 seed: int = 0, progress: bool | None = None) -> pd.DataFrame:
    """:func:`score_objects`, one row per scene (:func:`scene_means`): the mean of the scene's two maps."""
    return scene_means(score_objects(scorer, images, labels, masks, runs, n_road=n_road,
                                     road_percentages=road_percentages, step=step, seed=seed, progress=progress))


# ----------------------------------------------------------------------------- randomisation
def _leaf_resettable(model: nn.Module) -> list[str]:
    """Names of the modules with ``reset_parameters()`` and no such child, in registration order."""
    def resettable(m: nn.Module) -> bool:
        return callable(getattr(m, "reset_parameters", None))

    return [n for n, m in model.named_modules() if resettable(m) and not any(resettable(c) for c in m.children())]


def cascade_groups(model: nn.Module, steps: int) -> list[list[str]]:
    """The cascade's layer groups, top first: the top layer alone, then the rest in ``steps − 1`` equal runs.

    Every layer with parameters to re-initialise is in exactly one group, so after the last step the
    whole model is randomised.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.Flatten(),
        ...                     nn.Linear(4, 2))
        >>> cascade_groups(net, 3)
        [['4'], ['2', '1'], ['0']]
    """
    check_positive_int(steps, "steps")
    names = _leaf_resettable(model)[::-1]
    if not names:
        raise ValueError("model has no layer with a reset_parameters() method to randomise")
    rest = [list(part) for part in np.array_split(np.array(names[1:], dtype=object), max(0, steps - 1)) if len(part)]
    return [[names[0]], *rest] if steps > 1 else [names]


class _Group(nn.Module):
    """A cascade step: resets its member modules (held in a plain list, so they stay registered where they are).

    Its forward pass is the identity, so a model that runs all its children in order (an
    ``nn.Sequential``) computes the same function with the group registered in it.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = members

    def reset_parameters(self) -> None:
        for m in self.members:
            m.reset_parameters()  # type: ignore[operator]

    def forward(self, x: Any) -> Any:
        return x


def _grouped_factory(model: nn.Module, groups: list[list[str]]) -> tuple[Callable[[], nn.Module], list[str]]:
    """A factory of fresh copies of ``model`` holding one resettable :class:`_Group` per cascade step, and their names.

    The groups are registered after every other module and bottom first, so that
    :func:`~lwcam.scoring.randomisation.model_randomisation` (which walks the modules from the last registered)
    resets the top group first; the model keeps its own structure, layer names and function.
    """
    names = [f"randomisation_step_{i + 1}" for i in range(len(groups))]

    def build() -> nn.Module:
        work = copy.deepcopy(model)
        found = dict(work.named_modules())
        for i in reversed(range(len(groups))):
            work.add_module(names[i], _Group([found[n] for n in groups[i]]))
        return work

    return build, names


def _explainer(name: str, params: Mapping[str, Any], masks: torch.Tensor | None,
               models: Mapping[str, Any]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(images, targets) -> maps`` for a method with fixed models and settings."""
    base = VARIANTS.get(name, (name,))[0]

    def explain(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return METHODS[base](images, targets, masks=masks, **models, **params).saliency

    return explain


def _randomised_model(name: str, student: nn.Module | None, teacher: nn.Module | None) -> tuple[nn.Module, str]:
    """The model a method's randomisation check randomises, and the registry argument it is handed as."""
    access = METHODS[VARIANTS.get(name, (name,))[0]].access
    if access == "black-box":
        return _need(teacher, name), "blackbox"
    if access == "white-box teacher (oracle)":
        return _need(teacher, name), "teacher"
    return _need(student, name), "student"  # the student for student-side methods; ignored by model-free ones


def _need(model: nn.Module | None, name: str) -> nn.Module:
    if model is None:
        raise ValueError(f"the randomisation check of {name} needs the model it explains (student= or teacher=)")
    return model


def randomisation_check(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, *, methods: Sequence[str],
                        student: nn.Module | None, teacher: nn.Module | None, num_classes: int,
                        wrap: Callable[[nn.Module], Any] | None = None, steps: int = 3,
                        method_params: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0,
                        progress: bool | None = None) -> pd.DataFrame:
    """Cascading parameter randomisation of each method's model, top first, on the map of object ``a``.

    Student-side methods get a randomised student, black-box methods a randomised black box (the
    teacher wrapped by ``wrap``, default a plain :class:`~lwcam.BlackBox`), the teacher's Grad-CAM a
    randomised teacher; methods that read no model (random, centre, mask) are run on the randomised
    student and keep their map. The layers are randomised in the groups of :func:`cascade_groups`.

    Returns:
        One row per (method, step, scene): ``method, step, layer, image, rank_correlation``.
    """
    wrap = wrap or (lambda m: BlackBox(m, num_classes=num_classes))
    method_params = method_params or {}
    frames = []
    for name in track(methods, total=len(methods), desc="randomisation", enabled=progress):
        model, arg = _randomised_model(name, student, teacher)
        params = dict(method_params.get(name, {}))
        factory, names = _grouped_factory(model, cascade_groups(model, steps))

        def explain_fn(m: nn.Module, x: torch.Tensor, t: torch.Tensor, _name: str = name, _arg: str = arg,
                       _params: dict[str, Any] = params) -> torch.Tensor:
            given = {"blackbox": None, "student": student, "teacher": teacher,
                     _arg: wrap(m) if _arg == "blackbox" else m}
            return _explainer(_name, _params, masks[:, 0], given)(x, t)

        df = model_randomisation(factory, explain_fn, images, labels[:, 0], layers=names, seed=seed)
        df.insert(0, "method", name)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- robustness
def _second_run(name: str, params: Mapping[str, Any], models: Mapping[str, Any],
                second_student: nn.Module | None, second_seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The models and settings of the second run: another student, or another seed, or the same call."""
    base = VARIANTS.get(name, (name,))[0]
    if METHODS[base].access == "white-box student":
        return {**models, "student": _need(second_student, name)}, dict(params)
    if "seed" in inspect.signature(METHODS[base].fn).parameters:
        return dict(models), {**params, "seed": second_seed}
    return dict(models), dict(params)


def robustness(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, runs: Mapping[str, MethodRun], *,
               blackbox: Any, student: nn.Module | None, teacher: nn.Module | None,
               second_student: nn.Module | None, n_samples: int = 3, radius: float = NOISE_RADIUS,
               second_seed: int = 1, seed: int = 0, progress: bool | None = None) -> pd.DataFrame:
    """Max-sensitivity and the two-run rank correlation of each method's map of object ``a``.

    ``images`` are the scenes measured (the first scenes of every run); each run's own map of
    object ``a`` on them is the reference.

    Returns:
        One row per (method, scene): ``method, image, max_sensitivity, two_run_correlation``.
    """
    models = _models(blackbox, student, teacher)
    k, frames = len(images), []
    for name, run in track(runs.items(), total=len(runs), desc="robustness", enabled=progress):
        if len(run.indices) < k or not torch.equal(run.indices[:k], torch.arange(k)):
            raise ValueError(f"{name} did not explain the first {k} scenes that robustness() measures")
        ref = run.saliency[:k, 0]
        explain = _explainer(name, run.params, masks[:, 0], models)
        ms = max_sensitivity(explain, images, labels[:, 0], radius=radius, n_samples=n_samples, seed=seed,
                             saliency=ref, on_zero="nan")
        models2, params2 = _second_run(name, run.params, models, second_student, second_seed)
        again = _explainer(name, params2, masks[:, 0], models2)(images, labels[:, 0])
        frames.append(pd.DataFrame({"method": name, "image": np.arange(k), "max_sensitivity": ms.numpy(),
                                    "two_run_correlation": map_rank_correlation(ref, again).numpy()}))
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- the runner
def run_scorecard(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, *, methods: Sequence[str],
                  blackbox: Any, student: nn.Module, teacher: nn.Module | None = None,
                  second_student: nn.Module | None = None, scorer: Any = None, n_expensive: int | None = None,
                  n_road: int = 5, n_randomisation: int = 2, randomisation_steps: int = 3, n_robustness: int = 2,
                  robustness_samples: int = 3, second_seed: int = 1,
                  method_params: Mapping[str, Mapping[str, Any]] | None = None,
                  wrap: Callable[[nn.Module], Any] | None = None,
                  road_percentages: Sequence[float] = SCORECARD_ROAD_PERCENTAGES, step: int | None = None,
                  seed: int = 0, progress: bool | None = None) -> ScorecardResult:
    """T4's measurements: explain every scene per class with every method, then every measure per scene.

    Args:
        images, labels, masks: the conflict scenes ``(n,3,H,W)``, ``(n,2)``, ``(n,2,H,W)``.
        methods: names from :data:`SCORECARD_METHODS` (registry names or :data:`VARIANTS`).
        blackbox: the black box the black-box methods query; ``scorer`` (default ``blackbox``) the one
            the measures score on (probabilities).
        student, teacher: the white-box models; ``second_student`` the student distilled with another seed.
        n_expensive: scenes explained by :data:`EXPENSIVE_METHODS` (the first ones; default all).
        n_road, n_randomisation, n_robustness: the first scenes on which ROAD, randomisation and the
            robustness measures are taken (at most those every method explained); 0 skips the measure.
        randomisation_steps: cascade steps (:func:`cascade_groups`).
        robustness_samples: noise samples of max-sensitivity.
        second_seed: the seed of the second run of seeded methods.
        method_params: settings per method (:func:`scene_method_params`).
        wrap: turns a randomised teacher into the black box black-box methods query.
        road_percentages, step: ROAD's percentages and the deletion game's step (default the width).
        seed: seed of ROAD's noise, the noise samples and the re-initialisations.
        progress: show progress bars (``None``: only on a TTY).
    """
    for name, value in (("n_road", n_road), ("n_randomisation", n_randomisation), ("n_robustness", n_robustness)):
        check_positive_int(value, name, minimum=0)  # before any explanation is paid for (0 skips the measure)
    scorer = blackbox if scorer is None else scorer
    method_params = method_params or {}
    runs = explain_scenes(images, labels, masks, methods=methods, blackbox=blackbox, student=student, teacher=teacher,
                          n_expensive=n_expensive, method_params=method_params, progress=progress)
    per_object = score_objects(scorer, images, labels, masks, runs, step=step, progress=progress)
    first = first_scene_measures(
        images, labels, masks, runs, scorer=scorer, blackbox=blackbox, student=student, teacher=teacher,
        second_student=second_student, n_road=n_road, n_randomisation=n_randomisation,
        randomisation_steps=randomisation_steps, n_robustness=n_robustness, robustness_samples=robustness_samples,
        second_seed=second_seed, method_params=method_params, wrap=wrap, road_percentages=road_percentages, seed=seed,
        progress=progress)
    return finish_scorecard(per_object, runs, first)


@dataclass
class FirstSceneMeasures:
    """The measures taken on the first scenes only (:func:`first_scene_measures`); ``None`` or empty: not taken.

    Attributes:
        road: method -> its ROAD values (:func:`road_values`).
        randomisation: the rows of :func:`randomisation_check`.
        robust: the rows of :func:`robustness`.
    """

    road: dict[str, pd.DataFrame] = field(default_factory=dict)
    randomisation: pd.DataFrame | None = None
    robust: pd.DataFrame | None = None


def first_scene_measures(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                         runs: Mapping[str, MethodRun], *, scorer: Any, blackbox: Any, student: nn.Module | None,
                         teacher: nn.Module | None, second_student: nn.Module | None, n_road: int,
                         n_randomisation: int, randomisation_steps: int, n_robustness: int, robustness_samples: int,
                         second_seed: int, method_params: Mapping[str, Mapping[str, Any]],
                         wrap: Callable[[nn.Module], Any] | None,
                         road_percentages: Sequence[float] = SCORECARD_ROAD_PERCENTAGES, seed: int = 0,
                         progress: bool | None = None) -> FirstSceneMeasures:
    """ROAD, the randomisation check and the robustness measures of ``runs``' maps of object ``a`` on the first
    ``n_road``, ``n_randomisation`` and ``n_robustness`` scenes (at most those every run explained; 0 skips).

    Every method's values are drawn from ``seed`` afresh, so they do not depend on the other methods in ``runs``.
    """
    if not runs:
        return FirstSceneMeasures()
    common = min(len(r.indices) for r in runs.values())
    r_road, r, k = min(n_road, common), min(n_randomisation, common), min(n_robustness, common)
    out = FirstSceneMeasures()
    if r_road:
        out.road = {name: road_values(scorer, images, labels, run, r_road, road_percentages=road_percentages,
                                      seed=seed) for name, run in runs.items()}
    if r:
        out.randomisation = randomisation_check(
            images[:r], labels[:r], masks[:r], methods=list(runs), student=student, teacher=teacher, wrap=wrap,
            steps=randomisation_steps, method_params=method_params, seed=seed, progress=progress,
            num_classes=int(getattr(blackbox, "num_classes", labels.max().item() + 1)))
    if k:
        out.robust = robustness(images[:k], labels[:k], masks[:k], runs, blackbox=blackbox, student=student,
                                teacher=teacher, second_student=second_student, n_samples=robustness_samples,
                                second_seed=second_seed, seed=seed, progress=progress)
    return out


def finish_scorecard(per_object: pd.DataFrame, runs: dict[str, MethodRun],
                     first: FirstSceneMeasures) -> ScorecardResult:
    """The :class:`ScorecardResult` of per-object rows (:func:`score_objects`), the runs and the first-scene
    measures: each method's ROAD values on its object ``a`` rows; its value after the last cascade step as
    its ``randomisation``; the randomisation and robustness values on the scene's row and its object ``a``'s.
    """
    for name, values in first.road.items():
        at = (per_object["method"] == name) & (per_object["object"] == 0) & per_object["image"].isin(values["image"])
        per_object.loc[at, ["road_morf", "road_lerf"]] = values[["road_morf", "road_lerf"]].to_numpy()
    per_scene = scene_means(per_object)
    rand = pd.DataFrame(columns=["method", "step", "layer", "image", "rank_correlation"])
    final = pd.DataFrame({"method": pd.Series(dtype=str), "image": pd.Series(dtype=int),
                          "randomisation": pd.Series(dtype=float)})
    if first.randomisation is not None:
        rand = first.randomisation
        final = rand[rand["step"] == rand.groupby("method")["step"].transform("max")]
        final = final.rename(columns={"rank_correlation": "randomisation"})[["method", "image", "randomisation"]]
    robust = first.robust
    if robust is None:
        robust = pd.DataFrame({"method": pd.Series(dtype=str), "image": pd.Series(dtype=int),
                               "max_sensitivity": pd.Series(dtype=float),
                               "two_run_correlation": pd.Series(dtype=float)})
    per_scene = per_scene.merge(final, on=["method", "image"], how="left").merge(robust, on=["method", "image"],
                                                                                  how="left")
    on_a = final.merge(robust, on=["method", "image"], how="outer").assign(object=0)
    per_object = per_object.merge(on_a, on=["method", "image", "object"], how="left")
    return ScorecardResult(per_scene=per_scene[["method", "image", *MEASURES]], runs=runs, randomisation=rand,
                           per_object=per_object[["method", "image", "object", *MEASURES]])


# ----------------------------------------------------------------------------- tables
def scorecard_table(result: ScorecardResult, *, n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """T4: per method each measure's mean with its 95% bootstrap CI, the scenes, seconds and queries per scene."""
    t4 = summarize(result.per_scene, result.runs, n_boot=n_boot, seed=seed, metrics=list(MEASURES))
    t4 = t4.rename(columns={"n_images": "n_scenes", "seconds_per_image": "seconds_per_scene",
                            "queries_per_image": "queries_per_scene"})
    sub = result.per_scene
    for i, (col, measure) in enumerate((("n_road", "road_morf"), ("n_randomisation", "randomisation"),
                                        ("n_robustness", "max_sensitivity"))):
        t4.insert(4 + i, col, [int(sub.loc[sub["method"] == m, measure].notna().sum()) for m in t4["method"]])
    return t4


#: The claims of T4: (a, b); each is tested on every measure in its better direction.
CLAIM_PAIRS = (("lwcam", "gradcam"), ("lwcam_selected", "gradcam"), ("lwcam_selected", "rise"),
               ("lwcam_selected", "lime"), ("lwcam_conflict", "gradcam"), ("lwcam_conflict", "rise"),
               ("lwcam_conflict", "lime"), ("lwcam_gated", "gradcam"), ("lwcam_gated", "rise"))


def scorecard_claims(per_scene: pd.DataFrame, *, pairs: Sequence[tuple[str, str]] = CLAIM_PAIRS,
                     seed: int = 0) -> pd.DataFrame:
    """One-sided paired tests (Wilcoxon signed-rank, paired bootstrap CI) of ``a`` better than ``b`` on each measure.

    Only pairs whose methods are both present are tested, each on the scenes both were measured on.
    """
    present = set(per_scene["method"])
    rows = []
    for a, b in pairs:
        if a not in present or b not in present:
            continue
        for name, measure in MEASURES.items():
            alternative = "greater" if measure.higher_is_better else "less"
            rows.append({**compare(per_scene.dropna(subset=[name]), a, b, name, alternative, seed),
                         "family": measure.family})
    cols = ["a", "b", "metric", "family", "n", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "p_value",
            "alternative"]
    return pd.DataFrame(rows)[cols]


def _pair_p(per_scene: pd.DataFrame, a: str, b: str, measure: str) -> float:
    """Two-sided paired Wilcoxon p-value of ``a`` against ``b`` on the scenes both were measured on (NaN: none)."""
    sub = per_scene.dropna(subset=[measure])
    pa = sub[sub["method"] == a].set_index("image")[measure]
    pb = sub[sub["method"] == b].set_index("image")[measure]
    common = pa.index.intersection(pb.index)
    if len(common) == 0:
        return float("nan")
    return paired_test(pa.loc[common].to_numpy(), pb.loc[common].to_numpy(), n_boot=100).p_value


def separation_table(per_scene: pd.DataFrame, t4: pd.DataFrame, *, alpha: float = 0.01) -> pd.DataFrame:
    """Does the benchmark separate? Per measure: the method pairs that differ at ``p < alpha``, and the sanity goals.

    Columns: ``measure``, ``n_pairs``, ``pairs_differing`` (two-sided paired Wilcoxon, ``p < alpha``),
    ``separates`` (at least three pairs), then ``oracle_leads`` (targeted pointing and mass: the mask's
    mean at or above every other method's) and ``blind_fail`` (class sensitivity: random's and the centre
    bias's ρ ≥ 0.9, i.e. class-blind), each empty where it does not apply.
    """
    check_real(alpha, "alpha", 0.0, 1.0, low_open=True, high_open=True)
    methods = list(t4["method"])
    means = t4.set_index("method")
    rows = []
    for name in MEASURES:
        pairs = list(itertools.combinations(methods, 2))
        ps = [_pair_p(per_scene, a, b, name) for a, b in pairs]
        row: dict[str, Any] = {"measure": name, "n_pairs": len(pairs),
                               "pairs_differing": int(sum(p < alpha for p in ps if np.isfinite(p)))}
        row["separates"] = row["pairs_differing"] >= 3
        row["oracle_leads"] = (bool((means.loc["mask", name] >= means[name].drop("mask")).all())
                               if name in ("targeted_pointing", "targeted_mass") and "mask" in means.index else "")
        blind = [m for m in ("random", "center") if m in means.index]
        row["blind_fail"] = (bool((means.loc[blind, name] >= 0.9).all())
                             if name == "class_sensitivity" and blind else "")
        rows.append(row)
    return pd.DataFrame(rows)


def rank_table(t4: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """F8's data: each method's rank per measure (1 = best, ties share the lowest rank) and the values ranked.

    Rows are the methods' labels, columns the measures' labels.

    Example:
        >>> t4 = pd.DataFrame({"label": ["a", "b"], **{m: [0.1, 0.2] for m in MEASURES}})
        >>> ranks, values = rank_table(t4)
        >>> ranks["targeted mass"].tolist(), ranks["class sensitivity ρ"].tolist()
        ([2.0, 1.0], [1.0, 2.0])
    """
    values = t4.set_index("label")[list(MEASURES)]
    ranks = pd.DataFrame({name: values[name].rank(ascending=not m.higher_is_better, method="min")
                          for name, m in MEASURES.items()})
    labels = {name: m.label for name, m in MEASURES.items()}
    return ranks.rename(columns=labels), values.rename(columns=labels)


# ----------------------------------------------------------------------------- fusion on val
def _spec(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A fusion setting's :func:`~lwcam.cam.batched.explain_lwcam` arguments from its row of the selection table."""
    spec: dict[str, Any] = {"weighting": row["weighting"], "mode": row["mode"], "normalize": row["normalize"]}
    weights = row.get("weights")
    if isinstance(weights, str) and weights.strip():
        spec["weights"] = [float(w) for w in weights.split()]
    gate = row.get("gate_weighting")
    if isinstance(gate, str) and gate:
        spec["gate_weighting"] = gate
    for option in ("eps", "alpha"):
        value = row.get(option)  # NaN, or "" in a table read back with keep_default_na=False: unused
        if value not in (None, "") and np.isfinite(float(value)):
            spec[option] = float(value)
    return spec


def select_fusion_conflict(student: nn.Module, selection: pd.DataFrame, val_images: torch.Tensor,
                           val_labels: torch.Tensor, val_masks: torch.Tensor, *,
                           tolerance: float = CONFLICT_TOLERANCE, progress: bool | None = None
                           ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The conflict-aware fusion criterion, on ``val`` conflict scenes only.

    Declared criterion: among the settings of the fusion grid whose ``val`` deletion AUC (the table of
    :func:`lwcam.study.analysis.select_fusion`) is within ``tolerance`` of the best, the one with the highest
    mean targeted mass on the ``val`` scenes (both classes); ties go to the lower deletion AUC.

    Args:
        student: the distilled student.
        selection: :func:`~lwcam.study.analysis.select_fusion`'s table (``fusion``, ``weighting``, ``normalize``,
            ``mode``, ``weights``, ``val_deletion_auc``, ``selected_on_val``).
        val_images, val_labels, val_masks: ``val`` conflict scenes. Nothing else is read.
        tolerance: the deletion AUC tolerance.

    Returns:
        ``(table, chosen)``: the selection table with ``val_targeted_mass``, ``val_class_sensitivity``,
        ``within_tolerance`` and ``selected_conflict_aware`` columns, and the chosen setting's arguments.
    """
    check_real(tolerance, "tolerance", 0.0)  # a negative or NaN tolerance leaves no setting to choose
    k = len(val_images)
    x2 = torch.cat([val_images, val_images])
    t2 = torch.cat([val_labels[:, 0], val_labels[:, 1]])
    size = (int(x2.shape[-2]), int(x2.shape[-1]))
    _, raws = raw_layer_maps(student, x2, t2, tuple(GATED_WEIGHTINGS), progress=progress)
    stacks = {w: upsample_layers(raws[w], size) for w in WEIGHTING_LABELS}  # one pass for sums and gates
    m_asked = torch.cat([val_masks[:, 0], val_masks[:, 1]])
    m_other = torch.cat([val_masks[:, 1], val_masks[:, 0]])
    mass, sens = [], []
    for row in selection.to_dict("records"):
        sal = fused_maps(stacks, raws, _spec(row), size)
        mass.append(float(targeted_mass(sal, m_asked, m_other).mean()))
        sens.append(float(class_sensitivity(sal[:k], sal[k:], val_masks[:, 0], val_masks[:, 1]).mean()))
    table = selection.copy()
    table["val_targeted_mass"], table["val_class_sensitivity"] = mass, sens
    table["n_val_scenes"] = k
    table["within_tolerance"] = table["val_deletion_auc"] <= table["val_deletion_auc"].min() + tolerance
    ranked = table[table["within_tolerance"]].sort_values(["val_targeted_mass", "val_deletion_auc"],
                                                          ascending=[False, True])
    table["selected_conflict_aware"] = table.index == ranked.index[0]
    return table, _spec(table.loc[ranked.index[0]])

