"""T4, the scorecard, sharded over the processes of a ``torch.distributed`` group (``--stage t4``).

:func:`lwcam.study.scorecard.run_scorecard` in two shardings, each chosen so that every value is the one a single
process computes:

* **by scene**: the explanations (both classes of every scene) and the localisation measures
  (:func:`lwcam.study.scorecard.score_objects`): each rank takes its contiguous slice of the scenes
  (:func:`lwcam.study.sharded.shard_positions`). A scene's maps and measures depend on that scene only; the one
  exception, the random map, drawn per chunk of scenes, is drawn by every rank for all the scenes it draws
  in one process (it costs nothing) and cut to the rank's scenes;
* **by method**: ROAD, the randomisation check and the robustness measures, taken on the first scenes
  only (``n_road``, ``n_randomisation``, ``n_robustness``). Their noise is drawn from the seed afresh for each
  method but scene after scene within one, so a method's values on those scenes are computed by one rank,
  after every rank has shared its maps of the first scenes (``all_gather_object``); the methods are shared
  by the cost of their maps (:func:`share_methods`: RISE, LIME and occlusion re-explain under noise and under
  randomised models, and would otherwise load one rank).

Rank 0 gathers every piece (``gather_object``), puts the rows in one process's order and finishes the result
(:func:`lwcam.study.scorecard.finish_scorecard`); it alone writes tables, and only once every rank has answered.
What may differ from one process is the rounding of a forward pass over a batch of another size (well below
1e-6).

The T4 stage of a profile (its inputs, the launch, the tables) is :mod:`lwcam.study.sharded`'s: ``python -m
lwcam.study evaluate --profile quick --stage t4 --nproc 2`` (``make evaluate STAGE=t4 NPROC=2``), or
``torchrun ... -m lwcam.study.sharded --stage t4`` on each node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from .._checks import check_positive_int
from ..scoring.evaluation import MethodRun
from . import scorecard as sc
from ._shards import (
    LAYOUT_METHODS,
    check_nproc,
    gather_to_rank0,
    merge_method_runs,
    rank_and_world,
    shard_positions,
)

__all__ = ["T4Shard", "share_methods", "explain_shard_t4", "run_scorecard_sharded"]


@dataclass
class T4Shard:
    """One rank's part of T4: the per-object rows and runs of its scenes, and the first-scene measures of its
    methods."""

    per_object: pd.DataFrame
    runs: dict[str, MethodRun]
    first: sc.FirstSceneMeasures


def explain_shard_t4(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor, *,
                     methods: Sequence[str], limits: Mapping[str, int], **kwargs: Any) -> dict[str, MethodRun]:
    """:func:`~lwcam.study.scorecard.explain_scenes` of the scenes at ``positions`` (of the whole batch), each run's
    ``indices`` positions in the whole batch; a method with none of its scenes here is left out. ``limits``:
    the scenes each method explains (:func:`~lwcam.study.scorecard.scene_limits`).

    ``kwargs`` go to :func:`~lwcam.study.scorecard.explain_scenes` (models, ``method_params``, ``progress``).
    """
    runs: dict[str, MethodRun] = {}
    for name in methods:
        mine = positions[positions < limits[name]]
        if mine.numel() == 0:
            continue
        if name in LAYOUT_METHODS:  # drawn for every scene it draws in one process, then cut
            whole = torch.arange(limits[name])
            run = sc.explain_scenes(images[whole], labels[whole], masks[whole], methods=[name], **kwargs)[name]
            runs[name] = replace(run, indices=mine.clone(), saliency=run.saliency[mine])
            continue
        run = sc.explain_scenes(images[mine], labels[mine], masks[mine], methods=[name], **kwargs)[name]
        runs[name] = replace(run, indices=mine.clone())
    return runs


def _first_scenes(runs: Mapping[str, MethodRun], methods: Sequence[str], k: int) -> dict[str, MethodRun]:
    """Every rank's maps of the first ``k`` scenes, method by method, on every rank (``all_gather_object``)."""
    mine = {name: replace(r, indices=r.indices[r.indices < k], saliency=r.saliency[r.indices < k])
            for name, r in runs.items() if bool((r.indices < k).any())}
    _, world = rank_and_world()
    pieces: list[Any] = [mine] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(pieces, mine)
    return _merge_runs(pieces, [m for m in methods if any(m in p for p in pieces)])


def share_methods(costs: Mapping[str, float], world: int) -> list[list[str]]:
    """The methods of the first-scene measures shared among ``world`` ranks by cost: each method in turn, the
    costliest first (ties in the given order), goes to the rank with the least cost so far (ties: the lowest rank).

    Every rank computes the same shares from the same costs; which rank measures a method changes no value.

    >>> share_methods({"rise": 5.0, "lime": 3.0, "gradcam": 0.1, "cam": 0.1}, 2)
    [['rise'], ['lime', 'gradcam', 'cam']]
    """
    order = sorted(costs, key=lambda m: -costs[m])  # stable: ties keep the given order
    shares: list[list[str]] = [[] for _ in range(world)]
    load = [0.0] * world
    for name in order:
        r = min(range(world), key=lambda i: (load[i], i))
        shares[r].append(name)
        load[r] += costs[name]
    return shares


def _merge_runs(parts: Sequence[Mapping[str, MethodRun]], methods: Sequence[str]) -> dict[str, MethodRun]:
    """The ranks' runs (in rank order) as one per method (:func:`lwcam.study._shards.merge_method_runs`)."""
    return {name: merge_method_runs([p[name] for p in parts if name in p]) for name in methods}


def _in_order(frames: Sequence[pd.DataFrame | None], methods: Sequence[str], then: Sequence[str] = ()
              ) -> pd.DataFrame | None:
    """The ranks' rows as one frame, method by method in ``methods`` order, then by ``then`` (a stable sort:
    rows that tie keep the order they came in); ``None`` where no rank has any."""
    present = [f for f in frames if f is not None]
    if not present:
        return None
    rows = pd.concat(present, ignore_index=True)
    order = {m: i for i, m in enumerate(methods)}
    return (rows.assign(_m=rows["method"].map(order)).sort_values(["_m", *then], kind="stable").drop(columns="_m")
            .reset_index(drop=True))


def _merge(shards: Sequence[T4Shard], methods: Sequence[str]) -> sc.ScorecardResult:
    """Rank 0's result from every rank's :class:`T4Shard`, with the rows in one process's order."""
    per_object = _in_order([s.per_object for s in shards], methods, then=("object", "image"))
    first = sc.FirstSceneMeasures(road={k: v for s in shards for k, v in s.first.road.items()},
                                  randomisation=_in_order([s.first.randomisation for s in shards], methods),
                                  robust=_in_order([s.first.robust for s in shards], methods))
    return sc.finish_scorecard(cast(pd.DataFrame, per_object), _merge_runs([s.runs for s in shards], methods), first)


def run_scorecard_sharded(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, *,
                          methods: Sequence[str], blackbox: Any, student: nn.Module, teacher: nn.Module | None = None,
                          second_student: nn.Module | None = None, scorer: Any = None,
                          n_expensive: int | None = None, n_road: int = 5, n_randomisation: int = 2,
                          randomisation_steps: int = 3, n_robustness: int = 2, robustness_samples: int = 3,
                          second_seed: int = 1, method_params: Mapping[str, Mapping[str, Any]] | None = None,
                          wrap: Callable[[nn.Module], Any] | None = None,
                          road_percentages: Sequence[float] = sc.SCORECARD_ROAD_PERCENTAGES, step: int | None = None,
                          seed: int = 0) -> sc.ScorecardResult | None:
    """:func:`~lwcam.study.scorecard.run_scorecard` over the default process group (one process without one).

    Every rank passes the same arguments; rank 0 returns the result of every scene, the others ``None``.
    """
    for name, value in (("n_road", n_road), ("n_randomisation", n_randomisation), ("n_robustness", n_robustness)):
        check_positive_int(value, name, minimum=0)
    rank, world = rank_and_world()
    n, methods = len(images), list(methods)
    check_nproc(world, n, name="world size")
    scorer = blackbox if scorer is None else scorer
    method_params = method_params or {}
    limits = sc.scene_limits(methods, n, n_expensive)
    models = {"blackbox": blackbox, "student": student, "teacher": teacher}
    runs = explain_shard_t4(images, labels, masks, shard_positions(n, rank, world), methods=methods, limits=limits,
                            method_params=method_params, progress=False, **models)
    per_object = sc.score_objects(scorer, images, labels, masks, runs, step=step, progress=False)
    first = _first_scenes(runs, methods, min(max(n_road, n_randomisation, n_robustness), min(limits.values())))
    shares = share_methods({name: run.seconds_per_image for name, run in first.items()}, world)
    measures = sc.first_scene_measures(
        images, labels, masks, {name: first[name] for name in shares[rank]}, scorer=scorer,
        second_student=second_student, n_road=n_road, n_randomisation=n_randomisation,
        randomisation_steps=randomisation_steps, n_robustness=n_robustness, robustness_samples=robustness_samples,
        second_seed=second_seed, method_params=method_params, wrap=wrap, road_percentages=road_percentages, seed=seed,
        progress=False, **models)
    gathered = gather_to_rank0(T4Shard(per_object=per_object, runs=runs, first=measures))
    return _merge(gathered, methods) if gathered is not None else None
