"""The shape of lwcam.distillation: a package of small modules, one job each, its public names where they were.

What must hold: every public name imports from ``lwcam.distillation`` and ``lwcam.distill`` is its ``distill``;
every module opens with a docstring and stays under 300 lines; no import cycle runs through the package; and
``lwcam``'s lazy attributes reach every public submodule, the ones added after the list was first written too.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from _imports import cycles, import_graph, reaches

import lwcam
import lwcam.distillation as distillation

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lwcam" / "distillation"
PUBLIC = ["distill", "DistillConfig", "DistillCheckpoint", "DistillResult", "kd_loss", "label_loss",
          "topk_distribution", "answers_to_log_probs", "CHECKPOINT_NAME"]


def test_the_public_names_import_from_the_package_and_lwcam_distill_is_its_function():
    assert set(PUBLIC) <= set(distillation.__all__)
    for name in distillation.__all__:
        assert getattr(distillation, name) is not None, name
    assert callable(lwcam.distill) and lwcam.distill is distillation.distill
    assert lwcam.DistillResult is distillation.DistillResult
    assert distillation.CHECKPOINT_NAME == "distill_checkpoint.pt"
    assert not (ROOT / "lwcam" / "distill").exists() and not (ROOT / "lwcam" / "distill.py").exists()


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_every_module_opens_with_a_docstring_and_stays_small(path):
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{path.name} has no opening docstring"
    assert len(path.read_text().splitlines()) <= 300, f"{path.name} is over 300 lines"
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            body = node.body[1:] if ast.get_docstring(node) else node.body
            code = body[-1].end_lineno - body[0].lineno + 1  # type: ignore[operator]
            assert code <= 50, f"{path.name}: {node.name} has {code} lines of code"


def test_no_import_cycle_runs_through_the_package():
    graph = import_graph()
    ours = [m for m in graph if m.startswith("lwcam.distillation.")]
    assert len(ours) >= 10
    assert [m for m in ours if m in reaches(graph, m)] == []
    assert "lwcam.distillation" not in reaches(graph, "lwcam.distillation")  # nothing it imports leads back to it


def test_lwcam_reaches_every_public_submodule_lazily():
    names = sorted(p.stem if p.is_file() else p.name for p in (ROOT / "lwcam").iterdir()
                   if not p.name.startswith("_") and (p.suffix == ".py" or (p / "__init__.py").exists()))
    assert {"remote", "fast", "study", "cam", "scoring", "distillation", "baselines"} <= set(names)
    code = ("import sys, lwcam\n"
            "assert [m for m in sys.modules if m.startswith('lwcam.')] == ['lwcam._moved']  # lwcam stays cheap\n"
            f"for name in {names!r}:\n"
            "    assert getattr(lwcam, name).__name__ == f'lwcam.{name}', name\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=600)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        lwcam.nonexistent  # noqa: B018
    assert importlib.import_module("lwcam.remote") is lwcam.remote


def test_no_import_cycle_in_lwcam():
    assert cycles(import_graph()) == []
