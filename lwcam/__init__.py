"""lwcam: layer-wise Grad-CAM explanations of black-box classifiers via a distilled student.

The library, one package or module per step:

1. :mod:`lwcam.blackbox` (and :mod:`lwcam.remote`, a black box behind an inference server) and
   :mod:`lwcam.distillation`: query the black box, distil a white-box student.
2. :mod:`lwcam.cam`: a class activation map (Grad-CAM, LayerCAM or HiResCAM weighting) on every layer of
   the student in one forward/backward pass, the layers to use, and their fusion into one map.
3. :mod:`lwcam.baselines`: the methods lwcam is compared with, each seeing only the model it may see.
4. :mod:`lwcam.scoring`: every score of a map, one module per family (the deletion and insertion games
   on the black box, localisation, ROAD, randomisation, robustness, complexity), and the statistics.

:mod:`lwcam.data` and :mod:`lwcam.models` hold the data sets and architectures. The paper's study (the
pipeline, its tables and figures, the report) lives in :mod:`lwcam.study`, which imports the library and
is never imported by it; see ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from . import _moved

_moved.install()  # the previous release's import paths, with a DeprecationWarning

__version__ = "0.1.0"

_EXPORTS = {
    "BlackBox": "lwcam.blackbox",
    "TopK": "lwcam.blackbox",
    "BlackBoxError": "lwcam.blackbox",
    "CacheError": "lwcam.blackbox",
    "distill": "lwcam.distillation",
    "DistillResult": "lwcam.distillation",
    "LayerwiseGradCAM": "lwcam.cam",
    "LayerMaps": "lwcam.cam",
    "fuse": "lwcam.cam.fusion",
    "deletion_game": "lwcam.scoring",
    "insertion_game": "lwcam.scoring",
    "GameResult": "lwcam.scoring",
}

__all__ = [*_EXPORTS, "__version__"]

#: Every public submodule (and subpackage), read from the package folder so that no new one is missed.
_SUBMODULES = frozenset(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def __getattr__(name: str) -> Any:  # lazy: importing lwcam stays cheap
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES or f"lwcam.{name}" in _moved.OLD_PATHS:
        return importlib.import_module(f"lwcam.{name}")
    raise AttributeError(f"module 'lwcam' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
