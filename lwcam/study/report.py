"""The report: a profile's executed notebooks, figures and tables as one static HTML site.

:func:`build` renders the executed notebooks that :func:`lwcam.study.pipeline.run` leaves in
``runs/<profile>/notebooks/`` with nbconvert's ``lab`` template, less every script that template
would fetch from a CDN (require.js, MathJax, Mermaid, the widget manager), and writes a landing
page that answers first: the run's answers in a few sentences (:func:`lwcam.study.answers.headline_answers`,
the same the README shows) beside the scorecard (F8) and methods (F3) figures; then the claims with
their verdicts (a short summary per pair of methods, every claim folded in ``<details>``), T3
(folded), every figure, the list of tables, the notebooks and the timings.
Images are embedded in the pages or copied beside them and every style is inline, so the site
opens from ``file://`` with no server and no network.

Layout (``site/`` for the ``default`` profile, ``site/<profile>/`` for any other)::

    index.html               answers beside F8 and F3; claims and verdicts, T3, figures, tables, notebooks, timings
    notebooks/<name>.html    each executed notebook with its outputs
    tables/<id>.html, .csv   each table of the profile's reports folder
    figures/<id>.png         each figure of the profile's figures folder
    .lwcam-site.json         the manifest: every file the build wrote, and the notebooks that failed

Failure behaviour:

* A build never deletes or overwrites a file it did not write. It renders into a hidden sibling
  folder and moves its files in only once every page is made; a rebuild then removes the files
  its previous manifest lists and no others. An ``out`` that is a file, or that already holds
  files and no manifest, is refused (``ValueError`` naming it) and left as it is.
* A notebook that cannot be read (invalid JSON) stops the build before anything is written, with
  an error naming the file: the previous site stays as it was.
* A notebook whose cell raised (an ``error`` output or papermill's error marker) is built, and
  marked: a banner on the landing page and on that notebook's page names the notebook and the
  exception, and every table and figure that notebook makes is flagged as possibly stale or
  incomplete. ``python -m lwcam.study.report build`` then exits with status 1, and ``check`` reports
  the banner as a problem.

:func:`check_site` opens every page in headless Chromium (Debian's ``/usr/bin/chromium``, or
Playwright's own Chromium where that is missing; see :func:`find_browser`), driven by Playwright,
and reports console errors, images that did not load, links that do not resolve and any request
that would leave the machine; it saves a screenshot of the landing page.

:func:`publish` copies a run's outputs into the committed ``notebooks/*.ipynb``: each keeps its
own ``parameters`` cell (``profile = "quick"``, what nbval runs on) and loses papermill's
``injected-parameters`` cell, so a reader browsing the repository sees the real run's numbers.

Command line::

    python -m lwcam.study.report build --profile default     # site/index.html
    python -m lwcam.study.report check --profile default     # browser check, reports/site_landing.png
    python -m lwcam.study.report publish --profile default   # runs/default/notebooks -> notebooks/
"""

from __future__ import annotations

import argparse
import copy
import html
import json
import math
import numbers
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import pandas as pd

from .answers import (
    Answer,
    Tables,
    claim_summary,
    claim_verdict,
    headline_answers,
    load_csv,
    markdown_inline_html,
    with_verdicts,
)
from .profiles import project_root

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "MANIFEST",
    "SiteCheck",
    "NotebookFailure",
    "notebook_failures",
    "read_manifest",
    "site_failures",
    "find_browser",
    "site_dir",
    "claim_verdict",
    "with_verdicts",
    "external_resources",
    "made_by",
    "build",
    "merge_outputs",
    "publish",
    "check_site",
    "main",
]

#: Debian's Chromium, which :func:`check_site` drives where it is installed (else Playwright's own).
CHROMIUM = "/usr/bin/chromium"
#: The manifest a built site keeps at its top: the files the build wrote (a rebuild removes only those).
MANIFEST = ".lwcam-site.json"
#: The tag papermill gives the cells it inserts into a notebook whose execution raised.
PAPERMILL_ERROR_TAG = "papermill-error-cell-tag"
#: Flags for a headless Chromium that stays off the network and needs no sandbox or GPU.
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
#: The claim tables, in the order the landing page shows them: (table id, title).
CLAIM_TABLES = (("T3_claim", "T3: the paper's claim and lwcam against the baselines (notebook 04)"),
                ("T4_claims", "T4: the scorecard's claims (notebook 05)"),
                ("T5_claims", "T5: the scorecard's claims by object size (notebook 06)"))
#: The columns a claim table's summary groups by, besides the pair of methods.
CLAIM_GROUPS = {"T5_claims": ("student", "size_bin")}
#: Columns of T3 that the landing page shows: (column, heading); a column with ``_ci_low`` and
#: ``_ci_high`` siblings is shown with its 95% CI.
T3_COLUMNS = (("label", "method"), ("access", "sees"), ("resolution", "map resolution"), ("n_images", "images"),
              ("deletion_auc", "deletion AUC ↓"), ("insertion_auc", "insertion AUC ↑"), ("pointing", "pointing ↑"),
              ("mass", "mass ↑"), ("seconds_per_image", "s / image"), ("queries_per_image", "queries / image"))

_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}
<style type="text/css">
nav.lwcam-nav { font-family: system-ui, sans-serif; padding: 0.6em 1em; background: #f3f5f7;
  border-bottom: 1px solid #d0d7de; position: sticky; top: 0; z-index: 10; }
nav.lwcam-nav a { margin-right: 1em; }
.lwcam-failed { font-family: system-ui, sans-serif; margin: 0.8em 1em; padding: 0.6em 1em; background: #ffebe9;
  border: 2px solid #cf222e; color: #1f2328; }
</style>
{%- endblock extra_css -%}
{%- block body_header -%}
{{ super() }}
<nav class="lwcam-nav">{{ resources.lwcam_nav }}</nav>
{{ resources.lwcam_banner }}
{%- endblock body_header -%}
"""

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1280px;
  padding: 0 1.5em 3em; color: #1f2328; line-height: 1.45; }
nav { padding: 0.6em 0; border-bottom: 1px solid #d0d7de; margin-bottom: 1em; }
nav a { margin-right: 1em; }
.scroll { overflow-x: auto; margin: 0.5em 0 1em; }
table { border-collapse: collapse; font-size: 0.88em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.verdict { font-weight: 600; white-space: nowrap; }
td.holds { background: #dafbe1; }
td.fails { background: #ffebe9; }
.meta { color: #59636e; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.gallery figure { margin: 0; width: 380px; border: 1px solid #d0d7de; padding: 0.5em; }
.gallery img { width: 100%; height: auto; }
.gallery figcaption { font-size: 0.9em; }
.lwcam-failed { margin: 0.8em 0; padding: 0.6em 1em; background: #ffebe9; border: 2px solid #cf222e; }
.stale { color: #cf222e; font-weight: 600; }
.answers { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1.15fr); gap: 1.5em; align-items: start;
  margin-bottom: 1.5em; }
.answers h2 { margin-top: 0.3em; }
.answers ul { padding-left: 1.2em; margin: 0; }
.answers li { margin-bottom: 0.7em; }
.answers-figures figure { margin: 0 0 0.8em; }
.answers-figures img { width: 100%; height: auto; border: 1px solid #d0d7de; }
.answers-figures figcaption { font-size: 0.85em; color: #59636e; }
@media (max-width: 900px) { .answers { grid-template-columns: 1fr; } }
details { margin: 0.4em 0 1em; }
summary { cursor: pointer; font-weight: 600; color: #0969da; }
"""


@dataclass
class SiteCheck:
    """What :func:`check_site` saw: the pages it opened and every problem, as ``"page: what"`` lines.

    ``clicks`` gives, for every file a link reaches, the fewest clicks from the landing page, and
    ``landing`` what the landing page shows: its ``answers`` (one text each), whether they are shown,
    where they start and where the first shown table starts (CSS pixels from the top), the window's
    height, how many ``details`` elements fold tables away, and whether each figure beside the answers
    loaded.
    """

    pages: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    images: int = 0
    links: int = 0
    clicks: dict[str, int] = field(default_factory=dict)
    landing: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class NotebookFailure:
    """A notebook whose execution raised: its name, the exception, and the cell where it did (1 is the first).

    >>> str(NotebookFailure("02_explain", "ValueError", "bad layer", 7))
    '02_explain raised ValueError: bad layer (cell 7)'
    """

    notebook: str
    ename: str
    evalue: str = ""
    cell: int | None = None

    def __str__(self) -> str:
        where = f" (cell {self.cell})" if self.cell is not None else ""
        return f"{self.notebook} raised {self.ename}{': ' + self.evalue if self.evalue else ''}{where}"

    def to_dict(self) -> dict[str, Any]:
        return {"notebook": self.notebook, "ename": self.ename, "evalue": self.evalue, "cell": self.cell}


def _cell_failure(cell: Mapping[str, Any], index: int, name: str) -> NotebookFailure | None:
    """The exception a cell's outputs record (a clean ``SystemExit`` is not one), or papermill's flag on it."""
    for out in cell.get("outputs", []) or []:
        if out.get("output_type") != "error":
            continue
        ename, evalue = str(out.get("ename", "")) or "Exception", str(out.get("evalue", ""))
        if ename == "SystemExit" and evalue in ("", "0"):
            continue
        return NotebookFailure(name, ename, evalue, index + 1)
    if cell.get("metadata", {}).get("papermill", {}).get("exception") is True:
        return NotebookFailure(name, "CellExecutionError", "", index + 1)
    return None


def notebook_failures(nb: Any, name: str = "notebook") -> list[NotebookFailure]:
    """The failure an executed notebook records, as a list of at most one: the first cell that raised.

    A cell raised when it has an output of type ``error`` or papermill flagged it; a notebook
    carrying papermill's error marker and neither counts as failed at an unknown cell.

    >>> from nbformat.v4 import new_code_cell, new_notebook, new_output
    >>> cell = new_code_cell("1/0", outputs=[new_output("error", ename="ZeroDivisionError", evalue="division by zero",
    ...                                                 traceback=[])])
    >>> [str(f) for f in notebook_failures(new_notebook(cells=[new_code_cell("x = 1"), cell]), "03_x")]
    ['03_x raised ZeroDivisionError: division by zero (cell 2)']
    """
    cells = list(nb.get("cells", []))
    marked = any(PAPERMILL_ERROR_TAG in c.get("metadata", {}).get("tags", []) for c in cells)
    for index, cell in enumerate(cells):
        found = _cell_failure(cell, index, name)
        if found is not None:
            return [found]
    if marked or nb.get("metadata", {}).get("papermill", {}).get("exception") is True:
        return [NotebookFailure(name, "an exception", "papermill marked the notebook as failed")]
    return []


def site_dir(profile: str, root: str | os.PathLike | None = None) -> Path:
    """Where :func:`build` writes a profile's site: ``site/`` for ``default``, ``site/<profile>/`` otherwise.

    >>> site_dir("default", ".").name, site_dir("paper", ".").parent.name
    ('site', 'site')
    """
    base = project_root(root) / "site"
    return base if profile == "default" else base / profile


def _reports_dir(profile: str, base: Path) -> Path:
    return base / "reports" if profile == "default" else base / "reports" / profile


def _figures_dir(profile: str, base: Path) -> Path:
    return base / "figures" if profile == "default" else base / "figures" / profile


_RESOURCE = re.compile(r"""<(?:script|img|iframe|source|video|audio|embed)\b[^>]*?\bsrc\s*=\s*["']?([^"'\s>]+)"""
                       r"""|<link\b[^>]*?\bhref\s*=\s*["']?([^"'\s>]+)"""
                       r"""|url\(\s*["']?([^"')\s]+)|@import\s+["']([^"']+)""", re.IGNORECASE)


def external_resources(page: str) -> list[str]:
    """The URLs of scripts, styles, fonts and images that ``page`` (HTML) would fetch from a network.

    Plain ``<a href>`` links to other sites are not resources and are not listed.

    >>> external_resources('<script src="https://cdn.example/x.js"></script><img src="figures/F1.png">')
    ['https://cdn.example/x.js']
    >>> external_resources('<a href="https://arxiv.org/abs/1806.07421">RISE</a><style>p{}</style>')
    []
    """
    found = (next(g for g in m.groups() if g) for m in _RESOURCE.finditer(page))
    return [u for u in found if u.lower().startswith(("http:", "https:", "//", "ftp:"))]


def _strip_css_comments(page: str) -> str:
    """Drop ``/* ... */`` comments inside ``<style>`` blocks (nbconvert's CSS cites web pages in them)."""
    def strip(m: re.Match[str]) -> str:
        return m.group(1) + re.sub(r"/\*.*?\*/", "", m.group(2), flags=re.DOTALL) + m.group(3)
    return re.sub(r"(<style[^>]*>)(.*?)(</style>)", strip, page, flags=re.DOTALL | re.IGNORECASE)


_SAVED = re.compile(r"""save_(?:table|figure)\(\s*[^,]+,\s*["']([^"']+)["']""")


def made_by(sources: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """Which notebook saves each table or figure id: ``{id: notebook}``, from the notebooks' code.

    >>> made_by({"02_explain": ['pipeline.save_figure(fig, "F2_layer_maps", paths)']})
    {'F2_layer_maps': '02_explain'}
    """
    found: dict[str, str] = {}
    for name, cells in sources.items():
        for src in cells:
            for table_id in _SAVED.findall(src):
                found.setdefault(table_id, name)
    return found


def _fmt(value: Any) -> str:
    """One table cell as text: floats to 3 significant decimals (tiny ones in e-notation), NaN blank.

    >>> [_fmt(v) for v in (0.258719, 3.4e-71, 500, float("nan"), "lwcam", 1.0)]
    ['0.259', '3.4e-71', '500', '', 'lwcam', '1']
    """
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.3f}" if abs(value) >= 1e-3 else f"{value:.2g}"
    return str(value)


def _cell(value: Any, cls: str = "") -> str:
    numeric = isinstance(value, numbers.Real) and not isinstance(value, bool)
    classes = " ".join(c for c in (cls, "num" if numeric else "") if c)
    attr = f' class="{classes}"' if classes else ""
    return f"<td{attr}>{html.escape(_fmt(value))}</td>"


def _html_table(headings: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headings)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _read_csv(path: Path) -> pd.DataFrame | None:
    return load_csv(path) if path.exists() else None


def _method_labels(t3: pd.DataFrame | None) -> dict[str, str]:
    if t3 is None or not {"method", "label"} <= set(t3.columns):
        return {}
    return dict(zip(t3["method"].astype(str), t3["label"].astype(str), strict=True))


def _claim_rows(claims: pd.DataFrame, labels: Mapping[str, str]) -> list[list[str]]:
    rows = []
    for c in claims.to_dict("records"):
        sym = {"less": "<", "greater": ">"}.get(str(c.get("alternative", "")), "vs")
        a, b = labels.get(str(c.get("a")), c.get("a", "")), labels.get(str(c.get("b")), c.get("b", ""))
        claim = f"{a} {sym} {b}" if "a" in c else ""
        diff = (f"{_fmt(c['mean_diff'])} [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]"
                if {"mean_diff", "ci_low", "ci_high"} <= set(c) else "")
        verdict = str(c["verdict"])
        cls = "verdict " + ("holds" if verdict.strip().lower() == "holds" else "fails")
        rows.append([_cell(claim), _cell(c.get("metric", "")), _cell(c.get("subset", "")), _cell(c.get("n", "")),
                     _cell(c.get("mean_a", "")), _cell(c.get("mean_b", "")), _cell(diff), _cell(c.get("p_value", "")),
                     _cell(verdict, cls)])
    return rows


def _claim_summary_table(reports: Path, table_id: str) -> str:
    """Per pair of methods, how many of its claims hold and where ("" where the table cannot say)."""
    by = CLAIM_GROUPS.get(table_id, ())
    try:
        summary = claim_summary(Tables(reports), table_id, by)
    except (ValueError, KeyError):
        return ""
    headings = [*(b.replace("_", " ") for b in by), "claim", "holds", "where it holds"]
    rows = [[_cell(v) for v in r] for r in summary.itertuples(index=False)]
    return _html_table(headings, rows)


def _one_claim_table(reports: Path, table_id: str, title: str, labels: Mapping[str, str],
                     stale: Mapping[str, NotebookFailure]) -> list[str]:
    claims = _read_csv(reports / f"{table_id}.csv")
    parts = [f'<h3 id="{table_id}">{html.escape(title)}</h3>']
    if claims is not None and table_id in stale:
        why = html.escape(str(stale[table_id]))
        parts.append(f'<p class="stale">These verdicts may be stale or incomplete: {why}.</p>')
    if claims is None:
        return [*parts, f"<p>No {table_id} table for this profile yet (its notebook has not been run).</p>"]
    try:
        claims = with_verdicts(claims)
    except ValueError:
        return [*parts, f'<p>The table states no verdicts: <a href="tables/{table_id}.html">{table_id}</a>.</p>']
    held = int((claims["verdict"].astype(str).str.lower() == "holds").sum())
    parts.append(f'<p>{held} of {len(claims)} claims hold. Full table: <a href="tables/{table_id}.html">'
                 f"{table_id}</a>.</p>")
    parts.append(_claim_summary_table(reports, table_id))
    every = _html_table(["claim", "metric", "images", "n", "mean a", "mean b", "a − b [95% CI]", "p", "verdict"],
                        _claim_rows(claims, labels))
    parts.append(f"<details><summary>Every claim of {table_id} ({len(claims)})</summary>{every}</details>")
    return parts


def _claims_section(reports: Path, labels: Mapping[str, str], stale: Mapping[str, NotebookFailure]) -> str:
    parts = ['<h2 id="claims">Claims and verdicts</h2>',
             '<p class="meta">One-sided paired tests on the images both methods explained; a claim holds when the '
             "difference goes its way with p &lt; 0.05.</p>"]
    for table_id, title in CLAIM_TABLES:
        parts += _one_claim_table(reports, table_id, title, labels, stale)
    return "\n".join(parts)


def _answer_item(answer: Answer, stale: Mapping[str, NotebookFailure]) -> str:
    links = " ".join(f'<a href="tables/{t}.html">{html.escape(t)}</a>' for t in answer.tables)
    marks = "".join(dict.fromkeys(_stale_mark(t, stale) for t in answer.tables))
    return f'<li id="answer-{answer.key}">{markdown_inline_html(answer.text)} <span class="meta">({links})</span>' \
           f"{marks}</li>"


#: The figures shown beside the answers, where the profile has them: (figure id, caption).
ANSWER_FIGURES = (("F8_scorecard", "F8: each method's rank per measure of the scorecard (T4)"),
                  ("F3_methods", "F3: every method's maps of the same images"))


def _answers_section(reports: Path, pngs: list[Path], stale: Mapping[str, NotebookFailure]) -> str:
    """The landing page's opening: the run's answers in a few sentences, beside the scorecard and methods figures."""
    found = headline_answers(Tables(reports))
    text = ("<ul>" + "".join(_answer_item(a, stale) for a in found) + "</ul>" if found else
            "<p>No answers yet: the tables they come from (T3_claim, T3_methods, T4_scorecard, T5_claims, ...) "
            "are missing for this profile.</p>")
    have = {p.stem: p for p in pngs}
    figures = "".join(f'<figure><a href="figures/{have[f].name}"><img src="figures/{have[f].name}" '
                      f'alt="{html.escape(f)}"></a><figcaption>{html.escape(caption)}</figcaption></figure>'
                      for f, caption in ANSWER_FIGURES if f in have)
    return (f'<section id="answers" class="answers"><div class="answers-text"><h2>The answers</h2>{text}'
            '<p class="meta">Every number and verdict above is read from the tables below (the README says the '
            f'same, from the same code).</p></div><div class="answers-figures">{figures}</div></section>')


def _t3_value(row: Mapping[Any, Any], col: str) -> str:
    value = row.get(col, "")
    low, high = row.get(f"{col}_ci_low"), row.get(f"{col}_ci_high")
    if low is not None and high is not None and not (isinstance(value, float) and math.isnan(value)):
        return _cell(f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]", "num")
    return _cell(value)


def _t3_section(t3: pd.DataFrame | None) -> str:
    head = '<h2 id="T3">T3: every method, scored on the black box</h2>'
    if t3 is None:
        return head + "<p>No T3 table for this profile yet (notebook 04 has not been run).</p>"
    cols = [(c, h) for c, h in T3_COLUMNS if c in t3.columns]
    rows = [[_t3_value(r, c) for c, _ in cols] for r in t3.to_dict("records")]
    return (head + '<p class="meta">Means with 95% bootstrap CIs. Full table: <a href="tables/T3_methods.html">'
            f"T3_methods</a>.</p><details><summary>T3: {len(t3)} methods</summary>"
            + _html_table([h for _, h in cols], rows) + "</details>")


def _figures_section(figures: list[Path], makers: Mapping[str, str], stale: Mapping[str, NotebookFailure]) -> str:
    items = []
    for fig in figures:
        maker = makers.get(fig.stem)
        by = f' · <a href="notebooks/{maker}.html">{html.escape(maker)}</a>' if maker else ""
        by += _stale_mark(fig.stem, stale)
        items.append(f'<figure id="fig-{fig.stem}"><a href="figures/{fig.name}"><img src="figures/{fig.name}" '
                     f'alt="{html.escape(fig.stem)}"></a><figcaption><a href="figures/{fig.name}">'
                     f"{html.escape(fig.stem)}</a>{by}</figcaption></figure>")
    body = f'<div class="gallery">{"".join(items)}</div>' if items else "<p>No figures for this profile.</p>"
    return '<h2 id="figures">Figures</h2>' + body


def _tables_section(tables: list[Path], makers: Mapping[str, str], stale: Mapping[str, NotebookFailure]) -> str:
    rows = []
    for t in tables:
        maker = makers.get(t.stem, "lwcam.study.pipeline" if t.stem == "timings" else
                           "benchmarks/" + t.stem + ".py" if t.stem.startswith("bench_") else "")
        link = f'<a href="notebooks/{maker}.html">{html.escape(maker)}</a>' if t.stem in makers else html.escape(maker)
        link += _stale_mark(t.stem, stale)
        rows.append([f'<td><a href="tables/{t.stem}.html">{html.escape(t.stem)}</a></td>',
                     f'<td><a href="tables/{t.name}">csv</a></td>', f"<td>{link}</td>"])
    if not rows:
        return '<h2 id="tables">Tables</h2><p>No tables for this profile.</p>'
    return (f'<h2 id="tables">Tables</h2><details><summary>Every table of this run ({len(rows)}), with its data and '
            f'the notebook that makes it</summary>{_html_table(["table", "data", "made by"], rows)}</details>')


def _notebooks_section(titles: Mapping[str, str], failures: Iterable[NotebookFailure] = ()) -> str:
    failed = {f.notebook for f in failures}
    items = "".join(f'<li><a href="notebooks/{n}.html">{html.escape(n)}</a>: {html.escape(t)}'
                    f'{" <span class=stale>(failed)</span>" if n in failed else ""}</li>' for n, t in titles.items())
    return f'<h2 id="notebooks">Notebooks (executed, with their outputs)</h2><ul>{items}</ul>'


def _provenance(timings: pd.DataFrame | None, profile: str, source: str) -> str:
    facts = {"profile": profile, "executed notebooks": source}
    if timings is not None and len(timings):
        first = timings.iloc[0]
        facts.update({k: str(first[k]) for k in ("commit", "seed", "torch", "threads", "cpu", "machine")
                      if k in timings})
    items = " · ".join(f"<b>{html.escape(k)}</b>: {html.escape(v)}" for k, v in facts.items())
    return f'<p class="meta" id="provenance">{items}</p>'


def _timings_section(timings: pd.DataFrame | None) -> str:
    head = '<h2 id="timings">Timings</h2>'
    if timings is None or not {"notebook", "stage", "seconds"} <= set(timings.columns):
        return head + "<p>No timings recorded for this run.</p>"
    whole = timings[timings["stage"].isin(["(whole notebook)", "(total)"])]
    rows = [[_cell(r["notebook"]), _cell(float(r["seconds"]))] for r in whole.to_dict("records")]
    return (head + '<p>Wall time per notebook; every costly stage inside them is in the full table: '
            '<a href="tables/timings.html">timings</a>.</p>' + _html_table(["notebook", "seconds"], rows))


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _nav(prefix: str, names: Iterable[str]) -> str:
    links = [f'<a href="{prefix}index.html">Report</a>', f'<a href="{prefix}index.html#claims">Claims</a>',
             f'<a href="{prefix}index.html#figures">Figures</a>', f'<a href="{prefix}index.html#tables">Tables</a>']
    links += [f'<a href="{prefix}notebooks/{n}.html">{html.escape(n)}</a>' for n in names]
    return " ".join(links)


def _title(nb: Any, name: str) -> str:
    """The first heading of a notebook's first markdown cell, without its ``#``."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
            return first.lstrip("#").strip() or name
    return name


def _render_notebook(nb: Any, name: str, nav: str, banner: str = "") -> str:
    import jinja2
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", template_file="lwcam_site.html.j2",
                            extra_loaders=[jinja2.DictLoader({"lwcam_site.html.j2": _TEMPLATE})])
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": name}, "lwcam_nav": nav,
                                                             "lwcam_banner": banner})
    body = _strip_css_comments(body)
    bad = external_resources(body)
    if bad:
        raise RuntimeError(f"notebook {name}: the rendered page still fetches {bad[:3]} from the network")
    return body


def _table_page(csv_path: Path, nav: str, banner: str = "") -> str:
    df = load_csv(csv_path)
    rows = [[_cell(v) for v in r] for r in df.itertuples(index=False)]
    md = csv_path.with_suffix(".md")
    also = f" (also as markdown: <code>{html.escape(md.name)}</code> in the reports folder)" if md.exists() else ""
    body = (f"<nav>{nav}</nav>{banner}<h1>{html.escape(csv_path.stem)}</h1><p>{len(df)} rows. Data: "
            f'<a href="{csv_path.name}">{html.escape(csv_path.name)}</a>{also}.</p>'
            + _html_table([str(c) for c in df.columns], rows))
    return _page(csv_path.stem, body)


def _executed_notebooks(folder: Path, profile: str) -> list[Path]:
    found = sorted(folder.glob("*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no executed notebooks under {folder}; run `make reproduce PROFILE={profile}` "
                                "(python -m lwcam.study run --profile ...) first")
    return found


_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _check_profile(profile: object) -> str:
    """``profile`` if it can name a folder (letters, digits, ``_``, ``-``, ``.``), else ``ValueError`` naming it.

    >>> _check_profile("paper")
    'paper'
    """
    if not isinstance(profile, str) or not _PROFILE_NAME.fullmatch(profile):
        raise ValueError(f"profile: {profile!r} is not a profile name (letters, digits, '_', '-' and '.', "
                         "starting with a letter or digit)")
    return profile


def _read_notebooks(files: Iterable[Path]) -> dict[str, Any]:
    """Every notebook of ``files``, by name; ``ValueError`` naming the first that cannot be read."""
    import nbformat

    nbs = {}
    for path in files:
        try:
            nbs[path.stem] = nbformat.read(path, as_version=4)
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:  # invalid JSON or not a notebook
            raise ValueError(f"notebook {path}: not a readable notebook ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); rerun it or remove it") from exc
    return nbs


def _check_entry(entry: object, where: Path) -> str:
    """One manifest entry: a relative path inside the site, without ``..``."""
    if not isinstance(entry, str) or not entry or entry == MANIFEST:
        raise ValueError(f"{where}: damaged manifest, bad entry {entry!r}; remove the site folder yourself")
    parts = Path(entry).parts
    if Path(entry).is_absolute() or ".." in parts or "\\" in entry:
        raise ValueError(f"{where}: damaged manifest, the entry {entry!r} lies outside the site; "
                         "remove the site folder yourself")
    return entry


def read_manifest(site: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a built site (``None`` if ``site`` has none); ``ValueError`` naming a damaged one.

    It holds ``files`` (every file the build wrote, relative to ``site``), ``failed`` (the
    notebooks that raised, see :class:`NotebookFailure`) and the ``profile``.
    """
    path = Path(site) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: damaged manifest ({exc}); remove the site folder yourself") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise ValueError(f"{path}: damaged manifest (no 'files' list); remove the site folder yourself")
    manifest["files"] = [_check_entry(e, path) for e in manifest["files"]]
    return manifest


def site_failures(site: str | os.PathLike) -> list[NotebookFailure]:
    """The notebooks that raised in the run a built site shows, from its manifest."""
    manifest = read_manifest(site) or {}
    return [NotebookFailure(str(f.get("notebook", "?")), str(f.get("ename", "")), str(f.get("evalue", "")),
                            f.get("cell")) for f in manifest.get("failed", []) if isinstance(f, dict)]


_STAGING = re.compile(r"\..+\.building-\w+")


def _foreign_entries(out: Path) -> list[str]:
    """What ``out`` holds besides other profiles' sites (folders with a manifest) and unfinished builds."""
    return sorted(e.name for e in out.iterdir()
                  if not (e.is_dir() and ((e / MANIFEST).is_file() or _STAGING.fullmatch(e.name))))


def _claimed_files(out: Path) -> set[str]:
    """The files an earlier build wrote into ``out`` (its manifest's); ``ValueError`` if ``out`` is not ours to
    write: a file, or a folder that holds files and no manifest."""
    if not out.exists():
        if out.is_symlink():
            raise ValueError(f"out: {out} is a broken symbolic link; name a folder")
        return set()
    if not out.is_dir():
        raise ValueError(f"out: {out} is a file, not a folder; name a new or empty folder for the site")
    manifest = read_manifest(out)
    if manifest is not None:
        return set(manifest["files"])
    foreign = _foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(f"out: {out} already holds files that no site build wrote ({shown}; no {MANIFEST}); "
                         "nothing was changed. Name a new or empty folder, or move those files away")
    return set()


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    """Write ``value`` to ``path`` through a temporary file and a rename, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def _blocked(out: Path, rel: str, claimed: set[str]) -> bool:
    """Whether writing ``rel`` into ``out`` would replace something no build wrote (a file or a folder)."""
    target = out / rel
    if rel not in claimed and (target.exists() or target.is_symlink()):
        return True
    return any(parent.exists() and not parent.is_dir() for parent in target.parents if parent != out
               and parent.is_relative_to(out))


def _remove(out: Path, rel: str) -> None:
    """Remove a file an earlier build wrote, then its folders inside ``out`` that are left empty."""
    target = out / rel
    if target.is_file() or target.is_symlink():
        target.unlink()
    for parent in target.parents:
        if parent == out or not parent.is_relative_to(out):
            break
        try:
            parent.rmdir()  # only when empty: another file keeps its folder
        except OSError:
            break


def _install(staging: Path, out: Path, claimed: set[str], manifest: Mapping[str, Any]) -> None:
    """Move a site rendered in ``staging`` into ``out``, replacing only the files an earlier build wrote there.

    A new ``out`` is one rename. Otherwise the manifest first claims the old and the new files (so
    an interrupted move leaves nothing unclaimed), the files move one rename each, the old files
    the new site lacks are removed, and the manifest is written last.
    """
    new = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    if not out.exists():
        _write_json(staging / MANIFEST, {**manifest, "files": new})
        os.replace(staging, out)
        return
    clash = [rel for rel in new if _blocked(out, rel, claimed)]
    if clash:
        raise ValueError(f"out: {out / clash[0]} is in the way and no site build wrote it; nothing was changed. "
                         "Move it away or name another folder")
    _write_json(out / MANIFEST, {**manifest, "files": sorted(claimed | set(new))})
    for rel in new:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, out / rel)
    for rel in sorted(claimed - set(new)):
        _remove(out, rel)
    _write_json(out / MANIFEST, {**manifest, "files": new})


def _staging_dir(out: Path) -> Path:
    """A new hidden folder beside ``out`` to render into (same file system, so moving in is a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))


def build(profile: str = "default", root: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
          notebooks: str | os.PathLike | None = None) -> Path:
    """Build the static site of ``profile`` and return the path of its ``index.html``.

    ``notebooks`` is the folder of executed notebooks (default ``runs/<profile>/notebooks``);
    tables and figures come from the profile's ``reports`` and ``figures`` folders; ``out``
    defaults to :func:`site_dir`. The site is rendered beside ``out`` and moved in only when
    every page is made; only files an earlier build wrote (its manifest, :data:`MANIFEST`) are
    replaced or removed. ``ValueError`` names a bad ``profile``, an ``out`` that is a file or holds
    files no build wrote, and a notebook that cannot be read; nothing is changed then. A notebook
    whose cell raised is built with a banner (see :func:`notebook_failures`, :func:`site_failures`).
    """
    _check_profile(profile)
    base = project_root(root)
    source = Path(notebooks) if notebooks is not None else base / "runs" / profile / "notebooks"
    files = _executed_notebooks(source, profile)
    out_dir = Path(out) if out is not None else site_dir(profile, base)
    claimed = _claimed_files(out_dir)
    nbs = _read_notebooks(files)
    failures = [f for name, nb in nbs.items() for f in notebook_failures(nb, name)]
    try:
        shown_source = str(source.resolve().relative_to(base))
    except ValueError:
        shown_source = str(source)
    staging = _staging_dir(out_dir)
    try:
        _write_site(staging, _Run(profile, base, shown_source, nbs, failures))
        _install(staging, out_dir, claimed, {"generator": "lwcam.study.report", "profile": profile,
                                             "failed": [f.to_dict() for f in failures]})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / "index.html"


@dataclass
class _Run:
    """What a site shows: the profile, its executed notebooks and the failures they record."""

    profile: str
    base: Path
    source: str
    nbs: dict[str, Any]
    failures: list[NotebookFailure]

    @property
    def makers(self) -> dict[str, str]:
        return made_by({n: [c.source for c in nb.cells if c.cell_type == "code"] for n, nb in self.nbs.items()})

    @property
    def stale(self) -> dict[str, NotebookFailure]:
        """``{table or figure id: failure}`` for what a failed notebook makes."""
        failed = {f.notebook: f for f in self.failures}
        return {i: failed[n] for i, n in self.makers.items() if n in failed}


def _write_site(site: Path, run: _Run) -> None:
    """Every page of the site into the empty folder ``site``."""
    reports, figures = _reports_dir(run.profile, run.base), _figures_dir(run.profile, run.base)
    names, stale = list(run.nbs), run.stale
    for sub in ("notebooks", "tables", "figures"):
        (site / sub).mkdir()
    for name, nb in run.nbs.items():
        own = [f for f in run.failures if f.notebook == name]
        made = {i: f for i, f in stale.items() if f.notebook == name}
        banner = _failure_banner(own, made, "../")
        (site / "notebooks" / f"{name}.html").write_text(_render_notebook(nb, name, _nav("../", names), banner))
    tables = sorted(reports.glob("*.csv"))
    for t in tables:
        shutil.copy2(t, site / "tables" / t.name)
        page = _table_page(t, _nav("../", names), _stale_banner(t.stem, stale))
        (site / "tables" / f"{t.stem}.html").write_text(page)
    pngs = sorted(figures.glob("*.png"))
    for f in pngs:
        shutil.copy2(f, site / "figures" / f.name)
    t3, timings = _read_csv(reports / "T3_methods.csv"), _read_csv(reports / "timings.csv")
    labels = {**_method_labels(_read_csv(reports / "T4_scorecard.csv")), **_method_labels(t3)}
    makers = run.makers
    body = "\n".join([
        f"<nav>{_nav('', names)}</nav>", f"<h1>lwcam: results of the <code>{html.escape(run.profile)}</code> run</h1>",
        _failure_banner(run.failures, stale, ""),
        _provenance(timings, run.profile, run.source), _answers_section(reports, pngs, stale),
        _claims_section(reports, labels, stale), _t3_section(t3),
        _figures_section(pngs, makers, stale), _tables_section(tables, makers, stale),
        _notebooks_section({n: _title(nb, n) for n, nb in run.nbs.items()}, run.failures), _timings_section(timings),
    ])
    (site / "index.html").write_text(_page(f"lwcam report ({run.profile})", body))


def _failure_banner(failures: list[NotebookFailure], stale: Mapping[str, NotebookFailure], prefix: str) -> str:
    """A banner naming each failed notebook and its exception, and what those notebooks make ("" if none failed)."""
    if not failures:
        return ""
    items = "".join(
        f'<li><a href="{prefix}notebooks/{html.escape(f.notebook)}.html">{html.escape(f.notebook)}</a> raised '
        f"<code>{html.escape(f.ename)}{': ' + html.escape(f.evalue[:300]) if f.evalue else ''}</code>"
        f"{f' in cell {f.cell}' if f.cell is not None else ''}</li>" for f in failures)
    made = (f"<p>What these notebooks make may be stale (from an earlier run) or incomplete: "
            f"{html.escape(', '.join(sorted(stale)))}.</p>" if stale else
            "<p>The outputs after each failing cell are missing.</p>")
    return (f'<div class="lwcam-failed" id="failed-notebooks" role="alert"><b>This run did not finish: '
            f"{len(failures)} notebook{'s' if len(failures) > 1 else ''} raised an exception.</b>"
            f"<ul>{items}</ul>{made}</div>")


def _stale_banner(item: str, stale: Mapping[str, NotebookFailure]) -> str:
    """The banner of a table page whose notebook failed ("" if it did not)."""
    f = stale.get(item)
    if f is None:
        return ""
    return (f'<div class="lwcam-failed" role="alert"><b>Possibly stale or incomplete:</b> {html.escape(str(f))}, '
            f"and it makes this table.</div>")


def _stale_mark(item: str, stale: Mapping[str, NotebookFailure]) -> str:
    """A short flag beside a table or figure whose notebook failed ("" if it did not)."""
    f = stale.get(item)
    return f' <span class="stale">possibly stale: {html.escape(f.notebook)} failed</span>' if f else ""


def _tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def merge_outputs(committed: Any, executed: Any, name: str = "notebook") -> Any:
    """``committed`` (a notebook) carrying ``executed``'s outputs, cell by cell.

    Papermill's ``injected-parameters`` cell is dropped and the committed ``parameters`` cell is
    kept as it is; every other cell must have the same source in both, or the run is older than
    the notebook and a ``ValueError`` names the first cell that differs. Code cells are numbered
    1, 2, ... from the top.
    """
    run_cells = [c for c in executed.cells if "injected-parameters" not in _tags(c)]
    if len(run_cells) != len(committed.cells):
        raise ValueError(f"{name}: the run has {len(run_cells)} cells (without injected parameters) and the "
                         f"committed notebook {len(committed.cells)}; rerun the profile on the current notebook")
    merged = copy.deepcopy(committed)
    for i, (mine, run) in enumerate(zip(merged.cells, run_cells, strict=True)):
        if "parameters" in _tags(mine) or mine.cell_type != "code":
            continue
        if mine.source != run.source:
            raise ValueError(f"{name}: cell {i} ({mine.get('id', '?')}) differs from the run's; rerun the profile "
                             "on the current notebook")
        mine.outputs = copy.deepcopy(run.outputs)
    count = 0
    for cell in merged.cells:  # numbered as one top-to-bottom execution (papermill's cell took a number)
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
    return merged


def publish(profile: str = "default", root: str | os.PathLike | None = None,
            dest: str | os.PathLike | None = None) -> list[Path]:
    """Copy the outputs of ``runs/<profile>/notebooks/*.ipynb`` into the committed notebooks.

    Each committed notebook under ``notebooks/`` keeps its ``parameters`` cell (``profile = "quick"``,
    what nbval executes) and gets the run's outputs (see :func:`merge_outputs`). The
    results are written to ``dest`` (default: ``notebooks/`` itself); returns the paths written.
    """
    import nbformat

    base = project_root(root)
    runs = _executed_notebooks(base / "runs" / profile / "notebooks", profile)
    out_dir = Path(dest) if dest is not None else base / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for run_path in runs:
        mine = base / "notebooks" / run_path.name
        if not mine.exists():
            raise FileNotFoundError(f"{run_path}: no committed notebook notebooks/{run_path.name} to publish into")
        merged = merge_outputs(nbformat.read(mine, as_version=4), nbformat.read(run_path, as_version=4),
                               f"notebooks/{run_path.name}")
        nbformat.write(merged, out_dir / run_path.name)
        written.append(out_dir / run_path.name)
    return written


def find_browser() -> str | None:
    """A Chromium for :func:`check_site`: Debian's :data:`CHROMIUM`, else Playwright's own download, else ``None``."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        return None
    try:
        with sync_playwright() as pw:
            path = pw.chromium.executable_path
    except Error:
        return None
    return path if path and Path(path).exists() else None


def check_site(site: str | os.PathLike, screenshot: str | os.PathLike | None = None,
               browser: str | None = None) -> SiteCheck:
    """Open every page of a built site in headless Chromium and report what a reader would hit.

    Starting from ``index.html`` it follows every local link; it records console errors, page
    errors, images that did not load (``naturalWidth == 0``), links to missing files or anchors,
    pages no link reaches, and every request to a network (each one is blocked). ``verdicts`` are
    the landing page's claim verdicts and ``clicks`` how far each file is from it. ``screenshot``
    saves the whole landing page as a PNG. A landing page that reports a failed notebook is a
    problem too. ``browser`` is a Chromium executable (default: :func:`find_browser`'s).
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise ImportError("check_site needs Playwright for Python (pip install playwright; in the dev extra)") from exc
    index = Path(site).resolve() / "index.html"
    if not index.exists():
        raise FileNotFoundError(f"site: no {index}; build the site first (python -m lwcam.study.report build)")
    if browser is None:
        browser = find_browser()
        if browser is None:
            raise FileNotFoundError(f"browser: no Chromium found (neither {CHROMIUM} nor Playwright's own); install "
                                    "one: apt-get install chromium, or python -m playwright install chromium")
    elif not Path(browser).exists():
        raise FileNotFoundError(f"browser: {browser} not found; install Debian's chromium (apt-get install chromium)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=browser, headless=True, args=list(CHROMIUM_ARGS))
        try:
            return _crawl(chromium, index, Path(screenshot) if screenshot is not None else None)
        finally:
            chromium.close()


def _crawl(browser: Any, index: Path, screenshot: Path | None) -> SiteCheck:
    """Breadth first from the landing page, so each file's click count is the fewest."""
    result = SiteCheck()
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.route("**/*", lambda route: _local_only(route, result))
    ids: dict[Path, set[str]] = {}
    clicks: dict[Path, int] = {index: 0}
    anchors: list[tuple[str, Path, str]] = []
    queue = [index]
    while queue:
        path = queue.pop(0)
        where = str(path.relative_to(index.parent))
        page = context.new_page()
        ids[path], links = _visit(page, path, where, result)
        if path == index:
            _landing(page, result, screenshot)
        page.close()
        for target, frag in links:
            if not target.exists():
                result.problems.append(f"{where}: link to a missing file {target}")
                continue
            if target not in clicks:
                clicks[target] = clicks[path] + 1
                queue += [target] if target.suffix == ".html" else []
            anchors += [(where, target, frag)] if frag else []
    result.pages = [str(p.relative_to(index.parent)) for p in ids]
    result.clicks = {str(p.relative_to(index.parent)): n for p, n in clicks.items() if p.is_relative_to(index.parent)}
    # as a browser does: the fragment as written, then percent-decoded
    result.problems += [f"{w}: link to a missing anchor {t.name}#{f}" for w, t, f in anchors
                        if t in ids and not {f, unquote(f)} & ids[t]]
    result.problems += [f"{p.relative_to(index.parent)}: no link reaches this page"
                        for p in sorted(index.parent.rglob("*.html")) if p not in ids]
    context.close()
    return result


#: What :func:`check_site` measures on the landing page, in the browser (CSS pixels from the top of the page).
_LANDING_JS = """() => {
  const box = e => e.getBoundingClientRect();
  const answers = document.querySelector('#answers');
  const tables = [...document.querySelectorAll('table')].filter(t => t.offsetParent !== null);
  const shown = answers && answers.offsetParent !== null && box(answers).height > 0;
  return {
    answers: answers ? [...answers.querySelectorAll('li')].map(e => e.textContent.trim()) : [],
    answers_shown: Boolean(shown),
    answers_top: answers ? box(answers).top + window.scrollY : null,
    first_table_top: tables.length ? box(tables[0]).top + window.scrollY : null,
    viewport_height: window.innerHeight,
    details: document.querySelectorAll('details').length,
    answer_figures: answers ? [...answers.querySelectorAll('img')].map(i => i.complete && i.naturalWidth > 0) : [],
  };
}"""


def _landing_layout(layout: Mapping[str, Any]) -> list[str]:
    """The problems of the landing page's layout: the answers must open it, above the fold and before any table.

    >>> _landing_layout({"answers_shown": True, "answers_top": 80, "first_table_top": 900, "viewport_height": 900})
    []
    >>> _landing_layout({"answers_shown": True, "answers_top": 1200, "first_table_top": 300, "viewport_height": 900})
    ['index.html: the answers start below the fold (1200 px, the window is 900 px)', \
'index.html: a table (at 300 px) comes before the answers (at 1200 px)']
    """
    if not layout.get("answers_shown"):
        return ["index.html: no answers section is shown (#answers)"]
    top, fold, table = layout["answers_top"], layout["viewport_height"], layout.get("first_table_top")
    problems = []
    if top >= fold:
        problems.append(f"index.html: the answers start below the fold ({top:.0f} px, the window is {fold:.0f} px)")
    if table is not None and table < top:
        problems.append(f"index.html: a table (at {table:.0f} px) comes before the answers (at {top:.0f} px)")
    return problems


def _landing(page: Any, result: SiteCheck, screenshot: Path | None) -> None:
    result.verdicts = page.eval_on_selector_all("td.verdict", "els => els.map(e => e.textContent.trim())")
    failed = page.eval_on_selector_all("#failed-notebooks li", "els => els.map(e => e.textContent.trim())")
    result.problems += [f"index.html: the run did not finish: {text}" for text in failed]
    result.landing = page.evaluate(_LANDING_JS)
    result.problems += _landing_layout(result.landing)
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)


def _local_only(route: Any, result: SiteCheck) -> None:
    url = route.request.url
    if url.startswith(("file:", "data:", "blob:")):
        route.continue_()
    else:
        result.problems.append(f"request to the network blocked: {url}")
        route.abort()


def _visit(page: Any, path: Path, where: str, result: SiteCheck) -> tuple[set[str], list[tuple[Path, str]]]:
    """Open one page; record its errors and broken images; return its anchor ids and local links."""
    page.on("console", lambda m: result.problems.append(f"{where}: console {m.type}: {m.text}")
            if m.type == "error" else None)
    page.on("pageerror", lambda exc: result.problems.append(f"{where}: page error: {exc}"))
    page.goto(path.as_uri(), wait_until="load")
    images = page.eval_on_selector_all("img", "els => els.map(e => [(e.getAttribute('src') || '').slice(0, 80), "
                                              "e.complete && e.naturalWidth > 0])")
    result.images += len(images)
    result.problems += [f"{where}: image did not load: {src}" for src, loaded in images if not loaded]
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    result.links += len(hrefs)
    ids = set(page.eval_on_selector_all("[id], a[name]", "els => els.map(e => e.id || e.getAttribute('name'))"))
    links = []
    for href in hrefs:
        url = urlparse(href)
        if url.scheme == "file":
            links.append((Path(url2pathname(url.path)), url.fragment))
    return ids, links


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lwcam.study.report", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    commands = {}
    for cmd, text in (("build", "build the static site from a profile's executed notebooks"),
                      ("check", "open every page of a built site in headless Chromium; screenshot the landing page"),
                      ("publish", "copy a run's outputs into the committed notebooks/*.ipynb")):
        commands[cmd] = sub.add_parser(cmd, help=text)
        commands[cmd].add_argument("--profile", default="default")
    commands["build"].add_argument("--notebooks", default=None, help="folder of executed notebooks")
    commands["build"].add_argument("--out", default=None, help="site folder (default site/ or site/<profile>/)")
    commands["check"].add_argument("--site", default=None, help="site folder (default: where build writes)")
    commands["check"].add_argument("--screenshot", default=None,
                                   help="PNG of the landing page (default reports/[<profile>/]site_landing.png)")
    args = parser.parse_args(argv)
    try:
        return _run_command(args)
    except (OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run_command(args: argparse.Namespace) -> int:
    base = project_root()
    if args.cmd == "build":
        index = build(args.profile, base, args.out, args.notebooks)
        print(f"[lwcam] site -> {index} (open it in a browser; no server needed)")
        failed = site_failures(index.parent)
        for failure in failed:
            print(f"error: notebook {failure}; the site marks it, and what it makes may be stale", file=sys.stderr)
        return 1 if failed else 0
    if args.cmd == "publish":
        for path in publish(args.profile, base):
            print(f"[lwcam] {path.relative_to(base)} <- runs/{args.profile}/notebooks/{path.name}")
        return 0
    site = Path(args.site) if args.site else site_dir(args.profile, base)
    shot = Path(args.screenshot) if args.screenshot else _reports_dir(args.profile, base) / "site_landing.png"
    result = check_site(site, shot)
    print(f"[lwcam] {len(result.pages)} pages, {result.images} images, {result.links} links, "
          f"{len(result.verdicts)} claim verdicts; screenshot -> {shot}")
    for problem in result.problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
