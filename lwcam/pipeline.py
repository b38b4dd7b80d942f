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
import json
import os
import sys
import time
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
    "table_t1",
    "blackbox_labels",
    "pick_indices",
    "student_agreement",
    "claim_table",
    "short_label",
    "fusion_variants",
    "select_fusion",
    "queries_tradeoff",
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
    from .models import build_model, load_checkpoint, train_teacher

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
    result = train_teacher(
        params["teacher"], x, y, num_classes=int(params["num_classes"]), val_images=xv, val_labels=yv,
        epochs=int(params.get("teacher_epochs", 12)), batch_size=int(params.get("teacher_batch_size", 64)),
        lr=float(params.get("teacher_lr", 4e-3)), seed=int(params.get("seed", 0)),
        checkpoint_path=paths.teacher, progress_bar=progress, meta={"fingerprint": fingerprint},
        pixel_dropout=float(params.get("teacher_pixel_dropout", 0.5)),
    )
    _, meta = load_checkpoint(paths.teacher)
    meta["history"] = result.history
    return result.model, meta


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
    from .distillation import distill
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
    result = distill(
        bb, transfer, student=params["student"], temperature=float(params.get("temperature", 4.0)),
        epochs=int(params.get("distill_epochs", 10)), batch_size=int(params.get("distill_batch_size", 64)),
        query_budget=params.get("query_budget"), holdout=float(params.get("holdout", 0.05)),
        eval_images=test_x, eval_labels=test_y, seed=int(params.get("seed", 0)),
        checkpoint_dir=paths.run / f"distill_{output}", progress=progress,
    )
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


def table_t1(params: dict[str, Any], teacher_meta: dict[str, Any], teacher_accuracy: float,
             students: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """T1: teacher accuracy, student accuracy, agreement, KL, queries and time, one row per black-box mode."""
    rows = []
    for mode, summary in students.items():
        fid = summary["fidelity"]
        rows.append({
            "blackbox_output": mode,
            "teacher": params["teacher"],
            "teacher_test_acc": teacher_accuracy,
            "student": params["student"],
            "student_test_acc": fid.get("accuracy"),
            "agreement_test": fid.get("eval_agreement"),
            "kl_test": fid.get("eval_kl"),
            "agreement_holdout": fid.get("agreement"),
            "queries": summary["queries"],
            "distill_seconds": round(float(summary["seconds"]), 1),
            "teacher_train_seconds": round(float(teacher_meta.get("seconds", float("nan"))), 1),
        })
    return pd.DataFrame(rows)


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
    if run.name == "gradcam_teacher":
        return "Grad-CAM (teacher, oracle)"
    if run.name == "mask":
        return "mask (oracle)"
    return run.label.split(" (")[0]


def claim_table(per_image: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The paper's claim as paired tests: lwcam's deletion AUC below Grad-CAM's (and every other method's).

    The first row is the main claim (lwcam vs Grad-CAM on the student's last layer, deletion AUC,
    one-sided). Then the same on the images where student and black box agree, the insertion
    AUC (higher is better), and lwcam against every other method on their common images.
    """
    from .evaluation import compare

    rows = [dict(compare(per_image, "lwcam", "gradcam", "deletion_auc", "less", seed), subset="all images")]
    if "agrees" in per_image:
        agreeing = per_image[per_image["agrees"]]
        if agreeing["method"].eq("lwcam").any():
            rows.append(dict(compare(agreeing, "lwcam", "gradcam", "deletion_auc", "less", seed),
                             subset="student agrees with black box"))
    rows.append(dict(compare(per_image, "lwcam", "gradcam", "insertion_auc", "greater", seed), subset="all images"))
    for other in per_image["method"].unique():
        if other not in ("lwcam", "gradcam"):
            rows.append(dict(compare(per_image, "lwcam", other, "deletion_auc", "less", seed), subset="all images"))
    cols = ["a", "b", "metric", "subset", "n", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "p_value",
            "alternative"]
    return pd.DataFrame(rows)[cols]


def fusion_variants(names: list[str]) -> dict[str, dict[str, Any]]:
    """The fusion settings compared on ``val``: the PROTOCOL modes and each single layer."""
    variants: dict[str, dict[str, Any]] = {
        "sum of min-max maps (default)": {"mode": "sum", "normalize": "minmax"},
        "raw sum (normalize='none')": {"mode": "sum", "normalize": "none"},
        "max of min-max maps": {"mode": "max", "normalize": "minmax"},
        "sum without the shallowest layer": {"mode": "weighted", "normalize": "minmax",
                                             "weights": [0.0] + [1.0] * (len(names) - 1)},
    }
    for i, name in enumerate(names):
        w = [0.0] * len(names)
        w[i] = 1.0
        variants[f"layer {name} only"] = {"mode": "weighted", "normalize": "minmax", "weights": w}
    return variants


def select_fusion(params: dict[str, Any], paths: RunPaths, student: torch.nn.Module, scorer: Any,
                  per_image: pd.DataFrame, test: tuple[torch.Tensor, torch.Tensor], seed: int = 0,
                  n_val: int | None = None) -> pd.DataFrame:
    """Choose a fusion setting by deletion AUC on ``val`` images, then report it once on ``test``.

    Returns one row per setting with its validation deletion AUC; the selected setting (and the
    default) also get their test deletion AUC and a paired one-sided test against Grad-CAM.
    """
    from .evaluation import layer_maps_batched
    from .fusion import fuse
    from .metrics import deletion_game, paired_test

    n_val = n_val or int(params.get("n_fusion_val", 200))
    val_x, _, _ = load_split(params, "val", paths)
    val_x = val_x[:n_val]
    val_t = blackbox_labels(scorer, val_x)
    names, stack, _ = layer_maps_batched(student, val_x, val_t)
    variants = fusion_variants(names)
    rows = []
    for label, kw in variants.items():
        auc = deletion_game(scorer, val_x, fuse(stack, **kw), val_t).auc
        rows.append({"fusion": label, "val_deletion_auc": float(auc.mean()), "n_val": len(val_x)})
    table = pd.DataFrame(rows)
    best = table.loc[table["val_deletion_auc"].idxmin(), "fusion"]
    table["selected_on_val"] = table["fusion"] == best
    test_x, test_t = test
    _, test_stack, _ = layer_maps_batched(student, test_x, test_t)
    grad = per_image[per_image["method"] == "gradcam"].set_index("image")["deletion_auc"]
    grad = grad.reindex(range(len(test_x))).to_numpy()
    for col in ("test_deletion_auc", "test_gradcam_deletion_auc", "test_mean_diff", "test_p_value"):
        table[col] = float("nan")
    for label in dict.fromkeys([best, "sum of min-max maps (default)"]):
        auc = deletion_game(scorer, test_x, fuse(test_stack, **variants[label]), test_t).auc.numpy()
        res = paired_test(auc, grad, alternative="less", seed=seed)
        i = table.index[table["fusion"] == label][0]
        table.loc[i, ["test_deletion_auc", "test_gradcam_deletion_auc", "test_mean_diff", "test_p_value"]] = [
            float(auc.mean()), float(grad.mean()), res.mean_diff, res.p_value]
    return table


def queries_tradeoff(params: dict[str, Any], blackbox: Any, scorer: Any, images: torch.Tensor,
                     targets: torch.Tensor, runs: dict[str, Any], distill_summary: dict[str, Any],
                     seed: int = 0, n_images: int | None = None,
                     n_masks: tuple[int, ...] = (100, 300, 1000)) -> tuple[pd.DataFrame, str]:
    """F6 data: RISE's deletion AUC at several mask counts against lwcam's amortised queries.

    Returns the table (one row per RISE setting plus lwcam) and a sentence with the break-even
    image count: lwcam's distillation queries divided by RISE's queries per image.
    """
    from .baselines import rise
    from .metrics import deletion_game, insertion_game

    n = n_images or min(int(params.get("n_tradeoff", 20)), len(runs["rise"].indices))
    idx = runs["rise"].indices[:n]
    x, t = images[idx], targets[idx]
    rows = []
    settings = sorted({*n_masks, int(params.get("rise_masks", 4000))})
    for n_m in settings:
        if n_m == int(params.get("rise_masks", 4000)):
            sal = runs["rise"].saliency[:n]
        else:
            sal = rise(blackbox, x, t, n_masks=n_m, seed=seed)
        rows.append({"method": "RISE", "setting": f"N={n_m}", "queries_per_image": float(n_m),
                     "deletion_auc": float(deletion_game(scorer, x, sal, t).auc.mean()),
                     "insertion_auc": float(insertion_game(scorer, x, sal, t).auc.mean()), "n_images": n})
    lw = runs["lwcam"].saliency[[int((runs["lwcam"].indices == i).nonzero()) for i in idx]]
    q = int(distill_summary["queries"])
    rows.append({"method": "lwcam", "setting": f"distillation: {q} queries, once", "queries_per_image": 0.0,
                 "deletion_auc": float(deletion_game(scorer, x, lw, t).auc.mean()),
                 "insertion_auc": float(insertion_game(scorer, x, lw, t).auc.mean()), "n_images": n})
    table = pd.DataFrame(rows)
    n_default = int(params.get("rise_masks", 4000))
    sentence = (f"break-even: lwcam's {q} distillation queries equal RISE (N={n_default}) on "
                f"{q / n_default:.1f} images; beyond that lwcam needs fewer black-box queries in total")
    return table, sentence


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
    done = []
    timings = {}
    for name in names:
        src = base / "notebooks" / f"{name}.ipynb"
        if not src.exists():
            print(f"[lwcam] {name}: notebook not present, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        print(f"[lwcam] {name} (profile {profile}) ...", flush=True)
        pm.execute_notebook(str(src), str(out_dir / f"{name}.ipynb"), parameters=params,
                            cwd=str(base / "notebooks"), log_output=log_output, progress_bar=False,
                            kernel_name="python3")
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[lwcam] {name} done in {timings[name]} s", flush=True)
        done.append(out_dir / f"{name}.ipynb")
    (out_dir / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
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
