"""A tiny distillation task for the tests, and a script that runs ``distill`` on it.

The task: 3×16×16 images of noise with one 5×5 coloured blob; the blob's colour (one of four
directions in colour space) is the class. The black box is a fixed, hand-built classifier
(3×3 smoothing, colour templates, global max pooling), so its answers are deterministic,
confident but soft, and learnable by a small CNN.

Run as a script (alone or under ``torchrun``), it distils a :class:`TinyStudent` and writes, per
rank, ``rank{R}.pt`` (the final state dict) and ``rank{R}.json`` (queries asked in this process,
the result's query count, fidelity, history) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

NUM_CLASSES = 4
COLOURS = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]]) / math.sqrt(3)


def make_images(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n,3,size,size) and their true classes, a pure function of ``seed``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = 0.5 * torch.randn(n, 3, size, size, generator=g)
    amp = 0.3 + 1.7 * torch.rand(n, generator=g)
    pos = torch.randint(0, size - 5 + 1, (n, 2), generator=g)
    for i in range(n):
        r, c = pos[i].tolist()
        x[i, :, r : r + 5, c : c + 5] += amp[i] * COLOURS[labels[i]][:, None, None]
    return x, labels


class ColourTeacher(nn.Module):
    """Fixed black box: smoothed colour-template responses, max-pooled over space, scaled."""

    def __init__(self, scale: float = 3.0) -> None:
        super().__init__()
        self.smooth = nn.AvgPool2d(3, stride=1, padding=1)
        self.templates = nn.Conv2d(3, NUM_CLASSES, 1, bias=False)
        with torch.no_grad():
            self.templates.weight.copy_(COLOURS[:, :, None, None])
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.templates(self.smooth(x)).amax(dim=(2, 3))


class TinyStudent(nn.Module):
    """A small white-box CNN."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def make_blackbox(output: str = "probs", k: int = 2):
    from lwcam.blackbox import BlackBox

    return BlackBox(ColourTeacher(), num_classes=NUM_CLASSES, output=output, k=k, batch_size=256)


def make_student(seed: int = 0, sleep: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    student = TinyStudent()
    if sleep > 0:  # slows training down (numerically inert) so a test can interrupt it mid-run
        student.register_forward_pre_hook(lambda module, args: time.sleep(sleep))
    return student


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lwcam.distillation import distill

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--output", default="probs")
    ap.add_argument("--num-images", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--augment", default="default")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    images, _ = make_images(args.num_images, seed=1)
    bb = make_blackbox(args.output)
    result = distill(bb, images, student=make_student(args.seed, args.sleep), epochs=args.epochs,
                     batch_size=args.batch_size, seed=args.seed, augment=args.augment,
                     checkpoint_dir=args.checkpoint_dir, progress=False)
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result.student.state_dict(), out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "process_queries": bb.queries, "result_queries": result.queries, "fidelity": result.fidelity,
        "history": result.history, "world_size": result.config["world_size"],
        "resumed_from_epoch": result.config["resumed_from_epoch"],
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
