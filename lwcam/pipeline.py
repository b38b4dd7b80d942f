"""The reproducible pipeline: profiles, run folders, cached artefacts, and the papermill driver.

A *profile* is a YAML file under ``params/`` (``quick``, ``default``, ``imagenet``, ...). Its
keys are the notebooks' papermill parameters. Artefacts that take time to make (rendered
data, the black-box teacher, the distilled student, black-box answers) live in the run
folder ``runs/<profile>/`` and are reused when present, so every notebook can run alone.
Figures go to ``figures/`` and tables to ``reports/`` for the ``default`` profile, and to
``figures/<profile>/`` and ``reports/<profile>/`` for any other.

Command line::

    python -m lwcam.pipeline run --profile default      # every notebook, every figure and table
    python -m lwcam.pipeline run --profile quick --only 01_distill
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

__all__ = [
    "NOTEBOOKS",
    "project_root",
    "load_profile",
    "RunPaths",
    "load_split",
    "get_teacher",
    "make_blackbox",
    "collect_params",
    "get_student",
    "load_snapshots",
    "stage",
    "record_stage",
    "timings_table",
    "blackbox_labels",
    "pick_indices",
    "student_agreement",
    "short_label",
    "save_table",
    "save_figure",
    "run",
    "main",
]

NOTEBOOKS = ("01_distill", "02_explain", "03_layer_importance", "04_deletion_game")


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The folder holding ``pyproject.toml`` and ``params/``, searched upwards from ``start`` (or the cwd)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists() and (folder / "params").is_dir():
            return folder
    raise FileNotFoundError(f"no lwcam project root (pyproject.toml + params/) above {here}")


def load_profile(name: str, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read ``params/<name>.yaml`` as a dict of notebook parameters."""
    path = project_root(root) / "params" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"unknown profile {name!r}; expected one of {known}")
    params = yaml.safe_load(path.read_text()) or {}
    params.setdefault("profile", name)
    return params


@dataclass
class RunPaths:
    """Where a profile's artefacts, figures and tables go (all relative to the project root)."""

    profile: str
    root: Path

    @classmethod
    def for_profile(cls, profile: str, root: str | os.PathLike | None = None) -> RunPaths:
        paths = cls(profile=profile, root=project_root(root))
        for folder in (paths.run, paths.figures, paths.reports):
            folder.mkdir(parents=True, exist_ok=True)
        return paths

    @property
    def run(self) -> Path:
        return self.root / "runs" / self.profile

    @property
    def figures(self) -> Path:
        return self.root / "figures" if self.profile == "default" else self.root / "figures" / self.profile

    @property
    def reports(self) -> Path:
        return self.root / "reports" if self.profile == "default" else self.root / "reports" / self.profile

    @property
    def data_cache(self) -> Path:
        return self.root / "runs" / "data-cache"

    @property
    def teacher(self) -> Path:
        return self.run / "teacher.pt"

    @property
    def student(self) -> Path:
        return self.run / "student.pt"

    @property
    def answers(self) -> Path:
        return self.run / "blackbox-cache"

    @property
    def stage_log(self) -> Path:
        return self.run / "stage_timings.jsonl"

    def snapshots(self, output: str = "probs") -> Path:
        """Folder of the per-epoch students of a distillation (F7)."""
        return self.run / f"student_{output}_epochs"

    def rel(self, path: str | os.PathLike) -> str:
        """``path`` relative to the project root, for printing without absolute paths."""
        try:
            return str(Path(path).resolve().relative_to(self.root))
        except ValueError:
            return str(path)


def load_split(params: dict[str, Any], split: str, paths: RunPaths | None = None,
               n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load a split of the profile's data set as tensors ``(images, labels, masks)``."""
    from .data import SyntheticTextures, get_dataset, load_tensors

    name = params.get("dataset", "synthetic")
    if name == "synthetic":
        n = n if n is not None else params.get(f"n_{split}")
        ds = SyntheticTextures(
            split=split,
            n=n,
            image_size=int(params.get("image_size", 64)),
            num_classes=int(params.get("num_classes", 10)),
            seed=int(params.get("data_seed", 0)),
            cache_dir=paths.data_cache if paths is not None else None,
        )
        with stage(f"data: {split} split ({len(ds)} images, rendered or read from the cache)", paths):
            return ds.tensors()
    real_split = {"transfer": "train"}.get(split, split)
    ds = get_dataset(name, root=params.get("data_root"), split=real_split, image_size=params.get("image_size"))
    limit = n if n is not None else params.get(f"n_{split}")
    g = torch.Generator().manual_seed(int(params.get("seed", 0)))
    order = torch.randperm(len(ds), generator=g).tolist()  # type: ignore[arg-type]
    return load_tensors(ds, order[:limit] if limit else order)


#: Profile keys that determine the teacher, and (with those) the students; a cached artefact is
#: reused only when these match.
TEACHER_KEYS = ("dataset", "image_size", "num_classes", "seed", "data_seed", "n_train", "n_val", "teacher",
                "teacher_weights", "teacher_epochs", "teacher_batch_size", "teacher_lr", "teacher_pixel_dropout")
STUDENT_KEYS = ("n_transfer", "n_test", "student", "temperature", "distill_epochs", "distill_batch_size",
                "query_budget", "holdout", "topk")


def _fingerprint(params: dict[str, Any], keys: tuple[str, ...]) -> str:
    return json.dumps({k: params.get(k) for k in keys}, sort_keys=True, default=str)


def get_teacher(params: dict[str, Any], paths: RunPaths, progress: bool | None = None) -> tuple[torch.nn.Module, dict]:
    """Load the profile's black-box teacher, training it first if its checkpoint is missing.

    For the paper's data sets set ``teacher_weights`` to a torchvision weights enum name or a
    local file; the synthetic default trains ``teacher`` from scratch on the ``train`` split.
    """
    from .models import build_model, load_checkpoint

    if params.get("teacher_weights"):
        model = build_model(params["teacher"], int(params["num_classes"]), weights=params["teacher_weights"])
        return model.eval(), {"arch": params["teacher"], "weights": params["teacher_weights"], "seconds": 0.0}
    fingerprint = _fingerprint(params, TEACHER_KEYS)
    if paths.teacher.exists():
        model, meta = load_checkpoint(paths.teacher)
        if meta.get("fingerprint") == fingerprint:
            return model, meta
    x, y, _ = load_split(params, "train", paths)
    xv, yv, _ = load_split(params, "val", paths)
    with stage(f"teacher training ({params['teacher']})", paths):
        result = _train_teacher(params, paths, x, y, xv, yv, fingerprint, progress)
    _, meta = load_checkpoint(paths.teacher)
    meta["history"] = result.history
    return result.model, meta


def _train_teacher(params: dict[str, Any], paths: RunPaths, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor,
                   yv: torch.Tensor, fingerprint: str, progress: bool | None) -> Any:
    from .models import train_teacher

    return train_teacher(
        params["teacher"], x, y, num_classes=int(params["num_classes"]), val_images=xv, val_labels=yv,
        epochs=int(params.get("teacher_epochs", 12)), batch_size=int(params.get("teacher_batch_size", 64)),
        lr=float(params.get("teacher_lr", 4e-3)), seed=int(params.get("seed", 0)),
        checkpoint_path=paths.teacher, progress=progress, meta={"fingerprint": fingerprint},
        pixel_dropout=float(params.get("teacher_pixel_dropout", 0.5)),
    )


def make_blackbox(teacher: torch.nn.Module, params: dict[str, Any], paths: RunPaths, output: str | None = None,
                  cache: bool = True):
    """Wrap the teacher as a :class:`~lwcam.blackbox.BlackBox` with the profile's output mode and cache."""
    from .blackbox import BlackBox

    return BlackBox(
        teacher,
        num_classes=int(params["num_classes"]),
        output=output or params.get("blackbox_output", "probs"),
        k=int(params.get("topk", 5)),
        batch_size=int(params.get("blackbox_batch_size", 256)),
        cache_dir=paths.answers if cache else None,
        cache_namespace=f"{params['teacher']}-seed{params.get('seed', 0)}-{output or params.get('blackbox_output', 'probs')}",
    )


def collect_params(namespace: dict[str, Any], profile: str = "quick") -> dict[str, Any]:
    """Pick the profile keys (those of ``params/<profile>.yaml``) out of a notebook's namespace."""
    keys = load_profile(profile).keys()
    return {k: namespace[k] for k in keys if k in namespace}


def get_student(params: dict[str, Any], paths: RunPaths, teacher: torch.nn.Module, output: str | None = None,
                progress: bool | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the distilled student for a black-box ``output`` mode, distilling it first if needed.

    The student sees only the black box's answers on the ``transfer`` split (plus the ``test``
    split's answers, for the held-out fidelity that T1 reports). Its checkpoint and a JSON
    summary (history, fidelity, queries, seconds) are kept in the run folder.
    """
    from .models import load_checkpoint, save_checkpoint

    output = output or params.get("blackbox_output", "probs")
    ckpt = paths.run / f"student_{output}.pt"
    summary_path = paths.run / f"student_{output}.json"
    fingerprint = _fingerprint(params, TEACHER_KEYS + STUDENT_KEYS)
    if ckpt.exists() and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("fingerprint") == fingerprint:
            model, _ = load_checkpoint(ckpt)
            return model, summary
    transfer, _, _ = load_split(params, "transfer", paths)
    test_x, test_y, _ = load_split(params, "test", paths)
    # no persistent answer cache here: distillation keeps its answers in its own checkpoint, and
    # T1 must report what a distillation from scratch pays
    bb = make_blackbox(teacher, params, paths, output=output, cache=False)
    # one checkpoint folder per configuration, so an interrupted run resumes and a changed one starts afresh
    ckpt_dir = paths.run / f"distill_{output}_{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}"
    snapshots = paths.snapshots(output)
    snapshots.mkdir(parents=True, exist_ok=True)
    if not ckpt_dir.exists():
        for old in snapshots.glob("epoch_*.pt"):
            old.unlink()

    def keep(epoch: int, model: torch.nn.Module) -> None:
        save_checkpoint(model, snapshots / f"epoch_{epoch:03d}.pt", arch=params["student"],
                        num_classes=int(params["num_classes"]), output=output, epoch=epoch)

    with stage(f"distillation ({output}, {params['student']})", paths):
        result = _distill(params, ckpt_dir, bb, transfer, test_x, test_y, output, keep, progress)
    save_checkpoint(result.student, ckpt, arch=params["student"], num_classes=int(params["num_classes"]),
                    output=output, seed=int(params.get("seed", 0)))
    summary = {
        "fingerprint": fingerprint,
        "output": output,
        "history": result.history,
        "fidelity": result.fidelity,
        "queries": result.queries,
        "seconds": result.seconds,
        "config": {**{k: v for k, v in result.config.items() if isinstance(v, (int, float, str, bool, type(None)))},
                   "student_arch": params["student"]},
    }
    summary_path.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return result.student, summary


def _distill(params: dict[str, Any], ckpt_dir: Path, bb: Any, transfer: torch.Tensor, test_x: torch.Tensor,
             test_y: torch.Tensor, output: str, keep: Any, progress: bool | None) -> Any:
    from .distillation import distill

    return distill(
        bb, transfer, student=params["student"], temperature=float(params.get("temperature", 4.0)),
        epochs=int(params.get("distill_epochs", 10)), batch_size=int(params.get("distill_batch_size", 64)),
        query_budget=params.get("query_budget"), holdout=float(params.get("holdout", 0.05)),
        eval_images=test_x, eval_labels=test_y, seed=int(params.get("seed", 0)),
        checkpoint_dir=ckpt_dir, progress=progress, on_epoch_end=keep,
    )


def load_snapshots(params: dict[str, Any], paths: RunPaths, output: str = "probs") -> dict[int, torch.nn.Module]:
    """The student after each distillation epoch (``epoch -> model``), as saved by :func:`get_student`."""
    from .models import load_checkpoint

    files = sorted(paths.snapshots(output).glob("epoch_*.pt"))
    if not files:
        raise FileNotFoundError(f"no per-epoch students under {paths.rel(paths.snapshots(output))}; "
                                f"run notebook 01 (or delete the cached student_{output}.json) first")
    return {int(f.stem.split("_")[1]): load_checkpoint(f)[0] for f in files}


def blackbox_labels(blackbox: Any, images: torch.Tensor) -> torch.Tensor:
    """The black box's predicted class per image, whatever its output mode."""
    out = blackbox(images)
    if blackbox.output == "label":
        return out
    if blackbox.output == "topk":
        return out.indices[:, 0]
    return out.argmax(1)


def pick_indices(n_total: int, n: int, seed: int) -> torch.Tensor:
    """A seeded, sorted choice of ``n`` indices out of ``n_total`` (the images a figure shows)."""
    if not 0 < n <= n_total:
        raise ValueError(f"n must be in [1, {n_total}], got {n}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].sort().values


def student_agreement(student: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bool (B,): does the student's argmax equal the black box's label? (Which explanations to distrust.)"""
    from .models import predict_logits

    return predict_logits(student, images).argmax(1) == labels


def short_label(run: Any) -> str:
    """A short display name for a method run: ``lwcam``, ``Grad-CAM``, ``Grad-CAM (teacher, oracle)``, ..."""
    if run.name in ("lwcam", "lwcam_selected"):
        return run.label
    if run.name == "gradcam_teacher":
        return "Grad-CAM (teacher, oracle)"
    if run.name == "mask":
        return "mask (oracle)"
    return run.label.split(" (")[0]


@contextmanager
def stage(name: str, paths: RunPaths | None) -> Iterator[None]:
    """Time a costly stage and append ``{notebook, stage, seconds}`` to the run's stage log.

    The notebook's name comes from the ``LWCAM_NOTEBOOK`` environment variable, which
    :func:`run` sets for each notebook; :func:`timings_table` reads the log back.
    """
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if paths is not None:
            record_stage(name, time.perf_counter() - t0, paths)


def record_stage(name: str, seconds: float, paths: RunPaths) -> None:
    """Append one stage's wall time to the run's stage log (see :func:`stage`)."""
    row = {"notebook": os.environ.get("LWCAM_NOTEBOOK", ""), "stage": name, "seconds": round(float(seconds), 2)}
    with paths.stage_log.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _git_commit(root: Path) -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def timings_table(paths: RunPaths, notebook_seconds: dict[str, float], params: dict[str, Any]) -> pd.DataFrame:
    """Wall time per notebook and per costly stage, with the run's provenance in every row."""
    rows = []
    stages = [json.loads(line) for line in paths.stage_log.read_text().splitlines()] if paths.stage_log.exists() else []
    for nb, seconds in notebook_seconds.items():
        rows.append({"notebook": nb, "stage": "(whole notebook)", "seconds": seconds})
        rows.extend({"notebook": nb, "stage": r["stage"], "seconds": r["seconds"]} for r in stages
                    if r["notebook"] == nb)
    rows.append({"notebook": "(all)", "stage": "(total)", "seconds": round(sum(notebook_seconds.values()), 1)})
    table = pd.DataFrame(rows)
    table["profile"] = paths.profile
    table["seed"] = params.get("seed")
    table["commit"] = _git_commit(paths.root)
    table["torch"] = torch.__version__
    table["threads"] = torch.get_num_threads()
    table["machine"] = f"{platform.machine()} {os.cpu_count()} CPUs"
    return table


def save_table(df: pd.DataFrame, table_id: str, paths: RunPaths, float_format: str = "%.6g") -> tuple[Path, Path]:
    """Write ``<reports>/<table_id>.csv`` and ``.md`` and return both paths."""
    csv_path = paths.reports / f"{table_id}.csv"
    md_path = paths.reports / f"{table_id}.md"
    df.to_csv(csv_path, index=False, float_format=float_format)  # "%.6g" keeps tiny p-values
    md_path.write_text(df.to_markdown(index=False, floatfmt=".4g") + "\n")
    return csv_path, md_path


def save_figure(fig: Any, figure_id: str, paths: RunPaths, dpi: int = 120) -> Path:
    """Save a matplotlib figure as ``<figures>/<figure_id>.png``."""
    from .plots import save_figure as _save

    return _save(fig, paths.figures / f"{figure_id}.png", dpi=dpi)


def run(profile: str = "default", only: list[str] | None = None, root: str | os.PathLike | None = None,
        log_output: bool = False) -> list[Path]:
    """Execute the notebooks with papermill for ``profile``; executed copies go to ``runs/<profile>/notebooks``."""
    import papermill as pm

    base = project_root(root)
    params = load_profile(profile, base)
    names = list(NOTEBOOKS) if not only else list(only)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"unknown notebooks {unknown}; expected some of {NOTEBOOKS}")
    out_dir = base / "runs" / profile / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = RunPaths.for_profile(profile, base)
    paths.stage_log.unlink(missing_ok=True)
    done, timings, start = [], {}, time.perf_counter()
    for name in names:
        src = base / "notebooks" / f"{name}.ipynb"
        t0 = time.perf_counter()
        print(f"[lwcam] {name} (profile {profile}) ...", flush=True)
        os.environ["LWCAM_NOTEBOOK"] = name  # the kernel inherits it: stage() labels its rows with it
        try:
            pm.execute_notebook(str(src), str(out_dir / f"{name}.ipynb"), parameters=params,
                                cwd=str(base / "notebooks"), log_output=log_output, progress=False,
                                kernel_name="python3")
        finally:
            os.environ.pop("LWCAM_NOTEBOOK", None)
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[lwcam] {name} done in {timings[name]:.0f} s; run so far {time.perf_counter() - start:.0f} s",
              flush=True)
        done.append(out_dir / f"{name}.ipynb")
    table = timings_table(paths, timings, params)
    save_table(table, "timings", paths)
    print(f"[lwcam] timings -> {paths.rel(paths.reports / 'timings.csv')}", flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lwcam.pipeline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="execute the notebooks for a profile")
    p_run.add_argument("--profile", default="default")
    p_run.add_argument("--only", nargs="*", default=None, help="notebook names, e.g. 01_distill")
    p_run.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    run(args.profile, args.only, log_output=args.log_output)
    print(f"[lwcam] profile {args.profile}: all done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
