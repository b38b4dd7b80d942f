"""Cached artefacts are keyed by the black box they came from: its URL and the model version its server reports."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch

from lwcam.remote import endpoint_blackbox
from lwcam.study import pipeline
from lwcam.study.profiles import load_profile

ROOT = Path(__file__).resolve().parents[1]
URL_A = "http://127.0.0.1:8080/v2/models/blackbox"
URL_B = "http://127.0.0.1:8081/v2/models/blackbox"


def _remote(version: str | None) -> Any:
    """A stand-in for a remote black box: what :func:`pipeline.blackbox_version` reads of one."""
    return SimpleNamespace(fn=SimpleNamespace(metadata=SimpleNamespace(version=version)))


def test_profiles_differing_only_in_black_box_url_get_different_student_fingerprints():
    quick = load_profile("quick", ROOT)
    a, b = quick.replace(black_box_url=URL_A), quick.replace(black_box_url=URL_B)
    assert pipeline.student_fingerprint(a, "1") != pipeline.student_fingerprint(b, "1")
    assert pipeline.student_fingerprint(a, "1") == pipeline.student_fingerprint(quick.replace(black_box_url=URL_A), "1")
    assert pipeline.student_fingerprint(a, "1") != pipeline.student_fingerprint(quick, None)  # remote vs in process
    assert json.loads(pipeline.student_fingerprint(a, "1"))["black_box_url"] == URL_A


def test_a_new_model_version_behind_the_same_url_gets_a_new_fingerprint():
    a = load_profile("quick", ROOT).replace(black_box_url=URL_A)
    assert pipeline.student_fingerprint(a, "1") != pipeline.student_fingerprint(a, "2")
    assert pipeline.student_fingerprint(a, "2") == pipeline.student_fingerprint(a, "2")
    assert pipeline.student_fingerprint(a, None) != pipeline.student_fingerprint(a, "1")


def test_the_in_process_black_box_keeps_its_profile_key():
    """A profile without a server keeps the key its cached students were saved under."""
    quick = load_profile("quick", ROOT)
    assert pipeline.student_fingerprint(quick) == quick.fingerprint(pipeline.TEACHER_KEYS + pipeline.STUDENT_KEYS)
    with pytest.raises(ValueError, match="model_version: '3' given for a profile without black_box_url"):
        pipeline.student_fingerprint(quick, "3")


def test_blackbox_version_reads_the_servers_metadata():
    meta = {"name": "m", "versions": ["7"], "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 2]}],
            "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 8, 8]}]}
    bb = endpoint_blackbox("http://127.0.0.1:8080", "m", num_classes=2,
                           transport=httpx.MockTransport(lambda request: httpx.Response(200, json=meta)))
    assert pipeline.blackbox_version(bb) == "7"
    assert pipeline.blackbox_version(_remote(None)) is None
    assert pipeline.blackbox_version(torch.nn.Linear(2, 2)) is None


def _cached_student(paths: pipeline.RunPaths, fingerprint: str) -> None:
    (paths.run / "student_probs.pt").write_bytes(b"checkpoint")
    (paths.run / "student_probs.json").write_text(json.dumps({"fingerprint": fingerprint}))


def test_get_student_distils_afresh_for_another_black_box(tmp_path, monkeypatch):
    """No training: a cached student of the server's current model is loaded, one of another model is not."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "params").mkdir()
    p = load_profile("quick", ROOT).replace(profile="fp", black_box_url=URL_A)
    paths = pipeline.RunPaths.for_profile("fp", tmp_path)
    served = {"version": "1"}
    monkeypatch.setattr(pipeline, "make_blackbox", lambda *a, **k: _remote(served["version"]))
    monkeypatch.setattr(pipeline, "load_checkpoint", lambda path: ("cached student", {}))

    class Distilled(Exception):
        pass

    def distil(*args: Any, **kwargs: Any) -> None:
        raise Distilled(args[4])

    monkeypatch.setattr(pipeline, "_distill", distil)
    _cached_student(paths, pipeline.student_fingerprint(p, "1"))
    model, summary = pipeline.get_student(p, paths, teacher=torch.nn.Identity())
    assert model == "cached student" and summary["fingerprint"] == pipeline.student_fingerprint(p, "1")
    served["version"] = "2"  # the server now serves another version of the model
    with pytest.raises(Distilled) as new_version:
        pipeline.get_student(p, paths, teacher=torch.nn.Identity())
    assert str(new_version.value) == pipeline.student_fingerprint(p, "2")
    served["version"] = "1"
    with pytest.raises(Distilled) as new_url:
        pipeline.get_student(p.replace(black_box_url=URL_B), paths, teacher=torch.nn.Identity())
    assert URL_B in str(new_url.value)


def test_per_epoch_students_of_another_black_box_are_dropped_and_refused(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "params").mkdir()
    paths = pipeline.RunPaths.for_profile("fp", tmp_path)
    folder = paths.snapshots("probs")
    folder.mkdir(parents=True)
    assert pipeline._reset_snapshots(folder, "A", fresh=True) is False
    (folder / "epoch_001.pt").write_bytes(b"A's epoch 1")
    assert pipeline._reset_snapshots(folder, "A", fresh=False) is False  # the same distillation resumes
    assert (folder / "epoch_001.pt").exists()
    (paths.run / "student_probs.json").write_text(json.dumps({"fingerprint": "B"}))
    with pytest.raises(ValueError, match="come from another distillation .* rerun notebook 01"):
        pipeline.load_snapshots({}, paths)
    assert pipeline._reset_snapshots(folder, "B", fresh=False) is True  # another black box: every epoch again
    assert not (folder / "epoch_001.pt").exists()
    assert json.loads((folder / pipeline.SNAPSHOT_KEY).read_text()) == {"fingerprint": "B"}
