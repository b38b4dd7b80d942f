"""The import graph of lwcam, read from its source: which lwcam modules each module imports, and the cycles.

Every import counts, lazy ones inside functions and ``TYPE_CHECKING`` ones too, so the graph shows what a
module may reach, not only what importing it runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

LWCAM = Path(__file__).resolve().parents[1] / "lwcam"


def module_files(root: Path = LWCAM) -> dict[str, Path]:
    """``{"lwcam.x.y": path}`` for every ``.py`` file below ``root`` (a package's ``__init__`` as the package)."""
    return {".".join(("lwcam", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` (at ``path``) imports anywhere in its code."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != module}


def import_graph(root: Path = LWCAM) -> dict[str, set[str]]:
    """``{module: the lwcam modules it imports}`` for every module below ``root``."""
    files = module_files(root)
    return {m: imports_of(p, m, set(files)) for m, p in files.items()}


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out
