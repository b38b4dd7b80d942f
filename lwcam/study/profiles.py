"""Profiles: the typed, validated settings of a pipeline run.

A *profile* is a YAML file ``params/<name>.yaml`` (``quick``, ``default``, ``stride32``,
``imagenet``, ...). Its keys are the fields of :class:`Profile`, which declares each one once,
with its type, its default and what it means (``Profile.describe()`` prints the table). Loading
a file validates it: an unknown key or a value of the wrong type is an error that names the key
and the file; a key the file leaves out takes the declared default. A notebook's one papermill
parameter is the profile's name (``profile = "quick"``); its next cell reads the file with
:func:`lwcam.study.pipeline.load_profile`.

Example:
    >>> p = Profile(profile="demo", num_classes=4)
    >>> p.num_classes, p.teacher_lr, p.replace(topk=2).topk
    (4, 0.004, 2)
    >>> Profile.from_dict({"topk": "two"})
    Traceback (most recent call last):
    ...
    lwcam.study.profiles.ProfileError: profile key 'topk' must be int, got 'two' (str)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Profile", "ProfileError", "KEYS", "SPLITS", "project_root", "load_profile", "as_profile"]

#: The data splits a profile sizes (``n_<split>``).
SPLITS = ("train", "transfer", "val", "test")


class ProfileError(ValueError):
    """A profile that cannot be used: unknown name, unknown key, or a value of the wrong type."""


def _key(default: Any, doc: str, *, choices: tuple[str, ...] = (), null_at_default: bool = False) -> Any:
    """Declare a profile key: its default and one line of documentation.

    ``choices`` restricts a string key to those values. ``null_at_default`` makes the key
    appear as ``null`` in a fingerprint while it holds its default: such keys joined the
    fingerprints before any profile set them, and the artefacts made then keep their keys.
    """
    return field(default=default, metadata={"doc": doc, "choices": choices, "null_at_default": null_at_default})


@dataclass(frozen=True)
class Profile(Mapping[str, Any]):
    """The settings of one run: data, black box, distillation and evaluation sizes.

    Read a setting as an attribute (``profile.n_eval``). A profile is also a read-only mapping
    from key to value, for code that takes the settings as a ``Mapping``.
    """

    # run
    profile: str = _key("default", "name of the run: artefacts in runs/<profile>/, figures and tables beside")
    # data
    dataset: str = _key("synthetic", "data set: synthetic (embedded) or imagenet, cub200, cars, aircraft")
    data_root: str | None = _key(None, "folder of a paper data set (nothing is downloaded); unused by synthetic")
    image_size: int = _key(64, "side of the square input images, in pixels")
    num_classes: int = _key(10, "number of classes (2..10 for synthetic)")
    seed: int = _key(0, "seed of training, distillation, the images shown and the randomised explainers")
    data_seed: int = _key(0, "seed of the synthetic data set (each image is a function of seed, split, index)")
    object_radius: list | None = _key(
        None, "radius range [lo, hi] of the synthetic class object, in pixels of a 64-px image (scaled with "
              "image_size); null: 14-20, where objects span about four cells of an 8x8 last map",
        null_at_default=True)
    n_train: int | None = _key(None, "images of the train split (teacher training); null: the whole split")
    n_transfer: int | None = _key(None, "images of the transfer split the student learns from; null: all")
    n_val: int | None = _key(None, "images of the val split (teacher validation, fusion selection); null: all")
    n_test: int | None = _key(None, "images of the test split (fidelity, evaluation); null: all")
    # black box
    teacher: str = _key("mobilenet_v2_s8", "black-box architecture, a lwcam.models name")
    teacher_weights: str | None = _key(
        None, "torchvision weights enum name or local state-dict file; null: train the teacher here")
    teacher_epochs: int = _key(12, "epochs of teacher training (when teacher_weights is null)")
    teacher_batch_size: int = _key(64, "batch size of teacher training")
    teacher_lr: float = _key(0.004, "learning rate of teacher training")
    teacher_pixel_dropout: float = _key(
        0.5, "largest share of pixels dropped from half the teacher's training images (0 disables it)")
    blackbox_output: str = _key("probs", "what the black box answers: probs, logits, topk or label",
                                choices=("probs", "logits", "topk", "label"))
    topk: int = _key(5, "k of a topk black box")
    blackbox_batch_size: int = _key(256, "images per call to the black box")
    fast_forward: bool = _key(
        True, "run the black box's forward passes, and Score-CAM's on the student, on the fastest engine of "
        "lwcam.fast (ONNX Runtime), checked equal to eager within 1e-5 in probability; set-up time is logged")
    black_box_url: str | None = _key(
        None, "the black box behind an inference server, http://HOST:PORT/v2/models/NAME (as `lwcam serve` "
        "prints it): every black-box query goes there; null: the teacher in process")
    # distillation
    student: str = _key("regnet_x_s8", "white-box student architecture, a lwcam.models name")
    temperature: float = _key(4.0, "distillation temperature (soft-label outputs)")
    distill_epochs: int = _key(10, "epochs of distillation")
    distill_batch_size: int = _key(64, "batch size of distillation", null_at_default=True)
    distill_lr: float | None = _key(None, "peak learning rate of distillation, in (0, 10]; null: the optimiser's "
                                          "default (2e-3 for AdamW)", null_at_default=True)
    query_budget: int | None = _key(None, "most black-box queries distillation may spend; null: no limit")
    holdout: float = _key(0.05, "share of the transfer images held out of training to measure agreement",
                          null_at_default=True)
    label_smoothing: float = _key(
        0.0, "label smoothing of the cross-entropy a label-only black box's student learns from, in [0, 1)",
        null_at_default=True)
    train_channels_last: bool = _key(
        False, "train the teacher and the students in the channels_last layout: faster on CPU cores, and a "
               "different model for the same seed, as a change of seed would give (benchmarks/bench_seeds.py)",
        null_at_default=True)
    compare_modes: bool = _key(False, "01_distill also distils from topk and label black boxes (T1)")
    # explanation and evaluation
    n_explain: int = _key(6, "test images shown in F2 and F3")
    n_eval: int = _key(500, "test images scored by every white-box method (T3, F5)")
    n_eval_blackbox: int = _key(100, "of those, images scored by the black-box explainers (RISE, LIME, ...)")
    n_eval_mp: int = _key(30, "of those, images scored by meaningful perturbation")
    rise_masks: int = _key(4000, "masks per image of RISE")
    n_layer_eval: int = _key(100, "test images of the per-layer evaluation (T2, F4)")
    n_fusion_val: int = _key(100, "val images on which the fusion is selected")
    n_tradeoff: int = _key(20, "images of the RISE query trade-off (F6)")
    lime_samples: int = _key(500, "perturbed samples per image of LIME")
    game_steps: int | None = _key(
        None, "steps of the deletion and insertion games on the test and val images (T2, T3, F5-F7, the fusion "
              "selection); null: the protocol's image height (one row of pixels per step). Coarser only where "
              "benchmarks/bench_game_steps.py shows no mean AUC moving by more than 0.005 and no verdict changing",
        null_at_default=True)
    # the scorecard (T4, F8): class-conflict scenes, each explained once per object class
    n_conflict: int = _key(30, "test class-conflict scenes explained by every cheap method (T4, F8)")
    n_conflict_blackbox: int = _key(6, "of those, the scenes explained by RISE, LIME, occlusion and Score-CAM")
    n_road: int = _key(4, "of those, the scenes whose maps ROAD scores (noisy linear imputation, MoRF and LeRF)")
    n_randomisation: int = _key(2, "of those, the scenes of the cascading parameter randomisation check")
    randomisation_steps: int = _key(3, "steps of the randomisation cascade: the top layer, then the rest in equal runs")
    n_robustness: int = _key(2, "of those, the scenes of max-sensitivity and of the two-run rank correlation")
    robustness_samples: int = _key(3, "noise samples per scene of max-sensitivity")
    second_seed: int = _key(1, "seed of the second student (same black box) and of seeded methods' second run")
    # the scorecard by object size (T5, F9)
    resolution_students: list | None = _key(
        None, "ablation student architectures of T5 (lwcam.models names), each distilled from the same black box "
              "and held to T4's student-side measures on the same scenes; null: the main student only")

    def __post_init__(self) -> None:
        hints = _type_hints()
        for f in dataclasses.fields(self):
            value = _in_range(f.name, _checked(f.name, getattr(self, f.name), hints[f.name]))
            choices = f.metadata["choices"]
            if choices and value not in choices:
                raise ProfileError(f"profile key {f.name!r} must be one of {list(choices)}, got {value!r}")
            object.__setattr__(self, f.name, value)
        if self.object_radius is not None:
            from ..data import check_object_radius  # here: the data module is heavy, a profile is read anywhere

            try:
                object.__setattr__(self, "object_radius", list(check_object_radius(self.object_radius,
                                                                                   self.image_size)))
            except ValueError as err:
                raise ProfileError(f"profile key 'object_radius': {err}") from None
        if self.resolution_students is not None and not all(isinstance(a, str) and a for a in
                                                            self.resolution_students):
            raise ProfileError(f"profile key 'resolution_students' must be a list of architecture names or null, "
                               f"got {self.resolution_students!r}")
        if self.distill_lr is not None and not 0.0 < self.distill_lr <= 10.0:
            raise ProfileError(f"profile key 'distill_lr' must lie in (0, 10] or be null, got {self.distill_lr}")
        if self.game_steps is not None and not 1 <= self.game_steps <= self.image_size ** 2:
            raise ProfileError(f"profile key 'game_steps' must lie in [1, image_size² = {self.image_size ** 2}] "
                               f"or be null, got {self.game_steps}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "") -> Profile:
        """Validate ``values`` (key -> value) into a profile; ``source`` names them in errors."""
        where = f"{source}: " if source else ""
        unknown = sorted(set(values) - set(KEYS), key=str)
        if unknown:
            hints = {k: difflib.get_close_matches(str(k), KEYS, n=1) for k in unknown}
            named = ", ".join(f"{k!r}" + (f" (did you mean {hints[k][0]!r}?)" if hints[k] else "") for k in unknown)
            raise ProfileError(f"{where}unknown profile key {named}; "
                               "the keys are those of lwcam.study.profiles.Profile")
        try:
            return cls(**values)
        except ProfileError as err:
            raise ProfileError(f"{where}{err}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, name: str | None = None) -> Profile:
        """Read and validate a profile file; ``profile`` defaults to ``name`` (or the file's stem)."""
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ProfileError(f"{path}: not valid YAML ({err})") from None
        values = {} if values is None else values  # an empty file; a 0 or [] is not a mapping and raises below
        if not isinstance(values, dict):
            raise ProfileError(f"{path}: a profile is a mapping of keys to values, got {type(values).__name__}")
        values.setdefault("profile", name or path.stem)
        return cls.from_dict(values, source=str(path))

    def replace(self, **overrides: Any) -> Profile:
        """A copy with some keys changed (validated like a file)."""
        return Profile.from_dict({**self.to_dict(), **overrides}, source="overrides")

    # ------------------------------------------------------------------ reading
    def to_dict(self) -> dict[str, Any]:
        """Every key and its value, in declaration order (the notebooks' papermill parameters)."""
        return {k: getattr(self, k) for k in KEYS}

    def non_defaults(self) -> dict[str, Any]:
        """The keys whose value differs from the declared default."""
        return {k: v for k, v in self.to_dict().items() if v != _DEFAULTS[k]}

    def split_size(self, split: str) -> int | None:
        """``n_<split>``: the number of images the profile takes from a split (``None``: all)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return typing.cast("int | None", getattr(self, f"n_{split}"))

    def game_step(self) -> int | None:
        """Pixels moved per step of the games on the profile's square images, for ``game_steps`` steps
        (``None``: the games' default, one row per step).

        Example:
            >>> Profile(image_size=64).game_step() is None, Profile(image_size=64, game_steps=32).game_step()
            (True, 128)
        """
        return None if self.game_steps is None else -(-self.image_size ** 2 // self.game_steps)

    def fingerprint(self, keys: tuple[str, ...]) -> str:
        """The values of ``keys`` as one JSON string: cached artefacts are reused only when it matches."""
        values = {k: None if _NULL_AT_DEFAULT.get(k) and getattr(self, k) == _DEFAULTS[k] else getattr(self, k)
                  for k in keys}
        return json.dumps(values, sort_keys=True, default=str)

    @classmethod
    def describe(cls) -> str:
        """A Markdown table of the keys: name, type, default, meaning."""
        hints = _type_hints()
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            kind = _type_name(hints[f.name]).replace("|", "or")
            rows.append(f"| `{f.name}` | {kind} | `{json.dumps(f.default)}` | {f.metadata['doc']} |")
        return "\n".join(rows)

    # ------------------------------------------------------------------ Mapping
    def __getitem__(self, key: str) -> Any:
        if key not in _DEFAULTS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(KEYS)

    def __len__(self) -> int:
        return len(KEYS)


#: Every profile key, in declaration order.
KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Profile))
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Profile)}
_NULL_AT_DEFAULT: dict[str, bool] = {f.name: f.metadata["null_at_default"] for f in dataclasses.fields(Profile)}


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(Profile)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("NoneType", "None")


def _checked(name: str, value: Any, hint: Any) -> Any:
    """``value`` if it fits the declared type ``hint`` (an int is taken for a float); else an error naming the key."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    base = next(t for t in allowed if t is not type(None))
    if isinstance(value, bool) and base is not bool:
        pass  # True is an int to Python, never to a profile
    elif base is float and isinstance(value, int | float):
        return float(value)
    elif isinstance(value, base):
        return value
    raise ProfileError(f"profile key {name!r} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")


#: The interval of each number key, ``(low, high, low_open, high_open)``. A count of 0 means neither "all"
#: nor "none" anywhere downstream (``null`` means all), so it is refused by name when the profile is read.
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    **{k: (0, math.inf, False, False) for k in (  # a 0 here means none: seeds, a given teacher, a skipped measure
        "seed", "data_seed", "second_seed", "teacher_epochs", "n_road", "n_randomisation", "n_robustness")},
    **{k: (1, math.inf, False, False) for k in (
        "image_size", "n_train", "n_transfer", "n_val", "n_test", "teacher_batch_size", "topk", "blackbox_batch_size",
        "distill_epochs", "distill_batch_size", "query_budget", "n_explain", "n_eval", "n_eval_blackbox", "n_eval_mp",
        "rise_masks", "n_layer_eval", "n_fusion_val", "n_tradeoff", "lime_samples", "n_conflict",
        "n_conflict_blackbox", "randomisation_steps", "robustness_samples")},
    "num_classes": (2, math.inf, False, False),
    "teacher_lr": (0, math.inf, True, False),
    "temperature": (0, math.inf, True, False),
    "teacher_pixel_dropout": (0, 1, False, False),
    "holdout": (0, 1, False, True),
    "label_smoothing": (0, 1, False, True),
}


def _in_range(name: str, value: Any) -> Any:
    """``value`` if it is ``None`` or lies in the key's :data:`_RANGES` interval; else an error naming the key."""
    if value is None or name not in _RANGES:
        return value
    from .._checks import check_real  # here: importing this module stays free of torch

    low, high, low_open, high_open = _RANGES[name]
    try:
        check_real(value, f"profile key {name!r}", low, high, low_open=low_open, high_open=high_open)
    except ValueError as err:
        raise ProfileError(str(err)) from None
    return value


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The folder holding ``pyproject.toml`` and ``params/``, searched upwards from ``start`` (or the cwd)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists() and (folder / "params").is_dir():
            return folder
    raise FileNotFoundError(f"no lwcam project root (pyproject.toml + params/) above {here}")


def load_profile(name: str, root: str | os.PathLike | None = None) -> Profile:
    """Read and validate ``params/<name>.yaml`` of the project at (or above) ``root``."""
    path = project_root(root) / "params" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ProfileError(f"unknown profile {name!r}; expected one of {known}")
    return Profile.from_yaml(path, name)


def as_profile(params: Mapping[str, Any]) -> Profile:
    """``params`` itself if it is a :class:`Profile`, else the mapping validated into one."""
    return params if isinstance(params, Profile) else Profile.from_dict(params, source="parameters")
