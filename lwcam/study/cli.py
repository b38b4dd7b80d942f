"""The study's command line: ``python -m lwcam.study run`` (a profile's notebooks) and ``evaluate`` (a stage sharded).

::

    python -m lwcam.study run --profile default      # every notebook, every figure and table (make reproduce)
    python -m lwcam.study run --profile quick --only 01_distill
    python -m lwcam.study run --profile default --nproc 2   # T3 and T4 sharded over 2 processes
    python -m lwcam.study evaluate --profile quick --nproc 2   # T3's rows and tables, over 2 processes
    python -m lwcam.study evaluate --profile quick --nproc 2 --stage t2   # T2's; t4: T4's; all: each in turn

It sits above :mod:`lwcam.study.pipeline` and :mod:`lwcam.study.sharded`, so neither imports the other's
launcher: ``evaluate`` prepares a stage with the pipeline's artefacts, then starts the sharded processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import sharded
from ._shards import ShardedRunError, check_nproc, launch
from .pipeline import load_profile, project_root, run

__all__ = ["evaluate", "main"]


def evaluate(profile: str = "default", nproc: int = 1, root: str | os.PathLike | None = None,
             timeout_s: float = 1800.0, stage: str = "t3") -> list[Path]:
    """A stage's per-image rows and tables for ``profile``, sharded over ``nproc`` processes on this machine
    (:mod:`lwcam.study.sharded`); returns the files written.

    ``stage``: ``t3`` (the default) T3's explanations and games, ``per_image_methods.csv``, ``T3_methods`` and
    ``T3_claim``, the rows notebook 04 makes; ``t2`` T2's per-layer games, ``per_image_layers.csv`` and
    ``T2_layers``, those of notebook 03; ``t4`` the scorecard's rows (those notebook 06 reads) and ``T4_scorecard``,
    ``T4_randomisation``, ``T4_claims``, ``T4_separation``, those of notebook 05
    (:mod:`lwcam.study.sharded_t4`); ``all``
    each, in that order, in one launch. The notebooks also draw the figures. The teacher, the students and the
    fusions selected on ``val`` are made (or read from the run folder) here first, then the processes start;
    ``timeout_s`` bounds each collective. A failed process raises :class:`lwcam.study.sharded.ShardedRunError`.
    """
    base = project_root(root)
    names = sharded.stage_names(stage)
    params = load_profile(profile, base)
    for name in names:
        check_nproc(nproc, sharded.stage_images(params, name)[0])
    if nproc == 1:
        return sharded.run_worker(profile, str(base), timeout_s, stage)
    prepare: dict[str, Any] = {"t2": sharded.prepare_t2, "t3": sharded.prepare_t3, "t4": sharded.prepare_t4}
    outputs = [path for name in names for path in sharded.stage_outputs(prepare[name](profile, base).paths, name)]
    launch(["-m", "lwcam.study.sharded", "--profile", profile, "--root", str(base), "--timeout", str(timeout_s),
                    "--stage", stage], nproc)
    return outputs


def _check_evaluate_nproc(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` naming ``--nproc`` when it is not a process count every stage of ``--stage`` can shard."""
    params = load_profile(args.profile)
    for name in sharded.stage_names(args.stage):
        n_images, key = sharded.stage_images(params, name)
        try:
            check_nproc(args.nproc, n_images)
        except (TypeError, ValueError) as err:
            parser.error(f"argument --nproc: {err} (profile {args.profile}, stage {name}: {key}={n_images} images)")


def _evaluate_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``evaluate``: the arguments checked (an error names ``--nproc``), then :func:`evaluate`."""
    _check_evaluate_nproc(parser, args)
    t0 = time.perf_counter()
    try:
        written = evaluate(args.profile, args.nproc, timeout_s=args.timeout, stage=args.stage)
    except ShardedRunError as err:
        print(f"[lwcam] evaluate failed: {err}", file=sys.stderr, flush=True)
        return 1
    for path in written if args.nproc == 1 else []:  # rank 0 names them itself
        print(f"[lwcam] {path}", flush=True)
    what = {"t2": "T2", "t3": "T3", "t4": "T4", "all": "T2, T3 and T4"}[args.stage]
    print(f"[lwcam] profile {args.profile}: {what} over {args.nproc} processes in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lwcam.study", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="execute the notebooks for a profile")
    p_run.add_argument("--profile", default="default")
    p_run.add_argument("--only", nargs="*", default=None, help="notebook names, e.g. 01_distill")
    p_run.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    p_run.add_argument("--nproc", type=int, default=1,
                       help="processes on this machine over which notebooks 04 and 05 shard T3 and T4 (default 1)")
    p_eval = sub.add_parser("evaluate", help="T2's or T3's rows and tables, sharded over processes")
    p_eval.add_argument("--profile", default="default")
    p_eval.add_argument("--stage", default="t3", choices=["t2", "t3", "t4", "all"],
                        help="t2: per-layer games (T2); t3: explanations and games (T3, the default); t4: the "
                             "scorecard (T4); all: each in turn")
    p_eval.add_argument("--nproc", type=int, default=1,
                        help="processes on this machine (at most the stage's images: n_layer_eval, n_eval, n_conflict)")
    p_eval.add_argument("--timeout", type=float, default=1800.0, help="seconds a process waits for the others")
    args = parser.parse_args(argv)
    if args.cmd == "evaluate":
        return _evaluate_command(parser, args)
    try:
        check_nproc(args.nproc, name="--nproc")
    except ValueError as err:
        parser.error(f"argument --nproc: {err}")
    t0 = time.perf_counter()
    run(args.profile, args.only, log_output=args.log_output, nproc=args.nproc)
    print(f"[lwcam] profile {args.profile}: all done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
