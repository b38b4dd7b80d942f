"""T2's per-layer games and T3's explanations and games sharded over the processes of a ``torch.distributed`` group.

Each rank takes a contiguous slice of a stage's images (:func:`shard_positions`: rank ``r`` of ``W`` gets
``torch.tensor_split(arange(n), W)[r]``), computes their per-image rows and hands them to rank 0
(:func:`gather_to_rank0`, ``torch.distributed.gather_object``), which puts them back in the order one
process writes them (:func:`ordered_rows`) and only then writes a table, so a run that loses a rank
writes none.

* **T2** (``--stage t2``, notebook 03's rows): the student's Grad-CAM per layer of the first
  ``n_layer_eval`` test images, each layer's map and the fused map without it scored on the black box
  (:func:`lwcam.scoring.evaluation.layer_rows`); rows layer by layer, shallow to deep, then the fused map, images
  ascending; ``T2_layers`` is :func:`lwcam.scoring.evaluation.layer_table` of them, as notebook 03 writes it.
  Every map is normalised per image, and the Wilcoxon p-values take the profile's seed over the
  gathered rows, so the rows and table are those of one process.
* **T3** (``--stage t3``, the default; notebook 04's rows): every T3 method that explains those images
  (:func:`lwcam.study.pipeline.t3_limits`), the maps scored on the black box (:class:`ShardRows`); rows method
  by method in :data:`~lwcam.study.pipeline.T3_METHODS` order, images ascending.

* **T4** (``--stage t4``, notebook 05's rows): the scorecard, sharded by scene for the explanations and the
  localisation measures and by method for the measures taken on the first scenes only (ROAD, randomisation,
  robustness), whose noise is drawn scene after scene (:mod:`lwcam.study.sharded_t4`).

T3's rows are those of one process: every map depends on its own image only. RISE's masks and LIME's
samples come from the profile's seed, shared by every image, never from the rank; the random maps,
drawn per chunk of :data:`~lwcam.study.pipeline.T3_CHUNK` images of the whole batch, are drawn by each rank
for the chunks its images lie in, whole, and cut to its images. What may differ is the floating-point
rounding of a forward pass over a batch of another size (well below 1e-6 in an AUC).

The black box is asked without the answer cache here, as notebook 04 asks it; a black box with a cache
(:class:`lwcam.blackbox.BlackBox` ``cache_dir``) may be shared by every rank: the cache is one SQLite
file in WAL mode that each process opens on its own connection, and concurrent writers wait.

Process groups: ``gloo`` on CPU, ``nccl`` where each process of a node has a GPU of its own (the models
stay where the pipeline loads them; the group carries the gathered rows); :func:`process_group` creates one
from ``torchrun``'s environment (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) with a time
limit on every collective, and destroys it on the way out. :func:`launch` starts ``nproc`` processes on
this machine (127.0.0.1, a free port, no restart); a rank that fails ends the run and
:class:`ShardedRunError` names it.

Command line::

    python -m lwcam.study evaluate --profile quick --nproc 2      # one machine (--stage t2|t3|t4|all)
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_id=lwcam --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST_OF_NODE0:29500 -m lwcam.study.sharded --profile default --stage all   # on each node
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist

from .._utils import atomic_write_bytes
from ._shards import (
    LAYOUT_METHODS,
    ShardedRunError,
    check_nproc,
    gather_to_rank0,
    launch,
    merge_method_runs,
    rank_and_world,
    save_result,
    shard_positions,
)
from .pipeline import (
    T3_CHUNK,
    T3_METHODS,
    RunPaths,
    ScorecardInputs,
    blackbox_labels,
    fusion_selection,
    get_student,
    get_teacher,
    load_profile,
    load_split,
    make_blackbox,
    save_scorecard_rows,
    save_table,
    scorecard_inputs,
    scorecard_scenes,
    scorecard_tables,
    stage,
    student_agreement,
    t3_limits,
    t3_method_params,
)
from .profiles import as_profile

__all__ = ["DEFAULT_TIMEOUT_S", "STAGES", "ShardedRunError", "ShardRows", "T3Inputs", "LayerRows", "T2Inputs",
           "check_nproc", "shard_positions", "ordered_rows", "gather_to_rank0", "explain_shard", "t3_shard",
           "merge_shards", "merge_method_runs", "evaluate_t3", "process_group", "prepare_t3", "t3_tables", "write_t3",
           "t2_shard", "merge_layer_shards", "evaluate_t2", "t2_images", "prepare_t2", "write_t2", "prepare_t4",
           "write_t4", "stage_names", "stage_images", "stage_outputs", "save_result", "run_worker", "launch", "main"]

#: Seconds a collective (a gather, a barrier) may wait for the other ranks before it fails.
DEFAULT_TIMEOUT_S = 1800.0


@dataclass
class ShardRows:
    """One rank's per-image T3 rows (notebook 04's columns) and what its explanations cost.

    Attributes:
        per_image: one row per (method, image): ``method, image, deletion_auc, insertion_auc, pointing, mass,
            agrees``, ``image`` the position in the whole evaluation batch.
        costs: ``method -> (seconds, black-box queries, images explained)``, summed over the rank's calls.
        runs, games: with ``keep``, the maps (``method -> MethodRun``) and the games (``method -> (deletion,
            insertion)`` :class:`~lwcam.scoring.games.GameResult`) of those images; else ``None``.
    """

    per_image: pd.DataFrame
    costs: dict[str, tuple[float, float, int]]
    runs: dict[str, Any] | None = None
    games: dict[str, Any] | None = None


def _explain_layout(name: str, images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
                    mine: torch.Tensor, limit: int, settings: Mapping[str, Any]) -> Any:
    """A :data:`LAYOUT_METHODS` method on the images ``mine``: the whole chunks of one process, cut to ``mine``."""
    from ..baselines import METHODS  # here: the baselines are imported only by a run that explains
    from ..scoring.evaluation import MethodRun

    method, maps, seconds = METHODS[name], [], 0.0
    for start in sorted({int(i) // T3_CHUNK * T3_CHUNK for i in mine}):
        stop = min(start + T3_CHUNK, limit)
        result = method(images[start:stop], targets[start:stop], masks=masks[start:stop], **settings)
        rows = mine[(mine >= start) & (mine < stop)] - start
        maps.append(result.saliency[rows])
        seconds += result.seconds * len(rows) / (stop - start)
    return MethodRun(name=name, label=method.label, access=method.access, indices=mine.clone(),
                     saliency=torch.cat(maps), seconds_per_image=seconds / len(mine), queries_per_image=0.0,
                     params=dict(settings))


def explain_shard(params: Mapping[str, Any], images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
                  positions: torch.Tensor, *, blackbox: Any, student: torch.nn.Module, teacher: torch.nn.Module,
                  chosen: Mapping[str, Any]) -> dict[str, Any]:
    """T3's explanations of the images at ``positions`` (of the whole batch ``images``), ``method -> MethodRun``.

    A method explains those of ``positions`` that it explains in one process (:func:`lwcam.study.pipeline.t3_limits`);
    a method with none of them is left out. Each run's ``indices`` are positions in the whole batch.
    """
    from ..scoring.evaluation import run_methods  # here: evaluation imports the baselines

    limits, settings = t3_limits(params, len(images)), t3_method_params(params, chosen)
    runs: dict[str, Any] = {}
    for name in T3_METHODS:
        mine = positions[positions < limits[name]]
        if mine.numel() == 0:
            continue
        if name in LAYOUT_METHODS:
            runs[name] = _explain_layout(name, images, targets, masks, mine, limits[name], settings.get(name, {}))
            continue
        run = run_methods(images[mine], targets[mine], masks[mine], methods=[name], blackbox=blackbox,
                          student=student, teacher=teacher, method_params=settings, chunk=T3_CHUNK)[name]
        run.indices = mine.clone()
        runs[name] = run
    return runs


def t3_shard(params: Mapping[str, Any], images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
             positions: torch.Tensor, *, blackbox: Any, scorer: Any, student: torch.nn.Module,
             teacher: torch.nn.Module, chosen: Mapping[str, Any], keep: bool = False) -> ShardRows:
    """The per-image T3 rows of the images at ``positions``: explained (:func:`explain_shard`), scored on
    ``scorer`` (the games' access), with ``agrees`` (does the student's class equal ``targets``); with ``keep``
    also the maps and the games."""
    from ..scoring.evaluation import score_methods  # here: evaluation imports the baselines

    p = as_profile(params)
    positions = torch.as_tensor(positions, dtype=torch.long)
    runs = explain_shard(p, images, targets, masks, positions, blackbox=blackbox, student=student,
                         teacher=teacher, chosen=chosen)
    per_image, games = score_methods(scorer, images, targets, masks, runs, step=p.game_step())
    agree = torch.zeros(len(images), dtype=torch.bool)
    agree[positions] = student_agreement(student, images[positions], targets[positions])
    per_image["agrees"] = agree[torch.from_numpy(per_image["image"].to_numpy(copy=True))].numpy()
    costs = {name: (r.seconds_per_image * len(r.indices), r.queries_per_image * len(r.indices), len(r.indices))
             for name, r in runs.items()}
    return ShardRows(per_image=per_image, costs=costs, runs=runs if keep else None, games=games if keep else None)


def ordered_rows(frames: Sequence[pd.DataFrame], by: str, order: Sequence[Any]) -> pd.DataFrame:
    """The ranks' per-image rows (``frames`` in rank order) in one process's order: the rows of each value of
    column ``by`` in ``order`` (values no frame holds are skipped), each value's ``image`` ascending.

    Raises ``ValueError`` when an image comes twice or out of order within a value (frames that are not the
    contiguous slices of :func:`shard_positions`, in rank order) or a frame holds a value outside ``order``.

    >>> a = pd.DataFrame({"m": ["x", "y"], "image": [0, 0]}); b = pd.DataFrame({"m": ["x", "y"], "image": [1, 1]})
    >>> ordered_rows([a, b], "m", ["x", "y"]).values.tolist()
    [['x', 0], ['x', 1], ['y', 0], ['y', 1]]
    """
    unknown = {v for f in frames for v in f[by].unique()} - set(order)
    if unknown:
        raise ValueError(f"the shards' rows hold {by} {sorted(map(str, unknown))} outside {list(order)}")
    parts = []
    for value in order:
        mine = [part for f in frames if not (part := f[f[by] == value]).empty]
        if not mine:
            continue
        rows = pd.concat(mine, ignore_index=True)
        if not rows["image"].is_monotonic_increasing or not rows["image"].is_unique:
            raise ValueError(f"the shards' rows of {value!r} repeat an image or are out of order; pass the "
                             f"ranks' rows in rank order")
        parts.append(rows)
    if not parts:
        raise ValueError("the shards hold no row")
    return pd.concat(parts, ignore_index=True)


def merge_shards(shards: Sequence[ShardRows]) -> ShardRows:
    """The ranks' rows (in rank order) as one process writes them: by method in T3 order, images ascending.

    Raises ``ValueError`` when an image comes twice or out of order (shards that are not the contiguous
    slices of :func:`shard_positions`, in rank order).
    """
    per_image = ordered_rows([s.per_image for s in shards], "method", T3_METHODS)
    costs = {}
    for name in T3_METHODS:
        spent = [s.costs[name] for s in shards if name in s.costs]
        if spent:
            seconds, queries, n = zip(*spent, strict=True)
            costs[name] = (float(sum(seconds)), float(sum(queries)), int(sum(n)))
    kept = [(s.runs, s.games) for s in shards if s.runs is not None and s.games is not None]
    if len(kept) < len(shards):
        return ShardRows(per_image=per_image, costs=costs)
    runs = {name: merge_method_runs([r[name] for r, _ in kept if name in r]) for name in costs}
    games = {name: tuple(_merge_game([g[name][i] for _, g in kept if name in g]) for i in (0, 1)) for name in costs}
    return ShardRows(per_image=per_image, costs=costs, runs=runs, games=games)


def _merge_game(parts: Sequence[Any]) -> Any:
    """One game's results of the ranks (in rank order) as one :class:`~lwcam.scoring.games.GameResult`."""
    counted = [g.blackbox_queries for g in parts]
    return replace(parts[0], curves=torch.cat([g.curves for g in parts]), auc=torch.cat([g.auc for g in parts]),
                   targets=torch.cat([g.targets for g in parts]), queries=sum(g.queries for g in parts),
                   blackbox_queries=None if None in counted else sum(counted))


def evaluate_t3(params: Mapping[str, Any], images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, *,
                blackbox: Any, scorer: Any, student: torch.nn.Module, teacher: torch.nn.Module,
                chosen: Mapping[str, Any], keep: bool = False) -> ShardRows | None:
    """T3's per-image rows of ``images``, sharded over the default process group (one process without one).

    Every rank passes the same arguments; each explains and scores its slice (:func:`shard_positions`).
    Rank 0 returns the merged rows of every image (:func:`merge_shards`), with ``keep`` also the maps and
    games; the other ranks return ``None``.
    """
    rank, world = rank_and_world()
    mine = t3_shard(params, images, targets, masks, shard_positions(len(images), rank, world), blackbox=blackbox,
                    scorer=scorer, student=student, teacher=teacher, chosen=chosen, keep=keep)
    gathered = gather_to_rank0(mine)
    return merge_shards(gathered) if gathered is not None else None


def _backend() -> str:
    """``nccl`` where every process of this node has a CUDA device of its own, else ``gloo``."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local else "gloo"


@contextmanager
def process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[tuple[int, int]]:
    """``(rank, world size)`` inside the default process group made from ``torchrun``'s environment.

    With ``WORLD_SIZE`` above 1 and no group yet, one is created (``nccl`` where each process of the node has
    a CUDA device of its own, else ``gloo``), each collective waiting at most ``timeout_s`` seconds, and
    destroyed on the way out, also after an error. Without ``WORLD_SIZE`` (or 1) the body runs as one
    process: ``(0, 1)``.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (dist.is_available() and dist.is_initialized()):
        backend = _backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        created = True
    try:
        yield rank_and_world()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class T3Inputs:
    """What notebook 04 explains and scores: the profile, its run folder, models, images and the chosen fusion."""

    params: Any
    paths: RunPaths
    teacher: torch.nn.Module
    student: torch.nn.Module
    blackbox: Any
    scorer: Any
    images: torch.Tensor
    targets: torch.Tensor
    masks: torch.Tensor
    chosen: dict[str, Any]


def prepare_t3(profile: str, root: str | os.PathLike | None = None) -> T3Inputs:
    """Notebook 04's inputs for ``profile``: the teacher and student (trained or distilled first if missing),
    the black box without answer cache, the first ``n_eval`` test images and the fusion selected on ``val``."""
    p = load_profile(profile, root)
    paths = RunPaths.for_profile(profile, root)
    teacher, _ = get_teacher(p, paths, progress=False)
    student, _ = get_student(p, paths, teacher, progress=False)
    blackbox = make_blackbox(teacher, p, paths, cache=False)
    scorer = make_blackbox(teacher, p, paths, cache=False, output="probs")
    test_x, _, test_m = load_split(p, "test", paths, n=max(p.n_eval, p.n_test or 0))
    images, masks = test_x[: p.n_eval], test_m[: p.n_eval]
    _, chosen = fusion_selection(p, paths, student, scorer, progress=False)
    return T3Inputs(params=p, paths=paths, teacher=teacher, student=student, blackbox=blackbox, scorer=scorer,
                    images=images, targets=blackbox_labels(blackbox, images), masks=masks, chosen=dict(chosen))


def t3_tables(rows: ShardRows, inputs: T3Inputs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """T3 (``T3_methods``) and its claims (``T3_claim``) from the merged rows, as notebook 04 makes them."""
    from ..baselines import METHODS
    from ..scoring.evaluation import MethodRun, method_resolution, summarize
    from .analysis import claim_table  # here: analysis imports the baselines

    settings = t3_method_params(inputs.params, inputs.chosen)
    runs = {}
    for name, (seconds, queries, n) in rows.costs.items():
        images = rows.per_image.loc[rows.per_image["method"] == name, "image"].to_numpy(copy=True)
        runs[name] = MethodRun(name=name, label=METHODS[name].label, access=METHODS[name].access,
                               indices=torch.as_tensor(images), saliency=torch.empty(0), seconds_per_image=seconds / n,
                               queries_per_image=queries / n, params=dict(settings.get(name, {})))
    seed = inputs.params.seed
    t3 = summarize(rows.per_image, runs, seed=seed)
    t3.insert(3, "resolution", [method_resolution(r, inputs.student, inputs.teacher, inputs.images.shape[-1])
                                for r in runs.values()])
    return t3, claim_table(rows.per_image, seed=seed)


def write_t3(rows: ShardRows, inputs: T3Inputs) -> list[Path]:
    """Write the per-image rows (``per_image_methods.csv`` in the run folder), ``T3_methods`` and ``T3_claim``.

    Every file is written atomically, and only from complete rows.
    """
    t3, claims = t3_tables(rows, inputs)
    per_image_path = inputs.paths.run / "per_image_methods.csv"
    atomic_write_bytes(rows.per_image.to_csv(index=False).encode(), per_image_path)
    return [per_image_path, *save_table(t3, "T3_methods", inputs.paths), *save_table(claims, "T3_claim", inputs.paths)]


# --------------------------------------------------------------------------- T2: the per-layer games
@dataclass
class LayerRows:
    """Per-image T2 rows (:func:`lwcam.scoring.evaluation.layer_rows`) of some images, with the layers' names and
    native resolutions (shallow to deep)."""

    per_image: pd.DataFrame
    names: list[str]
    resolutions: dict[str, tuple[int, int]]


def t2_shard(params: Mapping[str, Any], images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
             positions: torch.Tensor, *, scorer: Any, student: torch.nn.Module) -> LayerRows:
    """The per-image T2 rows of the images at ``positions``: the student's Grad-CAM per layer
    (:func:`lwcam.cam.batched.layer_maps_batched`), each layer and the fused maps scored on ``scorer``."""
    from ..cam.batched import layer_maps_batched
    from ..scoring.evaluation import layer_rows  # here: evaluation imports the baselines

    p = as_profile(params)
    positions = torch.as_tensor(positions, dtype=torch.long)
    x, t, m = images[positions], targets[positions], masks[positions]
    names, stack, resolutions = layer_maps_batched(student, x, t)
    rows = layer_rows(scorer, x, t, m, names, stack, step=p.game_step(), positions=positions)
    return LayerRows(per_image=rows, names=list(names), resolutions=dict(resolutions))


def merge_layer_shards(shards: Sequence[LayerRows]) -> LayerRows:
    """The ranks' T2 rows (in rank order) as one process writes them: layer by layer, shallow to deep, then the
    fused map, images ascending. ``ValueError`` when the ranks saw other layers."""
    from ..scoring.evaluation import FUSED_LAYER

    first = shards[0]
    for r, shard in enumerate(shards):
        if shard.names != first.names:
            raise ValueError(f"rank {r} explained layers {shard.names}, rank 0 {first.names}")
    per_image = ordered_rows([s.per_image for s in shards], "layer", [*first.names, FUSED_LAYER])
    return LayerRows(per_image=per_image, names=list(first.names), resolutions=dict(first.resolutions))


def evaluate_t2(params: Mapping[str, Any], images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, *,
                scorer: Any, student: torch.nn.Module) -> LayerRows | None:
    """T2's per-image rows of ``images``, sharded over the default process group (one process without one).

    Every rank passes the same arguments and scores its slice (:func:`shard_positions`); rank 0 returns
    the merged rows of every image (:func:`merge_layer_shards`), the other ranks ``None``.
    """
    rank, world = rank_and_world()
    mine = t2_shard(params, images, targets, masks, shard_positions(len(images), rank, world), scorer=scorer,
                    student=student)
    gathered = gather_to_rank0(mine)
    return merge_layer_shards(gathered) if gathered is not None else None


@dataclass
class T2Inputs:
    """What notebook 03 scores: the profile, its run folder, the student, the black box's probabilities and
    the first ``n_layer_eval`` test images with the black box's labels."""

    params: Any
    paths: RunPaths
    student: torch.nn.Module
    scorer: Any
    images: torch.Tensor
    targets: torch.Tensor
    masks: torch.Tensor


def t2_images(params: Mapping[str, Any]) -> int:
    """How many images T2 scores: ``n_layer_eval``, at most the profile's test images (as notebook 03 takes them)."""
    p = as_profile(params)
    n_test = p.split_size("test")
    return p.n_layer_eval if n_test is None else min(p.n_layer_eval, n_test)


def prepare_t2(profile: str, root: str | os.PathLike | None = None) -> T2Inputs:
    """Notebook 03's inputs for ``profile``: the student (the teacher trained and the student distilled first
    if missing), the black box's probabilities without answer cache and the first test images."""
    p = load_profile(profile, root)
    paths = RunPaths.for_profile(profile, root)
    teacher, _ = get_teacher(p, paths, progress=False)
    student, _ = get_student(p, paths, teacher, progress=False)
    scorer = make_blackbox(teacher, p, paths, cache=False, output="probs")
    test_x, _, test_m = load_split(p, "test", paths)
    n = min(t2_images(p), len(test_x))
    images, masks = test_x[:n], test_m[:n]
    return T2Inputs(params=p, paths=paths, student=student, scorer=scorer, images=images,
                    targets=blackbox_labels(scorer, images), masks=masks)


def write_t2(rows: LayerRows, inputs: T2Inputs) -> list[Path]:
    """Write the per-image rows (``per_image_layers.csv`` in the run folder) and ``T2_layers``, as notebook 03
    writes T2 (:func:`lwcam.scoring.evaluation.layer_table`); every file atomically, and only from complete rows."""
    from ..scoring.evaluation import layer_table

    t2 = layer_table(rows.per_image, resolutions=rows.resolutions, seed=inputs.params.seed)
    per_image_path = inputs.paths.run / "per_image_layers.csv"
    atomic_write_bytes(rows.per_image.to_csv(index=False).encode(), per_image_path)
    return [per_image_path, *save_table(t2, "T2_layers", inputs.paths)]


# --------------------------------------------------------------------------- T4: the scorecard
def prepare_t4(profile: str, root: str | os.PathLike | None = None) -> ScorecardInputs:
    """Notebook 05's inputs for ``profile`` (:func:`lwcam.study.pipeline.scorecard_inputs`), models made first if
    missing."""
    return scorecard_inputs(load_profile(profile, root), RunPaths.for_profile(profile, root), progress=False)


def _run_t4(profile: str, root: str | None, rank: int, world: int, result: Path | None = None) -> list[Path]:
    """One rank's share of T4 (:func:`lwcam.study.sharded_t4.run_scorecard_sharded`); rank 0 writes the rows and T4's
    tables (:func:`write_t4`), or with ``result`` only saves the :class:`~lwcam.study.scorecard.ScorecardResult` there
    (notebook 05 reads it)."""
    from .sharded_t4 import run_scorecard_sharded  # here: it imports the scorecard and the baselines

    inputs = _rank0_first(prepare_t4, profile, root, rank, world)
    check_nproc(world, len(inputs.scenes[0]), name="world size")
    label = f"T4 sharded over {world} processes: explanations and measures"
    with stage(label, inputs.paths if rank == 0 and result is None else None):
        out = run_scorecard_sharded(*inputs.scenes, **inputs.run_kwargs())
    if out is None:
        return []
    return save_result(out, result) if result is not None else write_t4(out, inputs)


def write_t4(result: Any, inputs: ScorecardInputs) -> list[Path]:
    """T4's rows (those notebook 06 reads, :func:`lwcam.study.pipeline.save_scorecard_rows`) and tables, each
    written atomically, as notebook 05 writes them."""
    paths = inputs.paths
    written = save_scorecard_rows(paths, result, inputs.fusions)
    for table_id, table in scorecard_tables(result, inputs.params).items():
        written += save_table(table, table_id, paths)
    return written


# --------------------------------------------------------------------------- stages and workers
#: The stages ``evaluate --stage`` shards, in the order ``all`` runs them.
STAGES = ("t2", "t3", "t4")


def stage_names(which: str) -> tuple[str, ...]:
    """The stages of ``--stage which``: one of :data:`STAGES`, or ``all`` for every one in order.

    >>> stage_names("all"), stage_names("t2")
    (('t2', 't3', 't4'), ('t2',))
    """
    if which == "all":
        return STAGES
    if which not in STAGES:
        raise ValueError(f"stage must be one of {(*STAGES, 'all')}, got {which!r}")
    return (which,)


def stage_images(params: Mapping[str, Any], which: str) -> tuple[int, str]:
    """How many images (or scenes) a stage shards, and the profile key that says so."""
    p = as_profile(params)
    counts = {"t2": (t2_images(p), "n_layer_eval"), "t3": (p.n_eval, "n_eval"),
              "t4": (scorecard_scenes(p), "n_conflict")}
    return counts[stage_names(which)[0]] if which != "all" else min(counts.values())


def stage_outputs(paths: RunPaths, which: str) -> list[Path]:
    """The files a stage writes: its per-image (per-scene) rows in the run folder and its tables (``.csv``, ``.md``)."""
    rows, tables = {"t2": (("per_image_layers.csv",), ("T2_layers",)),
                    "t3": (("per_image_methods.csv",), ("T3_methods", "T3_claim")),
                    "t4": (("per_scene_scorecard.csv", "per_object_scorecard.csv", "scorecard_fusions.json"),
                           ("T4_scorecard", "T4_randomisation", "T4_claims", "T4_separation"))}[which]
    return [*(paths.run / r for r in rows), *(paths.reports / f"{t}.{ext}" for t in tables for ext in ("csv", "md"))]


def _rank0_first(prepare: Any, profile: str, root: str | None, rank: int, world: int) -> Any:
    """``prepare(profile, root)`` on rank 0 first (it may train, distil or select and cache), then on the others."""
    inputs = prepare(profile, root) if rank == 0 else None
    if world > 1:
        dist.barrier()
    return inputs if inputs is not None else prepare(profile, root)


def _run_t2(profile: str, root: str | None, rank: int, world: int) -> list[Path]:
    """One rank's share of T2; rank 0 writes the rows and ``T2_layers``."""
    inputs = _rank0_first(prepare_t2, profile, root, rank, world)
    check_nproc(world, len(inputs.images), name="world size")
    with stage(f"T2 sharded over {world} processes: per-layer games", inputs.paths if rank == 0 else None):
        rows = evaluate_t2(inputs.params, inputs.images, inputs.targets, inputs.masks, scorer=inputs.scorer,
                           student=inputs.student)
    return write_t2(rows, inputs) if rows is not None else []


def _run_t3(profile: str, root: str | None, rank: int, world: int, result: Path | None = None) -> list[Path]:
    """One rank's share of T3; rank 0 writes the rows, ``T3_methods`` and ``T3_claim``, or with ``result`` only
    saves ``{"runs", "per_image", "games"}`` there (:func:`save_result`), what notebook 04 computes."""
    inputs = _rank0_first(prepare_t3, profile, root, rank, world)
    check_nproc(world, len(inputs.images), name="world size")
    label = f"T3 sharded over {world} processes: explanations and games"
    with stage(label, inputs.paths if rank == 0 and result is None else None):
        rows = evaluate_t3(inputs.params, inputs.images, inputs.targets, inputs.masks, blackbox=inputs.blackbox,
                           scorer=inputs.scorer, student=inputs.student, teacher=inputs.teacher,
                           chosen=inputs.chosen, keep=result is not None)
    if rows is None:
        return []
    if result is not None:
        return save_result({"runs": rows.runs, "per_image": rows.per_image, "games": rows.games}, result)
    return write_t3(rows, inputs)


def run_worker(profile: str, root: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
               which: str = "t3", result: str | os.PathLike | None = None) -> list[Path]:
    """One rank of a sharded run of ``profile``'s stage ``which`` (``t2``, ``t3``, ``t4`` or ``all``; alone: the
    whole run); rank 0 returns the files it wrote. Under ``all`` the stages run in :data:`STAGES` order in one
    group. With ``result`` (stage ``t3`` or ``t4`` only) rank 0 writes no table: it saves what the stage's
    notebook computes to that file (:func:`save_result`), for the notebook to read."""
    runners: dict[str, Callable[..., list[Path]]] = {"t2": _run_t2, "t3": _run_t3, "t4": _run_t4}
    if result is not None and which not in ("t3", "t4"):
        raise ValueError(f"result= is for stage t3 or t4, not {which!r}")
    with process_group(timeout_s) as (rank, world):
        if result is not None:
            return runners[which](profile, root, rank, world, Path(result))
        written: list[Path] = []
        for name in stage_names(which):
            written += runners[name](profile, root, rank, world)
        return written


def main(argv: list[str] | None = None) -> int:
    """One rank of ``python -m lwcam.study.sharded --profile NAME`` (under ``torchrun``, or alone as one process)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    parser = argparse.ArgumentParser(prog="python -m lwcam.study.sharded", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--root", default=None, help="the project root (default: found from here)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds a collective waits for the other ranks")
    parser.add_argument("--result", default=None,
                        help="stage t3 or t4: save what its notebook computes to this file, write no table")
    parser.add_argument("--stage", default="t3", choices=[*STAGES, "all"],
                        help="t2 (per-layer games), t3 (explanations and games), t4 (the scorecard) or all (in turn)")
    args = parser.parse_args(argv)
    written = record(run_worker)(args.profile, args.root, args.timeout, args.stage, args.result)
    for path in written or []:
        print(f"[lwcam] {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
