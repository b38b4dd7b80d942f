"""The README and docs/: rendered from docs/templates/ and the tables, never stale, every link alive, no number typed.

Every number a run makes comes into the pages through a placeholder (lwcam.study.docs), so the committed
pages must equal what their templates render from the committed tables; after a rerun `make docs`
(which `make reproduce` calls) brings them up to date.
"""

from __future__ import annotations

import functools
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lwcam.study import docs
from lwcam.study.answers import TRAINING_FLOORS, Tables, headline_answers

ROOT = Path(__file__).resolve().parents[1]

#: Numbers the templates may write in prose: protocol constants that are the code's own defaults, not results.
ALLOWED_NUMBERS = {
    "95%": "the CIs' level, lwcam.scoring.stats.bootstrap_ci's default ci=0.95",
    "3.11": "the Python version the Makefile asks for",
}


def test_the_committed_pages_equal_what_their_templates_render():
    stale = [p.relative_to(ROOT).as_posix() for p in docs.stale_docs(ROOT)]
    assert stale == [], f"stale pages {stale}: run `make docs` (python -m lwcam.study.docs) and commit them"


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into docs/"
    text = "\n".join(lines)
    for needed in ("make reproduce", "make test", "make report", "## Quick tour", "figures/F9_resolution.png",
                   "docs/protocol.md", "docs/results-default.md", "docs/performance.md"):
        assert needed in text, needed


def test_every_relative_link_of_the_readme_and_docs_resolves():
    pages = docs.pages(ROOT)
    assert {p.name for p in pages} >= {"README.md", "protocol.md", "failure_sweep.md", "results-default.md"}
    assert docs.broken_links(pages) == []


def test_every_test_the_failure_sweep_cites_exists():
    """docs/failure_sweep.md is written by hand (it holds line numbers, not results): each test it cites must exist."""
    cited = set(re.findall(r"`(test_\w+)`", (ROOT / "docs" / "failure_sweep.md").read_text()))
    defined = set(re.findall(r"^def (test_\w+)", (ROOT / "tests" / "test_sweep_bad_inputs.py").read_text(), re.M))
    assert cited, "docs/failure_sweep.md cites no test"
    assert sorted(cited - defined) == []


def test_no_number_is_typed_by_hand_into_a_template():
    typed = {p.name: [n for n in docs.loose_numbers(p.read_text()) if n not in ALLOWED_NUMBERS]
             for p in sorted((ROOT / docs.TEMPLATES).glob("*.md"))}
    assert {k: v for k, v in typed.items() if v} == {}, "cite these from the tables with a placeholder"


def test_the_readme_names_the_machine_and_the_answers_of_the_default_run():
    readme = (ROOT / "README.md").read_text()
    timings = pd.read_csv(ROOT / "reports" / "timings.csv")
    assert str(timings["machine"].iloc[0]) in readme and str(timings["commit"].iloc[0]) in readme
    for answer in headline_answers(Tables(ROOT / "reports"), strict=True):
        assert answer.text in readme  # the same sentences as the report site's landing page


def _project(tmp_path: Path) -> Path:
    """A copy of what the pages are rendered from: templates, tables, profiles."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for sub in ("params", "reports", "figures", "docs"):
        shutil.copytree(ROOT / sub, tmp_path / sub)
    shutil.copy(ROOT / "README.md", tmp_path)
    return tmp_path


def test_a_rerun_with_other_numbers_rewrites_numbers_and_verdicts(tmp_path):
    root = _project(tmp_path)
    assert docs.stale_docs(root) == []
    claims = pd.read_csv(root / "reports" / "T3_claim.csv")
    first = (claims["a"] == "lwcam") & (claims["b"] == "gradcam") & (claims["metric"] == "deletion_auc") & (
        claims["subset"] == "all images")
    claims.loc[first, ["mean_a", "mean_diff", "p_value"]] = [0.123456, -0.07, 1e-9]
    claims.to_csv(root / "reports" / "T3_claim.csv", index=False)
    goals = pd.read_csv(root / "reports" / "T5_goals.csv")
    goals["met"], goals["value"] = True, 0.5
    goals.to_csv(root / "reports" / "T5_goals.csv", index=False)
    assert root / "README.md" in docs.stale_docs(root)
    docs.write_docs(root)
    readme = (root / "README.md").read_text()
    assert "**The paper's claim holds.**" in readme and "deletion AUC of 0.123" in readme
    assert f"{len(goals)} are met, 0 not met and 0 not measured" in readme
    assert "| met |" in (root / "docs" / "results-default.md").read_text()
    assert docs.stale_docs(root) == [] and docs.main(["--check", "--root", str(root)]) == 0


def _render(tmp_path: Path, text: str) -> str:
    (tmp_path / "reports").mkdir(exist_ok=True)
    (tmp_path / "reports" / "T.csv").write_text("method,label,auc\nlwcam,lwcam (paper),0.25\nrise,RISE,0.3\n")
    return docs.render_text(text, tmp_path, "page.md")


@pytest.mark.parametrize(("text", "message"), [
    ("x\n{{ T9 | method=lwcam | auc }}", r"page.md line 2: \{\{ T9 \| method=lwcam \| auc \}\}: table T9: no .*T9.csv"),
    ("{{ T | method=gradcam | auc }}", r"page.md line 1: .*table T: no row where method='gradcam'"),
    ("{{ T | method=lwcam,rise | auc }}", r"table T: 2 rows \(name more columns to pick one\)"),
    ("{{ T | method=lwcam | deletion }}", r"table T: no column 'deletion' \(it has method, label, auc\)"),
    ("{{ T | metod=lwcam | auc }}", r"table T: no column 'metod'"),
    ("{{ table T | | label, nope }}", r"table T: no column 'nope'"),
    ("{{ T | method=lwcam | auc | .3q }}", r"format: '.3q' is not a number format"),
    ("{{ param default | no_such_key }}", r"profile 'default' has no setting 'no_such_key'"),
    ("{{ answers | size }}", r"page.md line 1: .*T5_claims"),
])
def test_a_placeholder_naming_what_the_tables_lack_is_an_error_naming_it(tmp_path, text, message):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "params", tmp_path / "params")
    with pytest.raises(docs.DocsError, match=message):
        _render(tmp_path, text)


def test_placeholders_render_values_tables_counts_and_sections(tmp_path):
    text = ("{{ T | method=rise | auc | .2f }}; {{ count T | auc=0.25 }}; {{ T | method=lwcam | label }}\n"
            "{{ table T | | label=\"method\", auc:.1f=\"AUC ↓\" }}\n{{ if T }}yes{{ else }}no{{ endif }}"
            "{{ if T9 }}T9{{ endif }}{{ if not T9 }}, none{{ endif }}")
    assert _render(tmp_path, text).splitlines() == [
        "0.30; 1; lwcam (paper)", "| method | AUC ↓ |", "|---|---:|", "| lwcam (paper) | 0.2 |", "| RISE | 0.3 |",
        "yes, none"]


def _seeds(lows: dict[str, float]) -> str:
    """A bench_seeds table of two seeds: the first at 0.99 everywhere, the second at ``lows`` (0.99 elsewhere)."""
    cols = list(TRAINING_FLOORS)
    second = [lows.get(c, 0.99) for c in cols]
    return "\n".join([f"seed,{','.join(cols)}", "0," + ",".join(["0.99"] * len(cols)),
                      "1," + ",".join(map(str, second)), "margin at min," + ",".join(["-1"] * len(cols))]) + "\n"


@pytest.mark.parametrize(("lows", "expected"), [
    ({"agreement_topk": 0.975}, "**Every training floor holds** on 2 training seeds; the closest is the `topk` "
                                "student's agreement, at least 0.975 against its floor of 0.97 (margin +0.005)."),
    ({"teacher_small_acc": 0.85, "agreement_label": 0.969},
     "**The training floors are not met** on 2 training seeds: its accuracy on the smallest objects reaches 0.850, "
     "below its floor of 0.90 (margin -0.050); the `label` student's agreement reaches 0.969, below its floor of "
     "0.97 (margin -0.001)."),
])
def test_the_floors_placeholder_says_whether_every_floor_holds_on_every_seed(tmp_path, lows, expected):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "bench_seeds.csv").write_text(_seeds(lows))
    assert docs.render_text("{{ floors }}", tmp_path, "page.md") == expected


def test_the_quick_tour_runs(monkeypatch, tmp_path):
    """The README's quick tour, with a small callable as the API and one distillation epoch."""
    import torch

    import lwcam.distillation

    block = re.search(r"## Quick tour\n+```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert block is not None, "README.md: no python block under '## Quick tour'"
    monkeypatch.setattr(lwcam.distillation, "distill",
                        functools.partial(lwcam.distillation.distill, epochs=1, progress=False))
    monkeypatch.chdir(tmp_path)  # cache_dir="answers"
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()

    def my_api(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(x).softmax(1)

    scope = {"my_api": my_api, "transfer_images": torch.randn(32, 3, 32, 32), "images": torch.randn(4, 3, 32, 32)}
    exec(compile(block.group(1), "README.md (quick tour)", "exec"), scope)
    assert 0 <= float(scope["game"].auc.mean()) <= 1 and scope["weighted"].shape == (4, 32, 32)
