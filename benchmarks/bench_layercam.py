"""Cost of layer-wise Grad-CAM: all layers in one pass against one pass per layer.

On the same batch, side by side (round-robin over repeats, median reported):

(a) ``all layers``: one :class:`lwcam.LayerwiseGradCAM` call for all L auto layers;
(b) ``per layer``: L separate single-layer calls;
(c) ``input gradient``: one plain forward plus ``autograd.grad`` of the summed target logits
    with respect to the input, the cost floor of any gradient explanation.

Goals (reported, not asserted): a/c ≤ 1.2 and b/a ≥ L/1.5.

Usage:
    python benchmarks/bench_layercam.py --model regnet_x_s8 shufflenet_v2_x1_0 --batch 64 --size 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import add_common_args, machine, write_report  # noqa: E402
from lwcam._utils import seed_everything  # noqa: E402
from lwcam.cam.layerwise import LayerwiseGradCAM, auto_layers  # noqa: E402
from lwcam.models import build_model  # noqa: E402


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_model(arch: str, batch: int, size: int, repeats: int, warmup: int, seed: int) -> dict[str, object]:
    gen = seed_everything(seed)
    model = build_model(arch, 10).eval()
    images = torch.randn(batch, 3, size, size, generator=gen)
    targets = torch.randint(0, 10, (batch,), generator=gen)
    names = auto_layers(model, size)
    n_layers = len(names)

    all_cam = LayerwiseGradCAM(model, names, verbose=False)
    single_cams = [LayerwiseGradCAM(model, [n], verbose=False) for n in names]

    def run_all() -> None:
        all_cam(images, targets)

    def run_each() -> None:
        for cam in single_cams:
            cam(images, targets)

    def run_input_grad() -> None:
        x = images.detach().requires_grad_(True)
        logits = model(x)
        torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x)

    methods = {"a: all layers, one call": run_all, "b: one call per layer": run_each,
               "c: input gradient": run_input_grad}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    for _ in range(repeats):
        for key, fn in methods.items():  # interleaved, so load drifts hit all methods alike
            times[key].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    a, b, c = med.values()
    a_min, b_min, c_min = (min(v) for v in times.values())
    return {
        "model": arch, "layers": n_layers, "layer_names": " ".join(names), "batch": batch, "size": size,
        "repeats": repeats, "threads": torch.get_num_threads(),
        "a_all_layers_s": a, "b_per_layer_s": b, "c_input_grad_s": c,
        "a_min_s": a_min, "b_min_s": b_min, "c_min_s": c_min,
        "a_over_c": a / c, "b_over_a": b / a, "goal_a_over_c": 1.2, "goal_b_over_a": n_layers / 1.5,
        "a_over_c_met": a / c <= 1.2, "b_over_a_met": b / a >= n_layers / 1.5,
        "a_ms_per_image": 1000 * a / batch,
    }


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=["regnet_x_s8", "shufflenet_v2_x1_0"],
                   help="lwcam.models.build_model name(s), weights=None, 10 classes (default: the default and "
                        "stride32 students)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="reports/bench_layercam.csv", help="CSV path; the Markdown table goes beside it")
    args = add_common_args(p).parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()

    rows = [bench_model(m, args.batch, args.size, args.repeats, args.warmup, args.seed) for m in args.model]
    df = pd.DataFrame(rows)
    notes = (f"torchvision {torchvision.__version__}, batch {args.batch}, {args.size}x{args.size} px, "
             f"seed {args.seed}, "
             f"median of {args.repeats} (after {args.warmup} warm-up rounds).\n\n"
             "a = all L auto layers in one `LayerwiseGradCAM` call (one forward, one backward); "
             "b = L single-layer calls; c = one forward + input-gradient backward. Goals: a/c ≤ 1.2, b/a ≥ L/1.5.\n\n"
             "Layers: " + "; ".join(f"{r['model']}: {r['layer_names']}" for r in rows) + "\n\n"
             "Timings on a shared machine vary with its load; `a_min_s`, `b_min_s` and `c_min_s` in the CSV "
             "give the fastest repeat of each.")
    write_report(df, args.out, title="Layer-wise Grad-CAM cost", notes=notes, info=info, floatfmt=".3f",
                 columns=["model", "layers", "a_all_layers_s", "b_per_layer_s", "c_input_grad_s", "a_over_c",
                          "goal_a_over_c", "b_over_a", "goal_b_over_a"])
    return df


if __name__ == "__main__":
    main(sys.argv[1:])
