"""The report: a profile's executed notebooks, figures and tables as one static HTML site.

:func:`build` renders the executed notebooks that :func:`lwcam.pipeline.run` leaves in
``runs/<profile>/notebooks/`` with nbconvert's ``lab`` template, less every script that template
would fetch from a CDN (require.js, MathJax, Mermaid, the widget manager), and writes a landing
page: the claims with their verdicts (T3's, and T4's once notebook 05 has made them), the
headline T3 with links to every table and figure, the profile, the commit and the timings.
Images are embedded in the pages or copied beside them and every style is inline, so the site
opens from ``file://`` with no server and no network.

Layout (``site/`` for the ``default`` profile, ``site/<profile>/`` for any other)::

    index.html               claims and verdicts, T3, figures, tables, notebooks, timings
    notebooks/<name>.html    each executed notebook with its outputs
    tables/<id>.html, .csv   each table of the profile's reports folder
    figures/<id>.png         each figure of the profile's figures folder

:func:`check_site` opens every page in headless Chromium (Debian's ``/usr/bin/chromium``,
driven by Playwright) and reports console errors, images that did not load, links that do not
resolve and any request that would leave the machine; it saves a screenshot of the landing page.

:func:`publish` copies a run's outputs into the committed ``notebooks/*.ipynb``: each keeps its
own ``parameters`` cell (the ``quick`` defaults that nbval runs on) and loses papermill's
``injected-parameters`` cell, so a reader browsing the repository sees the real run's numbers.

Command line::

    python -m lwcam.report build --profile default     # site/index.html
    python -m lwcam.report check --profile default     # browser check, reports/site_landing.png
    python -m lwcam.report publish --profile default   # runs/default/notebooks -> notebooks/
"""

from __future__ import annotations

import argparse
import copy
import html
import math
import numbers
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import pandas as pd

from .profiles import project_root

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "SiteCheck",
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

#: Debian's Chromium, which :func:`check_site` drives (Playwright's own browser download is not used).
CHROMIUM = "/usr/bin/chromium"
#: Flags for a headless Chromium that stays off the network and needs no sandbox or GPU.
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
#: The claim tables, in the order the landing page shows them: (table id, title).
CLAIM_TABLES = (("T3_claim", "T3: the paper's claim and lwcam against the baselines (notebook 04)"),
                ("T4_claims", "T4: the scorecard's claims (notebook 05)"))
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
</style>
{%- endblock extra_css -%}
{%- block body_header -%}
{{ super() }}
<nav class="lwcam-nav">{{ resources.lwcam_nav }}</nav>
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
"""


@dataclass
class SiteCheck:
    """What :func:`check_site` saw: the pages it opened and every problem, as ``"page: what"`` lines.

    ``clicks`` gives, for every file a link reaches, the fewest clicks from the landing page.
    """

    pages: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    images: int = 0
    links: int = 0
    clicks: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


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
    return pd.read_csv(path) if path.exists() else None


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


def _claims_section(reports: Path, labels: Mapping[str, str]) -> str:
    parts = ['<h2 id="claims">Claims and verdicts</h2>',
             '<p class="meta">One-sided paired tests on the images both methods explained; a claim holds when the '
             "difference goes its way with p &lt; 0.05.</p>"]
    for table_id, title in CLAIM_TABLES:
        claims = _read_csv(reports / f"{table_id}.csv")
        parts.append(f'<h3 id="{table_id}">{html.escape(title)}</h3>')
        if claims is None:
            parts.append(f"<p>No {table_id} table for this profile yet (its notebook has not been run).</p>")
            continue
        try:
            claims = with_verdicts(claims)
        except ValueError:
            parts.append(f'<p>The table states no verdicts: <a href="tables/{table_id}.html">{table_id}</a>.</p>')
            continue
        held = int((claims["verdict"].astype(str).str.lower() == "holds").sum())
        parts.append(f'<p>{held} of {len(claims)} claims hold. Full table: <a href="tables/{table_id}.html">'
                     f"{table_id}</a>.</p>")
        parts.append(_html_table(["claim", "metric", "images", "n", "mean a", "mean b", "a − b [95% CI]", "p",
                                  "verdict"], _claim_rows(claims, labels)))
    return "\n".join(parts)


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
            "T3_methods</a>.</p>" + _html_table([h for _, h in cols], rows))


def _figures_section(figures: list[Path], makers: Mapping[str, str]) -> str:
    items = []
    for fig in figures:
        maker = makers.get(fig.stem)
        by = f' · <a href="notebooks/{maker}.html">{html.escape(maker)}</a>' if maker else ""
        items.append(f'<figure id="fig-{fig.stem}"><a href="figures/{fig.name}"><img src="figures/{fig.name}" '
                     f'alt="{html.escape(fig.stem)}"></a><figcaption><a href="figures/{fig.name}">'
                     f"{html.escape(fig.stem)}</a>{by}</figcaption></figure>")
    body = f'<div class="gallery">{"".join(items)}</div>' if items else "<p>No figures for this profile.</p>"
    return '<h2 id="figures">Figures</h2>' + body


def _tables_section(tables: list[Path], makers: Mapping[str, str]) -> str:
    rows = []
    for t in tables:
        maker = makers.get(t.stem, "lwcam.pipeline" if t.stem == "timings" else
                           "benchmarks/" + t.stem + ".py" if t.stem.startswith("bench_") else "")
        link = f'<a href="notebooks/{maker}.html">{html.escape(maker)}</a>' if t.stem in makers else html.escape(maker)
        rows.append([f'<td><a href="tables/{t.stem}.html">{html.escape(t.stem)}</a></td>',
                     f'<td><a href="tables/{t.name}">csv</a></td>', f"<td>{link}</td>"])
    body = _html_table(["table", "data", "made by"], rows) if rows else "<p>No tables for this profile.</p>"
    return '<h2 id="tables">Tables</h2>' + body


def _notebooks_section(titles: Mapping[str, str]) -> str:
    items = "".join(f'<li><a href="notebooks/{n}.html">{html.escape(n)}</a>: {html.escape(t)}</li>'
                    for n, t in titles.items())
    return f'<h2 id="notebooks">Notebooks (executed, with their outputs)</h2><ul>{items}</ul>'


def _provenance(timings: pd.DataFrame | None, profile: str, source: str) -> str:
    facts = {"profile": profile, "executed notebooks": source}
    if timings is not None and len(timings):
        first = timings.iloc[0]
        facts.update({k: str(first[k]) for k in ("commit", "seed", "torch", "threads", "machine") if k in timings})
    items = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in facts.items())
    return f'<ul class="meta">{items}</ul>'


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


def _render_notebook(nb: Any, name: str, nav: str) -> str:
    import jinja2
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", template_file="lwcam_site.html.j2",
                            extra_loaders=[jinja2.DictLoader({"lwcam_site.html.j2": _TEMPLATE})])
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": name}, "lwcam_nav": nav})
    body = _strip_css_comments(body)
    bad = external_resources(body)
    if bad:
        raise RuntimeError(f"notebook {name}: the rendered page still fetches {bad[:3]} from the network")
    return body


def _table_page(csv_path: Path, nav: str) -> str:
    df = pd.read_csv(csv_path)
    rows = [[_cell(v) for v in r] for r in df.itertuples(index=False)]
    md = csv_path.with_suffix(".md")
    also = f" (also as markdown: <code>{html.escape(md.name)}</code> in the reports folder)" if md.exists() else ""
    body = (f"<nav>{nav}</nav><h1>{html.escape(csv_path.stem)}</h1><p>{len(df)} rows. Data: "
            f'<a href="{csv_path.name}">{html.escape(csv_path.name)}</a>{also}.</p>'
            + _html_table([str(c) for c in df.columns], rows))
    return _page(csv_path.stem, body)


def _executed_notebooks(folder: Path, profile: str) -> list[Path]:
    found = sorted(folder.glob("*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no executed notebooks under {folder}; run `make reproduce PROFILE={profile}` "
                                "(python -m lwcam.pipeline run --profile ...) first")
    return found


def _reset(out: Path) -> None:
    """Empty the parts of ``out`` that :func:`build` writes (other profiles' sites below it stay)."""
    for sub in ("notebooks", "tables", "figures"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    (out / "index.html").unlink(missing_ok=True)


def build(profile: str = "default", root: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
          notebooks: str | os.PathLike | None = None) -> Path:
    """Build the static site of ``profile`` and return the path of its ``index.html``.

    ``notebooks`` is the folder of executed notebooks (default ``runs/<profile>/notebooks``);
    tables and figures come from the profile's ``reports`` and ``figures`` folders; ``out``
    defaults to :func:`site_dir`.
    """
    import nbformat

    base = project_root(root)
    source = Path(notebooks) if notebooks is not None else base / "runs" / profile / "notebooks"
    files = _executed_notebooks(source, profile)
    out_dir = Path(out) if out is not None else site_dir(profile, base)
    reports, figures = _reports_dir(profile, base), _figures_dir(profile, base)
    _reset(out_dir)
    nbs = {f.stem: nbformat.read(f, as_version=4) for f in files}
    names = list(nbs)
    for name, nb in nbs.items():
        (out_dir / "notebooks" / f"{name}.html").write_text(_render_notebook(nb, name, _nav("../", names)))
    tables = sorted(reports.glob("*.csv"))
    for t in tables:
        shutil.copy2(t, out_dir / "tables" / t.name)
        (out_dir / "tables" / f"{t.stem}.html").write_text(_table_page(t, _nav("../", names)))
    pngs = sorted(figures.glob("*.png"))
    for f in pngs:
        shutil.copy2(f, out_dir / "figures" / f.name)
    makers = made_by({n: [c.source for c in nb.cells if c.cell_type == "code"] for n, nb in nbs.items()})
    t3, timings = _read_csv(reports / "T3_methods.csv"), _read_csv(reports / "timings.csv")
    labels = {**_method_labels(_read_csv(reports / "T4_scorecard.csv")), **_method_labels(t3)}
    try:
        shown_source = str(source.resolve().relative_to(base))
    except ValueError:
        shown_source = str(source)
    body = "\n".join([
        f"<nav>{_nav('', names)}</nav>", f"<h1>lwcam: results of the <code>{html.escape(profile)}</code> run</h1>",
        _provenance(timings, profile, shown_source), _claims_section(reports, labels), _t3_section(t3),
        _figures_section(pngs, makers), _tables_section(tables, makers),
        _notebooks_section({n: _title(nb, n) for n, nb in nbs.items()}), _timings_section(timings),
    ])
    index = out_dir / "index.html"
    index.write_text(_page(f"lwcam report ({profile})", body))
    return index


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

    Each committed notebook under ``notebooks/`` keeps its ``parameters`` cell (the ``quick``
    defaults that nbval executes) and gets the run's outputs (see :func:`merge_outputs`). The
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


def check_site(site: str | os.PathLike, screenshot: str | os.PathLike | None = None,
               browser: str = CHROMIUM) -> SiteCheck:
    """Open every page of a built site in headless Chromium and report what a reader would hit.

    Starting from ``index.html`` it follows every local link; it records console errors, page
    errors, images that did not load (``naturalWidth == 0``), links to missing files or anchors,
    pages no link reaches, and every request to a network (each one is blocked). ``verdicts`` are
    the landing page's claim verdicts and ``clicks`` how far each file is from it. ``screenshot``
    saves the whole landing page as a PNG.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise ImportError("check_site needs Playwright for Python (pip install playwright; in the dev extra)") from exc
    index = Path(site).resolve() / "index.html"
    if not index.exists():
        raise FileNotFoundError(f"site: no {index}; build the site first (python -m lwcam.report build)")
    if not Path(browser).exists():
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


def _landing(page: Any, result: SiteCheck, screenshot: Path | None) -> None:
    result.verdicts = page.eval_on_selector_all("td.verdict", "els => els.map(e => e.textContent.trim())")
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
    parser = argparse.ArgumentParser(prog="python -m lwcam.report", description=__doc__.split("\n\n")[0])
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
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run_command(args: argparse.Namespace) -> int:
    base = project_root()
    if args.cmd == "build":
        index = build(args.profile, base, args.out, args.notebooks)
        print(f"[lwcam] site -> {index} (open it in a browser; no server needed)")
        return 0
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
