"""Models: torchvision architectures by name, pretrained weights, and the default black box.

``build_model`` makes any torchvision classification architecture sized to a class count, and
the *small-input* (CIFAR-style) adaptations of :data:`SMALL_INPUT_ARCHITECTURES`: torchvision's
own ``RegNet``, ``MobileNetV2`` and ``ShuffleNetV2`` classes with narrow widths and a total stride
of 8 instead of 32, so that a 64-px image ends in an 8×8 last convolutional map, as a 224-px
image does (7×7) in the ImageNet originals.
The pretrained route stays in the code: a torchvision weights enum name
(``"ResNet50_Weights.IMAGENET1K_V2"``, ``"DEFAULT"``) or a local weight file, loaded with
``torch.load(..., weights_only=True)``. Here nothing is downloaded: the default black box
is trained from scratch by :func:`train_teacher` on the synthetic ``train`` split.

Example:
    >>> net = build_model("resnet18", num_classes=10)
    >>> net(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.regnet import BlockParams, RegNet
from torchvision.ops.misc import Conv2dNormActivation

from ._checks import check_bool, check_positive_int, check_real
from ._utils import atomic_save, eval_mode, resolve_device, seed_everything, track, training_layout

__all__ = [
    "SMALL_INPUT_ARCHITECTURES",
    "build_model",
    "classification_models",
    "load_weights",
    "save_checkpoint",
    "load_checkpoint",
    "train_teacher",
    "TeacherResult",
    "evaluate_accuracy",
    "predict_logits",
    "random_flip_shift",
    "random_pixel_dropout",
]


def _regnet_x_s8(num_classes: int) -> nn.Module:
    """RegNetX with a stride-2 stem of 16 channels, stages of widths 24/48/96/192, depths 1/1/2/2,
    strides 1/2/2/1 and group width 8: 64 → 32, 32, 16, 8, 8 px; about 22 M multiply-adds at 64 px."""
    params = BlockParams(depths=[1, 1, 2, 2], widths=[24, 48, 96, 192], group_widths=[8] * 4,
                         bottleneck_multipliers=[1.0] * 4, strides=[1, 2, 2, 1])
    return RegNet(params, num_classes=num_classes, stem_width=16)


def _regnet_x_s4(num_classes: int) -> nn.Module:
    """:func:`_regnet_x_s8` with a stride-1 third stage: 64 → 32, 32, 16, 16, 16 px, a 16×16 last map (an
    ablation: the explanation's resolution from the student, not the fusion); about 60 M multiply-adds at 64 px."""
    params = BlockParams(depths=[1, 1, 2, 2], widths=[24, 48, 96, 192], group_widths=[8] * 4,
                         bottleneck_multipliers=[1.0] * 4, strides=[1, 2, 1, 1])
    return RegNet(params, num_classes=num_classes, stem_width=16)


def _mobilenet_v2_s8(num_classes: int) -> nn.Module:
    """MobileNetV2 at width 0.75 with expansion 4, eight inverted-residual blocks whose strides stop at
    the 8× point, and a last 1×1 convolution of 256 channels (not 1280): 64 → 32 (stem), 32, 16, 8,
    8, 8 px; about 11 M multiply-adds at 64 px."""
    setting = [[1, 16, 1, 1], [4, 24, 2, 2], [4, 32, 2, 2], [4, 64, 2, 1], [4, 128, 1, 1]]
    model = torchvision.models.MobileNetV2(num_classes=num_classes, width_mult=0.75, inverted_residual_setting=setting)
    last = model.features[-1]
    model.features[-1] = Conv2dNormActivation(last[0].in_channels, 256, kernel_size=1, activation_layer=nn.ReLU6)
    model.classifier[-1] = nn.Linear(256, num_classes)
    nn.init.kaiming_normal_(model.features[-1][0].weight, mode="fan_out")
    nn.init.normal_(model.classifier[-1].weight, 0, 0.01)
    nn.init.zeros_(model.classifier[-1].bias)
    return model


def _shufflenet_v2_s8(num_classes: int) -> nn.Module:
    """ShuffleNetV2 x0.5 with a stride-1 first convolution and no max-pool: 64 → 64, 32, 16, 8 px;
    about 44 M multiply-adds at 64 px."""
    model = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=num_classes)
    conv = model.conv1[0]
    model.conv1[0] = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


#: CIFAR-style adaptations for small inputs: name -> builder ``(num_classes) -> nn.Module``. Each is a
#: torchvision class with narrow widths and a total stride of 8 (an 8×8 last map at 64 px, like the
#: 7×7 of the originals at 224 px), so last-layer Grad-CAM is not a 2×2 blur; ``regnet_x_s4``, an
#: ablation, stops at 4 (16×16). Random init only.
SMALL_INPUT_ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "regnet_x_s8": _regnet_x_s8,
    "regnet_x_s4": _regnet_x_s4,
    "mobilenet_v2_s8": _mobilenet_v2_s8,
    "shufflenet_v2_s8": _shufflenet_v2_s8,
}


def classification_models() -> list[str]:
    """Names :func:`build_model` accepts: torchvision's classification architectures and the
    small-input adaptations of :data:`SMALL_INPUT_ARCHITECTURES`."""
    return sorted([*torchvision.models.list_models(module=torchvision.models), *SMALL_INPUT_ARCHITECTURES])


def build_model(name: str, num_classes: int, weights: str | os.PathLike | None = None) -> nn.Module:
    """Build a torchvision classification architecture by name.

    Args:
        name: a torchvision classification model name (``"resnet18"``, ``"regnet_x_400mf"``, ...) or a
            small-input adaptation of :data:`SMALL_INPUT_ARCHITECTURES` (``"regnet_x_s8"``,
            ``"mobilenet_v2_s8"``, ``"shufflenet_v2_s8"``), whose ``weights`` can only be a local file.
        num_classes: width of the output layer.
        weights: ``None`` (random init, the default here), a torchvision weights enum name
            (``"ResNet18_Weights.IMAGENET1K_V1"`` or ``"DEFAULT"``; torchvision downloads it on first
            use, which needs internet) or the path of a local state-dict file, loaded with
            ``torch.load(path, weights_only=True)`` (a dict with a ``"model"`` entry also works).

    Raises:
        ValueError: unknown architecture, or a class-count mismatch with the weights.
    """
    if name not in classification_models():
        raise ValueError(
            f"unknown architecture {name!r}: expected a torchvision classification model name such as "
            f"'resnet18', 'regnet_x_400mf' or 'shufflenet_v2_x1_0' (see lwcam.models.classification_models())"
        )
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if name in SMALL_INPUT_ARCHITECTURES:
        model = SMALL_INPUT_ARCHITECTURES[name](num_classes)
        if weights is not None:
            load_weights(model, weights)
        return model
    if weights is None:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    path = Path(weights)
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin") or path.exists():
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        load_weights(model, path)
        return model
    enum = torchvision.models.get_weight(f"{torchvision.models.get_model_weights(name).__name__}.{weights}"
                                         if "." not in str(weights) else str(weights))
    n_enum = len(enum.meta.get("categories", []))
    if n_enum and n_enum != num_classes:
        raise ValueError(f"weights {weights} have {n_enum} classes but num_classes={num_classes}")
    return torchvision.models.get_model(name, weights=enum)


def _read_weights(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``ValueError`` naming the file if it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # a truncated zip, a foreign pickle, a text file: whatever torch.load trips on
        raise ValueError(f"the weight file {path} cannot be read ({type(err).__name__}: {err})") from err


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a local state dict into ``model`` with ``torch.load(..., weights_only=True)``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weight file {path} does not exist")
    state = _read_weights(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    model.load_state_dict(state)
    return model


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **meta: Any) -> Path:
    """Atomically save ``{"model": state_dict, "meta": meta}`` (tensors only, ``weights_only``-safe)."""
    return atomic_save({"model": model.state_dict(), "meta": meta}, path)


def load_checkpoint(path: str | os.PathLike, arch: str | None = None,
                    num_classes: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`; the architecture comes from its meta."""
    ckpt = _read_weights(Path(path))
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"checkpoint {path} holds no 'model' state dict (it holds a {type(ckpt).__name__}); "
                         f"write it with save_checkpoint")
    meta = ckpt.get("meta", {})
    arch = meta.get("arch") if arch is None else arch
    num_classes = meta.get("num_classes") if num_classes is None else num_classes
    if arch is None or num_classes is None:
        raise ValueError(f"checkpoint {path} names no architecture/num_classes; pass arch= and num_classes=")
    model = build_model(arch, int(num_classes))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, meta


def random_pixel_dropout(x: torch.Tensor, generator: torch.Generator, max_rate: float = 0.5,
                         p: float = 0.5) -> torch.Tensor:
    """Set a random share of pixels (all channels) to 0, the data-set mean in the normalised space.

    Each image is hit with probability ``p``; a hit image loses a fraction ``r ~ U(0, max_rate)`` of
    its pixels, chosen uniformly. Like random erasing, it teaches the network that scattered missing
    pixels are not evidence against the class, so that what changes its answer is losing the
    object, not salt-and-pepper damage spread over the whole image.
    """
    if max_rate <= 0 or p <= 0:
        return x
    b, _, h, w = x.shape
    hit = torch.rand(b, 1, 1, 1, generator=generator) < p
    rate = torch.rand(b, 1, 1, 1, generator=generator) * max_rate
    drop = (torch.rand(b, 1, h, w, generator=generator) < rate) & hit
    return x.masked_fill(drop, 0.0)


def random_flip_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 4) -> torch.Tensor:
    """Label-preserving augmentation: random horizontal/vertical flips and a small translation."""
    b = x.shape[0]
    flip_h = torch.rand(b, generator=generator) < 0.5
    flip_v = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip_h.view(-1, 1, 1, 1), x.flip(3), x)
    x = torch.where(flip_v.view(-1, 1, 1, 1), x.flip(2), x)
    if max_shift > 0:
        pad = F.pad(x, (max_shift,) * 4, mode="reflect")
        dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
        x = pad[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
    return x


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256,
                   device: str | torch.device | None = None) -> torch.Tensor:
    """Logits of ``model`` on ``images`` in eval mode, batched; restores train/eval state."""
    check_positive_int(batch_size, "batch_size")
    if len(images) == 0:
        raise ValueError(f"images is an empty batch (shape {tuple(images.shape)}); expected at least one image")
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    with eval_mode(model), torch.inference_mode():
        return torch.cat([model(images[i : i + batch_size].to(dev)).float().cpu()
                          for i in range(0, len(images), batch_size)])


def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on labelled images."""
    return (predict_logits(model, images, batch_size).argmax(1) == labels).float().mean().item()


@dataclass
class TeacherResult:
    """Outcome of :func:`train_teacher`."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    val_accuracy: float = float("nan")
    seconds: float = 0.0
    checkpoint: Path | None = None


def train_teacher(
    arch: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    val_images: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 4e-3,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.05,
    seed: int = 0,
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool | None = None,
    device: str | torch.device | None = None,
    meta: dict[str, Any] | None = None,
    pixel_dropout: float = 0.5,
    channels_last: bool = False,
) -> TeacherResult:
    """Train the default black box from scratch (AdamW, one-cycle schedule, flip/shift and pixel-dropout augmentation).

    The loss is cross-entropy with label smoothing ``ε``:
    ``L = -(1-ε) log p_y - ε/C Σ_c log p_c``.

    Args:
        arch: torchvision architecture name.
        images, labels: the ``train`` split, normalised (N,3,H,W) and (N,).
        num_classes: class count.
        val_images, val_labels: optional held-out split for the reported accuracy.
        epochs, batch_size, lr, weight_decay, label_smoothing: optimisation settings.
        seed: seeds initialisation, data order and augmentation.
        checkpoint_path: if given, the final model is written there atomically
            (temporary file, then rename) with its meta data.
        progress: tqdm bar over steps (``None``: only on a TTY).
        device: ``None`` picks CUDA when available.
        meta: extra entries stored in the checkpoint's meta data.
        pixel_dropout: the largest share of pixels :func:`random_pixel_dropout` removes from half
            of the training images (0 disables it).
        channels_last: train a CPU convnet in the ``channels_last`` layout (:func:`~lwcam._utils.training_layout`):
            1.5x faster on 2 cores, but the rounding differences grow over training into a different
            model, as a change of seed would (``benchmarks/bench_train_layout.py``); the model comes back
            contiguous. Off by default so that a seed gives one model.

    Returns:
        a :class:`TeacherResult` with the model in eval mode on the CPU.

    Raises:
        ValueError: an argument out of range (the message names it).
        FloatingPointError: the loss became NaN or Inf; the message names the epoch and step.
    """
    _check_teacher_arguments(images, labels, epochs=epochs, batch_size=batch_size, lr=lr,
                             weight_decay=weight_decay, label_smoothing=label_smoothing, pixel_dropout=pixel_dropout,
                             channels_last=channels_last)
    t0 = time.perf_counter()
    run = _TeacherTraining.start(arch, num_classes, seed=seed, device=device, batch_size=batch_size, lr=lr,
                                 weight_decay=weight_decay, label_smoothing=label_smoothing,
                                 pixel_dropout=pixel_dropout, total_steps=epochs * math.ceil(len(images) / batch_size))
    model = run.model
    history: list[dict[str, float]] = []
    bar = track(range(run.total_steps), total=run.total_steps, desc=f"train {arch}", enabled=progress)
    with training_layout(model, channels_last) as run.layout:
        for epoch in range(epochs):
            loss, accuracy = _train_teacher_epoch(run, images, labels, epoch, bar)
            row = {"epoch": epoch + 1, "loss": loss, "train_accuracy": accuracy, "seconds": time.perf_counter() - t0}
            if val_images is not None and val_labels is not None:
                row["val_accuracy"] = evaluate_accuracy(model, val_images, val_labels)
            history.append(row)
    model = model.cpu().eval()
    val_acc = history[-1].get("val_accuracy", float("nan"))
    seconds = time.perf_counter() - t0
    ckpt = None
    if checkpoint_path is not None:
        ckpt = save_checkpoint(model, checkpoint_path, arch=arch, num_classes=num_classes, seed=seed,
                               val_accuracy=val_acc, seconds=seconds, epochs=epochs, pixel_dropout=pixel_dropout,
                               **(meta or {}))
    return TeacherResult(model=model, history=history, val_accuracy=val_acc, seconds=seconds, checkpoint=ckpt)


def _check_teacher_arguments(images: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
                             weight_decay: float, label_smoothing: float, pixel_dropout: float,
                             channels_last: bool) -> None:
    """``ValueError`` naming the argument when one of :func:`train_teacher`'s is out of range."""
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"images must be (N,3,H,W) matching labels (N,), got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    check_real(lr, "lr", 0.0, low_open=True)
    check_real(weight_decay, "weight_decay", 0.0)
    check_real(label_smoothing, "label_smoothing", 0.0, 1.0, high_open=True)
    check_real(pixel_dropout, "pixel_dropout", 0.0, 1.0)
    check_bool(channels_last, "channels_last")


@dataclass
class _TeacherTraining:
    """What :func:`train_teacher`'s epochs share: the model, its optimiser and schedule, the generator."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator  # data order and augmentation
    device: torch.device
    batch_size: int
    lr: float
    label_smoothing: float
    pixel_dropout: float
    total_steps: int
    layout: torch.memory_format = torch.contiguous_format  # of the input batches (set by train_teacher)

    @classmethod
    def start(cls, arch: str, num_classes: int, *, seed: int, device: str | torch.device | None, batch_size: int,
              lr: float, weight_decay: float, label_smoothing: float, pixel_dropout: float,
              total_steps: int) -> _TeacherTraining:
        """Seed everything, build ``arch`` on the device, AdamW with a one-cycle schedule (15 % warm-up)."""
        gen = seed_everything(seed)
        dev = resolve_device(device)
        model = build_model(arch, num_classes).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.15)
        return cls(model=model, opt=opt, sched=sched, gen=gen, device=dev, batch_size=batch_size, lr=lr,
                   label_smoothing=label_smoothing, pixel_dropout=pixel_dropout, total_steps=total_steps)


def _train_teacher_epoch(run: _TeacherTraining, images: torch.Tensor, labels: torch.Tensor, epoch: int,
                         bar: Iterator[int]) -> tuple[float, float]:
    """One pass in a random order with flip/shift and pixel-dropout augmentation; returns the mean
    training loss and the training accuracy (both on the augmented batches)."""
    run.model.train()
    order = torch.randperm(len(images), generator=run.gen)
    total, correct, seen = 0.0, 0, 0
    for s in range(math.ceil(len(images) / run.batch_size)):
        idx = order[s * run.batch_size : (s + 1) * run.batch_size]
        x = random_pixel_dropout(random_flip_shift(images[idx], run.gen), run.gen, max_rate=run.pixel_dropout)
        x = x.to(run.device).contiguous(memory_format=run.layout)
        loss_value, hits = _train_teacher_step(run, x, labels[idx].to(run.device), epoch, s)
        total += loss_value * len(idx)
        correct += hits
        seen += len(idx)
        next(bar, None)
    return total / seen, correct / seen


def _train_teacher_step(run: _TeacherTraining, x: torch.Tensor, y: torch.Tensor, epoch: int,
                        step: int) -> tuple[float, int]:
    """One AdamW step on ``L = -(1-ε) log p_y - ε/C Σ_c log p_c``; returns the loss and the correct predictions."""
    out = run.model(x)
    loss = F.cross_entropy(out, y, label_smoothing=run.label_smoothing)
    if not math.isfinite(loss_value := loss.item()):
        raise FloatingPointError(f"teacher training diverged: the loss is {loss_value} at epoch {epoch + 1}, "
                                 f"step {step + 1}; lower lr (now {run.lr}) or check the images for NaN/Inf")
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    run.sched.step()
    return loss_value, int((out.argmax(1) == y).sum())
