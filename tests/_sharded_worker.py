"""A tiny T2 and T3 evaluation for the tests, and a script that runs it sharded (see lwcam.sharded).

The task: ``--num-images`` 32×32 noise images with a box mask each, an untrained ``mobilenet_v2_s8``
black box and an untrained ``regnet_x_s8`` student (random weights from fixed seeds, BatchNorm made
non-trivial), every T3 method at small settings (16 RISE masks, 12 LIME samples, 8 game steps).

Run as a script under ``torchrun`` (or alone, as one process), it writes rank 0's merged rows to
``--out``/``rows.csv`` and their costs to ``costs.json`` (``--stage t3``, the default), or T2's per-layer
rows to ``rows.csv`` and the layers' names to ``layers.json`` (``--stage t2``). ``--die-rank R --die-after K``
makes rank R exit with code 17 at its K-th black-box forward pass (mid-run). ``--launch N`` starts the script in N
processes with :func:`lwcam.sharded.launch` instead, and exits with 3 (the error on stderr) when a rank fails.
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


def make_task(n: int = 6) -> dict[str, Any]:
    """Profile, models, black boxes, images, targets, masks and the chosen fusion: a pure function of ``n``."""
    from lwcam.blackbox import BlackBox
    from lwcam.models import build_model
    from lwcam.pipeline import blackbox_labels
    from lwcam.profiles import Profile

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
    blackbox = BlackBox(teacher, num_classes=CLASSES, output="probs", batch_size=64)
    scorer = BlackBox(teacher, num_classes=CLASSES, output="probs", batch_size=64)
    return {"params": params, "images": images, "targets": blackbox_labels(blackbox, images), "masks": masks,
            "blackbox": blackbox, "scorer": scorer, "student": student, "teacher": teacher, "chosen": dict(CHOSEN)}


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
    from lwcam.sharded import evaluate_t2, evaluate_t3, process_group

    torch.set_num_threads(1)
    with process_group(timeout_s=args.timeout) as (rank, _world):
        task = make_task(args.num_images)
        if rank == args.die_rank:
            _die_at(task["teacher"], args.die_after)
        inputs = [task.pop(k) for k in ("params", "images", "targets", "masks")]
        if args.stage == "t2":
            rows: Any = evaluate_t2(*inputs, scorer=task["scorer"], student=task["student"])
        else:
            rows = evaluate_t3(*inputs, **task)
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
    ap.add_argument("--stage", choices=["t2", "t3"], default="t3")
    ap.add_argument("--launch", type=int, default=0, help="start the script in this many processes")
    args = ap.parse_args(argv)
    if not args.launch:
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(work)(args)  # a rank's error reaches the launcher
    from lwcam.sharded import ShardedRunError, launch

    forward = ["--out", args.out, "--num-images", str(args.num_images), "--die-rank", str(args.die_rank),
               "--die-after", str(args.die_after), "--timeout", str(args.timeout), "--stage", args.stage]
    try:
        launch([str(Path(__file__).resolve()), *forward], args.launch)
    except ShardedRunError as err:
        print(f"sharded run failed: {err}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
