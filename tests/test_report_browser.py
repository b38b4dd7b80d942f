"""The report site in a real browser: Debian's headless Chromium driven by Playwright (lwcam.report.check_site).

The site is built from the ``quick`` run's executed notebooks when ``runs/quick/notebooks`` holds
them all, and otherwise from the committed ``notebooks/*.ipynb``, which carry their outputs, so
the test needs no notebook execution on a clean clone. Tables and figures come from the committed
``reports/quick/`` and ``figures/quick/``. On CI (``CI=true``) a missing browser fails the test;
elsewhere it skips.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lwcam import report

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser_ready() -> None:
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("Playwright for Python (pip install -e '.[dev]')")
    if not Path(report.CHROMIUM).exists():
        missing.append(f"{report.CHROMIUM} (apt-get install chromium)")
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"the browser test needs {' and '.join(missing)}; .ci/run installs them")
    if missing:
        pytest.skip(f"needs {' and '.join(missing)}")


def _notebook_source() -> Path:
    committed = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    run = ROOT / "runs" / "quick" / "notebooks"
    return run if all((run / name).exists() for name in committed) else ROOT / "notebooks"


def test_every_page_loads_offline_without_errors(browser_ready, tmp_path):
    t0 = time.perf_counter()
    index = report.build("quick", ROOT, out=tmp_path / "site", notebooks=_notebook_source())
    shot = tmp_path / "site_landing.png"
    result = report.check_site(index.parent, screenshot=shot)
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


def test_the_check_catches_what_a_reader_would_hit(browser_ready, tmp_path):
    """A broken page: a missing image, a dead link and anchor, a script error, a CDN script, an orphan page."""
    (tmp_path / "index.html").write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"><script src="https://cdn.example.org/x.js"></script>'
        '</head><body><img src="figures/missing.png"><a href="nowhere.html">x</a><a href="#no-such-id">y</a>'
        "<script>undefinedFunction()</script></body></html>")
    (tmp_path / "orphan.html").write_text("<!DOCTYPE html><html><body>alone</body></html>")
    problems = "\n".join(report.check_site(tmp_path).problems)
    for expected in ("request to the network blocked: https://cdn.example.org/x.js", "image did not load",
                     "link to a missing file", "missing anchor index.html#no-such-id", "undefinedFunction",
                     "orphan.html: no link reaches this page"):
        assert expected in problems
