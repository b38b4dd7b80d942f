"""Time lwcam's deletion and insertion games against torchcam's ``DeletionInsertionMetric``.

Both run in one process on the same model, images, saliency maps, targets, step schedule
(H steps of W pixels) and model batch size. Two configurations are timed:

* ``protocol``: lwcam's protocol, deletion onto zeros plus insertion from a Gaussian blur (11, 5).
  torchcam shares one baseline between its two games, so it needs two ``update`` calls (baseline
  zeros for deletion, baseline blur for insertion), each computing both curves.
* ``shared-zeros``: torchcam's own setting, deletion onto zeros and insertion from zeros, which it
  gets from a single ``update``; lwcam runs its two games with ``substrate="zeros"`` and
  ``start="zeros"``.

torchcam is timed on the first ``--peer-images`` images and its time scaled linearly to
``--n-images`` (its cost is linear in the number of images: a fixed number of forward passes per
image). The table states which numbers are measured and which scaled. The model is wrapped in a
counter, so the table also reports how many images each side sent through the model.

Usage:
    python benchmarks/bench_games.py --n-images 500 --size 64 --model resnet18
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pandas as pd
import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lwcam._utils import seed_everything  # noqa: E402
from lwcam.metrics import deletion_game, gaussian_blur, insertion_game  # noqa: E402


class CountingModel(nn.Module):
    """Passes images through ``model`` and counts them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.model(x)


class FixedSaliency:
    """A torchcam CAM-extractor stand-in that returns precomputed saliency maps."""

    def __init__(self, model: nn.Module, saliency: torch.Tensor) -> None:
        self.model = model
        self.saliency = saliency

    def __call__(self, class_idx=None, scores=None, normalized=True, *, targets=None, **kwargs):
        return [self.saliency]

    def fuse_cams(self, cams: list[torch.Tensor]) -> torch.Tensor:
        return cams[0]

    @contextmanager
    def _hooks_off(self):
        yield


def build(args: argparse.Namespace) -> tuple[CountingModel, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = seed_everything(args.seed)
    if args.model == "linear":  # a near-free model: isolates each side's own overhead
        net = nn.Sequential(nn.Flatten(), nn.Linear(3 * args.size * args.size, 10)).eval()
    else:
        net = getattr(torchvision.models, args.model)(weights=None, num_classes=10).eval()
    model = CountingModel(net).eval()
    images = torch.randn(args.n_images, 3, args.size, args.size, generator=g)
    coarse = torch.rand(args.n_images, 1, max(args.size // 8, 1), max(args.size // 8, 1), generator=g)
    saliency = nn.functional.interpolate(coarse, size=(args.size, args.size), mode="bilinear",
                                         align_corners=False)[:, 0]
    with torch.inference_mode():
        targets = torch.cat([net(images[i : i + args.batch_size]).argmax(1)
                             for i in range(0, args.n_images, args.batch_size)])
    return model, images, saliency, targets


def time_ours(model: CountingModel, images, saliency, targets, *, insertion_start: str, batch_size: int
              ) -> dict[str, float]:
    model.images = 0
    t0 = time.perf_counter()
    d = deletion_game(model, images, saliency, targets, substrate="zeros", batch_size=batch_size, progress=False)
    i = insertion_game(model, images, saliency, targets, start=insertion_start, batch_size=batch_size,
                       progress=False)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "forwards": model.images, "del_auc": d.auc.mean().item(),
            "ins_auc": i.auc.mean().item(), "queries": d.queries + i.queries}


def time_peer(model: CountingModel, images, saliency, targets, *, steps: int, baselines: dict, batch_size: int
              ) -> dict[str, float]:
    """``baselines`` maps the curve to keep ("deletion_auc"/"insertion_auc") to the baseline for it;
    one ``update`` per distinct baseline."""
    from torchcam.metrics import DeletionInsertionMetric

    model.images = 0
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    calls: dict[int, tuple[object, list[str]]] = {}
    for key, base in baselines.items():
        calls.setdefault(id(base), (base, []))[1].append(key)
    for base, keys in calls.values():
        metric = DeletionInsertionMetric(FixedSaliency(model, saliency), partial(torch.softmax, dim=-1),
                                         steps=steps, baseline=base, batch_size=batch_size)
        metric.update(images, class_idx=targets.tolist())
        summary = metric.summary()
        for key in keys:
            out[key] = summary[key]
    out["seconds"] = time.perf_counter() - t0
    out["forwards"] = model.images
    return out


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-images", type=int, default=500)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--model", default="resnet18",
                    help="a torchvision classification model name, or 'linear' (one linear layer) to measure "
                         "the games' own overhead")
    ap.add_argument("--peer-images", type=int, default=50,
                    help="time torchcam on this many of the images and scale to --n-images")
    ap.add_argument("--batch-size", type=int, default=256, help="model batch size, both implementations")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default="protocol,shared-zeros")
    ap.add_argument("--out", default="reports/bench_games.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_peer = min(args.peer_images, args.n_images)

    model, images, saliency, targets = build(args)
    with torch.inference_mode():  # warm-up: first-call allocations are not charged to either side
        model(images[: args.batch_size])
    sub = slice(0, n_peer)
    blur = partial(gaussian_blur, kernel_size=11, sigma=5.0)
    configs = {
        "protocol": ("blur", {"deletion_auc": None, "insertion_auc": blur}),
        "shared-zeros": ("zeros", {"deletion_auc": None, "insertion_auc": None}),
    }
    rows = []
    for name in args.configs.split(","):
        start, baselines = configs[name]
        print(f"[{name}] lwcam on {args.n_images} images ...", flush=True)
        ours = time_ours(model, images, saliency, targets, insertion_start=start, batch_size=args.batch_size)
        ours_sub = time_ours(model, images[sub], saliency[sub], targets[sub], insertion_start=start,
                             batch_size=args.batch_size) if n_peer < args.n_images else ours
        print(f"[{name}] torchcam on {n_peer} images ...", flush=True)
        peer = time_peer(model, images[sub], saliency[sub], targets[sub], steps=args.size, baselines=baselines,
                         batch_size=args.batch_size)
        scale = args.n_images / n_peer
        peer_scaled = peer["seconds"] * scale
        rows.append({
            "config": name,
            "model": args.model,
            "size": args.size,
            "steps": args.size,
            "images": args.n_images,
            "lwcam_s": round(ours["seconds"], 2),
            "torchcam_images_timed": n_peer,
            "torchcam_s_measured": round(peer["seconds"], 2),
            "torchcam_s": round(peer_scaled, 2),
            "torchcam_s_is": "measured" if n_peer == args.n_images else f"scaled x{scale:g} from {n_peer} images",
            "ratio": round(peer_scaled / ours["seconds"], 2),
            "ratio_same_subset": round(peer["seconds"] / ours_sub["seconds"], 2),
            "lwcam_model_images": ours["forwards"],
            "torchcam_model_images": round(peer["forwards"] * scale),
            "lwcam_ms_per_model_image": round(1000 * ours["seconds"] / ours["forwards"], 3),
            "torchcam_ms_per_model_image": round(1000 * peer["seconds"] / peer["forwards"], 3),
            "del_auc_diff_subset": abs(ours_sub["del_auc"] - peer["deletion_auc"]),
            "ins_auc_diff_subset": abs(ours_sub["ins_auc"] - peer["insertion_auc"]),
        })
    df = pd.DataFrame(rows)
    cols = ["config", "images", "lwcam_s", "torchcam_s", "torchcam_s_is", "ratio", "ratio_same_subset",
            "lwcam_model_images", "torchcam_model_images"]
    print(df[cols].to_string(index=False))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    md = out.with_suffix(".md")
    md.write_text(
        f"# Deletion + insertion: lwcam vs torchcam DeletionInsertionMetric\n\n"
        f"{args.model} (weights=None, 10 classes), {args.size}x{args.size} images, {args.size} steps of "
        f"{args.size} pixels, model batch size {args.batch_size}, {args.threads} threads.\n"
        f"`ratio` = torchcam seconds / lwcam seconds (torchcam {'measured' if n_peer == args.n_images else f'timed on {n_peer} images and scaled linearly'}); "
        f"`ratio_same_subset` compares both on the same {n_peer} images. "
        f"`*_auc_diff_subset`: |mean AUC difference| on those images.\n\n"
        + df.to_markdown(index=False) + "\n"
    )
    print(f"wrote {out} and {md}")
    return df


if __name__ == "__main__":
    main()
