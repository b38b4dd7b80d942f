"""The student: built or copied, seeded and probed once, its logits, its training mode and its optimiser.

* :func:`prepare_student`: a torchvision architecture by name (random weights, auxiliary heads removed) or a
  copy of the caller's module, seeded, on the device, checked on one transfer image;
* :func:`as_logits`: the (B,C) logits of whatever the student returns (a tensor, ``.logits``, a tuple);
* :func:`train_mode`: training mode that keeps the submodules the caller froze in eval mode;
* :func:`optimiser`: AdamW (or SGD with Nesterov momentum) with a linear warm-up and a cosine decay.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    >>> _ = net[1].eval()  # a frozen BatchNorm
    >>> train_mode(net, {"1"})
    >>> net.training, net[0].training, net[1].training
    (True, True, False)
    >>> as_logits((torch.ones(1, 3), "aux")).shape
    torch.Size([1, 3])
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from .._utils import eval_mode, seed_everything
from ..models import build_model
from .config import DistillConfig, Plan

__all__ = ["as_logits", "build_student", "optimiser", "prepare_student", "state_hash", "train_mode"]


def build_student(name: str, num_classes: int) -> nn.Module:
    """A torchvision classification architecture with random weights, auxiliary heads removed."""
    model = build_model(name, num_classes=num_classes, weights=None)  # the name was checked by check_student
    if getattr(model, "aux_logits", False):  # inception_v3 / googlenet: train on the main head only
        cast(Any, model).aux_logits = False
        for attr in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, attr):
                setattr(model, attr, None)
    return model


def as_logits(out: Any) -> torch.Tensor:
    """The (B,C) logits in what the student returns: a tensor, an object with ``.logits``, or a tuple's first."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the student must return a (B,C) logits tensor, got {type(out).__name__}")


def state_hash(module: nn.Module) -> str:
    """SHA-256 over the module's class name and every state_dict entry's name and bytes."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


def train_mode(model: nn.Module, frozen: set[str]) -> None:
    """Training mode, except for the submodules the caller had put in eval mode (e.g. a frozen BatchNorm)."""
    model.train()
    for name, m in model.named_modules():
        if name in frozen:
            m.training = False


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at a step: linear warm-up over ``warmup_steps``, then a cosine decay to 0."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return fn


def optimiser(model: nn.Module, config: DistillConfig,
              n_train: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (or SGD, Nesterov momentum 0.9), one epoch of linear warm-up (at most 1/10 of the run), cosine decay."""
    params = model.parameters()
    opt: torch.optim.Optimizer
    if config.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=config.peak_lr, weight_decay=config.decay)
    else:
        opt = torch.optim.SGD(params, lr=config.peak_lr, momentum=0.9, nesterov=True, weight_decay=config.decay)
    steps_per_epoch = max(1, n_train // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(total_steps, max(1, min(steps_per_epoch, total_steps // 10))))
    return opt, sched


def prepare_student(student: str | nn.Module, plan: Plan, seed: int,
                    device: torch.device) -> tuple[nn.Module, str, str, set[str]]:
    """The seeded student on ``device``, its name, a hash of its initial weights and its frozen submodules.

    One image is passed through it to check that it takes the transfer images and outputs
    ``num_classes`` logits (``ValueError`` otherwise).
    """
    seed_everything(seed)
    if isinstance(student, str):
        name, model = student, build_student(student, plan.num_classes)
    else:
        name, model = f"{type(student).__module__}.{type(student).__qualname__}", copy.deepcopy(student)
    init_hash = state_hash(model)
    frozen = {n for n, m in model.named_modules() if not m.training} if model.training else set()
    model.to(device)
    with eval_mode(model), torch.no_grad():
        try:
            probe = as_logits(model(plan.source.get(torch.tensor([0])).to(device)))
        except Exception as err:
            raise ValueError(f"student {name} cannot take transfer_images of shape {plan.source.shape}: "
                             f"{type(err).__name__}: {err}") from err
    if probe.dim() != 2 or probe.shape[1] != plan.num_classes:
        raise ValueError(f"student {name} outputs shape {tuple(probe.shape)} for one image, but the "
                         f"black box has num_classes={plan.num_classes}: its output width must match")
    return model, name, init_hash, frozen
