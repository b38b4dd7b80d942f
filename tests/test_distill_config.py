"""DistillConfig (validated hyper-parameters, one fingerprint) and DistillCheckpoint (save, read, round trip)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from lwcam.distillation import CHECKPOINT_NAME, DistillCheckpoint, DistillConfig, distill

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _distill_worker import make_blackbox, make_images, make_student  # noqa: E402


def test_defaults_follow_the_optimiser_and_the_config_is_frozen() -> None:
    adamw, sgd = DistillConfig(), DistillConfig(optimizer="sgd")
    assert (adamw.peak_lr, adamw.decay) == (2e-3, 0.05)
    assert (sgd.peak_lr, sgd.decay) == (0.05, 5e-4)
    assert DistillConfig(lr=1, weight_decay=0).peak_lr == 1.0
    assert [DistillConfig(augment=a).aug_mode for a in (True, "default", "query", False, None, "none")] == [
        "default", "default", "query", "none", "none", "none"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        adamw.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"temperature": 0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"epochs": 0}, "epochs"),
    ({"epochs": 2.0}, "epochs"),
    ({"batch_size": True}, "batch_size"),
    ({"seed": -1}, "seed"),
    ({"optimizer": "adam"}, "optimizer"),
    ({"lr": 0.0}, "lr"),
    ({"lr": "fast"}, "lr"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"weight_decay": float("inf")}, "weight_decay"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"augment": "sometimes"}, "augment"),
    ({"query_budget": 0}, "query_budget"),
    ({"holdout": -1}, "holdout"),
    ({"holdout": 1.0}, "holdout"),
    ({"holdout": True}, "holdout"),
])
def test_bad_values_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DistillConfig(**kwargs)


def test_sizes_follow_budget_and_holdout() -> None:
    assert DistillConfig(holdout=0.1).sizes(100, 0) == (100, 10)
    assert DistillConfig(holdout=7).sizes(100, 0) == (100, 7)
    assert DistillConfig(query_budget=60, holdout=0.5, batch_size=16).sizes(100, 20) == (40, 20)
    with pytest.raises(ValueError, match="query_budget=10 is smaller than one batch"):
        DistillConfig(query_budget=10, batch_size=16).sizes(100, 0)
    with pytest.raises(ValueError, match="leaves 4 queries after the 20 eval_images"):
        DistillConfig(query_budget=24, batch_size=16).sizes(100, 20)
    with pytest.raises(ValueError, match="holdout=5 leaves no transfer image"):
        DistillConfig(holdout=5).sizes(5, 0)


def test_fingerprint_result_config_and_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    x, _ = make_images(48, seed=1)
    kw = {"epochs": 1, "batch_size": 16, "optimizer": "sgd", "temperature": 2, "holdout": 8, "seed": 3}
    result = distill(make_blackbox("probs"), x, student=make_student(0), checkpoint_dir=tmp_path, progress=False, **kw)
    settings = DistillConfig(**kw).settings()
    # one set of settings, in the result's config and in the checkpoint's fingerprint alike
    assert {k: result.config[k] for k in settings} == settings
    raw = DistillCheckpoint.read(tmp_path / CHECKPOINT_NAME)
    assert {k: raw["fingerprint"][k] for k in settings} == settings
    assert raw["fingerprint"]["n_holdout"] == 8 and raw["epoch"] == 1 and raw["queries"] == 48
    # every entry of the file is a field of DistillCheckpoint, and saving it again writes the same content
    ckpt = DistillCheckpoint(**raw)
    ckpt.save(tmp_path / "copy.pt")
    again = DistillCheckpoint.read(tmp_path / "copy.pt")
    assert again.keys() == raw.keys() == ckpt.to_dict().keys()
    assert torch.equal(again["torch_rng"][0], raw["torch_rng"][0])
    assert all(torch.equal(again["student"][k], v) for k, v in raw["student"].items())
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt cannot be read"):
        DistillCheckpoint.read(tmp_path / "junk.pt")


def test_a_resumed_run_whose_split_differs_raises(tmp_path: Path) -> None:
    """The checkpoint's hold-out and training indices are read back: a run that draws another split cannot resume."""
    torch.set_num_threads(1)
    x, _ = make_images(32, seed=1)
    kw = {"epochs": 1, "batch_size": 16, "optimizer": "sgd", "holdout": 8, "seed": 3, "progress": False}
    distill(make_blackbox("probs"), x, student=make_student(0), checkpoint_dir=tmp_path, **kw)
    path = tmp_path / CHECKPOINT_NAME
    raw = DistillCheckpoint.read(path)
    assert len(raw["holdout_indices"]) == 8 and len(raw["train_indices"]) == 24 and "epochs" not in raw
    distill(make_blackbox("probs"), x, student=make_student(0), checkpoint_dir=tmp_path, **kw)  # same split: resumes
    raw["holdout_indices"], raw["train_indices"] = raw["train_indices"][:8], raw["holdout_indices"]
    DistillCheckpoint(**raw).save(path)
    with pytest.raises(ValueError, match="other holdout_indices than this run draws"):
        distill(make_blackbox("probs"), x, student=make_student(0), checkpoint_dir=tmp_path, **kw)
