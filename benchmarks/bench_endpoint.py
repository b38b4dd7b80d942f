"""A black box behind an inference server against the same model in process: images per second.

One model (``lwcam.models.build_model``, ``weights=None``; by default the default profile's black box
``mobilenet_v2_s8`` with 10 classes at 64 px) is queried two ways, on the same images:

* ``in process``: a :class:`lwcam.BlackBox` around the module (no cache);
* ``server``: ``lwcam serve --checkpoint`` (MLServer, in a subprocess on a free loopback port, with
  as many torch threads) queried by :meth:`lwcam.BlackBox.from_endpoint` (no cache, no rate limit):
  JSON over HTTP, metadata checks, answer validation.

At each batch size (one request or call per batch) the two sides run in turn for ``--rounds``
rounds, so load drift on a shared machine touches both alike; throughput is images / seconds summed
over the rounds, after one warm-up batch per side. ``ratio`` = server / in process; ``overhead_ms``
= the extra milliseconds per request. ``max_abs_diff`` is the largest difference in probability
between the two sides' answers.

Usage:
    python benchmarks/bench_endpoint.py --model mobilenet_v2_s8 --image-size 64 --threads 1

One torch thread a side by default: with two on a busy 2-core machine, a batch of one image can take
a hundred times longer than with one (the threads wait on each other), which would measure the
machine, not the server.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import add_common_args, machine, write_report  # noqa: E402
from lwcam import BlackBox  # noqa: E402
from lwcam._utils import seed_everything  # noqa: E402
from lwcam.models import build_model, save_checkpoint  # noqa: E402
from lwcam.study.serve import ServerProcess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v2_s8", help="a lwcam.models name")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--images", type=int, default=256, help="images per side and round at batch sizes >= 16; "
                        "batch size 1 uses a quarter of them")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "reports" / "bench_endpoint.csv"))
    args = add_common_args(parser, threads=1).parse_args(argv)  # one thread a side: robust on a shared machine
    for name in ("classes", "image_size", "images", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batch_sizes) < 1:
        parser.error("--batch-sizes must be >= 1")
    return args


def _time(bb: BlackBox, images: torch.Tensor) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = bb(images)
    return time.perf_counter() - t0, out  # type: ignore[return-value]


def _measure(local: BlackBox, remote: BlackBox, images: torch.Tensor, batch: int, rounds: int) -> dict[str, object]:
    n = len(images)
    for bb in (local, remote):  # warm-up: one batch each
        bb.batch_size = batch
        bb(images[:batch] + 1.0)
    seconds = {"in process": 0.0, "server": 0.0}
    diff = 0.0
    for _ in range(rounds):
        t_local, a = _time(local, images)
        t_remote, b = _time(remote, images)
        seconds["in process"] += t_local
        seconds["server"] += t_remote
        diff = max(diff, float((a - b).abs().max()))  # type: ignore[operator]
    requests = rounds * -(-n // batch)
    ips = {k: rounds * n / v for k, v in seconds.items()}
    return {"batch_size": batch, "images": rounds * n, "requests": requests,
            "in_process_img_s": ips["in process"], "server_img_s": ips["server"],
            "ratio": ips["server"] / ips["in process"],
            "overhead_ms": 1000 * (seconds["server"] - seconds["in process"]) / requests, "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    info = machine()
    model = build_model(args.model, args.classes).eval()
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(max(args.images, *args.batch_sizes), 3, args.image_size, args.image_size, generator=g)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(model, Path(tmp) / "model.pt", arch=args.model, num_classes=args.classes)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        server = ServerProcess(["--checkpoint", str(ckpt), "--image-size", str(args.image_size), "--threads",
                                str(args.threads), "--name", "bench"], env=env, log=Path(tmp) / "server.log")
        t0 = time.perf_counter()
        with server:
            startup = time.perf_counter() - t0
            local = BlackBox(model, args.classes)
            remote = BlackBox.from_endpoint(server.url, "bench", args.classes, image_size=args.image_size,
                                            max_batch_size=max(args.batch_sizes), timeout=600.0)
            for batch in args.batch_sizes:
                n = max(batch, args.images // 4 if batch == 1 else args.images)
                rows.append(_measure(local, remote, images[:n], batch, args.rounds))
                print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df.insert(0, "model", f"{args.model} ({args.classes} classes, {args.image_size} px)")
    notes = (f"Server: `lwcam serve --checkpoint` (MLServer 1.7, REST/JSON) on 127.0.0.1, {args.threads} torch "
             f"threads, ready {startup:.1f} s after its start (Python, torch and MLServer imports, model load). "
             f"Client: `BlackBox.from_endpoint` (httpx; images sent as exact decimals of their float32 values). "
             f"Both sides share the machine; {args.rounds} rounds, interleaved. `ratio` = server / in process.")
    write_report(df, args.out, title="A black box behind an inference server: images per second against in process",
                 notes=notes, info=info)
    return df


if __name__ == "__main__":
    main()
