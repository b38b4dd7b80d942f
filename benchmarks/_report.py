"""What every benchmark script shares: ``--seed``/``--threads``, the machine it ran on, and one
table written as CSV + Markdown and printed.

Importing this module has no side effects.

Example:
    >>> import argparse, pandas as pd, tempfile
    >>> args = add_common_args(argparse.ArgumentParser()).parse_args(["--threads", "1"])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     csv, md = write_report(pd.DataFrame({"a": [1.0]}), f"{d}/t.csv", title="T", echo=False)
    ...     md.read_text().startswith("# T")
    True
"""

from __future__ import annotations

import argparse
import io
import os
import platform
from pathlib import Path

import pandas as pd
import torch

from lwcam._utils import atomic_write_bytes
from lwcam.study.pipeline import cpu_model

__all__ = ["add_common_args", "cpu_model", "machine", "machine_line", "write_report"]


def add_common_args(parser: argparse.ArgumentParser, threads: int = 2) -> argparse.ArgumentParser:
    """Add ``--seed`` (default 0) and ``--threads`` (torch threads, default ``threads``)."""
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--threads", type=int, default=threads, help="torch.set_num_threads")
    return parser


def machine() -> dict[str, object]:
    """CPU model, CPU count, torch threads, torch and Python versions, 1-minute load average."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "load_1min": round(load, 2)}


def machine_line(info: dict[str, object] | None = None) -> str:
    """One sentence describing :func:`machine` (by default, measured now)."""
    m = info or machine()
    return (f"{m['cpu']} ({m['cpus']} CPUs), {m['threads']} torch threads, torch {m['torch']}, "
            f"Python {m['python']}, load average {m['load_1min']}")


def write_report(df: pd.DataFrame, csv_path: str | os.PathLike, *, title: str, notes: str = "",
                 columns: list[str] | None = None, floatfmt: str = ".4g", echo: bool = True,
                 info: dict[str, object] | None = None) -> tuple[Path, Path]:
    """Write ``df`` to ``csv_path`` and a Markdown page beside it (same stem, ``.md``); print the table.

    The CSV gets every column of ``df`` plus the machine (``cpu``, ``threads``, ``torch``); the
    Markdown page holds ``# title``, the machine, the table (``columns`` only, when given) and ``notes``.
    Both files are written atomically. ``info`` is a :func:`machine` record taken earlier (for
    example at the start of the run); by default the machine is read now.

    Returns:
        The CSV and Markdown paths.
    """
    info = info or machine()
    csv_path = Path(csv_path)
    full = df.copy()
    for key in ("cpu", "threads", "torch"):
        full[key] = info[key]
    buf = io.StringIO()
    full.to_csv(buf, index=False)
    atomic_write_bytes(buf.getvalue().encode(), csv_path)
    table = (df[columns] if columns else df).to_markdown(index=False, floatfmt=floatfmt)
    md_path = csv_path.with_suffix(".md")
    page = f"# {title}\n\nMachine: {machine_line(info)}.\n\n{table}\n"
    page += f"\n{notes.strip()}\n" if notes.strip() else ""
    atomic_write_bytes(page.encode(), md_path)
    if echo:
        print(f"{machine_line(info)}\n{table}\nwrote {csv_path} and {md_path}", flush=True)
    return csv_path, md_path
