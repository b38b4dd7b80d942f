"""The report site in a real browser: headless Chromium driven by Playwright (lwcam.study.report.check_site).

The site is built from the ``quick`` run's executed notebooks when ``runs/quick/notebooks`` holds
them all, and otherwise from the committed ``notebooks/*.ipynb``, which carry their outputs, so
the test needs no notebook execution on a clean clone. Tables and figures come from the committed
``reports/quick/`` and ``figures/quick/``. The ``chromium`` fixture (tests/conftest.py) finds or
installs the browser; where it cannot, these tests skip with the reason, and on CI (``CI=true``)
they fail.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lwcam.study import report

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _notebook_source() -> Path:
    committed = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    run = ROOT / "runs" / "quick" / "notebooks"
    return run if all((run / name).exists() for name in committed) else ROOT / "notebooks"


def test_every_page_loads_offline_without_errors(chromium, tmp_path):
    t0 = time.perf_counter()
    index = report.build("quick", ROOT, out=tmp_path / "site", notebooks=_notebook_source())
    shot = tmp_path / "site_landing.png"
    result = report.check_site(index.parent, screenshot=shot, browser=chromium)
    assert result.ok, "\n".join(result.problems)
    names = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert {f"notebooks/{n}.html" for n in names} <= set(result.pages) and "index.html" in result.pages
    assert len(result.pages) == len(list(index.parent.rglob("*.html")))  # every page opened
    assert result.images >= len(list((ROOT / "figures" / "quick").glob("*.png")))
    assert result.verdicts and set(result.verdicts) <= {"holds", "does not hold"}  # the landing page's verdicts
    site_files = [p.relative_to(index.parent).as_posix() for sub in ("figures", "tables")
                  for p in (index.parent / sub).iterdir()]
    assert site_files and all(result.clicks.get(f, 99) <= 2 for f in site_files)  # every figure and table
    assert shot.stat().st_size > 10_000
    assert time.perf_counter() - t0 < 120


def test_the_landing_page_answers_first_above_the_fold(chromium, tmp_path):
    """The answers open the landing page: shown, above the fold, before any table, beside figures that load."""
    index = report.build("quick", ROOT, out=tmp_path / "site", notebooks=_notebook_source())
    result = report.check_site(index.parent, browser=chromium)
    assert result.ok, "\n".join(result.problems)
    landing = result.landing
    assert landing["answers_shown"] and landing["answers_top"] < landing["viewport_height"]
    assert landing["first_table_top"] is None or landing["answers_top"] < landing["first_table_top"]
    assert any(a.startswith("The paper's claim") for a in landing["answers"]), landing["answers"]
    assert landing["answer_figures"] and all(landing["answer_figures"])  # F8 and F3 beside the answers loaded
    assert landing["details"] >= 3  # the long tables are folded


def test_the_check_reports_a_landing_page_without_answers_first(chromium, tmp_path):
    """A page whose table comes before the answers, and one with no answers at all: both are problems."""
    (tmp_path / "index.html").write_text(
        '<!DOCTYPE html><html><body><table><tr><td>x</td></tr></table><div style="height:1500px"></div>'
        '<section id="answers"><ul><li>late</li></ul></section></body></html>')
    problems = report.check_site(tmp_path, browser=chromium).problems
    assert any("the answers start below the fold" in p for p in problems), problems
    assert any("comes before the answers" in p for p in problems), problems
    (tmp_path / "index.html").write_text("<!DOCTYPE html><html><body><p>nothing</p></body></html>")
    problems = report.check_site(tmp_path, browser=chromium).problems
    assert "index.html: no answers section is shown (#answers)" in problems


def test_the_check_catches_what_a_reader_would_hit(chromium, tmp_path):
    """A broken page: a missing image, a dead link and anchor, a script error, a CDN script, an orphan page."""
    (tmp_path / "index.html").write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"><script src="https://cdn.example.org/x.js"></script>'
        '</head><body><img src="figures/missing.png"><a href="nowhere.html">x</a><a href="#no-such-id">y</a>'
        "<script>undefinedFunction()</script></body></html>")
    (tmp_path / "orphan.html").write_text("<!DOCTYPE html><html><body>alone</body></html>")
    problems = "\n".join(report.check_site(tmp_path, browser=chromium).problems)
    for expected in ("request to the network blocked: https://cdn.example.org/x.js", "image did not load",
                     "link to a missing file", "missing anchor index.html#no-such-id", "undefinedFunction",
                     "orphan.html: no link reaches this page"):
        assert expected in problems


def test_the_check_reports_a_failed_notebook(chromium, tmp_path):
    """A site of a run whose notebook raised: the landing page's banner is a problem of the check."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    cell = new_code_cell("1/0", outputs=[new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                                    traceback=[])])
    run = tmp_path / "run"
    run.mkdir()
    nbformat.write(new_notebook(cells=[new_markdown_cell("# 09 · fails"), cell]), run / "09_fails.ipynb")
    index = report.build("quick", ROOT, out=tmp_path / "site", notebooks=run)
    result = report.check_site(index.parent, browser=chromium)
    assert "index.html: the run did not finish: 09_fails raised ZeroDivisionError: division by zero in cell 2" \
        in result.problems, result.problems


def test_without_a_browser_the_set_up_says_why(monkeypatch, tmp_path):
    """Where no Chromium is found and installing is forbidden, the reasons are what the skip (or CI's failure) shows."""
    from conftest import _find_or_install_browser

    monkeypatch.setattr(report, "find_browser", lambda: None)
    monkeypatch.setenv("LWCAM_INSTALL_BROWSER", "0")
    path, misses = _find_or_install_browser(lambda line: None)
    assert path is None and misses == ["no Chromium installed (neither /usr/bin/chromium nor Playwright's own)"]
    (tmp_path / "index.html").write_text("<!DOCTYPE html><html><body>x</body></html>")
    with pytest.raises(FileNotFoundError, match="browser: no Chromium found"):
        report.check_site(tmp_path)
