"""lwcam: layer-wise Grad-CAM explanations of black-box classifiers via a distilled student.

The four steps, each one module:

1. :mod:`lwcam.blackbox` and :mod:`lwcam.distillation`: query the black box, distil a white-box student.
2. :mod:`lwcam.layercam`: a class activation map (Grad-CAM or LayerCAM weighting) on every layer of
   the student in one forward/backward pass.
3. :mod:`lwcam.fusion`: fuse the layer maps pixel-wise (sum, max, or per-layer weights).
4. :mod:`lwcam.metrics` and :mod:`lwcam.baselines`: deletion/insertion games on the black box;
   :mod:`lwcam.measures`: the scorecard's other measures (class-conflict localisation, ROAD,
   randomisation, robustness, sparseness).

:mod:`lwcam.evaluation` runs every method and scores it, :mod:`lwcam.analysis` makes the paper's
tables (T1, the fusion chosen on ``val``, the claims, F6, F7), :mod:`lwcam.scorecard` the scorecard
on class-conflict scenes (T4, F8), :mod:`lwcam.profiles` declares a
run's settings, and :mod:`lwcam.pipeline` runs the notebooks with cached artefacts and timings.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BlackBox": "lwcam.blackbox",
    "TopK": "lwcam.blackbox",
    "BlackBoxError": "lwcam.blackbox",
    "CacheError": "lwcam.blackbox",
    "distill": "lwcam.distillation",
    "DistillResult": "lwcam.distillation",
    "LayerwiseGradCAM": "lwcam.layercam",
    "LayerMaps": "lwcam.layercam",
    "fuse": "lwcam.fusion",
    "deletion_game": "lwcam.metrics",
    "insertion_game": "lwcam.metrics",
    "GameResult": "lwcam.metrics",
}

__all__ = [*_EXPORTS, "__version__"]

#: Every public submodule (and subpackage), read from the package folder so that no new one is missed.
_SUBMODULES = frozenset(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def __getattr__(name: str) -> Any:  # lazy: importing lwcam stays cheap
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"lwcam.{name}")
    raise AttributeError(f"module 'lwcam' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
