"""A tiny T2, T3 and T4 evaluation for the tests, and a script that runs it sharded (see lwcam.study.sharded).

The task: ``--num-images`` 32×32 noise images with a box mask each, an untrained ``mobilenet_v2_s8``
black box and an untrained ``regnet_x_s8`` student (random weights from fixed seeds, BatchNorm made
non-trivial), every T3 method at small settings (16 RISE masks, 12 LIME samples, 8 game steps).

Run as a script under ``torchrun`` (or alone, as one process), it writes rank 0's merged rows to
``--out``/``rows.csv`` and their costs to ``costs.json`` (``--stage t3``, the default), or T2's per-layer
rows to ``rows.csv`` and the layers' names to ``layers.json`` (``--stage t2``), or T4's per-scene, per-object
and randomisation rows and the runs' costs (``--stage t4``: :func:`make_scorecard_task`'s 32×64 scenes).
``--die-rank R --die-after K`` makes rank R exit with code 17 at its K-th black-box forward pass (mid-run).
``--launch N`` starts the script in N processes with :func:`lwcam.study.sharded.launch` instead, and exits with 3
(the error on stderr) when a rank fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _models import randomise_bn  # noqa: E402

SIZE, CLASSES = 32, 4
CHOSEN = {"weighting": "gradcam", "mode": "max", "normalize": "minmax"}


def make_task(n: int = 6, cache_dir: str | None = None) -> dict[str, Any]:
    """Profile, models, black boxes, images, targets, masks and the chosen fusion: a pure function of ``n``.

    With ``cache_dir`` both black boxes keep their answers there (one SQLite file every process shares)."""
    from lwcam.blackbox import BlackBox
    from lwcam.models import build_model
    from lwcam.study.pipeline import blackbox_labels
    from lwcam.study.profiles import Profile

    params = Profile.from_dict({"image_size": SIZE, "num_classes": CLASSES, "seed": 0, "n_eval": n,
                                "n_eval_blackbox": min(3, n), "n_eval_mp": min(2, n), "rise_masks": 16,
                                "lime_samples": 12, "game_steps": 8, "fast_forward": False}, source="test task")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    student = build_model("regnet_x_s8", CLASSES).eval()
    teacher = build_model("mobilenet_v2_s8", CLASSES).eval()
    randomise_bn(student, g)
    randomise_bn(teacher, g)
    images = torch.randn(n, 3, SIZE, SIZE, generator=g)
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    for i in range(n):
        r, c = torch.randint(0, SIZE - 12, (2,), generator=g).tolist()
        masks[i, r : r + 12, c : c + 12] = True
    blackbox = BlackBox(teacher, num_classes=CLASSES, output="probs", batch_size=64, cache_dir=cache_dir)
    scorer = BlackBox(teacher, num_classes=CLASSES, output="probs", batch_size=64, cache_dir=cache_dir)
    return {"params": params, "images": images, "targets": blackbox_labels(blackbox, images), "masks": masks,
            "blackbox": blackbox, "scorer": scorer, "student": student, "teacher": teacher, "chosen": dict(CHOSEN)}


def make_scorecard_task(n: int = 6) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """Conflict scenes ``(images, labels, masks)`` of 32×64 px (two disjoint 12-px boxes of two classes each) and
    :func:`lwcam.study.scorecard.run_scorecard`'s keyword arguments: every T4 method at small settings, the first 3
    scenes for the costly methods, ROAD on 3, randomisation (2 steps) and robustness on 2. A pure function of ``n``.
    """
    from lwcam.models import build_model
    from lwcam.study import scorecard

    task = make_task(n)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    second = build_model("regnet_x_s8", CLASSES).eval()
    randomise_bn(second, g)
    images = torch.randn(n, 3, SIZE, 2 * SIZE, generator=g)
    labels = torch.stack([torch.randperm(CLASSES, generator=g)[:2] for _ in range(n)])
    masks = torch.zeros(n, 2, SIZE, 2 * SIZE, dtype=torch.bool)
    for i in range(n):
        for j in (0, 1):
            r, c = torch.randint(0, SIZE - 12, (2,), generator=g).tolist()
            masks[i, j, r : r + 12, j * SIZE + c : j * SIZE + c + 12] = True
    kwargs = dict(methods=scorecard.SCORECARD_METHODS, blackbox=task["blackbox"], scorer=task["scorer"],
                  student=task["student"], teacher=task["teacher"], second_student=second, n_expensive=3, n_road=3,
                  n_randomisation=2, randomisation_steps=2, n_robustness=2, robustness_samples=2, seed=0,
                  method_params=scorecard.scene_method_params(SIZE, 2 * SIZE, rise_masks=16, lime_samples=12,
                                                              fusions={"lwcam_selected": CHOSEN,
                                                                       "lwcam_conflict": CHOSEN}))
    return (images, labels, masks), kwargs


def write_scorecard(result: Any, out: Path) -> None:
    """A :class:`lwcam.study.scorecard.ScorecardResult`'s rows (``per_scene.csv``, ``per_object.csv``,
    ``randomisation.csv``) and its runs' costs (``costs.json``: images explained, queries per scene) under ``out``."""
    from lwcam._utils import atomic_write_bytes

    for name in ("per_scene", "per_object", "randomisation"):
        frame = getattr(result, name)
        atomic_write_bytes(frame.to_csv(index=False, float_format="%.17g").encode(), out / f"{name}.csv")
    costs = {k: [len(r.indices), r.queries_per_image] for k, r in result.runs.items()}
    atomic_write_bytes(json.dumps(costs).encode(), out / "costs.json")


def _count_images(teacher: torch.nn.Module) -> list[int]:
    """A one-item list that counts the images ``teacher`` is run on from now on (answers the cache gave are not)."""
    seen = [0]

    def hook(_module: Any, args: Any) -> None:
        seen[0] += int(args[0].shape[0])

    teacher.register_forward_pre_hook(hook)
    return seen


def _die_at(teacher: torch.nn.Module, calls: int) -> None:
    """Exit the process (code 17, no clean-up) at the ``calls``-th forward pass of ``teacher``."""
    count = [0]

    def hook(_module: Any, _args: Any) -> None:
        count[0] += 1
        if count[0] >= calls:
            os._exit(17)

    teacher.register_forward_pre_hook(hook)


def work(args: argparse.Namespace) -> int:
    from lwcam._utils import atomic_write_bytes
    from lwcam.study.sharded import evaluate_t2, evaluate_t3, process_group
    from lwcam.study.sharded_t4 import run_scorecard_sharded

    torch.set_num_threads(1)
    with process_group(timeout_s=args.timeout) as (rank, _world):
        if args.stage == "t4":
            scenes, kwargs = make_scorecard_task(args.num_images)
            if rank == args.die_rank:
                _die_at(kwargs["teacher"], args.die_after)
            result = run_scorecard_sharded(*scenes, **kwargs)
            if result is not None:
                write_scorecard(result, Path(args.out))
            return 0
        task = make_task(args.num_images, args.cache)
        seen = _count_images(task["teacher"])
        if rank == args.die_rank:
            _die_at(task["teacher"], args.die_after)
        inputs = [task.pop(k) for k in ("params", "images", "targets", "masks")]
        if args.stage == "t2":
            rows: Any = evaluate_t2(*inputs, scorer=task["scorer"], student=task["student"])
        else:
            rows = evaluate_t3(*inputs, **task)
        atomic_write_bytes(json.dumps(seen[0]).encode(), Path(args.out) / f"forwards{rank}.json")
    if rows is not None:
        out = Path(args.out)
        atomic_write_bytes(rows.per_image.to_csv(index=False, float_format="%.17g").encode(), out / "rows.csv")
        extra = ({"layers.json": rows.names} if args.stage == "t2"
                 else {"costs.json": {k: list(v) for k, v in rows.costs.items()}})
        for name, value in extra.items():
            atomic_write_bytes(json.dumps(value).encode(), out / name)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-images", type=int, default=6)
    ap.add_argument("--die-rank", type=int, default=-1)
    ap.add_argument("--die-after", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--cache", default=None, help="the black boxes' answer cache folder (default: none)")
    ap.add_argument("--stage", choices=["t2", "t3", "t4"], default="t3")
    ap.add_argument("--launch", type=int, default=0, help="start the script in this many processes")
    args = ap.parse_args(argv)
    if not args.launch:
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(work)(args)  # a rank's error reaches the launcher
    from lwcam.study.sharded import ShardedRunError, launch

    forward = ["--out", args.out, "--num-images", str(args.num_images), "--die-rank", str(args.die_rank),
               "--die-after", str(args.die_after), "--timeout", str(args.timeout), "--stage", args.stage,
               *(["--cache", args.cache] if args.cache else [])]
    try:
        launch([str(Path(__file__).resolve()), *forward], args.launch)
    except ShardedRunError as err:
        print(f"sharded run failed: {err}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
