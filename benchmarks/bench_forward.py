"""Forward-pass engines for the default networks, against the machine's GEMM rate, and what they buy end to end.

Side by side in one run, on the default black box (``mobilenet_v2_s8``) and the default student
(``regnet_x_s8``), both ``lwcam.models.build_model(name, 10)`` with ``weights=None`` and their last
layer scaled so that the logits' standard deviation is ``--sharpen`` (a random-init network's
probabilities are nearly uniform, which would hide any difference between engines; the scaling
changes no cost):

* ``forward``: inference at batch 1, 64 and 256 on ``--size`` px images, per path: ``eager``
  (contiguous inputs), ``eager channels_last``, the engines of :func:`lwcam.fast.accelerate`
  (``onnxruntime``, ``torchscript``: frozen TorchScript) and ``torch.compile`` (default mode, at the
  batch sizes of ``--compile-batches`` only: each new batch size compiles again);
* ``train step``: one distillation-style training step (forward, KL loss against soft targets,
  backward, AdamW step) at batch 64, eager with contiguous and with ``channels_last`` inputs;
* ``deletion game`` and ``RISE``: :func:`lwcam.deletion_game` and :func:`lwcam.baselines.rise` on the
  black box, through a :class:`lwcam.BlackBox` of the module (the games feed it ``channels_last``)
  and of its :func:`~lwcam.fast.accelerate` forward pass;
* ``gemm``: a 2048×2048 float32 matrix product, the machine's dense-arithmetic rate, measured in the
  same run.

Every measurement is cut into ``--rounds`` rounds run in turn, so that load drift on a shared machine
touches every path alike. Columns: ``images_per_s`` (model images per second), ``gflop_per_s``
(FLOPs counted once per image with ``torch.utils.flop_counter.FlopCounterMode``: 2 per
multiply-add, forward only for inference, forward + backward for a training step),
``ratio_to_gemm`` (GFLOP/s over the GEMM rate), ``x_eager_cl`` (speed over ``eager
channels_last`` at the same model and batch, or over the module's BlackBox for the games and RISE),
``setup_s`` (export, engine start and equality check; for ``torch.compile`` the first call at that
batch size) and ``max_abs_prob_diff`` (largest softmax-probability difference to eager on the
batch measured; for a train step, on the first step's outputs; for the games and RISE, over
the deletion curves and the RISE maps, both in probability units).

Usage:
    python benchmarks/bench_forward.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import add_common_args, machine, write_report  # noqa: E402
from lwcam import BlackBox  # noqa: E402
from lwcam.baselines import rise  # noqa: E402
from lwcam.fast import accelerate  # noqa: E402
from lwcam.models import build_model  # noqa: E402
from lwcam.scoring.games import deletion_game  # noqa: E402

MODELS = {"black box": "mobilenet_v2_s8", "student": "regnet_x_s8"}
CL = torch.channels_last
Forward = Callable[[torch.Tensor], torch.Tensor]


def build(name: str, sharpen: float, seed: int, size: int) -> nn.Module:
    """``build_model(name, 10)`` (seeded), its last layer scaled so that the logits' standard deviation over
    64 standard-normal images is ``sharpen`` (0: left as built)."""
    torch.manual_seed(seed)
    net = build_model(name, 10).eval()
    if sharpen > 0:
        last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            spread = float(net(torch.randn(64, 3, size, size)).std())
            last.weight.mul_(sharpen / spread)
            last.bias.mul_(sharpen / spread)
    return net


def gemm_gflops(reps: int = 5) -> float:
    """Best-of-``reps`` GFLOP/s of a 2048² float32 matrix product."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best / 1e9


def flops_per_image(model: nn.Module, x: torch.Tensor, train: bool = False) -> float:
    """FLOPs per image of one forward (and, with ``train``, backward) pass on the batch ``x``."""
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def forward_paths(model: nn.Module, shape: tuple[int, int, int], args: argparse.Namespace
                  ) -> dict[str, tuple[Forward, bool, float]]:
    """Path name -> (forward, wants channels_last input, set-up seconds)."""
    def eager(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    paths: dict[str, tuple[Forward, bool, float]] = {"eager": (eager, False, 0.0),
                                                     "eager channels_last": (eager, True, 0.0)}
    for engine in ("onnxruntime", "torchscript"):
        fast = accelerate(model, shape, engine=engine)
        paths[engine] = (fast, engine == "torchscript", fast.setup_seconds)
    if args.compile_batches:
        compiled = torch.compile(copy.deepcopy(model))

        def run_compiled(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return compiled(x)

        paths["torch.compile"] = (run_compiled, True, 0.0)
    return paths


def timed(fn: Callable[[], object], seconds: float) -> tuple[float, int]:
    """Call ``fn`` until ``seconds`` have passed (at least once); return the time taken and the calls."""
    calls, t0 = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    return time.perf_counter() - t0, calls


def bench_forward(args: argparse.Namespace, acc: dict, info: dict) -> None:
    shape = (3, args.size, args.size)
    probe = torch.randn(64, *shape, generator=torch.Generator().manual_seed(args.seed))
    for role, name in MODELS.items():
        model = build(name, args.sharpen, args.seed, args.size)
        info[(role, "flops")] = flops_per_image(model, probe[:1])
        paths = forward_paths(model, shape, args)
        for batch in args.batches:
            pool = probe[torch.arange(batch) % 64].contiguous()
            with torch.inference_mode():
                reference = torch.softmax(model(pool), 1)
            for path, (fn, cl, setup) in paths.items():
                if path == "torch.compile" and batch not in args.compile_batches:
                    continue
                x = pool.contiguous(memory_format=CL) if cl else pool
                row = acc[("forward", role, name, batch, path)]
                t0 = time.perf_counter()
                out = fn(x)  # also the warm-up (torch.compile: it compiles for this batch size)
                row["setup_s"] = setup or (time.perf_counter() - t0 if path == "torch.compile" else 0.0)
                row["max_abs_prob_diff"] = float((torch.softmax(out.float(), 1) - reference).abs().max())
                row["flops"] = info[(role, "flops")]
        info[(role, "paths")] = paths
    for _ in range(args.rounds):
        for role, name in MODELS.items():
            for batch in args.batches:
                pool = probe[torch.arange(batch) % 64].contiguous()
                for path, (fn, cl, _) in info[(role, "paths")].items():
                    key = ("forward", role, name, batch, path)
                    if key not in acc:
                        continue
                    x = pool.contiguous(memory_format=CL) if cl else pool
                    sec, calls = timed(lambda fn=fn, x=x: fn(x), args.seconds)
                    acc[key]["seconds"] += sec
                    acc[key]["images"] += calls * batch


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    out = model(x)
    loss = F.kl_div(F.log_softmax(out / 4.0, 1), soft, reduction="batchmean") * 16.0
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return out.detach()


def bench_train(args: argparse.Namespace, acc: dict) -> None:
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(64, 3, args.size, args.size, generator=g)
    soft = torch.softmax(torch.randn(64, 10, generator=g), 1)
    setups = {}
    for role, name in MODELS.items():
        base = build(name, 0.0, args.seed, args.size).train()
        flops = flops_per_image(copy.deepcopy(base), x, train=True)
        firsts = {}
        for path, cl in (("eager", False), ("eager channels_last", True)):
            model = copy.deepcopy(base).to(memory_format=CL) if cl else copy.deepcopy(base)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            xin = x.contiguous(memory_format=CL) if cl else x
            torch.manual_seed(args.seed)  # the same dropout draws on both paths
            firsts[path] = torch.softmax(train_step(model, opt, xin, soft), 1)
            setups[(role, path)] = (model, opt, xin)
            row = acc[("train step", role, name, 64, path)]
            row["flops"] = flops
            row["max_abs_prob_diff"] = float((firsts[path] - firsts["eager"]).abs().max())
    for _ in range(args.rounds):
        for (role, path), (model, opt, xin) in setups.items():
            sec, calls = timed(lambda m=model, o=opt, xi=xin: train_step(m, o, xi, soft), args.seconds)
            row = acc[("train step", role, MODELS[role], 64, path)]
            row["seconds"] += sec
            row["images"] += calls * 64


def bench_end_to_end(args: argparse.Namespace, acc: dict, info: dict) -> None:
    """The deletion game and RISE on the black box: the module's BlackBox against the accelerated one's."""
    g = torch.Generator().manual_seed(args.seed + 1)
    name = MODELS["black box"]
    model = build(name, args.sharpen, args.seed, args.size)
    fast = accelerate(model, (3, args.size, args.size))
    n = args.game_images
    images = torch.randn(n, 3, args.size, args.size, generator=g)
    coarse = torch.rand(n, 1, args.size // 8, args.size // 8, generator=g)
    saliency = F.interpolate(coarse, size=(args.size, args.size), mode="bilinear", align_corners=False)[:, 0]
    boxes = {"eager channels_last": BlackBox(model, 10, batch_size=256),
             f"accelerated ({fast.engine})": BlackBox(fast, 10, fn_returns="logits", batch_size=256)}
    with torch.inference_mode():
        targets = model(images).argmax(1)
    outputs: dict = defaultdict(dict)
    for r in range(args.rounds):
        for path, bb in boxes.items():
            sl = slice(r * n // args.rounds, (r + 1) * n // args.rounds)
            jobs = {"deletion game": lambda bb=bb, sl=sl: deletion_game(bb, images[sl], saliency[sl], targets[sl],
                                                                          progress=False).curves,
                    "RISE": lambda bb=bb, sl=sl: rise(bb, images[sl][:1], targets[sl][:1], n_masks=args.rise_masks,
                                                      seed=args.seed, progress=False)}
            for what, job in jobs.items():
                before, t0 = bb.queries, time.perf_counter()
                outputs[(what, path)][r] = job()
                row = acc[(what, "black box", name, 256, path)]
                row["seconds"] += time.perf_counter() - t0
                row["images"] += bb.queries - before
                row["flops"] = info[("black box", "flops")]
                row["setup_s"] = fast.setup_seconds if path != "eager channels_last" else 0.0
    for (what, path), per_round in outputs.items():
        ref = outputs[(what, "eager channels_last")]
        acc[(what, "black box", name, 256, path)]["max_abs_prob_diff"] = max(
            float((per_round[r] - ref[r]).abs().max()) for r in per_round)


def table(acc: dict, gemm: float) -> pd.DataFrame:
    df = pd.DataFrame([{"what": w, "role": role, "model": m, "batch": b, "path": p, **row}
                       for (w, role, m, b, p), row in acc.items()])
    df["images_per_s"] = df.images / df.seconds
    df["gflop_per_s"] = df.images_per_s * df.flops / 1e9
    df["ratio_to_gemm"] = df.gflop_per_s / gemm
    base = {(w, m, b): v for w, m, b, p, v in zip(df.what, df.model, df.batch, df.path, df.images_per_s,
                                                   strict=True) if p == "eager channels_last"}
    df["x_eager_cl"] = [v / base[(w, m, b)] for w, m, b, v in zip(df.what, df.model, df.batch, df.images_per_s,
                                                                    strict=True)]
    gemm_row = {"what": "gemm", "role": "", "model": "2048x2048 float32 matmul", "batch": 0, "path": "torch",
                "gflop_per_s": gemm, "ratio_to_gemm": 1.0}
    return pd.concat([df, pd.DataFrame([gemm_row])], ignore_index=True)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--compile-batches", type=int, nargs="*", default=[256],
                    help="batch sizes torch.compile is measured at (each compiles anew); none: leave it out")
    ap.add_argument("--sharpen", type=float, default=4.0,
                    help="standard deviation of the logits the last layer is scaled to (0: as built)")
    ap.add_argument("--seconds", type=float, default=0.4, help="seconds per path per round")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (more: finer against load drift)")
    ap.add_argument("--game-images", type=int, default=32, help="images of the deletion game, over all rounds")
    ap.add_argument("--rise-masks", type=int, default=1000, help="RISE masks on one image per round")
    ap.add_argument("--out", default="reports/bench_forward.csv")
    ap.add_argument("--notes", default="", help="a sentence added to the Markdown page")
    args = add_common_args(ap).parse_args(argv)
    torch.set_num_threads(args.threads)
    info_run = machine()
    t0 = time.perf_counter()
    acc: dict = defaultdict(lambda: {"seconds": 0.0, "images": 0, "flops": float("nan"), "setup_s": 0.0,
                                     "max_abs_prob_diff": 0.0})
    info: dict = {}
    gemm = gemm_gflops()
    bench_forward(args, acc, info)
    bench_train(args, acc)
    bench_end_to_end(args, acc, info)
    gemm = max(gemm, gemm_gflops())  # before and after: the better of the two
    df = table(acc, gemm)
    notes = (f"Models: build_model(name, 10), weights=None, last layer scaled to logits of standard deviation "
             f"{args.sharpen:g}; {args.size}x{args.size} "
             f"images; {args.rounds} interleaved rounds of {args.seconds:g} s per path; deletion game on "
             f"{args.game_images} images (H steps), RISE with {args.rise_masks} masks on {args.rounds} images; "
             f"seed {args.seed}; {time.perf_counter() - t0:.0f} s in all. x_eager_cl: speed over eager "
             f"channels_last (for the games and RISE, over the module's BlackBox). {args.notes}")
    cols = ["what", "role", "model", "batch", "path", "images_per_s", "gflop_per_s", "ratio_to_gemm", "x_eager_cl",
            "setup_s", "max_abs_prob_diff"]
    write_report(df, args.out, title="Forward-pass engines: speed, GEMM ratio and equality", notes=notes,
                 columns=cols, floatfmt=".3g", info=info_run)
    return df


if __name__ == "__main__":
    main()
