"""The two layers of lwcam, as docs/architecture.md states them, checked by walking the source.

* The library (every module outside ``lwcam.study``) never imports the study, directly or through another
  module, and imports without pandas, papermill or the study installed.
* No paper table or figure id (T1–T5, F1–F9) names anything in the library.
* A library file over 500 lines says why in its opening docstring.
* Every score of :mod:`lwcam.scoring` declares its family and direction, and the scorecard's columns agree.
* The previous release's import paths still work, with a DeprecationWarning that names the new path.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import warnings

import pytest
from _imports import LWCAM, import_graph, module_files, reaches

from lwcam import _moved, scoring
from lwcam.study import scorecard

ROOT = LWCAM.parent
LIBRARY = sorted(m for m in module_files() if not (m == "lwcam.study" or m.startswith("lwcam.study.")))


def test_the_library_never_imports_the_study():
    graph = import_graph()
    assert len(LIBRARY) >= 40 and "lwcam.study.pipeline" in graph
    leaks = {m: sorted(r for r in reaches(graph, m) if r.startswith("lwcam.study")) for m in LIBRARY}
    assert {m: r for m, r in leaks.items() if r} == {}


def test_the_import_walk_sees_a_library_module_that_imports_the_study(tmp_path):
    """The walk above can fail: a library module importing the study is found."""
    pkg = tmp_path / "lwcam"
    (pkg / "study").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "study" / "__init__.py").write_text("")
    (pkg / "study" / "pipeline.py").write_text("")
    (pkg / "data.py").write_text("def f():\n    from .study import pipeline\n")
    graph = import_graph(pkg)
    assert "lwcam.study.pipeline" in reaches(graph, "lwcam.data")


BLOCKER = """
import sys
for name in ("pandas", "papermill", "seaborn", "nbformat", "lwcam.study"):
    sys.modules[name] = None  # as if not installed: an import fails, importlib.util.find_spec gives None
"""


def test_the_library_imports_without_pandas_papermill_or_the_study():
    # lwcam._serving is the MLServer runtime of the `serve` extra, and MLServer itself needs pandas
    modules = [m for m in LIBRARY if m not in ("lwcam._moved", "lwcam._serving")]
    code = BLOCKER + f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
    code += f"print(len({modules!r}))\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == len(modules)


def test_the_blocker_would_catch_a_library_module_that_needs_pandas():
    code = BLOCKER + "import pandas\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr


_ID = re.compile(r"(?:^|_)[TtFf][1-9](?:_|$)")


def test_no_table_or_figure_id_names_anything_in_the_library():
    found = []
    for module, path in module_files().items():
        if module not in LIBRARY:
            continue
        tree = ast.parse(path.read_text())
        top = [*tree.body, *(n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body)]
        for node in top:  # module and class attributes, functions and classes: what a user can name
            names = [node.name] if isinstance(node, ast.FunctionDef | ast.ClassDef) else \
                [t.id for t in [*getattr(node, "targets", []), getattr(node, "target", None)]
                 if isinstance(t, ast.Name)]
            found += [f"{module}.{n}" for n in names if _ID.search(n)]
    assert found == []
    assert _ID.search("explain_t3") and _ID.search("T3_METHODS") and not _ID.search("float32")


@pytest.mark.parametrize("module", LIBRARY)
def test_a_long_library_file_says_why(module):
    path = module_files()[module]
    lines = len(path.read_text().splitlines())
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert doc, f"{module} has no opening docstring"
    if lines > 500:
        assert "Why one file:" in doc, f"{module} has {lines} lines and its docstring does not say why"


def test_every_score_declares_its_family_and_direction():
    public = {name for name in scoring.__all__ if callable(getattr(scoring, name))
              and name not in {"score", "bootstrap_ci", "paired_test", "gaussian_blur", "game_auc",
                               "map_rank_correlation", "ScoreInfo", "GameResult", "PairedResult"}}
    assert public == set(scoring.SCORES)
    for name, info in scoring.SCORES.items():
        assert getattr(scoring, name).score_info is info
        assert info.family in scoring.FAMILIES and info.needs <= scoring.NEEDS
    assert scoring.SCORES["deletion_game"].direction == "lower"
    assert scoring.SCORES["targeted_deletion"].direction == ("lower", "higher")


def test_score_refuses_an_unknown_family_direction_or_need():
    with pytest.raises(ValueError, match="family"):
        scoring.score("speed", "higher")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="direction"):
        scoring.score("complexity", "up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs"):
        scoring.score("complexity", "higher", needs=("gpu",))


#: each scorecard column: the library score it comes from, and which of its outputs (None: the only one)
T4_SOURCES = {
    "targeted_pointing": ("targeted_pointing", None), "targeted_mass": ("targeted_mass", None),
    "class_sensitivity": ("class_sensitivity", None), "deletion_asked": ("targeted_deletion", 0),
    "deletion_other": ("targeted_deletion", 1), "randomisation": ("model_randomisation", None),
    "max_sensitivity": ("max_sensitivity", None), "sparseness": ("sparseness", None),
}


def test_the_scorecard_columns_agree_with_the_scores_they_come_from():
    for column, (source, output) in T4_SOURCES.items():
        info, measure = scoring.SCORES[source], scorecard.MEASURES[column]
        direction = info.direction if output is None else info.direction[output]  # type: ignore[index]
        assert measure.higher_is_better == (direction == "higher"), column
        # on conflict scenes the deletion game of each class is read as localisation (T4's family)
        expected = "localisation" if column in ("deletion_asked", "deletion_other") else info.family
        assert measure.family == expected, column


#: the public names of the modules that were split, as the previous release listed them
OLD_PUBLIC = {
    "lwcam.layercam": ["LayerwiseGradCAM", "LayerMaps", "ClassifierOutputTarget", "auto_layers", "WEIGHTINGS",
                       "layer_maps_batched", "layer_maps_all_weightings", "raw_layer_maps", "upsample_layers",
                       "explain_lwcam"],
    "lwcam.metrics": ["GameResult", "PairedResult", "deletion_game", "insertion_game", "gaussian_blur", "game_auc",
                      "pointing_game", "relevance_mass", "bootstrap_ci", "paired_test"],
    "lwcam.measures": ["targeted_pointing", "targeted_mass", "class_sensitivity", "targeted_deletion", "road",
                       "road_score", "ROAD_PERCENTAGES", "model_randomisation", "max_sensitivity",
                       "map_rank_correlation", "sparseness"],
}


def _import_old(name: str):
    sys.modules.pop(name, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(name)
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning) and name in str(w.message)]
    return module, deprecations


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_a_moved_module_imports_from_its_old_path_with_a_deprecation_warning(old):
    new = _moved.MOVED[old]
    module, deprecations = _import_old(old)
    assert module is importlib.import_module(new)
    assert len(deprecations) == 1 and new in str(deprecations[0].message)
    assert deprecations[0].filename == __file__  # the warning points at the import, not at importlib


@pytest.mark.parametrize("old", sorted(_moved.SPLIT))
def test_a_split_module_keeps_its_public_names_at_its_old_path(old):
    module, deprecations = _import_old(old)
    assert len(deprecations) == 1
    for name in OLD_PUBLIC[old]:
        assert hasattr(module, name), f"{old}.{name} is gone"


def test_python_m_on_an_old_path_runs_the_new_module_and_warns():
    out = subprocess.run([sys.executable, "-m", "lwcam.pipeline", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "python -m lwcam.study" in out.stdout and "DeprecationWarning" in out.stderr


def test_an_unknown_module_is_not_found_by_the_old_paths_finder():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("lwcam.no_such_module")
