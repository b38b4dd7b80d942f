"""The reproducible pipeline: profiles, run folders, cached artefacts, and the papermill driver.

A *profile* is a YAML file under ``params/`` (``quick``, ``default``, ``imagenet``, ...), read into
a validated :class:`~lwcam.study.profiles.Profile`; its keys are the notebooks' papermill parameters.
Artefacts that take time to make (rendered data, the black-box teacher, the distilled student,
black-box answers) live in the run folder ``runs/<profile>/`` and are reused when present, so
every notebook can run alone.
Figures go to ``figures/`` and tables to ``reports/`` for the ``default`` profile, and to
``figures/<profile>/`` and ``reports/<profile>/`` for any other.

The command line (``python -m lwcam.study run|evaluate``) is :mod:`lwcam.study.cli`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch

from .._utils import atomic_write_bytes
from ..blackbox import BlackBox, Output
from ..data import DEFAULT_OBJECT_RADIUS, ConflictScenes, SyntheticTextures, get_dataset, load_tensors
from ..distillation import DistillResult, distill
from ..fast import FastForward, accelerate
from ..models import build_model, load_checkpoint, predict_logits, save_checkpoint, train_teacher
from ._shards import check_nproc, launch
from .plots import save_figure as _save_png
from .profiles import Profile, as_profile, project_root
from .profiles import load_profile as _load_profile

__all__ = [
    "NOTEBOOKS",
    "machine_name",
    "cpu_model",
    "Profile",
    "project_root",
    "load_profile",
    "RunPaths",
    "load_split",
    "get_teacher",
    "make_blackbox",
    "make_scene_blackbox",
    "load_conflict",
    "fusion_selection",
    "T3_METHODS",
    "T3_CHUNK",
    "t3_method_params",
    "t3_limits",
    "explain_t3",
    "accelerated",
    "get_student",
    "save_scorecard_rows",
    "load_scorecard_rows",
    "last_map_cell_px",
    "blackbox_accuracy_by_size",
    "resolution_units",
    "ablation_scorecard",
    "student_fingerprint",
    "blackbox_version",
    "load_snapshots",
    "stage",
    "record_stage",
    "timings_table",
    "blackbox_labels",
    "pick_indices",
    "student_agreement",
    "short_label",
    "save_table",
    "save_figure",
    "show_figure",
    "run",
]

NOTEBOOKS = ("01_distill", "02_explain", "03_layer_importance", "04_deletion_game", "05_scorecard", "06_resolution")


def load_profile(name: str | Mapping[str, Any], root: str | os.PathLike | None = None) -> Profile:
    """Read and validate ``params/<name>.yaml`` (see :func:`lwcam.study.profiles.load_profile`).

    A notebook's ``parameters`` cell holds one line, ``profile = "quick"``, and its next cell calls this.
    ``name`` may also be a mapping of profile keys, as :func:`run` injects for a profile that differs from
    its file: the file its ``profile`` key names, with the other keys set (validated like the file).

    >>> load_profile({"profile": "quick", "seed": 3}).seed, load_profile("quick").seed
    (3, 0)
    """
    if isinstance(name, str):
        return _load_profile(name, root)
    values = dict(name)
    if not isinstance(values.get("profile"), str):
        raise ValueError(f"profile: a mapping of profile keys must name its profile file, got {dict(name)!r}")
    return _load_profile(values.pop("profile"), root).replace(**values)


@dataclass
class RunPaths:
    """Where a profile's artefacts, figures and tables go (all relative to the project root)."""

    profile: str
    root: Path

    @classmethod
    def for_profile(cls, profile: str, root: str | os.PathLike | None = None) -> RunPaths:
        paths = cls(profile=profile, root=project_root(root))
        for folder in (paths.run, paths.figures, paths.reports):
            folder.mkdir(parents=True, exist_ok=True)
        return paths

    @property
    def run(self) -> Path:
        return self.root / "runs" / self.profile

    @property
    def figures(self) -> Path:
        return self.root / "figures" if self.profile == "default" else self.root / "figures" / self.profile

    @property
    def reports(self) -> Path:
        return self.root / "reports" if self.profile == "default" else self.root / "reports" / self.profile

    @property
    def data_cache(self) -> Path:
        return self.root / "runs" / "data-cache"

    @property
    def teacher(self) -> Path:
        return self.run / "teacher.pt"

    @property
    def student(self) -> Path:
        return self.run / "student.pt"

    @property
    def answers(self) -> Path:
        return self.run / "blackbox-cache"

    @property
    def stage_log(self) -> Path:
        return self.run / "stage_timings.jsonl"

    def snapshots(self, output: str = "probs") -> Path:
        """Folder of the per-epoch students of a distillation (F7)."""
        return self.run / f"student_{output}_epochs"

    def rel(self, path: str | os.PathLike) -> str:
        """``path`` relative to the project root, for printing without absolute paths."""
        try:
            return str(Path(path).resolve().relative_to(self.root))
        except ValueError:
            return str(path)


def load_split(params: Mapping[str, Any], split: str, paths: RunPaths | None = None,
               n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load a split of the profile's data set as tensors ``(images, labels, masks)``.

    ``n`` overrides the profile's ``n_<split>``; ``None`` there means the whole split.
    """
    p = as_profile(params)
    limit = n if n is not None else p.split_size(split)
    if p.dataset == "synthetic":
        ds = SyntheticTextures(split=split, n=limit, image_size=p.image_size, num_classes=p.num_classes,
                               seed=p.data_seed, cache_dir=paths.data_cache if paths is not None else None,
                               object_radius=object_radius(p))
        with stage(f"data: {split} split ({len(ds)} images, rendered or read from the cache)", paths):
            return ds.tensors()
    real_split = {"transfer": "train"}.get(split, split)
    real = get_dataset(p.dataset, root=p.data_root, split=real_split, image_size=p.image_size)
    g = torch.Generator().manual_seed(p.seed)
    order = torch.randperm(len(cast(Sized, real)), generator=g).tolist()
    return load_tensors(real, order[:limit] if limit else order)


def object_radius(params: Mapping[str, Any]) -> tuple[float, float]:
    """The synthetic class object's radius range of a profile (``object_radius``; null: the renderer's default)."""
    r = as_profile(params).object_radius
    return DEFAULT_OBJECT_RADIUS if r is None else (float(r[0]), float(r[1]))


#: Profile keys that determine the teacher, and (with those) the students; a cached artefact is
#: reused only when these match.
TEACHER_KEYS = ("dataset", "image_size", "num_classes", "seed", "data_seed", "object_radius", "n_train", "n_val",
                "teacher",
                "teacher_weights", "teacher_epochs", "teacher_batch_size", "teacher_lr", "teacher_pixel_dropout",
                "train_channels_last")
STUDENT_KEYS = ("n_transfer", "n_test", "student", "temperature", "distill_epochs", "distill_batch_size", "distill_lr",
                "query_budget", "holdout", "topk", "label_smoothing")


def blackbox_version(blackbox: Any) -> str | None:
    """The model version a remote black box's server reports in its metadata (``None`` for a local one).

    >>> blackbox_version(object()) is None
    True
    """
    metadata = getattr(getattr(blackbox, "fn", None), "metadata", None)
    version = getattr(metadata, "version", None)
    return None if version is None else str(version)


def student_fingerprint(params: Mapping[str, Any], model_version: str | None = None) -> str:
    """The key a distilled student (and its per-epoch students) is cached under.

    It holds the profile keys that determine the teacher and the distillation and, for a black box
    behind an inference server, ``black_box_url`` and the model version the server reports
    (``model_version``, see :func:`blackbox_version`): a student distilled from one black box is
    never reused for another. For the teacher in process the key is the profile keys alone.

    >>> from lwcam.study.profiles import Profile
    >>> a = Profile.from_dict({"black_box_url": "http://127.0.0.1:8080/v2/models/a"}, source="example")
    >>> b = a.replace(black_box_url="http://127.0.0.1:8080/v2/models/b")
    >>> fp = student_fingerprint
    >>> fp(a, "1") == fp(b, "1"), fp(a, "1") == fp(a, "2"), fp(a, "1") == fp(a, "1")
    (False, False, True)
    """
    p = as_profile(params)
    key = p.fingerprint(TEACHER_KEYS + STUDENT_KEYS)
    if p.black_box_url is None:
        if model_version is not None:
            raise ValueError(f"model_version: {model_version!r} given for a profile without black_box_url")
        return key
    values = {**json.loads(key), "black_box_url": p.black_box_url, "black_box_version": model_version}
    return json.dumps(values, sort_keys=True, default=str)


def get_teacher(params: Mapping[str, Any], paths: RunPaths,
                progress: bool | None = None) -> tuple[torch.nn.Module, dict]:
    """Load the profile's black-box teacher, training it first if its checkpoint is missing.

    For the paper's data sets set ``teacher_weights`` to a torchvision weights enum name or a
    local file; the synthetic default trains ``teacher`` from scratch on the ``train`` split.
    """
    p = as_profile(params)
    if p.teacher_weights:
        model = build_model(p.teacher, p.num_classes, weights=p.teacher_weights)
        return model.eval(), {"arch": p.teacher, "weights": p.teacher_weights, "seconds": 0.0}
    fingerprint = p.fingerprint(TEACHER_KEYS)
    if paths.teacher.exists():
        model, meta = load_checkpoint(paths.teacher)
        if meta.get("fingerprint") == fingerprint:
            return model, meta
    x, y, _ = load_split(p, "train", paths)
    xv, yv, _ = load_split(p, "val", paths)
    with stage(f"teacher training ({p.teacher})", paths):
        result = train_teacher(
            p.teacher, x, y, num_classes=p.num_classes, val_images=xv, val_labels=yv,
            epochs=p.teacher_epochs, batch_size=p.teacher_batch_size, lr=p.teacher_lr, seed=p.seed,
            checkpoint_path=paths.teacher, progress=progress, meta={"fingerprint": fingerprint},
            pixel_dropout=p.teacher_pixel_dropout, channels_last=p.train_channels_last,
        )
    _, meta = load_checkpoint(paths.teacher)
    meta["history"] = result.history
    return result.model, meta


def make_blackbox(teacher: torch.nn.Module, params: Mapping[str, Any], paths: RunPaths, output: str | None = None,
                  cache: bool = True) -> BlackBox:
    """Wrap the teacher as a :class:`~lwcam.blackbox.BlackBox` with the profile's output mode and cache.

    With the profile's ``fast_forward`` the teacher answers through :func:`accelerated` (the same
    answers within 1e-5 in probability, and the same answer-cache namespace). With the profile's
    ``black_box_url`` every query goes to that inference server instead (``teacher`` is not asked).
    """
    p = as_profile(params)
    mode = output or p.blackbox_output
    if p.black_box_url is not None:
        from ..remote import split_model_url  # here: httpx is imported only when a server is used

        url, name = split_model_url(p.black_box_url)
        return BlackBox.from_endpoint(url, name, p.num_classes, image_size=p.image_size, output=cast(Output, mode),
                                      k=p.topk, max_batch_size=p.blackbox_batch_size,
                                      cache_dir=paths.answers if cache else None)
    return BlackBox(
        accelerated(teacher, p, paths) if p.fast_forward else teacher,
        num_classes=p.num_classes,
        fn_returns="logits",
        output=cast(Output, mode),
        k=p.topk,
        batch_size=p.blackbox_batch_size,
        cache_dir=paths.answers if cache else None,
        cache_namespace=f"{p.teacher}-seed{p.seed}-{mode}",
    )


def accelerated(module: torch.nn.Module, params: Mapping[str, Any], paths: RunPaths | None,
                role: str = "black box", image_shape: tuple[int, int, int] | None = None) -> FastForward:
    """``module`` on the fastest engine of :func:`lwcam.fast.accelerate` for images of ``image_shape`` (default
    the profile's ``(3, image_size, image_size)``), set up once per module, weights and shape in a process; the
    set-up's wall time goes to the run's stage log as ``fast forward set-up: <role> (<engine>)``."""
    p = as_profile(params)
    fast = accelerate(module, image_shape or (3, p.image_size, p.image_size), reuse=True)
    if not fast.reused and paths is not None:
        record_stage(f"fast forward set-up: {role} ({fast.engine})", fast.setup_seconds, paths)
    return fast


def make_scene_blackbox(teacher: torch.nn.Module, params: Mapping[str, Any], paths: RunPaths | None,
                        image_shape: tuple[int, int, int], output: str | None = None) -> BlackBox:
    """:func:`make_blackbox` (no answer cache) for images of ``image_shape``, e.g. the 64×128 conflict scenes.

    With ``fast_forward`` the engine is set up for that shape (its set-up time is logged when ``paths``
    is given).
    """
    p = as_profile(params)
    if p.black_box_url is not None:
        return make_blackbox(teacher, p, cast(RunPaths, paths), output=output, cache=False)
    fn: Any = teacher
    if p.fast_forward:
        fn = accelerated(teacher, p, paths, role=f"black box at {image_shape[1]}x{image_shape[2]}",
                         image_shape=image_shape)
    mode = cast(Output, output or p.blackbox_output)
    return BlackBox(fn, num_classes=p.num_classes, fn_returns="logits", output=mode, k=p.topk,
                    batch_size=p.blackbox_batch_size)


def load_conflict(params: Mapping[str, Any], split: str, paths: RunPaths | None, n: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` class-conflict scenes of a split (:class:`~lwcam.data.ConflictScenes`).

    Returns ``(images (n,3,H,2H), labels (n,2), masks (n,2,H,2H))``.
    """
    p = as_profile(params)
    if p.dataset != "synthetic":
        raise ValueError(f"class-conflict scenes exist for the synthetic data set only, not {p.dataset!r}")
    ds = ConflictScenes(split=split, n=n, image_size=p.image_size, num_classes=p.num_classes, seed=p.data_seed,
                        cache_dir=paths.data_cache if paths is not None else None, object_radius=object_radius(p))
    with stage(f"data: {split} conflict scenes ({n}, rendered or read from the cache)", paths):
        return ds.tensors()


def fusion_selection(params: Mapping[str, Any], paths: RunPaths, student: torch.nn.Module, scorer: Any,
                     progress: bool | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """:func:`lwcam.study.analysis.select_fusion` on the profile's first ``n_fusion_val`` ``val`` images, cached.

    The table and the chosen setting are kept in the run folder, keyed by the profile keys that
    determine them, so notebooks 04 and 05 pay for the selection once.
    """
    from .analysis import FUSION_GRID_VERSION, select_fusion  # here: analysis imports the baselines

    p = as_profile(params)
    key = json.dumps({**json.loads(p.fingerprint(TEACHER_KEYS + STUDENT_KEYS + ("n_fusion_val", "game_steps"))),
                      "fusion_grid": FUSION_GRID_VERSION}, sort_keys=True)
    if p.black_box_url is not None:  # the student and the scores come from that server's model
        key = json.dumps({**json.loads(key), "student": student_fingerprint(p, blackbox_version(scorer))},
                         sort_keys=True)
    table_path, meta_path = paths.run / "fusion_selection.csv", paths.run / "fusion_selection.json"
    if table_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == key:
            return pd.read_csv(table_path, keep_default_na=False), meta["chosen"]
    val_x, _, _ = load_split(p, "val", paths)
    val_x = val_x[: p.n_fusion_val]
    with stage("fusion selection on val (every grid setting)", paths):
        table, chosen = select_fusion(student, scorer, val_x, blackbox_labels(scorer, val_x), seed=p.seed,
                                      step=p.game_step(), progress=progress)
    table.to_csv(table_path, index=False)
    meta_path.write_text(json.dumps({"fingerprint": key, "chosen": chosen}, indent=2) + "\n")
    return table, chosen


#: T3's methods in table order, and those (black-box or query-priced) explained on ``n_eval_blackbox`` images only.
T3_METHODS = ("lwcam", "lwcam_selected", "gradcam", "layercam", "gradcampp", "scorecam", "gradcam_teacher", "cam",
              "meaningful_perturbation", "rise", "lime", "occlusion", "random", "center", "mask")
T3_EXPENSIVE = ("scorecam", "rise", "lime", "occlusion")
#: Images per call of a T3 method (``chunk`` of :func:`lwcam.scoring.evaluation.run_methods`); random maps are drawn
#: per chunk.
T3_CHUNK = 50


def t3_method_params(params: Mapping[str, Any], chosen: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The settings T3 hands each method (``method -> keyword arguments``); ``chosen`` is the fusion selected on val.

    >>> from lwcam.study.profiles import Profile
    >>> t3_method_params(Profile(seed=3), {"mode": "max"})["rise"]["seed"]
    3
    """
    p = as_profile(params)
    return {"lwcam_selected": dict(chosen), "rise": {"n_masks": p.rise_masks, "seed": p.seed},
            "lime": {"seed": p.seed, "n_samples": p.lime_samples}, "random": {"seed": p.seed},
            "scorecam": {"fast": p.fast_forward}, "meaningful_perturbation": {"seed": p.seed}}


def t3_limits(params: Mapping[str, Any], n_images: int) -> dict[str, int]:
    """How many of the first evaluation images each T3 method explains (``method -> count``).

    >>> from lwcam.study.profiles import Profile
    >>> lim = t3_limits(Profile(n_eval_blackbox=2, n_eval_mp=1), 16)
    >>> lim["lwcam"], lim["rise"], lim["meaningful_perturbation"]
    (16, 2, 1)
    """
    p = as_profile(params)
    limits = dict.fromkeys(T3_METHODS, n_images)
    limits.update(dict.fromkeys(T3_EXPENSIVE, min(p.n_eval_blackbox, n_images)))
    limits["meaningful_perturbation"] = min(p.n_eval_mp, n_images)
    return limits


def explain_t3(params: Mapping[str, Any], images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, *,
               blackbox: Any, student: torch.nn.Module, teacher: torch.nn.Module,
               chosen: Mapping[str, Any]) -> dict[str, Any]:
    """T3's explanations, ``method -> MethodRun`` in :data:`T3_METHODS` order: every method on ``images``,
    :data:`T3_EXPENSIVE` on the first ``n_eval_blackbox``, meaningful perturbation on the first ``n_eval_mp``;
    ``chosen`` is the fusion selected on ``val`` (:func:`fusion_selection`). :mod:`lwcam.study.sharded` shares
    the same work out over the processes of a ``torch.distributed`` group."""
    from ..scoring.evaluation import run_methods  # here: evaluation imports the baselines, which pipeline does not need

    limits = t3_limits(params, len(images))
    settings = t3_method_params(params, chosen)
    cheap_and_priced = [m for m in T3_METHODS if m != "meaningful_perturbation"]
    runs = run_methods(
        images, targets, masks, methods=cheap_and_priced, blackbox=blackbox, student=student, teacher=teacher,
        subset=range(limits["rise"]), subset_methods=list(T3_EXPENSIVE), method_params=settings, chunk=T3_CHUNK)
    runs.update(run_methods(
        images, targets, masks, methods=["meaningful_perturbation"], student=student,
        subset=range(limits["meaningful_perturbation"]), subset_methods=["meaningful_perturbation"],
        method_params=settings, chunk=T3_CHUNK))
    return {m: runs[m] for m in T3_METHODS}


@contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables (which child processes inherit) for the ``with`` body, then restore them."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


#: The environment variable through which :func:`run` (``--nproc``) tells the notebooks' kernels over how many
#: processes to shard T3 (notebook 04) and T4 (notebook 05); unset: one process, in the kernel.
NPROC_ENV = "LWCAM_NPROC"


def notebook_nproc() -> int:
    """Processes over which a notebook shards its stage: ``$LWCAM_NPROC`` (set by :func:`run`), default 1."""
    raw = os.environ.get(NPROC_ENV, "1")
    try:
        return check_nproc(int(raw), name=NPROC_ENV)
    except ValueError:
        raise ValueError(f"{NPROC_ENV} must be a process count of at least 1, got {raw!r}") from None


def sharded_result(params: Mapping[str, Any], paths: RunPaths, which: str, nproc: int) -> Any:
    """Stage ``which`` (``t3`` or ``t4``) of the profile over ``nproc`` processes (:mod:`lwcam.study.sharded`), what
    its notebook computes in one process, read back from a private temporary folder.

    The processes read the profile from its file: ``params`` must be that profile unchanged.
    """
    p = as_profile(params)
    if p.to_dict() != load_profile(p.profile, paths.root).to_dict():
        raise ValueError(f"nproc={nproc}: the processes read params/{p.profile}.yaml as it is, but this profile "
                         f"differs from it; run with nproc=1, or save the settings as a profile of their own")
    # a fresh folder only this user can write to: the file is unpickled, so nobody else may put one there
    with tempfile.TemporaryDirectory(prefix="lwcam-sharded-") as folder:
        result = Path(folder) / f"{which}.pt"
        with environ(LWCAM_STAGE_LOG="off"):  # the processes inherit it; this process times the stage whole
            launch(["-m", "lwcam.study.sharded", "--profile", p.profile, "--root", str(paths.root), "--stage",
                            which, "--result", str(result)], nproc)
        return torch.load(result, weights_only=False)  # written just now by the processes this call started


def t3_results(params: Mapping[str, Any], paths: RunPaths, images: torch.Tensor, targets: torch.Tensor,
               masks: torch.Tensor, *, blackbox: Any, scorer: Any, student: torch.nn.Module,
               teacher: torch.nn.Module, chosen: Mapping[str, Any]) -> tuple[dict[str, Any], pd.DataFrame, dict]:
    """Notebook 04's T3: the explanations (:func:`explain_t3`) scored on ``scorer``
    (:func:`lwcam.scoring.evaluation.score_methods`), ``(runs, per_image, games)``; over :func:`notebook_nproc`
    processes when it is above 1 (the rows of one process, :mod:`lwcam.study.sharded`)."""
    from ..scoring.evaluation import score_methods

    nproc = notebook_nproc()
    if nproc > 1:
        with stage(f"explanations and games over {nproc} processes (all methods)", paths):
            out = sharded_result(params, paths, "t3", nproc)
        return out["runs"], out["per_image"], out["games"]
    with stage("explanations (all methods)", paths):
        runs = explain_t3(params, images, targets, masks, blackbox=blackbox, student=student, teacher=teacher,
                          chosen=chosen)
    with stage("deletion and insertion games (all methods)", paths):
        per_image, games = score_methods(scorer, images, targets, masks, runs, step=as_profile(params).game_step())
    return runs, per_image, games


def save_scorecard_rows(paths: RunPaths, result: Any, fusions: Mapping[str, Mapping[str, Any]]) -> list[Path]:
    """Keep T4's per-scene and per-object rows and the fusions chosen on ``val`` in the run folder (for T5);
    each file is written atomically. Returns the files."""
    out = [paths.run / "per_scene_scorecard.csv", paths.run / "per_object_scorecard.csv",
           paths.run / "scorecard_fusions.json"]
    atomic_write_bytes(result.per_scene.to_csv(index=False).encode(), out[0])
    atomic_write_bytes(result.per_object.to_csv(index=False).encode(), out[1])
    atomic_write_bytes((json.dumps(fusions, indent=2, default=float) + "\n").encode(), out[2])
    return out


@dataclass
class ScorecardInputs:
    """What notebook 05 scores (:func:`scorecard_inputs`): the models, the test conflict scenes, the scene
    black boxes and the fusions selected on ``val`` (by deletion, and conflict-aware on ``val`` scenes)."""

    params: Profile
    paths: RunPaths
    teacher: torch.nn.Module
    student: torch.nn.Module
    second_student: torch.nn.Module
    scenes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    blackbox: BlackBox
    scorer: BlackBox
    fusion_table: pd.DataFrame
    chosen: dict[str, Any]
    chosen_conflict: dict[str, Any]

    @property
    def fusions(self) -> dict[str, dict[str, Any]]:
        """The T4 rows' fusions: ``lwcam_selected`` and ``lwcam_conflict``."""
        return {"lwcam_selected": self.chosen, "lwcam_conflict": self.chosen_conflict}

    def run_kwargs(self) -> dict[str, Any]:
        """:func:`lwcam.study.scorecard.run_scorecard`'s keyword arguments for these scenes, from the profile."""
        from . import scorecard  # here: the scorecard imports the baselines, which pipeline does not need

        p, shape = self.params, tuple(int(d) for d in self.scenes[0].shape[1:])
        return dict(methods=scorecard.SCORECARD_METHODS, blackbox=self.blackbox, scorer=self.scorer,
                    student=self.student, teacher=self.teacher, second_student=self.second_student,
                    n_expensive=p.n_conflict_blackbox, n_road=p.n_road, n_randomisation=p.n_randomisation,
                    randomisation_steps=p.randomisation_steps, n_robustness=p.n_robustness,
                    robustness_samples=p.robustness_samples, second_seed=p.second_seed, seed=p.seed,
                    method_params=scorecard.scene_method_params(shape[1], shape[2], rise_masks=p.rise_masks,
                                                                lime_samples=p.lime_samples, seed=p.seed,
                                                                fusions=self.fusions),
                    wrap=_SceneWrap(p, cast(tuple[int, int, int], shape)))


@dataclass
class _SceneWrap:
    """A randomised teacher as the scene black box (:func:`make_scene_blackbox`, no run folder)."""

    params: Profile
    shape: tuple[int, int, int]

    def __call__(self, model: torch.nn.Module) -> BlackBox:
        return make_scene_blackbox(model, self.params, None, self.shape)


def scorecard_scenes(params: Mapping[str, Any]) -> int:
    """How many test conflict scenes T4 reads: enough for every measure's first scenes."""
    p = as_profile(params)
    return max(p.n_conflict, p.n_conflict_blackbox, p.n_road, p.n_randomisation, p.n_robustness)


def scorecard_inputs(params: Mapping[str, Any], paths: RunPaths, progress: bool | None = None) -> ScorecardInputs:
    """Notebook 05's inputs: teacher, student and the second-seed student (made first if missing), the first
    test conflict scenes every T4 measure needs, the scene black boxes, and the fusions selected on ``val``
    (:func:`fusion_selection`, then :func:`lwcam.study.scorecard.select_fusion_conflict` on ``val`` scenes)."""
    from . import scorecard

    p = as_profile(params)
    teacher, _ = get_teacher(p, paths, progress=progress)
    student, _ = get_student(p, paths, teacher, progress=progress)
    second, _ = get_student(p, paths, teacher, seed=p.second_seed, progress=progress)
    scenes = load_conflict(p, "test", paths, n=scorecard_scenes(p))
    shape = cast(tuple[int, int, int], tuple(int(d) for d in scenes[0].shape[1:]))
    probs = make_blackbox(teacher, p, paths, cache=False, output="probs")
    selection, chosen = fusion_selection(p, paths, student, probs, progress=progress)
    val_x, val_y, val_m = load_conflict(p, "val", paths, n=p.n_fusion_val)
    with stage("conflict-aware fusion selection on val scenes", paths):
        table, conflict = scorecard.select_fusion_conflict(student, selection, val_x, val_y, val_m)
    return ScorecardInputs(params=p, paths=paths, teacher=teacher, student=student, second_student=second,
                           scenes=scenes, blackbox=make_scene_blackbox(teacher, p, paths, shape),
                           scorer=make_scene_blackbox(teacher, p, paths, shape, output="probs"), fusion_table=table,
                           chosen=dict(chosen), chosen_conflict=dict(conflict))


def scorecard_result(inputs: ScorecardInputs) -> Any:
    """Notebook 05's T4 (:func:`lwcam.study.scorecard.run_scorecard` of ``inputs``), over :func:`notebook_nproc`
    processes when it is above 1 (the result of one process, :mod:`lwcam.study.sharded_t4`)."""
    from . import scorecard

    nproc = notebook_nproc()
    if nproc > 1:
        with stage(f"T4: explanations and measures over {nproc} processes (all methods)", inputs.paths):
            return sharded_result(inputs.params, inputs.paths, "t4", nproc)
    with stage("T4: explanations and measures (all methods)", inputs.paths):
        return scorecard.run_scorecard(*inputs.scenes, **inputs.run_kwargs())


def scorecard_tables(result: Any, params: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """T4's tables of a :class:`~lwcam.study.scorecard.ScorecardResult`: ``T4_scorecard`` (bootstrap CIs),
    ``T4_randomisation`` (each cascade step), ``T4_claims`` (paired tests) and ``T4_separation``."""
    from . import scorecard

    seed = as_profile(params).seed
    t4 = scorecard.scorecard_table(result, seed=seed)
    steps = (result.randomisation.groupby(["method", "step"], sort=False)
             .agg(layers=("layer", "first"), rank_correlation=("rank_correlation", "mean"),
                  n_scenes=("image", "nunique")).reset_index())
    steps["label"] = steps["method"].map(t4.set_index("method")["label"])
    return {"T4_scorecard": t4, "T4_randomisation": steps,
            "T4_claims": scorecard.scorecard_claims(result.per_scene, seed=seed),
            "T4_separation": scorecard.separation_table(result.per_scene, t4)}


def load_scorecard_rows(paths: RunPaths) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """T4's per-object rows and the fusions chosen on ``val``, as :func:`save_scorecard_rows` kept them."""
    rows, fusions = paths.run / "per_object_scorecard.csv", paths.run / "scorecard_fusions.json"
    if not rows.exists() or not fusions.exists():
        raise FileNotFoundError(f"no scorecard rows under {paths.rel(paths.run)}; run notebook 05_scorecard first")
    return pd.read_csv(rows), json.loads(fusions.read_text())


#: The student-side rows of an ablation student's T5 (its own explanations); the black-box and reference rows
#: (RISE, LIME, occlusion, random, centre, mask) do not depend on the student and are the main student's.
ABLATION_METHODS = ("lwcam", "lwcam_selected", "lwcam_conflict", "lwcam_gated", "gradcam", "layercam", "gradcampp")
STUDENT_FREE_METHODS = ("rise", "lime", "occlusion", "random", "center", "mask")


def last_map_cell_px(student: torch.nn.Module, image_size: int) -> float:
    """Input pixels per cell of the student's deepest explained map (``layers="auto"``): 8.0 for an 8×8 map at 64 px."""
    from ..cam.layerwise import LayerwiseGradCAM  # here: pipeline itself needs no CAM
    from ..cam.maps import LayerMaps

    with LayerwiseGradCAM(student, verbose=False) as cam:
        lm = cam(torch.zeros(1, 3, image_size, image_size), targets=0)
    assert isinstance(lm, LayerMaps)  # one weighting gives one LayerMaps
    h, w = lm.resolutions[lm.names[-1]]
    return image_size / max(h, w)


def blackbox_accuracy_by_size(params: Mapping[str, Any], paths: RunPaths, teacher: torch.nn.Module
                              ) -> pd.DataFrame:
    """The black box's accuracy per object-size bin on the ``val`` and ``test`` images (synthetic data only).

    Sizes are in cells of the profile's student architecture's last map, as in T5. Columns ``split``,
    ``size_bin``, ``n``, ``accuracy``; a row ``all`` per split.
    """
    from .resolution import accuracy_by_size  # here: the study's tables import the baselines

    p = as_profile(params)
    if p.dataset != "synthetic":
        raise ValueError(f"object sizes are known for the synthetic data set only, not {p.dataset!r}")
    cell = last_map_cell_px(build_model(p.student, p.num_classes).eval(), p.image_size)
    frames = []
    for split in ("val", "test"):
        x, y, m = load_split(p, split, paths)
        correct = predict_logits(teacher, x).argmax(dim=1).cpu() == y
        frames.append(accuracy_by_size(correct, m, cell).assign(split=split))
    table = pd.concat(frames, ignore_index=True)
    return table[["split", "size_bin", "n", "accuracy"]]


def resolution_units(params: Mapping[str, Any], paths: RunPaths, teacher: torch.nn.Module,
                     progress: bool | None = None) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """T5's units (:func:`lwcam.study.resolution.size_units`) and the test objects' sizes, per student.

    The main student's rows are T4's (notebook 05's, re-read); each ``resolution_students`` architecture
    adds :func:`ablation_scorecard`'s rows beside the student-free ones (:data:`STUDENT_FREE_METHODS`).
    Every student bins the same objects in cells of **its own** last map (protocol: the size in cells of
    the student's last map), so a 32×-stride student sees the objects four times smaller than an 8× one.
    A student is named with its cell width (``"regnet_x_s8 (8 px cells)"``).
    """
    from .resolution import object_sizes, size_units  # here: the study's tables import the baselines

    p = as_profile(params)
    student, _ = get_student(p, paths, teacher)
    per_object, fusions = load_scorecard_rows(paths)
    _, _, masks = load_conflict(p, "test", paths, n=int(per_object["image"].max()) + 1)
    cell = last_map_cell_px(student, p.image_size)
    name = f"{p.student} ({cell:g} px cells)"
    sizes = {name: object_sizes(masks, cell)}
    units = {name: size_units(per_object, sizes[name])}
    free = per_object[per_object["method"].isin(STUDENT_FREE_METHODS)]
    for arch in p.resolution_students or []:
        result, own_cell = ablation_scorecard(p, paths, teacher, arch, fusions, progress=progress)
        name = f"{arch} ({own_cell:g} px cells)"
        sizes[name] = object_sizes(masks, own_cell)
        units[name] = size_units(pd.concat([result.per_object, free]), sizes[name])
    return units, sizes


def ablation_scorecard(params: Mapping[str, Any], paths: RunPaths, teacher: torch.nn.Module, arch: str,
                       fusions: Mapping[str, Mapping[str, Any]], progress: bool | None = None) -> tuple[Any, float]:
    """T4's student-side measurements with another student architecture, distilled from the same black box.

    The student is distilled from the profile's black box (its ``probs`` answers on the same transfer
    images) and kept in ``runs/<profile>/ablation_<arch>/``; it explains the same ``n_conflict`` test
    scenes with :data:`ABLATION_METHODS`, the lwcam rows at the settings chosen on ``val`` for the main
    student (``fusions``; a setting whose per-layer weights do not fit this student's layers is left out),
    and no robustness measures (they need a second student). Returns its
    :class:`~lwcam.study.scorecard.ScorecardResult` and the pixels per cell of its last map.
    """
    from ..cam.layerwise import auto_layers
    from . import scorecard  # here: the scorecard imports the baselines, which pipeline does not need

    p = as_profile(params).replace(student=arch, blackbox_output="probs", compare_modes=False)
    sub = RunPaths(profile=f"{p.profile}/ablation_{arch}", root=paths.root)
    sub.run.mkdir(parents=True, exist_ok=True)
    with stage(f"T5: ablation student {arch} (distillation or cache)", paths):
        student, _ = get_student(p, sub, teacher, progress=progress)
    n_layers = len(auto_layers(student, p.image_size))
    usable = {k: dict(v) for k, v in fusions.items() if len(v.get("weights") or [0] * n_layers) == n_layers}
    methods = [m for m in ABLATION_METHODS if m not in fusions or m in usable]
    x, y, m = load_conflict(p, "test", paths, n=p.n_conflict)
    shape = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
    scorer = make_scene_blackbox(teacher, p, paths, shape, output="probs")
    with stage(f"T5: ablation student {arch}, explanations and measures", paths):
        result = scorecard.run_scorecard(
            x, y, m, methods=methods, blackbox=scorer, scorer=scorer, student=student, teacher=teacher,
            n_road=min(p.n_road, p.n_conflict), n_randomisation=min(p.n_randomisation, p.n_conflict),
            randomisation_steps=p.randomisation_steps, n_robustness=0,
            method_params=scorecard.scene_method_params(shape[1], shape[2], seed=p.seed, fusions=usable),
            seed=p.seed, progress=progress)
    return result, last_map_cell_px(student, p.image_size)


def get_student(params: Mapping[str, Any], paths: RunPaths, teacher: torch.nn.Module, output: str | None = None,
                progress: bool | None = None, seed: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the distilled student for a black-box ``output`` mode, distilling it first if needed.

    The student sees only the black box's answers on the ``transfer`` split (plus the ``test``
    split's answers, for the held-out fidelity that T1 reports). Its checkpoint and a JSON
    summary (history, fidelity, queries, seconds) are kept in the run folder.

    ``seed`` (default the profile's) distils another student from the same black box with that
    seed; it is cached separately (``student_<output>_seed<seed>``) and keeps no per-epoch students.

    The cache key is :func:`student_fingerprint`: with ``black_box_url`` the server's metadata are
    read first, so a student of another URL or another model version is distilled afresh.
    """
    p = as_profile(params)
    mode = output or p.blackbox_output
    tag = ""
    if seed is not None and seed != p.seed:
        p, tag = p.replace(seed=seed), f"_seed{seed}"
    ckpt = paths.run / f"student_{mode}{tag}.pt"
    summary_path = paths.run / f"student_{mode}{tag}.json"
    remote = make_blackbox(teacher, p, paths, output=mode, cache=False) if p.black_box_url is not None else None
    fingerprint = student_fingerprint(p, blackbox_version(remote))
    if ckpt.exists() and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("fingerprint") == fingerprint:
            model, _ = load_checkpoint(ckpt)
            return model, summary
    result = _distill(p, paths, teacher, mode, fingerprint, progress, keep_epochs=not tag, blackbox=remote)
    save_checkpoint(result.student, ckpt, arch=p.student, num_classes=p.num_classes, output=mode, seed=p.seed)
    summary = {
        "fingerprint": fingerprint,
        "output": mode,
        "history": result.history,
        "fidelity": result.fidelity,
        "queries": result.queries,
        "seconds": result.seconds,
        "config": {**{k: v for k, v in result.config.items() if isinstance(v, (int, float, str, bool, type(None)))},
                   "student_arch": p.student},
    }
    summary_path.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return result.student, summary


def _distill(p: Profile, paths: RunPaths, teacher: torch.nn.Module, output: str, fingerprint: str,
             progress: bool | None, keep_epochs: bool = True, blackbox: BlackBox | None = None) -> DistillResult:
    """Distil a student from the black box's ``output`` answers, keeping the student of every epoch (``keep_epochs``).

    ``blackbox`` is the one to ask (default: :func:`make_blackbox` without answer cache).
    """
    transfer, _, _ = load_split(p, "transfer", paths)
    test_x, test_y, _ = load_split(p, "test", paths)
    # no persistent answer cache here: distillation keeps its answers in its own checkpoint, and
    # T1 must report what a distillation from scratch pays
    bb = blackbox if blackbox is not None else make_blackbox(teacher, p, paths, output=output, cache=False)
    # one checkpoint folder per configuration, so an interrupted run resumes and a changed one starts afresh
    ckpt_dir = paths.run / f"distill_{output}_{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}"
    snapshots = paths.snapshots(output)
    snapshots.mkdir(parents=True, exist_ok=True)
    if keep_epochs and _reset_snapshots(snapshots, fingerprint, fresh=not ckpt_dir.exists()):
        # the per-epoch students are another distillation's: train every epoch again, so each is re-made
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    def keep(epoch: int, model: torch.nn.Module) -> None:
        save_checkpoint(model, snapshots / f"epoch_{epoch:03d}.pt", arch=p.student, num_classes=p.num_classes,
                        output=output, epoch=epoch)

    with stage(f"distillation ({output}, {p.student}, seed {p.seed})", paths):
        return distill(
            bb, transfer, student=p.student, temperature=p.temperature, epochs=p.distill_epochs,
            batch_size=p.distill_batch_size, lr=p.distill_lr, query_budget=p.query_budget, holdout=p.holdout,
            eval_images=test_x, eval_labels=test_y, seed=p.seed, label_smoothing=p.label_smoothing,
            channels_last=p.train_channels_last, checkpoint_dir=ckpt_dir, progress=progress,
            on_epoch_end=keep if keep_epochs else None,
        )


#: The file beside the per-epoch students that names the distillation (its fingerprint) they come from.
SNAPSHOT_KEY = "fingerprint.json"


def _snapshot_fingerprint(folder: Path) -> str | None:
    """The fingerprint recorded beside a folder's per-epoch students (``None`` if none is recorded)."""
    key_file = folder / SNAPSHOT_KEY
    if not key_file.exists():
        return None
    try:
        return json.loads(key_file.read_text()).get("fingerprint")
    except (ValueError, AttributeError):
        return None


def _reset_snapshots(folder: Path, fingerprint: str, fresh: bool) -> bool:
    """Drop the per-epoch students (all when ``fresh``, else those of another distillation) and record
    ``fingerprint`` beside them; ``True`` when they were another distillation's."""
    recorded = _snapshot_fingerprint(folder)
    foreign = recorded is not None and recorded != fingerprint
    if fresh or foreign:
        for old in folder.glob("epoch_*.pt"):
            old.unlink()
    (folder / SNAPSHOT_KEY).write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    return foreign


def _check_snapshots(paths: RunPaths, output: str) -> None:
    """``ValueError`` when the per-epoch students come from another distillation than the cached student."""
    summary_path = paths.run / f"student_{output}.json"
    recorded = _snapshot_fingerprint(paths.snapshots(output))
    if recorded is None or not summary_path.exists():
        return
    if json.loads(summary_path.read_text()).get("fingerprint") != recorded:
        raise ValueError(f"the per-epoch students under {paths.rel(paths.snapshots(output))} come from another "
                         f"distillation (another profile or black box) than {paths.rel(summary_path)}; "
                         f"rerun notebook 01")


def load_snapshots(params: Mapping[str, Any], paths: RunPaths, output: str = "probs") -> dict[int, torch.nn.Module]:
    """The student after each distillation epoch (``epoch -> model``), as saved by :func:`get_student`.

    They must come from the distillation of the cached ``student_<output>.json`` (the fingerprint
    recorded beside them); per-epoch students of another black box raise ``ValueError``.
    """
    files = sorted(paths.snapshots(output).glob("epoch_*.pt"))
    if not files:
        raise FileNotFoundError(f"no per-epoch students under {paths.rel(paths.snapshots(output))}; "
                                f"run notebook 01 (or delete the cached student_{output}.json) first")
    _check_snapshots(paths, output)
    return {int(f.stem.split("_")[1]): load_checkpoint(f)[0] for f in files}


def blackbox_labels(blackbox: Any, images: torch.Tensor) -> torch.Tensor:
    """The black box's predicted class per image, whatever its output mode."""
    out = blackbox(images)
    if blackbox.output == "label":
        return out
    if blackbox.output == "topk":
        return out.indices[:, 0]
    return out.argmax(1)


def pick_indices(n_total: int, n: int, seed: int) -> torch.Tensor:
    """A seeded, sorted choice of ``n`` indices out of ``n_total`` (the images a figure shows)."""
    if not 0 < n <= n_total:
        raise ValueError(f"n must be in [1, {n_total}], got {n}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].sort().values


def student_agreement(student: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bool (B,): does the student's argmax equal the black box's label? (Which explanations to distrust.)"""
    return predict_logits(student, images).argmax(1) == labels


def short_label(run: Any) -> str:
    """A short display name for a method run: ``lwcam``, ``Grad-CAM``, ``Grad-CAM (teacher, oracle)``, ..."""
    if run.name in ("lwcam", "lwcam_selected"):
        return run.label
    if run.name == "gradcam_teacher":
        return "Grad-CAM (teacher, oracle)"
    if run.name == "mask":
        return "mask (oracle)"
    return run.label.split(" (")[0]


@contextmanager
def stage(name: str, paths: RunPaths | None) -> Iterator[None]:
    """Time a costly stage and append ``{notebook, stage, seconds}`` to the run's stage log.

    The notebook's name comes from the ``LWCAM_NOTEBOOK`` environment variable, which
    :func:`run` sets for each notebook; :func:`timings_table` reads the log back.
    """
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if paths is not None:
            record_stage(name, time.perf_counter() - t0, paths)


def record_stage(name: str, seconds: float, paths: RunPaths) -> None:
    """Append one stage's wall time to the run's stage log (see :func:`stage`); nothing where ``LWCAM_STAGE_LOG``
    is ``off`` (the processes a notebook hands a stage to: the notebook times the stage as a whole)."""
    if os.environ.get("LWCAM_STAGE_LOG") == "off":
        return
    row = {"notebook": os.environ.get("LWCAM_NOTEBOOK", ""), "stage": name, "seconds": round(float(seconds), 2)}
    with paths.stage_log.open("a") as f:
        f.write(json.dumps(row) + "\n")


#: What a run writes in the tracked tree: it does not make the code the run ran on "dirty".
OUTPUT_FOLDERS = ("reports", "figures")


def _git_commit(root: Path) -> str:
    """The commit the code is at, with ``-dirty`` when tracked files other than a run's outputs have changed."""
    outputs = [f":(exclude){folder}" for folder in OUTPUT_FOLDERS]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *outputs],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def timings_table(paths: RunPaths, notebook_seconds: dict[str, float], params: Mapping[str, Any],
                  commit: str | None = None) -> pd.DataFrame:
    """Wall time per notebook and per costly stage, with the run's provenance in every row.

    ``commit`` is the code's commit as read when the run began (default: read now).
    """
    rows = []
    stages = [json.loads(line) for line in paths.stage_log.read_text().splitlines()] if paths.stage_log.exists() else []
    for nb, seconds in notebook_seconds.items():
        rows.append({"notebook": nb, "stage": "(whole notebook)", "seconds": seconds})
        rows.extend({"notebook": nb, "stage": r["stage"], "seconds": r["seconds"]} for r in stages
                    if r["notebook"] == nb)
    rows.append({"notebook": "(all)", "stage": "(total)", "seconds": round(sum(notebook_seconds.values()), 1)})
    table = pd.DataFrame(rows)
    table["profile"] = paths.profile
    table["seed"] = as_profile(params).seed
    table["commit"] = commit or _git_commit(paths.root)
    table["torch"] = torch.__version__
    table["threads"] = torch.get_num_threads()
    table["machine"] = machine_name()
    return table


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_name() -> str:
    """The machine as the timings name it: CPU model, architecture and core count.

    >>> "CPUs" in machine_name()
    True
    """
    return f"{cpu_model()}, {platform.machine()} {os.cpu_count()} CPUs"


def save_table(df: pd.DataFrame, table_id: str, paths: RunPaths, float_format: str = "%.6g") -> tuple[Path, Path]:
    """Write ``<reports>/<table_id>.csv`` and ``.md`` and return both paths.

    Each file is written atomically (a temporary file, then a rename): a run killed mid-write leaves the
    previous table or the new one, never half of one.
    """
    csv_path = paths.reports / f"{table_id}.csv"
    md_path = paths.reports / f"{table_id}.md"
    atomic_write_bytes(df.to_csv(index=False, float_format=float_format).encode(), csv_path)  # "%.6g": tiny p-values
    atomic_write_bytes((df.to_markdown(index=False, floatfmt=".4g") + "\n").encode(), md_path)
    return csv_path, md_path


def save_figure(fig: Any, figure_id: str, paths: RunPaths, dpi: int = 120) -> Path:
    """Save a matplotlib figure as ``<figures>/<figure_id>.png``."""
    return _save_png(fig, paths.figures / f"{figure_id}.png", dpi=dpi)


def show_figure(fig: Any, figure_id: str, paths: RunPaths, dpi: int = 120) -> None:
    """A notebook's figure in one call: :func:`save_figure`, close ``fig``, then display the PNG as saved."""
    from IPython.display import Image, display  # here: only a notebook displays
    from matplotlib import pyplot

    path = save_figure(fig, figure_id, paths, dpi=dpi)
    pyplot.close(fig)  # a pyplot figure is freed; lwcam.study.plots' own figures were never pyplot's
    display(Image(filename=str(path)))


def start_notebook(profile: str | Mapping[str, Any]) -> tuple[Profile, RunPaths]:
    """A notebook's first cell after ``parameters``: quiet warnings, a headless backend, the profile, the seed.

    Returns the profile (:func:`load_profile` of what papermill injected) and its run paths, and prints where
    the figures and tables go.

    >>> params, paths = start_notebook("quick")  # doctest: +ELLIPSIS
    profile=quick  figures -> figures/quick/  tables -> reports/quick/
    """
    import warnings

    import matplotlib

    from .._utils import seed_everything

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", message="IProgress not found")
    matplotlib.use("Agg")
    params = load_profile(profile)
    paths = RunPaths.for_profile(params.profile)
    seed_everything(params.seed)
    print(f"profile={params.profile}  figures -> {paths.rel(paths.figures)}/  tables -> {paths.rel(paths.reports)}/")
    return params, paths


def _notebook_parameters(profile: Profile, notebook: Path) -> dict[str, str | dict[str, Any]]:
    """What papermill injects: ``profile``, the profile's name, or with the keys where it differs from its file
    a mapping that :func:`load_profile` reads back (each notebook's ``parameters`` cell declares ``profile`` alone)."""
    import papermill as pm  # here, not at the top: a notebook kernel importing lwcam.study.pipeline pays ~2 s less

    declared = list(pm.inspect_notebook(str(notebook)))
    if declared != ["profile"]:
        raise ValueError(f"the parameters cell of {notebook.name} must declare profile alone, not {declared}")
    changed = {k: v for k, v in profile.to_dict().items()
               if v != load_profile(profile.profile, notebook.parent)[k]}
    return {"profile": {"profile": profile.profile, **changed} if changed else profile.profile}


def _merge_timings(table: pd.DataFrame, paths: RunPaths) -> pd.DataFrame:
    """``table`` plus the rows of notebooks it does not hold from the saved timings (a run of some notebooks).

    Each row keeps the commit it was measured at; the ``(total)`` row is summed anew over the notebooks.
    """
    saved = paths.reports / "timings.csv"
    if not saved.exists():
        return table
    old = pd.read_csv(saved)
    keep = old[~old["notebook"].isin(set(table["notebook"]) | {"(all)"})]
    merged = pd.concat([keep, table[table["notebook"] != "(all)"]], ignore_index=True)
    order = {nb: i for i, nb in enumerate(NOTEBOOKS)}
    merged = merged.sort_values("notebook", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    total = table[table["notebook"] == "(all)"].copy()
    total["seconds"] = round(float(merged.loc[merged["stage"] == "(whole notebook)", "seconds"].sum()), 1)
    return pd.concat([merged, total], ignore_index=True)


def run(profile: str = "default", only: list[str] | None = None, root: str | os.PathLike | None = None,
        log_output: bool = False, overrides: Mapping[str, Any] | None = None, nproc: int = 1) -> list[Path]:
    """Execute the notebooks with papermill for ``profile``; executed copies go to ``runs/<profile>/notebooks``.

    ``overrides`` sets profile keys over the file's (the run keeps the profile's name and folders). ``nproc``
    above 1 shards T3 (notebook 04) and T4 (notebook 05) over that many processes on this machine
    (:func:`t3_results`, :func:`scorecard_result`); the tables are those of one process.
    """
    import papermill as pm  # here, not at the top (see _notebook_parameters)

    nproc = check_nproc(nproc)
    if nproc > 1 and overrides:
        raise ValueError(f"nproc={nproc} shards over processes that read params/{profile}.yaml as it is; "
                         f"overrides= needs nproc=1")
    base = project_root(root)
    params = load_profile(profile, base).replace(**(overrides or {}))
    names = list(NOTEBOOKS) if not only else list(only)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"unknown notebooks {unknown}; expected some of {NOTEBOOKS}")
    out_dir = base / "runs" / profile / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = RunPaths.for_profile(profile, base)
    paths.stage_log.unlink(missing_ok=True)
    commit = _git_commit(base)  # before the run writes anything
    done, timings, start = [], {}, time.perf_counter()
    for name in names:
        src = base / "notebooks" / f"{name}.ipynb"
        t0 = time.perf_counter()
        print(f"[lwcam] {name} (profile {profile}) ...", flush=True)
        # the kernel inherits both: stage() labels its rows with the notebook, notebook_nproc() reads the count
        with environ(LWCAM_NOTEBOOK=name, **{NPROC_ENV: str(nproc)}):
            pm.execute_notebook(str(src), str(out_dir / f"{name}.ipynb"), parameters=_notebook_parameters(params, src),
                                cwd=str(base / "notebooks"), log_output=log_output, progress_bar=False,
                                kernel_name="python3")
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[lwcam] {name} done in {timings[name]:.0f} s; run so far {time.perf_counter() - start:.0f} s",
              flush=True)
        done.append(out_dir / f"{name}.ipynb")
    table = timings_table(paths, timings, params, commit)
    save_table(_merge_timings(table, paths) if only else table, "timings", paths)
    print(f"[lwcam] timings -> {paths.rel(paths.reports / 'timings.csv')}", flush=True)
    return done
