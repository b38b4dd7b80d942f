"""The input checks the scorecard's measures share: a batch of maps and a batch of masks."""

from __future__ import annotations

import torch

from .._checks import check_map


# --------------------------------------------------------------------------- input checks
def _saliency(values: object, name: str, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """A finite (B,H,W) map with at least one image and one pixel, as float64."""
    m = check_map(values, name=name) if shape is None else check_map(values, *shape, name=name)
    if m.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(m.shape)}); expected at least one image of at least one pixel")
    if m.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {m.dtype}")
    return m.to(torch.float64)


def _mask(values: object, name: str, shape: tuple[int, int, int], *, nonempty: bool = True) -> torch.Tensor:
    """A (B,H,W) bool mask of the given shape (0/1 values accepted); with ``nonempty``, one pixel per image at least."""
    m = check_map(values, *shape, name=name)
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"{name} must be boolean or contain only 0 and 1")
        m = m != 0
    if nonempty:
        empty = ~m.flatten(1).any(dim=1)
        if bool(empty.any()):
            raise ValueError(f"{name} is empty on image {int(torch.nonzero(empty)[0])}: every image needs the object's "
                             f"pixels")
    return m.cpu()
