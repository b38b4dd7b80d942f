"""Which layers of a model to explain: named layers resolved, and the stages that ``layers="auto"`` picks.

The automatic choice (as torchcam's ``locate_candidate_layer`` does for one layer) reads the model's tree
and the outputs of one forward pass:

1. :func:`candidate_layers`: the model's direct children, after unwrapping single-child wrappers, and the
   children of every ``nn.Sequential``/``nn.ModuleList`` among them.
2. :func:`select_stages`: in the order they ran, the candidates whose output is a 4-D map larger than 1×1;
   a container is replaced by its children where they give at least two resolutions; of consecutive
   candidates at one resolution the last is kept, and a candidate larger than the one before it is
   skipped. The result is one layer per stage, shallow to deep.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.Flatten())
    >>> candidate_layers(net)
    (['0', '1', '2'], {})
    >>> outputs = {"0": torch.zeros(1, 4, 8, 8), "1": torch.zeros(1, 4, 4, 4), "2": torch.zeros(1, 64)}
    >>> select_stages(*candidate_layers(net), outputs, {"0": 1, "1": 2, "2": 3})
    [('0', (8, 8)), ('1', (4, 4))]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["resolve_layers", "candidate_layers", "select_stages"]


def _is_container(m: nn.Module) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList))


def describe_output(out: Any) -> str:
    """A layer's output in words, for an error message."""
    if isinstance(out, Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    return f"a {type(out).__name__}"


def resolve_layers(modules: Mapping[str, nn.Module], layers: Iterable[str | nn.Module] | nn.Module) -> list[str]:
    """The names, in ``modules`` (``dict(model.named_modules())``), of ``layers`` given by name or by module.

    Raises:
        ValueError: an unknown name, a module not in the model, an empty list, or a layer listed twice.
        TypeError: ``layers`` is not iterable, or an item is neither a name nor a module.
    """
    if isinstance(layers, nn.Module):
        layers = [layers]
    try:
        items = list(layers)
    except TypeError:
        raise TypeError(f"layers must be 'auto' or a sequence of names/modules, got {layers!r}") from None
    if not items:
        raise ValueError("layers is empty: pass 'auto' or at least one layer")
    by_id: dict[int, str] = {}
    for name, mod in modules.items():
        by_id.setdefault(id(mod), name)
    names: list[str] = []
    for item in items:
        if isinstance(item, str):
            if item not in modules:
                valid = [n for n in modules if n][:12]
                raise ValueError(
                    f"unknown layer name {item!r}; valid names include {valid}"
                    f"{' ...' if len(modules) > 13 else ''} (see model.named_modules())")
            name = item
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"layer {type(item).__name__} is not a submodule of the model")
            name = by_id[id(item)]
        else:
            raise TypeError(f"a layer must be a name or an nn.Module, got {type(item).__name__}")
        if name in names:
            raise ValueError(f"layer {name!r} is listed twice")
        names.append(name)
    return names


def candidate_layers(model: nn.Module) -> tuple[list[str], dict[str, list[str]]]:
    """The model's direct children (after unwrapping single-child wrappers) and, for containers, their children."""
    prefix, root = "", model
    while True:
        kids = list(root.named_children())
        if len(kids) != 1:
            break
        prefix = f"{prefix}{kids[0][0]}."
        root = kids[0][1]
    if not kids:  # a single leaf module
        return [prefix[:-1]], {}
    top: list[str] = []
    containers: dict[str, list[str]] = {}
    for local, child in kids:
        name = prefix + local
        top.append(name)
        if _is_container(child):
            containers[name] = [f"{name}.{sub}" for sub, _ in child.named_children()]
    return top, containers


def _resolution(out: Any) -> tuple[int, int] | None:
    if isinstance(out, Tensor) and out.ndim == 4:
        return int(out.shape[-2]), int(out.shape[-1])
    return None


def _ordered_candidates(top: list[str], containers: Mapping[str, list[str]], outputs: Mapping[str, Any],
                        fired: Mapping[str, int]) -> list[str]:
    cands: list[str] = []
    for name in top:
        subs = [s for s in containers.get(name, []) if s in fired]
        if len({r for s in subs if (r := _resolution(outputs.get(s))) is not None}) >= 2:
            cands.extend(subs)
        elif name in fired:
            cands.append(name)
    return sorted(cands, key=lambda n: fired[n])


def select_stages(top: list[str], containers: Mapping[str, list[str]], outputs: Mapping[str, Any],
                  fired: Mapping[str, int]) -> list[tuple[str, tuple[int, int]]]:
    """One layer per stage, shallow to deep, with its output's (h, w).

    Args:
        top, containers: :func:`candidate_layers` of the model.
        outputs: each hooked layer's output in one forward pass.
        fired: each hooked layer's position in the order the layers ran.

    Raises:
        ValueError: no candidate gave a 4-D output larger than 1×1.
    """
    cands = _ordered_candidates(top, containers, outputs, fired)
    kept: list[tuple[str, tuple[int, int]]] = []
    for name in cands:
        r = _resolution(outputs.get(name))
        if r is None or r[0] * r[1] <= 1:
            continue
        if kept and r == kept[-1][1]:
            kept[-1] = (name, r)
        elif kept and r[0] * r[1] > kept[-1][1][0] * kept[-1][1][1]:
            continue
        else:
            kept.append((name, r))
    if not kept:
        raise ValueError(
            "layers='auto' found no stage with a 4-D (B,C,h,w) output larger than 1x1; "
            f"pass layers explicitly (candidates were {cands})")
    return kept
