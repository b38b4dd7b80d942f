"""Deletion and insertion games at the forward-pass limit, and against torchcam.

Side by side in one run, on one model (``lwcam.models.build_model``, ``weights=None``, 10 classes; by
default the default profile's black box ``mobilenet_v2_s8``), the same images,
saliency maps and targets (the model's own labels), and the same model batch size:

* ``raw``: the model's own batched inference under ``torch.inference_mode()``, on as many images, in
  batches of the same sizes as one game, with inputs contiguous (``nchw``) and ``channels_last`` (the
  faster of the two is eager PyTorch's forward-pass bound), and the model on ONNX Runtime
  (:func:`lwcam.fast.accelerate`, the profiles' ``fast_forward``), the accelerated bound.
* ``lwcam``: :func:`lwcam.deletion_game` and :func:`lwcam.insertion_game`, scored through a
  :class:`lwcam.BlackBox` (no cache) of the eager module; ``lwcam (onnxruntime)`` the same games through
  a BlackBox of the accelerated model, as the pipeline scores them (``protocol`` config).
* ``torchcam``: torchcam's ``DeletionInsertionMetric`` on the first ``--peer-images`` images (fed our
  saliency by ``benchmarks/torchcam_adapter.py``). It computes both curves per ``update`` with one
  canvas shared by both games, so the ``protocol`` config (deletion onto zeros, insertion from a blur
  (11, 5)) needs two updates, and ``shared-zeros`` (both games on zeros, torchcam's default) one.

Every measurement is cut into ``--rounds`` rounds run in turn, so load drift on a shared machine
touches every side alike. Throughput is model images / seconds, summed over the rounds.

* ``ratio_to_raw_bound`` = throughput / the raw bound of the same engine (goal: at least 0.8 for the games);
* ``x_eager`` = eager lwcam's seconds per explained image / the accelerated lwcam's (same games);
* ``x_torchcam`` = torchcam seconds per explained image / lwcam seconds per explained image, both
  games, same config (torchcam timed on its subset, lwcam on every image).

Usage:
    python benchmarks/bench_games.py --model mobilenet_v2_s8 --n-images 48 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import add_common_args, machine, write_report  # noqa: E402
from benchmarks.torchcam_adapter import torchcam_games  # noqa: E402
from lwcam import BlackBox  # noqa: E402
from lwcam._utils import seed_everything  # noqa: E402
from lwcam.fast import FastForward, accelerate  # noqa: E402
from lwcam.models import build_model  # noqa: E402
from lwcam.scoring.games import deletion_game, gaussian_blur, insertion_game  # noqa: E402

# config -> (deletion substrate, insertion start, torchcam baselines: curve -> baseline)
CONFIGS = {
    "protocol": ("zeros", "blur", {"deletion_auc": None, "insertion_auc": partial(gaussian_blur, kernel_size=11,
                                                                                  sigma=5.0)}),
    "shared-zeros": ("zeros", "zeros", {"deletion_auc": None, "insertion_auc": None}),
}


class Counter(nn.Module):
    """Passes images through ``model`` and counts them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.model(x)


def build(args: argparse.Namespace) -> tuple[Counter, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model, random images, smooth random saliency maps and the model's labels."""
    g = seed_everything(args.seed)
    net = build_model(args.model, 10).eval()
    images = torch.randn(args.n_images, 3, args.size, args.size, generator=g)
    coarse = torch.rand(args.n_images, 1, max(args.size // 8, 1), max(args.size // 8, 1), generator=g)
    saliency = nn.functional.interpolate(coarse, size=(args.size, args.size), mode="bilinear",
                                         align_corners=False)[:, 0]
    with torch.inference_mode():
        targets = torch.cat([net(images[i : i + args.batch_size]).argmax(1)
                             for i in range(0, args.n_images, args.batch_size)])
    return Counter(net).eval(), images, saliency, targets


def time_raw(model: nn.Module, pool: torch.Tensor, total: int, batch_size: int) -> tuple[float, int]:
    """Seconds for ``total`` images in batches of ``batch_size`` (the last one shorter), as a game sends them."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, total, batch_size):
            model(pool[: min(batch_size, total - lo)])
    return time.perf_counter() - t0, total


def time_game(game, bb: BlackBox, images, saliency, targets, canvas: str, batch_size: int
              ) -> tuple[float, int, torch.Tensor]:
    key = "substrate" if game is deletion_game else "start"
    before = bb.queries
    t0 = time.perf_counter()
    res = game(bb, images, saliency, targets, batch_size=batch_size, progress=False, **{key: canvas})
    return time.perf_counter() - t0, bb.queries - before, res.auc


def time_torchcam(model: Counter, images, saliency, targets, baselines: dict, steps: int, batch_size: int
                  ) -> tuple[float, int, dict[str, float]]:
    """One ``update`` per distinct baseline; keeps the curve each baseline is there for."""
    calls: dict[int, tuple[object, list[str]]] = {}
    for key, base in baselines.items():
        calls.setdefault(id(base), (base, []))[1].append(key)
    before, out = model.images, {}
    t0 = time.perf_counter()
    for base, keys in calls.values():
        summary = torchcam_games(model, images, saliency, targets, steps=steps, baseline=base,
                                 batch_size=batch_size)
        out.update({k: summary[k] for k in keys})
    return time.perf_counter() - t0, model.images - before, out


def run_rounds(args, model: Counter, fast: FastForward, images, saliency, targets) -> dict:
    """Accumulate seconds, model images, explained images and AUC gaps per (config, side, what)."""
    acc: dict = defaultdict(lambda: {"seconds": 0.0, "model_images": 0, "images": 0, "auc_gap": 0.0})
    bb = BlackBox(model, num_classes=10, batch_size=args.batch_size)
    bb_fast = BlackBox(fast, num_classes=10, fn_returns="logits", batch_size=args.batch_size)
    n_points = args.size + 1  # default step = W on square images: H steps
    pool = images[torch.arange(args.batch_size) % images.shape[0]].contiguous()
    pools = {"nchw": pool, "channels_last": pool.contiguous(memory_format=torch.channels_last)}
    per, peer_per = -(-args.n_images // args.rounds), -(-args.peer_images // args.rounds)
    for r in range(args.rounds):
        sl, psl = slice(r * per, (r + 1) * per), slice(r * per, r * per + peer_per)
        x, s, t = images[sl], saliency[sl], targets[sl]
        if x.shape[0] == 0:
            break
        for fmt, p in pools.items():
            sec, n = time_raw(model, p, x.shape[0] * n_points, args.batch_size)
            _add(acc[("all", "raw", f"forward, {fmt}")], sec, n, 0)
        sec, n = time_raw(fast, pool, x.shape[0] * n_points, args.batch_size)
        _add(acc[("all", "raw", f"forward, {fast.engine}")], sec, n, 0)
        substrate, start, _ = CONFIGS["protocol"]
        for game, canvas, key in ((deletion_game, substrate, "deletion"), (insertion_game, start, "insertion")):
            sec, n, _ = time_game(game, bb_fast, x, s, t, canvas, args.batch_size)
            _add(acc[("protocol", f"lwcam ({fast.engine})", f"{key} ({canvas})")], sec, n, x.shape[0])
        for cfg, (substrate, start, baselines) in CONFIGS.items():
            aucs = {}
            for game, canvas, key in ((deletion_game, substrate, "deletion_auc"),
                                      (insertion_game, start, "insertion_auc")):
                sec, n, auc = time_game(game, bb, x, s, t, canvas, args.batch_size)
                _add(acc[(cfg, "lwcam", f"{key.split('_')[0]} ({canvas})")], sec, n, x.shape[0])
                aucs[key] = auc[: peer_per].mean().item()
            if images[psl].shape[0]:
                sec, n, peer = time_torchcam(model, images[psl], saliency[psl], targets[psl], baselines,
                                             args.size, args.batch_size)
                row = acc[(cfg, "torchcam", "deletion + insertion")]
                _add(row, sec, n, images[psl].shape[0])
                row["auc_gap"] = max(row["auc_gap"], *(abs(aucs[k] - peer[k]) for k in aucs))
    return acc


def _add(row: dict, seconds: float, model_images: int, images: int) -> None:
    row["seconds"] += seconds
    row["model_images"] += model_images
    row["images"] += images


def table(acc: dict, args: argparse.Namespace, fast_engine: str) -> pd.DataFrame:
    lwcam_sides = {side for (_, side, _) in acc if side.startswith("lwcam")}
    for cfg in CONFIGS:  # lwcam's two games together, the unit torchcam is compared on
        for lw in sorted(lwcam_sides):
            if not any(c == cfg and side == lw for (c, side, _) in acc):
                continue
            both = acc[(cfg, lw, "deletion + insertion")]
            for (c, side, _), row in list(acc.items()):
                if c == cfg and side == lw and row is not both:
                    _add(both, row["seconds"], row["model_images"], 0)
                    both["images"] = row["images"]
    df = pd.DataFrame([{"config": c, "side": side, "what": what, **row} for (c, side, what), row in acc.items()])
    df["model_images_per_s"] = df.model_images / df.seconds
    df.insert(3, "engine", [fast_engine if fast_engine in f"{side} {what}" else "eager"
                            for side, what in zip(df.side, df.what, strict=True)])
    bounds = df[df.side == "raw"].groupby("engine").model_images_per_s.max()
    df["ratio_to_raw_bound"] = df.model_images_per_s / df.engine.map(bounds)
    df["seconds_per_image"] = (df.seconds / df.images).where(df.images > 0)
    eager = df[df.side == "lwcam"].set_index(["config", "what"]).seconds_per_image
    df["x_eager"] = [eager.get((c, w)) / v if side.startswith("lwcam (") else float("nan")
                     for c, side, w, v in zip(df.config, df.side, df.what, df.seconds_per_image, strict=True)]
    per_image = df.set_index(["config", "side", "what"]).seconds_per_image
    df["x_torchcam"] = [per_image.get((c, "torchcam", "deletion + insertion")) / v
                        if side == "lwcam" and w == "deletion + insertion" else float("nan")
                        for c, side, w, v in zip(df.config, df.side, df.what, df.seconds_per_image, strict=True)]
    df["auc_gap"] = df.auc_gap.where(df.side == "torchcam")
    df.insert(0, "model", args.model)
    order = {"raw": 0, "lwcam": 1, "torchcam": 3}
    return df.sort_values(["config", "side"], key=lambda col: col.map(lambda v: order.get(v, 2))
                          if col.name == "side" else col,
                          kind="stable").reset_index(drop=True)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mobilenet_v2_s8",
                    help="a lwcam.models.build_model name (weights=None, 10 classes); default: the default black box")
    ap.add_argument("--n-images", type=int, default=48)
    ap.add_argument("--peer-images", type=int, default=12, help="images torchcam is timed on (a subset)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256, help="model batch size, every side")
    ap.add_argument("--rounds", type=int, default=12, help="interleaved rounds (more: finer against load drift)")
    ap.add_argument("--out", default="reports/bench_games.csv")
    args = add_common_args(ap).parse_args(argv)
    torch.set_num_threads(args.threads)
    args.peer_images = min(max(args.peer_images, 1), args.n_images)
    info = machine()
    model, images, saliency, targets = build(args)
    fast = accelerate(model.model, (3, args.size, args.size))
    run_rounds(args, model, fast, images[:2], saliency[:2], targets[:2])  # warm-up, not reported
    t0 = time.perf_counter()
    df = table(run_rounds(args, model, fast, images, saliency, targets), args, fast.engine)
    notes = (
        f"{args.model} (weights=None, 10 classes), {args.n_images} images of {args.size}x{args.size}, "
        f"{args.size} steps of {args.size} pixels, model batch size {args.batch_size}, {args.rounds} interleaved "
        f"rounds, seed {args.seed}; {time.perf_counter() - t0:.0f} s measured. torchcam: the first "
        f"{args.peer_images} images. Accelerated model: {fast.engine}, set up once in {fast.setup_seconds:.2f} s "
        "(not in the table). `ratio_to_raw_bound`: model images per second / the fastest raw forward of the same "
        "engine (goal for the games: at least 0.8). `x_eager`: eager lwcam's seconds per explained image / the "
        "accelerated lwcam's, same games. `x_torchcam`: torchcam seconds per explained image / lwcam's, "
        "both games. `auc_gap`: largest |mean AUC difference| between torchcam and lwcam on the same images. "
        f"Load average at the start {info['load_1min']}, at the end {machine()['load_1min']}: a shared machine "
        "adds noise, which the rounds spread over every side alike."
    )
    write_report(df, args.out, title="Deletion and insertion games: throughput against the forward-pass bound "
                 "and against torchcam", notes=notes, info=info,
                 columns=["config", "side", "what", "engine", "images", "model_images", "seconds",
                          "model_images_per_s", "ratio_to_raw_bound", "seconds_per_image", "x_eager", "x_torchcam",
                          "auc_gap"])
    return df


if __name__ == "__main__":
    main()
