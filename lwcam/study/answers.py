"""The run's answers in a few sentences, read from its tables: one home for the README, the docs and the report.

A profile's tables (``reports/`` for ``default``, ``reports/<profile>/`` otherwise) hold every number
a run makes. :class:`Tables` reads them, picks rows by the values of their columns, and adds the
columns a reader wants and no table stores: a claim's ``verdict`` (:func:`claim_verdict`) and a
goal's ``outcome`` (``met``, ``not met`` or ``not measured``). :func:`headline_answers` turns them
into the four answers a reader comes for:

* **claim**: does the paper's claim hold (its sum of layer maps against last-layer Grad-CAM, T3 and T4)?
* **trust**: which explainer follows the class it is asked about (the scorecard, T4)?
* **cost**: what an explanation costs in black-box queries and seconds (T3, T1, the run's timings)?
* **size**: where layer-wise fusion helps (object size against the student's last-map cells, T5)?

Every number and every verdict word of an answer comes from the tables, so an answer cannot
contradict them after a rerun. :mod:`lwcam.study.docs` renders them into the README and the docs,
:mod:`lwcam.study.report` onto the site's landing page.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = Path(d, "T3_claim.csv").write_text(
    ...         "a,b,metric,subset,n,mean_a,mean_b,mean_diff,ci_low,ci_high,p_value,alternative\\n"
    ...         "lwcam,gradcam,deletion_auc,all images,10,0.3,0.2,0.1,0.05,0.15,0.99,less\\n")
    ...     _ = Path(d, "T3_methods.csv").write_text("method,label\\nlwcam,lwcam (paper)\\ngradcam,Grad-CAM\\n")
    ...     tables = Tables(d)
    ...     print(tables.value("T3_claim", {"a": ["lwcam"], "b": ["gradcam"]}, "verdict"))
    ...     answer = headline_answers(tables)[0]
    does not hold
    >>> answer.text.split(".**")[0], "deletion AUC of 0.300 against 0.200 for Grad-CAM" in answer.text
    ("**The paper's claim does not hold", True)
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["TableError", "MissingTable", "Tables", "Answer", "claim_verdict", "with_verdicts", "goal_outcome",
           "load_csv", "reports_dir", "format_value", "headline_answers", "provenance", "markdown_inline_html",
           "method_labels", "claim_summary", "verdict_changes"]

#: A table id: a file stem of the reports folder, optionally under one profile folder (``paper/T3_methods``).
_TABLE_ID = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*")


class TableError(ValueError):
    """A table, row or column that a caller asked for and the reports do not hold; the message names it."""


class MissingTable(TableError):
    """A table that is not in the reports folder (its notebook has not been run for this profile)."""


def reports_dir(profile: str, root: str | os.PathLike) -> Path:
    """A profile's tables: ``<root>/reports`` for ``default``, ``<root>/reports/<profile>`` otherwise.

    >>> reports_dir("default", "/p").as_posix(), reports_dir("paper", "/p").as_posix()
    ('/p/reports', '/p/reports/paper')
    """
    base = Path(root) / "reports"
    return base if profile == "default" else base / profile


def load_csv(path: Path) -> pd.DataFrame:
    """A table of the reports folder; ``ValueError`` naming a file that is not a readable CSV."""
    try:
        return pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' parser errors are ValueErrors
        raise ValueError(f"table {path}: not a readable CSV ({str(exc).splitlines()[0][:200] if str(exc) else ''})"
                         ) from exc


def claim_verdict(mean_diff: float, p_value: float, alternative: str, alpha: float = 0.05) -> str:
    """A claim's verdict: it ``holds`` when the difference goes its way and the one-sided ``p < alpha``.

    ``alternative`` is the claim's direction for ``a - b``: ``less`` or ``greater``.

    >>> claim_verdict(-0.02, 0.001, "less"), claim_verdict(0.06, 1.0, "less"), claim_verdict(0.01, 0.2, "greater")
    ('holds', 'does not hold', 'does not hold')
    """
    if alternative not in ("less", "greater"):
        raise ValueError(f"alternative must be 'less' or 'greater', got {alternative!r}")
    better = mean_diff < 0 if alternative == "less" else mean_diff > 0
    return "holds" if better and p_value < alpha else "does not hold"


def claim_lines(claims: pd.DataFrame) -> list[str]:
    """One line per claim, as the notebooks print it: the pair, the measure, the means, ``p`` and the verdict.

    >>> t = pd.DataFrame({"a": ["lwcam"], "b": ["rise"], "metric": ["deletion_auc"], "n": [8], "mean_a": [0.1],
    ...                   "mean_b": [0.2], "mean_diff": [-0.1], "p_value": [0.001], "alternative": ["less"]})
    >>> claim_lines(t)
    ['lwcam vs rise (deletion_auc, n=8): 0.100 vs 0.200, p = 0.001 -> holds']
    """
    lines = []
    for _, c in with_verdicts(claims).iterrows():
        subset = f", {c.subset}" if "subset" in claims else ""
        lines.append(f"{c.a} vs {c.b} ({c.metric}{subset}, n={c.n}): {c.mean_a:.3f} vs {c.mean_b:.3f}, "
                     f"p = {c.p_value:.3g} -> {c.verdict}")
    return lines


def with_verdicts(claims: pd.DataFrame) -> pd.DataFrame:
    """``claims`` with a ``verdict`` column: its own, or one made from ``mean_diff``, ``p_value`` and ``alternative``.

    >>> t = pd.DataFrame({"mean_diff": [-0.1, 0.1], "p_value": [1e-9, 1.0], "alternative": ["less", "less"]})
    >>> list(with_verdicts(t)["verdict"])
    ['holds', 'does not hold']
    """
    if "verdict" in claims:
        return claims
    needed = {"mean_diff", "p_value", "alternative"}
    if not needed <= set(claims.columns):
        raise ValueError(f"claims: a claim table needs a 'verdict' column or the columns {sorted(needed)}; "
                         f"got {list(claims.columns)}")
    out = claims.copy()
    out["verdict"] = [claim_verdict(float(d), float(p), str(a))
                      for d, p, a in zip(claims["mean_diff"], claims["p_value"], claims["alternative"], strict=True)]
    return out


def goal_outcome(met: object, value: object) -> str:
    """A declared goal's outcome: ``met``, ``not met``, or ``not measured`` (no value: nothing to test it on).

    >>> goal_outcome(True, 0.01), goal_outcome(False, -0.1), goal_outcome(False, float("nan"))
    ('met', 'not met', 'not measured')
    """
    if _is_missing(value):
        return "not measured"
    return "met" if str(met).strip().lower() == "true" else "not met"


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, numbers.Real) and math.isnan(value)) or value == ""


def _derive(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the columns no table stores: ``verdict`` of a claim table, ``outcome`` of a goals table."""
    if "verdict" not in table and {"mean_diff", "p_value", "alternative"} <= set(table.columns):
        table = with_verdicts(table)
    if "outcome" not in table and {"met", "value"} <= set(table.columns):
        table = table.assign(outcome=[goal_outcome(m, v) for m, v in zip(table["met"], table["value"], strict=True)])
    return table


def format_value(value: Any, spec: str = "") -> str:
    """One value as text: a number by the format ``spec`` (Python's), or as the site shows it; text as it is.

    Without ``spec`` a float keeps 3 decimals (tiny ones in e-notation) and a whole number none;
    a missing value (NaN) is ``n/a``.

    >>> [format_value(v) for v in (0.258719, 3.4e-71, 500.0, "lwcam", float("nan"))]
    ['0.259', '3.4e-71', '500', 'lwcam', 'n/a']
    >>> format_value(0.61667, ".0%"), format_value(2.06737e-06, ".1g"), format_value(-0.1404, "+.3f")
    ('62%', '2e-06', '-0.140')
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return "n/a" if _is_missing(value) else str(value)
    if math.isnan(value):
        return "n/a"
    if spec:
        try:
            return format(value, spec)
        except ValueError as exc:
            raise ValueError(f"format: {spec!r} is not a number format ({exc})") from exc
    number = float(value)
    if number.is_integer() and abs(number) < 1e6:
        return str(int(number))
    return f"{number:.3f}" if abs(number) >= 1e-3 else f"{number:.2g}"


def _filter_text(filters: Mapping[str, Sequence[str]]) -> str:
    return " ".join(f"{k}={'|'.join(map(repr, v))}" for k, v in filters.items()) or "(no filter)"


class Tables:
    """The CSV tables of one reports folder, read once each, with :func:`claim_verdict` and goal outcomes added.

    A table id is a file stem (``T3_methods``) or a profile folder and a stem (``paper/T3_methods``).
    Rows are picked by ``{column: [accepted values]}``, compared as text (``"256"`` matches 256).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = Path(d, "T.csv").write_text("method,auc\\nlwcam,0.2\\nrise,0.3\\n")
    ...     t = Tables(d)
    ...     t.value("T", {"method": ["rise"]}, "auc"), len(t.rows("T", {"method": ["rise", "lwcam"]}))
    (0.3, 2)
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._cache: dict[str, pd.DataFrame] = {}

    def path(self, table_id: str) -> Path:
        """The CSV file of ``table_id``; ``TableError`` naming an id that is not one."""
        if not isinstance(table_id, str) or not _TABLE_ID.fullmatch(table_id):
            raise TableError(f"table: {table_id!r} is not a table id (a file stem of the reports folder, "
                             "optionally under one profile folder: T3_methods, paper/T3_methods)")
        return self.folder / f"{table_id}.csv"

    def has(self, table_id: str) -> bool:
        """Whether the reports folder holds ``table_id``."""
        return self.path(table_id).is_file()

    def get(self, table_id: str) -> pd.DataFrame:
        """The whole table; :class:`MissingTable` naming the file when it is not there."""
        if table_id not in self._cache:
            path = self.path(table_id)
            if not path.is_file():
                raise MissingTable(f"table {table_id}: no {path} (its notebook or benchmark has not been run)")
            self._cache[table_id] = _derive(load_csv(path))
        return self._cache[table_id]

    def rows(self, table_id: str, filters: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
        """The rows whose columns hold one of the accepted values; ``TableError`` naming a column it lacks."""
        table = self.get(table_id)
        keep = pd.Series(True, index=table.index)
        for column, accepted in (filters or {}).items():
            if column not in table:
                raise TableError(f"table {table_id}: no column {column!r} (it has {', '.join(map(str, table))})")
            keep &= table[column].astype(str).isin([str(a) for a in accepted])
        return table[keep]

    def row(self, table_id: str, filters: Mapping[str, Sequence[str]]) -> pd.Series:
        """The one row that ``filters`` picks; ``TableError`` naming the table and the filter when not exactly one."""
        found = self.rows(table_id, filters)
        if len(found) != 1:
            what = "no row" if found.empty else f"{len(found)} rows (name more columns to pick one)"
            raise TableError(f"table {table_id}: {what} where {_filter_text(filters)}")
        return found.iloc[0]

    def value(self, table_id: str, filters: Mapping[str, Sequence[str]], column: str) -> Any:
        """One cell: ``column`` of the row ``filters`` picks; ``TableError`` naming a missing column."""
        row = self.row(table_id, filters)
        if column not in row.index:
            raise TableError(f"table {table_id}: no column {column!r} (it has {', '.join(map(str, row.index))})")
        value = row[column]
        return value.item() if hasattr(value, "item") else value


@dataclass(frozen=True)
class Answer:
    """One headline answer: its ``key``, the tables it reads and its ``text`` (Markdown: ``**bold**``, ```code```)."""

    key: str
    text: str
    tables: tuple[str, ...]


def _label(tables: Tables, table_id: str, method: str) -> str:
    return str(tables.value(table_id, {"method": [method]}, "label"))


def _claim(tables: Tables, table_id: str, **filters: str) -> pd.Series:
    return tables.row(table_id, {k: [v] for k, v in filters.items()})


def _held(tables: Tables, table_id: str, a: str, b: str) -> tuple[int, int]:
    """How many of ``a``'s claims against ``b`` hold, and how many there are."""
    claims = tables.rows(table_id, {"a": [a], "b": [b]})
    return int((claims["verdict"] == "holds").sum()), len(claims)


def claim_answer(tables: Tables) -> Answer:
    """Does the paper's claim hold: its sum of layer maps against last-layer Grad-CAM (T3, and T4 where run)."""
    c = _claim(tables, "T3_claim", a="lwcam", b="gradcam", metric="deletion_auc", subset="all images")
    paper, gradcam = _label(tables, "T3_methods", "lwcam"), _label(tables, "T3_methods", "gradcam")
    text = (f"**The paper's claim {c['verdict']}.** On single objects its sum of the student's layer maps, "
            f"{paper}, has a deletion AUC of {format_value(c['mean_a'], '.3f')} against "
            f"{format_value(c['mean_b'], '.3f')} for {gradcam} (lower is better; difference "
            f"{format_value(c['mean_diff'], '+.3f')} [{format_value(c['ci_low'], '+.3f')}, "
            f"{format_value(c['ci_high'], '+.3f')}], one-sided p = {format_value(c['p_value'], '.2g')}, "
            f"{format_value(c['n'])} images).")
    used: tuple[str, ...] = ("T3_claim", "T3_methods")
    if tables.has("T4_claims"):
        held, total = _held(tables, "T4_claims", "lwcam", "gradcam")
        text += f" On class-conflict scenes it beats {gradcam} on {held} of {total} measures of the scorecard."
        used += ("T4_claims",)
    return Answer("claim", text, used)


def _mean_ranks(tables: Tables) -> tuple[pd.Series, list[str]]:
    """The explainers' mean rank (1 = best) over the T4 measures that separate methods; oracles and references out."""
    from .scorecard import MEASURES  # the measures' directions have one home; imported here to keep this module light

    t4, sep = tables.get("T4_scorecard"), tables.get("T4_separation")
    measures = [m for m, s in zip(sep["measure"], sep["separates"], strict=True) if str(s) == "True" and m in t4]
    if not measures:
        raise TableError("table T4_separation: no measure separates methods, so no ranking can be made")
    access = t4["access"].astype(str)
    explainers = t4[~access.str.contains("oracle") & (access != "none")].set_index("label")
    ranks = pd.DataFrame({m: explainers[m].rank(ascending=not MEASURES[m].higher_is_better, method="min")
                          for m in measures})
    return ranks.mean(axis=1).sort_values(kind="stable"), measures


def _benchmark_checks(tables: Tables) -> str:
    sep = tables.get("T4_separation").set_index("measure")
    leads = all(str(sep.at[m, "oracle_leads"]) == "True" for m in ("targeted_pointing", "targeted_mass"))
    blind = str(sep.at["class_sensitivity", "blind_fail"]) == "True"
    return (f"The benchmark's own checks {'hold' if leads and blind else 'fail'}: the mask oracle "
            f"{'leads' if leads else 'does not lead'} targeted pointing and mass, and random and centre-bias maps "
            f"{'are' if blind else 'are not'} class-blind.")


def _ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ..., ``11th``, ``12th``, ``13th``, ``21st``.

    >>> [_ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21)]
    ['1st', '2nd', '3rd', '4th', '11th', '12th', '13th', '21st']
    """
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def trust_answer(tables: Tables) -> Answer:
    """Which explainer to trust: the best mean ranks of the scorecard's separating measures (T4, F8)."""
    means, measures = _mean_ranks(tables)
    top = [f"{label} at {format_value(r, '.1f')}" for label, r in means.head(3).items()]
    place = {label: i + 1 for i, label in enumerate(means.index)}
    paper, rise = _label(tables, "T4_scorecard", "lwcam"), _label(tables, "T4_scorecard", "rise")
    text = (f"**Which explainer to trust: {means.index[0]}.** On class-conflict scenes, over the {len(measures)} "
            f"measures that separate methods, the best mean ranks of {len(means)} explainers go to "
            f"{', '.join(top[:-1])} and {top[-1]}; "
            f"{paper} comes {_ordinal(place[paper])} and {rise} {_ordinal(place[rise])}. " + _benchmark_checks(tables))
    return Answer("trust", text, ("T4_scorecard", "T4_separation"))


def provenance(tables: Tables, table_id: str = "timings") -> str:
    """Where a run came from, from its timings: machine, torch, threads, seed and commit.

    A ``cpu`` column (the CPU's model), where the run recorded one, is named before the machine.
    """
    first = tables.get(table_id).iloc[0]
    machine = str(first["machine"])
    if "cpu" in first.index and not _is_missing(first["cpu"]):
        machine = f"{first['cpu']}, {machine}"
    threads = format_value(first["threads"])
    return (f"{machine}, torch {first['torch']} at {threads} thread{'' if threads == '1' else 's'}, "
            f"seed {format_value(first['seed'])}, commit `{first['commit']}`")


def cost_answer(tables: Tables) -> Answer:
    """What an explanation costs: black-box queries and seconds per image against RISE's (T3), distillation (T1)."""
    own = tables.row("T3_methods", {"method": ["lwcam"]})
    rise = tables.row("T3_methods", {"method": ["rise"]})
    distil = tables.value("T1_distillation", {"blackbox_output": ["probs"]}, "queries")
    total = tables.value("timings", {"notebook": ["(all)"], "stage": ["(total)"]}, "seconds")
    speed = float(rise["seconds_per_image"]) / float(own["seconds_per_image"])
    text = (f"**What it costs: {format_value(own['queries_per_image'])} black-box queries per explanation** "
            f"against {format_value(rise['queries_per_image'], ',.0f')} for {rise['label']}, and "
            f"{format_value(own['seconds_per_image'], '.2g')} s per image against "
            f"{format_value(rise['seconds_per_image'], '.2g')} s ({format_value(speed, ',.0f')}× less); the "
            f"student costs {format_value(distil, ',.0f')} queries once, for distillation. The whole run took "
            f"{format_value(total, ',.0f')} s of pipeline time on {provenance(tables)}.")
    return Answer("cost", text, ("T3_methods", "T1_distillation", "timings"))


#: The protocol's training floors (``PROTOCOL.md``): a column of ``bench_seeds`` and the least value that holds,
#: on every training seed.
TRAINING_FLOORS: dict[str, float] = {"teacher_test_acc": 0.97, "teacher_small_acc": 0.90, "agreement_probs": 0.97,
                                     "agreement_topk": 0.97, "agreement_label": 0.97}
_FLOOR_NAMES = {"teacher_test_acc": "the black box's test accuracy",
                "teacher_small_acc": "its accuracy on the smallest objects",
                "agreement_probs": "the `probs` student's agreement",
                "agreement_topk": "the `topk` student's agreement",
                "agreement_label": "the `label` student's agreement"}


def floors_answer(tables: Tables, table_id: str = "bench_seeds") -> Answer:
    """Do the training floors hold on every seed of ``benchmarks/bench_seeds.py``? Its worst margin, or each miss.

    The margin of a floor is the least value over the seeds minus the floor (:data:`TRAINING_FLOORS`).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     cols = ",".join(TRAINING_FLOORS)
    ...     _ = Path(d, "bench_seeds.csv").write_text(f"seed,{cols}\\n0,0.98,0.95,0.98,0.99,0.975\\n"
    ...                                               f"1,0.975,0.96,0.972,0.98,0.965\\nmin,0,0,0,0,0\\n")
    ...     print(floors_answer(Tables(d)).text.replace(": ", ":\\n"))
    **The training floors are not met** on 2 training seeds:
    the `label` student's agreement reaches 0.965, below its floor of 0.97 (margin -0.005).
    """
    table = tables.get(table_id)
    seeds = table[pd.to_numeric(table["seed"], errors="coerce").notna()]
    if seeds.empty:
        raise TableError(f"table {table_id}: no row of a training seed")
    lows = {c: float(seeds[c].astype(float).min()) for c in TRAINING_FLOORS}
    margins = {c: lows[c] - floor for c, floor in TRAINING_FLOORS.items()}
    missed = [c for c in TRAINING_FLOORS if margins[c] < 0]
    n = f"{len(seeds)} training seed{'s' if len(seeds) != 1 else ''}"
    if not missed:
        worst = min(margins, key=lambda c: margins[c])
        text = (f"**Every training floor holds** on {n}; the closest is {_FLOOR_NAMES[worst]}, at least "
                f"{lows[worst]:.3f} against its floor of {TRAINING_FLOORS[worst]:.2f} (margin {margins[worst]:+.3f}).")
    else:
        misses = "; ".join(f"{_FLOOR_NAMES[c]} reaches {lows[c]:.3f}, below its floor of {TRAINING_FLOORS[c]:.2f} "
                           f"(margin {margins[c]:+.3f})" for c in missed)
        text = f"**The training floors are not met** on {n}: {misses}."
    return Answer("floors", text, (table_id,))


def _bin_order(label: str) -> tuple[int, float]:
    """Size bins small to large: ``≤ x`` first, ``a–b`` by ``a``, ``> x`` last."""
    first = re.search(r"\d+(?:\.\d+)?", label)
    number = float(first.group()) if first else 0.0
    return (0 if label.startswith("≤") else 2 if label.startswith(">") else 1), number


def _cell_px(student: str) -> float:
    found = re.search(r"(\d+(?:\.\d+)?) px cells", student)
    return float(found.group(1)) if found else 0.0


def _pointing(tables: Tables, student: str, size_bin: str) -> tuple[str, str]:
    """The deep-gated fusion against last-layer Grad-CAM on targeted pointing, in one bin of one student."""
    c = _claim(tables, "T5_claims", student=student, size_bin=size_bin, a="lwcam_gated", b="gradcam",
               metric="targeted_pointing")
    return (f"with the student {student}, on objects of {size_bin} of its cells, "
            f"{format_value(c['mean_a'], '.0%')} against {format_value(c['mean_b'], '.0%')} "
            f"(one-sided p = {format_value(c['p_value'], '.2g')}: it "
            f"{'beats' if c['verdict'] == 'holds' else 'does not beat'} Grad-CAM)"), str(c["verdict"])


_WHERE = {("holds", "does not hold"): "on objects as small as the student's last-map cells, not on larger ones",
          ("holds", "holds"): "on small and large objects alike",
          ("does not hold", "holds"): "on objects larger than the student's last-map cells only",
          ("does not hold", "does not hold"): "nowhere on this benchmark's object sizes"}


def size_answer(tables: Tables) -> Answer:
    """Where layer-wise fusion helps: its pointing on the smallest objects of the coarsest student and on the
    largest objects of the finest one (T5), and the goals declared before ``test`` was read (T5_goals)."""
    t5 = tables.rows("T5_claims", {"a": ["lwcam_gated"], "b": ["gradcam"], "metric": ["targeted_pointing"]})
    if t5.empty:
        raise TableError("table T5_claims: no row where a='lwcam_gated' b='gradcam' metric='targeted_pointing'")
    students = sorted(set(t5["student"].astype(str)), key=_cell_px)
    coarse, fine = students[-1], students[0]
    small = min(t5[t5["student"] == coarse]["size_bin"].astype(str), key=_bin_order)
    large = max(t5[t5["student"] == fine]["size_bin"].astype(str), key=_bin_order)
    first, v_small = _pointing(tables, coarse, small)
    second, v_large = _pointing(tables, fine, large)
    outcomes = tables.get("T5_goals")["outcome"].value_counts()
    label = _label(tables, "T4_scorecard", "lwcam_gated") if tables.has("T4_scorecard") else "the deep-gated fusion"
    text = (f"**Where layer-wise fusion helps: {_WHERE[(v_small, v_large)]}.** {label} puts the maximum on the "
            f"asked object {first}; {second}. Of the goals declared before `test` was read, "
            f"{outcomes.get('met', 0)} are met, {outcomes.get('not met', 0)} not met and "
            f"{outcomes.get('not measured', 0)} not measured.")
    return Answer("size", text, ("T5_claims", "T5_goals"))


#: The headline answers in reading order: (key, the function that makes it from the tables).
ANSWERS: tuple[tuple[str, Callable[[Tables], Answer]], ...] = (
    ("claim", claim_answer), ("trust", trust_answer), ("cost", cost_answer), ("size", size_answer))


def headline_answers(tables: Tables, strict: bool = False, keys: Iterable[str] | None = None) -> list[Answer]:
    """The answers the tables can give, in reading order (``keys``: only those).

    An answer whose table is missing, or lacks a row or column it reads, is left out; with
    ``strict`` it raises :class:`TableError` naming what is missing instead (the docs use that).
    A table that is present but not a readable CSV always raises ``ValueError`` naming the file.
    """
    wanted = list(keys) if keys is not None else [k for k, _ in ANSWERS]
    unknown = sorted(set(wanted) - {k for k, _ in ANSWERS})
    if unknown:
        raise ValueError(f"keys: unknown answers {unknown}; known: {[k for k, _ in ANSWERS]}")
    found = []
    for key, make in ANSWERS:
        if key not in wanted:
            continue
        try:
            found.append(make(tables))
        except (TableError, KeyError):
            if strict:
                raise
    return found


def method_labels(tables: Tables) -> dict[str, str]:
    """``{method id: label}`` from the tables that name their methods (T3_methods, T4_scorecard, T5_resolution)."""
    labels: dict[str, str] = {}
    for table_id in ("T5_resolution", "T4_scorecard", "T3_methods"):
        if tables.has(table_id):
            t = tables.get(table_id)
            if {"method", "label"} <= set(t.columns):
                labels.update(zip(t["method"].astype(str), t["label"].astype(str), strict=True))
    return labels


def _metric_label(metric: str, subset: object) -> str:
    from .scorecard import MEASURES  # one home for the measures' labels

    games = {"deletion_auc": "deletion AUC", "insertion_auc": "insertion AUC"}
    name = MEASURES[metric].label if metric in MEASURES else games.get(metric, metric.replace("_", " "))
    return name if _is_missing(subset) or subset == "all images" else f"{name} ({subset})"


def claim_summary(tables: Tables, table_id: str, by: Sequence[str] = ()) -> pd.DataFrame:
    """One row per pair of methods (and per ``by`` columns): how many of its claims hold, and on what.

    Columns: ``by``, ``claim`` ("A better than B"), ``holds`` ("k of n") and ``where`` (the
    metrics whose claim holds, separated by ``;``, or ``none``).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = Path(d, "C.csv").write_text("a,b,metric,mean_diff,p_value,alternative\\n"
    ...                                    "x,y,sparseness,0.2,0.001,greater\\nx,y,targeted_mass,-0.1,0.9,greater\\n")
    ...     claim_summary(Tables(d), "C").to_dict("records")
    [{'claim': 'x better than y', 'holds': '1 of 2', 'where': 'sparseness'}]
    """
    claims, labels = tables.get(table_id), method_labels(tables)
    keys = [*by, "a", "b"]
    missing = [k for k in keys if k not in claims]
    if missing:
        raise TableError(f"table {table_id}: no column {missing[0]!r} (it has {', '.join(map(str, claims))})")
    rows = []
    for values, group in claims.groupby(keys, sort=False):
        key = dict(zip(keys, values, strict=True))
        held = group[group["verdict"] == "holds"]
        where = [_metric_label(str(m), s) for m, s in zip(held["metric"], held.get("subset", [None] * len(held)),
                                                          strict=True)]
        a, b = labels.get(str(key["a"]), key["a"]), labels.get(str(key["b"]), key["b"])
        rows.append({**{k: key[k] for k in by}, "claim": f"{a} better than {b}",
                     "holds": f"{len(held)} of {len(group)}", "where": "; ".join(where) or "none"})
    return pd.DataFrame(rows)


def _claim_text(row: pd.Series) -> str:
    return f"{row['mean_a']:.3f} vs {row['mean_b']:.3f}, p = {row['p_value']:.2g}: {row['verdict']}"


def verdict_changes(tables: Tables, before_id: str, now_id: str) -> pd.DataFrame:
    """The claims of ``now_id`` whose verdict differs from the same claim in ``before_id``, before and now.

    A claim is the same when ``a``, ``b``, ``metric`` and ``subset`` (where the tables have it) match;
    claims in only one table are left out. Columns: ``claim``, ``measure``, ``before`` and ``now``
    ("mean_a vs mean_b, p = p: verdict").

    >>> import tempfile
    >>> head = "a,b,metric,mean_a,mean_b,mean_diff,p_value,alternative\\n"
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = Path(d, "old.csv").write_text(head + "x,y,deletion_auc,0.1,0.2,-0.1,0.001,less\\n")
    ...     _ = Path(d, "new.csv").write_text(head + "x,y,deletion_auc,0.2,0.2,0.0,0.5,less\\n")
    ...     verdict_changes(Tables(d), "old", "new").to_dict("records")[0]["now"]
    '0.200 vs 0.200, p = 0.5: does not hold'
    """
    before, now = tables.get(before_id), tables.get(now_id)
    keys = [k for k in ("a", "b", "metric", "subset") if k in now and k in before]
    both = before.merge(now, on=keys, suffixes=("_before", ""))
    labels = method_labels(tables)
    rows = []
    for _, row in both[both["verdict_before"] != both["verdict"]].iterrows():
        old = pd.Series({c: row[f"{c}_before"] for c in ("mean_a", "mean_b", "p_value", "verdict")})
        a, b = labels.get(str(row["a"]), row["a"]), labels.get(str(row["b"]), row["b"])
        rows.append({"claim": f"{a} better than {b}", "measure": _metric_label(str(row["metric"]), row.get("subset")),
                     "before": _claim_text(old), "now": _claim_text(row)})
    return pd.DataFrame(rows, columns=["claim", "measure", "before", "now"])


def markdown_inline_html(text: str) -> str:
    """An answer's Markdown (``**bold**``, ```code```) as HTML, everything else escaped.

    >>> markdown_inline_html("**It holds** for `lwcam` & <b>")
    '<b>It holds</b> for <code>lwcam</code> &amp; &lt;b&gt;'
    """
    import html

    out = html.escape(text, quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
