"""The import paths of the previous release, kept for one release with a ``DeprecationWarning``.

The study moved to :mod:`lwcam.study`, the CAM engine and fusion to :mod:`lwcam.cam`, and the scores to
:mod:`lwcam.scoring`. An old path still imports, from a finder appended to ``sys.meta_path`` (so that a real
module always wins), and warns once per import, naming the new path:

* a module that moved whole (:data:`MOVED`) is the new module itself, so that patching it patches the
  module the code uses, and ``python -m`` runs the new module;
* a module that was split (:data:`SPLIT`) is a module of its public names, gathered from the new ones.

Example:
    >>> import importlib, warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     old = importlib.import_module("lwcam.fusion")
    >>> old.__name__, caught[0].category.__name__
    ('lwcam.cam.fusion', 'DeprecationWarning')
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MOVED", "RUN_AS", "SPLIT", "OLD_PATHS", "install"]

#: old module -> its new home, for modules that moved whole.
MOVED = {
    **{f"lwcam.{m}": f"lwcam.study.{m}" for m in (
        "profiles", "pipeline", "analysis", "scorecard", "resolution", "plots", "report", "docs", "answers",
        "sharded", "sharded_t4", "_shards", "serve")},
    "lwcam.fusion": "lwcam.cam.fusion",
    "lwcam.fusion_recursive": "lwcam.cam.recursive",
    "lwcam.evaluation": "lwcam.scoring.evaluation",
}

#: ``python -m <old>`` runs this module where it is not the new home itself (the command line left the pipeline).
RUN_AS = {"lwcam.pipeline": "lwcam.study"}

#: old module -> the new modules its public names went to, for modules that were split.
SPLIT = {
    "lwcam.layercam": ("lwcam.cam.layerwise", "lwcam.cam.maps", "lwcam.cam.batched"),
    "lwcam.metrics": ("lwcam.scoring.games", "lwcam.scoring.stats", "lwcam.scoring.localisation"),
    "lwcam.measures": ("lwcam.scoring.localisation", "lwcam.scoring.faithfulness", "lwcam.scoring.randomisation",
                       "lwcam.scoring.robustness", "lwcam.scoring.complexity", "lwcam.scoring.correlation"),
}


#: every old path the finder answers for
OLD_PATHS = frozenset(MOVED) | frozenset(SPLIT)


def _stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the code that imported, past the import machinery.

    ``warnings.warn`` does not count importlib's ``_bootstrap`` frames; the frames of this module, of
    ``importlib.import_module`` and of ``lwcam.__getattr__`` are counted and skipped here.
    """
    skipped = (__file__, importlib.__file__, str(Path(__file__).with_name("__init__.py")))
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_code.co_filename
        if not ("importlib" in name and "_bootstrap" in name):
            if name not in skipped:
                return level
            level += 1
        frame = frame.f_back  # type: ignore[assignment]
    return level


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in the next release; import {new} instead",
                  DeprecationWarning, stacklevel=_stacklevel())


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of :data:`MOVED` and :data:`SPLIT`; nothing else."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in OLD_PATHS:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        name = module.__name__
        if name in MOVED:
            _warn(name, MOVED[name])
            sys.modules[name] = importlib.import_module(MOVED[name])  # the import statement returns this one
            return
        _warn(name, " or ".join(SPLIT[name]))
        public: list[str] = []
        for new in SPLIT[name]:
            source = importlib.import_module(new)
            for attr in source.__all__:
                setattr(module, attr, getattr(source, attr))
                public.append(attr)
        module.__all__ = public  # type: ignore[attr-defined]

    def get_code(self, fullname: str) -> types.CodeType:
        """``python -m <old path>``: warn, then run the new module as ``__main__``."""
        if fullname not in MOVED:
            raise ImportError(f"{fullname} was split into {SPLIT.get(fullname)} and cannot be run")
        new = RUN_AS.get(fullname, MOVED[fullname])
        source = (f"import runpy, warnings\n"
                  f"warnings.warn({fullname!r} + ' is deprecated; run python -m {new}', DeprecationWarning)\n"
                  f"runpy.run_module({new!r}, run_name='__main__', alter_sys=True)\n")
        return compile(source, f"<{fullname}, moved to {new}>", "exec")


def install() -> None:
    """Append the finder to ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
