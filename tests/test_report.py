"""The report site (lwcam.study.report) without a browser: verdicts, offline pages, publish, committed notebooks."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from lwcam.study import report

ROOT = Path(__file__).resolve().parents[1]


def _notebook(params: str, body: str, outputs: bool, injected: str | None = None) -> nbformat.NotebookNode:
    cells = [new_markdown_cell("# 01 · A tiny notebook"), new_code_cell(params, metadata={"tags": ["parameters"]})]
    if injected is not None:
        cells.append(new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    code = new_code_cell(body)
    if outputs:
        code.outputs = [new_output("stream", name="stdout", text="42\n")]
        code.execution_count = 3
    cells.append(code)
    return new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                              "language": "python"}})


def _project(tmp_path: Path, profile: str = "tiny") -> Path:
    """A minimal project tree: one executed notebook, T3 tables, a timings table and one figure."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "params").mkdir()
    run = tmp_path / "runs" / profile / "notebooks"
    run.mkdir(parents=True)
    nbformat.write(_notebook("n = 1", 'pipeline.save_table(t, "T3_methods", paths)\nprint(42)', True, "n = 500"),
                   run / "01_tiny.ipynb")
    reports, figures = tmp_path / "reports" / profile, tmp_path / "figures" / profile
    reports.mkdir(parents=True)
    figures.mkdir(parents=True)
    pd.DataFrame({"a": ["lwcam", "lwcam"], "b": ["gradcam", "random"], "metric": ["deletion_auc"] * 2,
                  "subset": ["all images"] * 2, "n": [10, 10], "mean_a": [0.3, 0.3], "mean_b": [0.2, 0.7],
                  "mean_diff": [0.1, -0.4], "ci_low": [0.05, -0.5], "ci_high": [0.15, -0.3], "p_value": [1.0, 1e-9],
                  "alternative": ["less", "less"]}).to_csv(reports / "T3_claim.csv", index=False)
    pd.DataFrame({"method": ["lwcam", "gradcam"], "label": ["lwcam (paper)", "Grad-CAM"], "n_images": [10, 10],
                  "deletion_auc": [0.3, 0.2], "deletion_auc_ci_low": [0.25, 0.15],
                  "deletion_auc_ci_high": [0.35, 0.25]}).to_csv(reports / "T3_methods.csv", index=False)
    pd.DataFrame({"notebook": ["01_tiny", "(all)"], "stage": ["(whole notebook)", "(total)"], "seconds": [1.5, 1.5],
                  "profile": profile, "seed": 0, "commit": "abc123def456", "torch": "2.x", "threads": 1,
                  "machine": "x86_64 2 CPUs"}).to_csv(reports / "timings.csv", index=False)
    (figures / "F1_tiny.png").write_bytes((ROOT / "figures" / "F4_layer_importance.png").read_bytes())
    return tmp_path


def test_claim_verdicts_follow_the_direction_and_the_p_value():
    assert report.claim_verdict(-0.1, 0.01, "less") == "holds"
    assert report.claim_verdict(-0.1, 0.2, "less") == "does not hold"
    assert report.claim_verdict(-0.1, 0.01, "greater") == "does not hold"  # significant, but the wrong way
    with pytest.raises(ValueError, match="alternative must be 'less' or 'greater'"):
        report.claim_verdict(0.1, 0.01, "two-sided")
    own = pd.DataFrame({"claim": ["x"], "verdict": ["holds"]})
    assert report.with_verdicts(own) is own  # a table that states its verdicts keeps them
    with pytest.raises(ValueError, match="claims: a claim table needs a 'verdict' column"):
        report.with_verdicts(pd.DataFrame({"claim": ["x"]}))


def test_external_resources_finds_what_a_page_would_fetch():
    page = ('<script src="https://cdn.x/require.js"></script><link rel="stylesheet" href="//fonts.x/css">'
            '<style>@import "https://fonts.x/a.css"; p { background: url(https://x/bg.png) }</style>'
            '<img src="figures/F1.png"><img src="data:image/png;base64,AAAA"><a href="https://arxiv.org/">paper</a>')
    assert report.external_resources(page) == ["https://cdn.x/require.js", "//fonts.x/css", "https://fonts.x/a.css",
                                                "https://x/bg.png"]


def test_build_writes_an_offline_site_with_claims_t3_figures_tables_and_notebooks(tmp_path):
    root = _project(tmp_path)
    index = report.build("tiny", root)
    site = root / "site" / "tiny"
    assert index == site / "index.html"
    page = index.read_text()
    assert "does not hold" in page and ">holds<" in page  # T3's two claims, one each way
    assert "No T4_claims table for this profile yet" in page  # notebook 05 not run: said, not an error
    assert "lwcam (paper) &lt; Grad-CAM" in page and "0.300 [0.250, 0.350]" in page
    assert "abc123def456" in page and "01 · A tiny notebook" in page
    for link in ("notebooks/01_tiny.html", "tables/T3_methods.html", "tables/T3_claim.html", "figures/F1_tiny.png",
                 "tables/timings.html"):
        assert f'href="{link}"' in page and (site / link).exists()
    nb_page = (site / "notebooks" / "01_tiny.html").read_text()
    assert "42" in nb_page and 'href="../index.html"' in nb_page
    for html_file in site.rglob("*.html"):
        assert report.external_resources(html_file.read_text()) == [], html_file
    assert "material-components-web" not in nb_page  # nbconvert's CSS comments (web addresses) are gone


def test_the_landing_page_opens_with_the_answers_and_folds_the_long_tables(tmp_path):
    root = _project(tmp_path)
    figures = root / "figures" / "tiny"
    (figures / "F8_scorecard.png").write_bytes((figures / "F1_tiny.png").read_bytes())
    page = report.build("tiny", root).read_text()
    answers, claims = page.index('id="answers"'), page.index('id="claims"')
    assert answers < claims and page.index("<table") > answers  # the answers come before any table
    opening = page[answers:claims]
    assert "<b>The paper's claim does not hold.</b>" in opening
    assert "deletion AUC of 0.300 against 0.200 for Grad-CAM" in opening  # from T3_claim and T3_methods' labels
    assert 'src="figures/F8_scorecard.png"' in opening and 'href="tables/T3_claim.html"' in opening
    assert "F3_methods" not in opening  # a figure the profile lacks is left out, not a broken image
    assert page.count("<details>") >= 3 and "Every claim of T3_claim (2)" in page  # claims, T3, tables folded


def _failed_run_with_claims(tmp_path):
    """A project whose notebook wrote T3_claim and then failed; the project root and its built landing page."""
    root = _project(tmp_path)
    path = root / "runs" / "tiny" / "notebooks" / "01_tiny.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells[-1].source += '\npipeline.save_table(claims, "T3_claim", paths)'
    nbformat.write(nb, path)
    _failed_run(root)
    return root, report.build("tiny", root).read_text()


def test_the_answers_of_a_failed_notebook_are_flagged_and_missing_answers_are_said(tmp_path):
    root, page = _failed_run_with_claims(tmp_path)
    opening = page[page.index('id="answers"'):page.index('id="claims"')]
    assert '<span class="stale">possibly stale: 01_tiny failed</span>' in opening
    (root / "reports" / "tiny" / "T3_claim.csv").unlink()
    page = report.build("tiny", root).read_text()
    assert "No answers yet: the tables they come from" in page


def test_build_shows_t4_claims_once_notebook_05_made_them(tmp_path):
    root = _project(tmp_path)
    reports = root / "reports" / "tiny"
    pd.DataFrame({"method": ["lwcam_aware"], "label": ["lwcam (conflict-aware)"]}).to_csv(
        reports / "T4_scorecard.csv", index=False)
    pd.DataFrame({"a": ["lwcam_aware"], "b": ["gradcam"], "metric": ["targeted_pointing"], "n": [12],
                  "mean_a": [0.9], "mean_b": [0.5], "mean_diff": [0.4], "ci_low": [0.2], "ci_high": [0.6],
                  "p_value": [0.001], "alternative": ["greater"]}).to_csv(reports / "T4_claims.csv", index=False)
    page = report.build("tiny", root).read_text()
    assert "No T4_claims table" not in page and "1 of 1 claims hold" in page
    assert "lwcam (conflict-aware) &gt; Grad-CAM" in page and 'href="tables/T4_claims.html"' in page
    pd.DataFrame({"claim": ["x"]}).to_csv(reports / "T4_claims.csv", index=False)  # no verdict to show: said so
    assert "The table states no verdicts" in report.build("tiny", root).read_text()


def test_build_names_the_missing_run(tmp_path):
    root = _project(tmp_path)
    with pytest.raises(FileNotFoundError, match="make reproduce PROFILE=paper"):
        report.build("paper", root)
    assert report.main(["build", "--profile", "paper", "--out", str(tmp_path / "s")]) == 2


def test_publish_copies_outputs_keeps_the_parameters_cell_and_drops_the_injected_one(tmp_path):
    root = _project(tmp_path)
    (root / "notebooks").mkdir()
    body = 'pipeline.save_table(t, "T3_methods", paths)\nprint(42)'
    nbformat.write(_notebook("n = 1", body, outputs=False), root / "notebooks" / "01_tiny.ipynb")
    (written,) = report.publish("tiny", root)
    nb = nbformat.read(written, as_version=4)
    assert [c.metadata.get("tags", []) for c in nb.cells] == [[], ["parameters"], []]
    assert nb.cells[1].source == "n = 1" and nb.cells[2].outputs[0]["text"] == "42\n"
    nbformat.write(_notebook("n = 1", "print(43)", outputs=False), root / "notebooks" / "01_tiny.ipynb")
    with pytest.raises(ValueError, match="cell 2 .* differs from the run's"):
        report.publish("tiny", root)


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_committed_notebooks_run_on_quick_without_injected_parameters(path):
    """nbval executes the committed notebooks as they are: their parameters cell must name the quick profile."""
    nb = nbformat.read(path, as_version=4)
    tags = [t for c in nb.cells for t in c.metadata.get("tags", [])]
    assert "injected-parameters" not in tags and tags.count("parameters") == 1
    declared = papermill.inspect_notebook(str(path))
    assert {k: ast.literal_eval(v["default"]) for k, v in declared.items()} == {"profile": "quick"}


def _failed_run(root: Path, name: str = "01_tiny") -> None:
    """Rewrite the run's notebook as one whose last cell raised after saving nothing new."""
    path = root / "runs" / "tiny" / "notebooks" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells[-1].outputs = [new_output("error", ename="RuntimeError", evalue="the black box went away",
                                       traceback=["Traceback ...", "RuntimeError: the black box went away"])]
    nbformat.write(nb, path)


def test_a_failed_notebook_is_marked_on_the_landing_page_its_own_page_and_its_tables(tmp_path, monkeypatch, capsys):
    root = _project(tmp_path)
    _failed_run(root)
    index = report.build("tiny", root)
    page = index.read_text()
    assert 'id="failed-notebooks"' in page and "01_tiny</a> raised <code>RuntimeError: the black box went away" in page
    assert "may be stale (from an earlier run) or incomplete: T3_methods" in page
    assert 'T3_methods</a></td><td><a href="tables/T3_methods.csv">csv</a></td><td><a href="notebooks/01_tiny.html">' \
           '01_tiny</a> <span class="stale">possibly stale: 01_tiny failed</span>' in page
    assert 'T3_claim</a></td><td><a href="tables/T3_claim.csv">csv</a></td><td></td>' in page  # not made by 01
    nb_page = (index.parent / "notebooks" / "01_tiny.html").read_text()
    assert 'class="lwcam-failed"' in nb_page and "RuntimeError: the black box went away" in nb_page
    table_page = (index.parent / "tables" / "T3_methods.html").read_text()
    assert "Possibly stale or incomplete:" in table_page and "01_tiny raised RuntimeError" in table_page
    assert "Possibly stale" not in (index.parent / "tables" / "T3_claim.html").read_text()
    assert [str(f) for f in report.site_failures(index.parent)] == [
        "01_tiny raised RuntimeError: the black box went away (cell 4)"]
    monkeypatch.chdir(root)
    assert report.main(["build", "--profile", "tiny"]) == 1  # built, marked, and the command says it failed
    assert "error: notebook 01_tiny raised RuntimeError" in capsys.readouterr().err


def test_claim_verdicts_of_a_failed_notebook_are_flagged(tmp_path):
    _, page = _failed_run_with_claims(tmp_path)
    assert '<p class="stale">These verdicts may be stale or incomplete: 01_tiny raised RuntimeError' in page


def test_a_rebuild_after_a_good_run_drops_the_banner(tmp_path):
    root = _project(tmp_path)
    _failed_run(root)
    report.build("tiny", root)
    nbformat.write(_notebook("n = 1", 'pipeline.save_table(t, "T3_methods", paths)\nprint(42)', True, "n = 500"),
                   root / "runs" / "tiny" / "notebooks" / "01_tiny.ipynb")
    index = report.build("tiny", root)
    assert "failed-notebooks" not in index.read_text() and report.site_failures(index.parent) == []


def test_papermills_marker_and_flag_count_as_a_failure_and_a_clean_exit_does_not():
    marker = new_markdown_cell("Execution using papermill encountered an exception here and stopped:",
                               metadata={"tags": [report.PAPERMILL_ERROR_TAG]})
    assert [f.ename for f in report.notebook_failures(new_notebook(cells=[marker]), "x")] == ["an exception"]
    flagged = new_code_cell("run()", metadata={"papermill": {"exception": True}})
    (found,) = report.notebook_failures(new_notebook(cells=[new_markdown_cell("# x"), flagged]), "x")
    assert (found.ename, found.cell) == ("CellExecutionError", 2)
    clean = new_code_cell("raise SystemExit(0)")
    clean.outputs = [new_output("error", ename="SystemExit", evalue="0", traceback=[])]
    assert report.notebook_failures(new_notebook(cells=[clean]), "x") == []
    nb = new_notebook(cells=[new_code_cell("x = 1")], metadata={"papermill": {"exception": True}})
    assert len(report.notebook_failures(nb, "x")) == 1
