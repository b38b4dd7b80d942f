"""The report build never deletes what it did not write, keeps the previous site on a bad input, and names it."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from test_report import _notebook, _project

from lwcam.study import report


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_leftovers(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if ".building-" in p.name], list(parent.iterdir())


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return _project(tmp_path)


def test_a_folder_of_the_users_files_is_refused_and_left_as_it_is(project, capsys, monkeypatch):
    monkeypatch.chdir(project)  # the command line finds the project from the working folder
    out = project / "mine"
    (out / "notebooks").mkdir(parents=True)
    nbformat.write(_notebook("n = 1", "print(1)", outputs=False), out / "notebooks" / "analysis.ipynb")
    (out / "index.html").write_text("my own page")
    before = _snapshot(out)
    with pytest.raises(ValueError, match=f"out: {out} already holds files that no site build wrote"):
        report.build("tiny", project, out=out)
    assert _snapshot(out) == before
    assert report.main(["build", "--profile", "tiny", "--out", str(out)]) == 2
    assert str(out) in capsys.readouterr().err and _snapshot(out) == before
    _no_leftovers(project)


def test_a_rebuild_removes_only_the_files_its_manifest_lists(project):
    site = project / "site" / "tiny"
    report.build("tiny", project)
    manifest = report.read_manifest(site)
    assert manifest is not None and "tables/T3_claim.csv" in manifest["files"] and "index.html" in manifest["files"]
    assert set(manifest["files"]) == set(_snapshot(site)) - {report.MANIFEST}
    (site / "notes.txt").write_text("the reader's notes")
    (site / "tables" / "my_table.csv").write_text("x\n1\n")
    (project / "reports" / "tiny" / "T3_claim.csv").unlink()  # the next run makes no T3_claim
    report.build("tiny", project)
    assert not (site / "tables" / "T3_claim.csv").exists() and not (site / "tables" / "T3_claim.html").exists()
    assert (site / "notes.txt").read_text() == "the reader's notes" and (site / "tables" / "my_table.csv").exists()
    assert "tables/T3_claim.csv" not in report.read_manifest(site)["files"]
    _no_leftovers(site.parent)


def test_an_empty_folder_is_built_into_and_other_profiles_sites_below_it_stay(project):
    quick = report.build("tiny", project, out=project / "site" / "quick").parent  # another profile's site below
    (project / "site" / "empty").mkdir()
    report.build("tiny", project, out=project / "site" / "empty")
    report.build("tiny", project, out=project / "site")  # holds only other sites: allowed
    assert (project / "site" / "index.html").exists() and (quick / "index.html").exists()
    assert report.read_manifest(quick) is not None


def test_a_file_in_the_way_of_a_new_page_is_refused(project):
    site = project / "site" / "tiny"
    report.build("tiny", project)
    before = _snapshot(site)
    (project / "figures" / "tiny" / "F9_new.png").write_bytes((project / "figures" / "tiny" / "F1_tiny.png")
                                                              .read_bytes())
    (site / "figures" / "F9_new.png").write_text("the reader's own picture")
    with pytest.raises(ValueError, match=r"F9_new.png is in the way and no site build wrote it"):
        report.build("tiny", project)
    assert (site / "figures" / "F9_new.png").read_text() == "the reader's own picture"
    assert {k: v for k, v in _snapshot(site).items() if k != "figures/F9_new.png"} == before
    _no_leftovers(site.parent)


def test_a_corrupt_notebook_keeps_the_previous_site_and_is_named(project, capsys):
    site = project / "site" / "tiny"
    report.build("tiny", project)
    before = _snapshot(site)
    bad = project / "runs" / "tiny" / "notebooks" / "02_broken.ipynb"
    bad.write_text('{"cells": [ not json')
    with pytest.raises(ValueError, match=f"notebook {bad}: not a readable notebook"):
        report.build("tiny", project)
    assert _snapshot(site) == before
    assert report.main(["build", "--profile", "tiny", "--notebooks", str(bad.parent), "--out", str(site)]) == 2
    assert f"notebook {bad}" in capsys.readouterr().err and _snapshot(site) == before
    _no_leftovers(site.parent)


def test_a_page_that_fails_to_render_keeps_the_previous_site(project, monkeypatch):
    site = project / "site" / "tiny"
    report.build("tiny", project)
    before = _snapshot(site)

    def broken(*args: object, **kwargs: object) -> str:
        raise RuntimeError("nbconvert broke")

    monkeypatch.setattr(report, "_render_notebook", broken)
    with pytest.raises(RuntimeError, match="nbconvert broke"):
        report.build("tiny", project)
    assert _snapshot(site) == before
    _no_leftovers(site.parent)


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "two words"])
def test_a_bad_profile_name_is_refused(project, name, capsys):
    with pytest.raises(ValueError, match=r"profile: .* is not a profile name"):
        report.build(name, project)
    assert report.main(["build", "--profile", name, "--out", str(project / "s")]) == 2
    assert f"profile: {name!r}" in capsys.readouterr().err
    assert not (project / "s").exists() and not (project / "evil").exists()


def test_an_out_path_that_is_a_file_is_refused(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    out = project / "site.html"
    out.write_text("a file")
    with pytest.raises(ValueError, match=f"out: {out} is a file, not a folder"):
        report.build("tiny", project, out=out)
    assert out.read_text() == "a file"
    assert report.main(["build", "--profile", "tiny", "--out", str(out)]) == 2
    assert f"out: {out} is a file" in capsys.readouterr().err


def test_a_missing_runs_folder_is_named(project):
    missing = project / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"no executed notebooks under {missing}"):
        report.build("tiny", project, notebooks=missing)
    with pytest.raises(FileNotFoundError, match="runs/other/notebooks; run `make reproduce PROFILE=other`"):
        report.build("other", project)


def test_a_notebooks_argument_that_is_a_file_or_empty_is_named(project):
    a_file = project / "runs" / "tiny" / "notebooks" / "01_tiny.ipynb"
    with pytest.raises(FileNotFoundError, match=f"no executed notebooks under {a_file}"):
        report.build("tiny", project, notebooks=a_file)
    empty = project / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no executed notebooks under {empty}"):
        report.build("tiny", project, notebooks=empty)


def test_a_notebook_that_is_json_but_not_a_notebook_is_named(project):
    bad = project / "runs" / "tiny" / "notebooks" / "00_list.ipynb"
    bad.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match=f"notebook {bad}: not a readable notebook"):
        report.build("tiny", project)
    assert not (project / "site").exists()


def test_a_corrupt_table_is_named_and_the_previous_site_kept(project):
    site = project / "site" / "tiny"
    report.build("tiny", project)
    before = _snapshot(site)
    bad = project / "reports" / "tiny" / "T3_methods.csv"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match=f"table {bad}: not a readable CSV"):
        report.build("tiny", project)
    assert _snapshot(site) == before


def test_a_damaged_manifest_is_refused_and_nothing_deleted(project):
    site = project / "site" / "tiny"
    report.build("tiny", project)
    (site / report.MANIFEST).write_text("{ not json")
    before = _snapshot(site)
    with pytest.raises(ValueError, match=f"{site / report.MANIFEST}: damaged manifest"):
        report.build("tiny", project)
    (site / report.MANIFEST).write_text(json.dumps({"files": ["index.html", "../../pyproject.toml"]}))
    with pytest.raises(ValueError, match=r"the entry '../../pyproject.toml' lies outside the site"):
        report.build("tiny", project)
    assert (project / "pyproject.toml").exists()
    assert {k: v for k, v in _snapshot(site).items() if k != report.MANIFEST} == {
        k: v for k, v in before.items() if k != report.MANIFEST}


def test_the_cli_names_a_missing_site_to_check(tmp_path, capsys):
    assert report.main(["check", "--site", str(tmp_path / "no-site")]) == 2
    assert str(tmp_path / "no-site") in capsys.readouterr().err


def test_read_manifest_and_site_failures_of_a_folder_without_a_site(tmp_path):
    assert report.read_manifest(tmp_path) is None and report.site_failures(tmp_path) == []
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "t.csv", index=False)
    (tmp_path / report.MANIFEST).write_text(json.dumps({"files": "index.html"}))
    with pytest.raises(ValueError, match="damaged manifest \\(no 'files' list\\)"):
        report.read_manifest(tmp_path)
