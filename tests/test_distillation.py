"""Tests of lwcam.distillation on a tiny task (see tests/_distill_worker.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from lwcam.blackbox import BlackBox
from lwcam.distillation import (
    CHECKPOINT_NAME,
    DistillResult,
    answers_to_log_probs,
    distill,
    kd_loss,
    label_loss,
    topk_distribution,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _distill_worker import (  # noqa: E402
    NUM_CLASSES,
    ColourTeacher,
    make_blackbox,
    make_images,
    make_student,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_distill_worker.py"
N, EPOCHS, BATCH = 512, 6, 64


@pytest.fixture(scope="module")
def task():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = make_images(N, seed=1)
    xe, ye = make_images(256, seed=2)
    yield {"x": x, "y": y, "xe": xe, "ye": ye}
    torch.set_num_threads(threads)


def _run(bb: BlackBox, images, **kw) -> DistillResult:
    kw.setdefault("student", make_student(0))
    kw.setdefault("epochs", EPOCHS)
    kw.setdefault("batch_size", BATCH)
    kw.setdefault("progress", False)
    return distill(bb, images, **kw)


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs"


class _Items(Dataset):
    """(image, label, mask) items, like lwcam.data."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), torch.zeros(self.images.shape[-2:], dtype=torch.bool)


# --------------------------------------------------------------------------- loss formulas
def test_kd_loss_matches_hand_computation() -> None:
    z = [1.0, -0.5, 2.0]
    p = [0.7, 0.2, 0.1]
    tau = 2.0
    pt = [q ** (1 / tau) for q in p]
    pt = [q / sum(pt) for q in pt]
    es = [math.exp(v / tau) for v in z]
    ps = [v / sum(es) for v in es]
    expected = tau**2 * sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps, strict=True))
    got = kd_loss(torch.tensor([z]), torch.tensor([p]).log(), temperature=tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # τ² scaling: the same KL without the factor, at τ = 1 the plain KL
    assert (got / tau**2).item() == pytest.approx(expected / tau**2, rel=1e-5)
    kl1 = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, torch.softmax(torch.tensor(z), 0).tolist(),
                                                             strict=True))
    assert kd_loss(torch.tensor([z]), torch.tensor([p]).log(), temperature=1.0).item() == pytest.approx(kl1, rel=1e-5)
    # logits and log-probabilities of the same teacher give the same loss (softmax is shift invariant)
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    assert kd_loss(torch.tensor([z]), logits, 4.0).item() == pytest.approx(
        kd_loss(torch.tensor([z]), logits.log_softmax(1), 4.0).item(), rel=1e-6)
    # zero when the student matches, zero-probability classes stay finite
    assert kd_loss(logits, logits, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    zero = answers_to_log_probs(torch.tensor([[1.0, 0.0, 0.0]]), "probs", 3)
    assert torch.isfinite(kd_loss(torch.tensor([z]), zero, 4.0))
    expected_ce = -torch.log_softmax(torch.tensor(z), 0)[0].item()
    assert kd_loss(torch.tensor([z]), zero, 1.0).item() == pytest.approx(expected_ce)
    # reductions
    two = torch.tensor([z, [0.0, 0.0, 0.0]])
    per = kd_loss(two, torch.tensor([p, p]).log(), 2.0, reduction="none")
    assert per.shape == (2,)
    assert kd_loss(two, torch.tensor([p, p]).log(), 2.0).item() == pytest.approx(per.mean().item())
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(two, two, 0.0)


def test_probs_softening_is_power_renormalised() -> None:
    p = torch.tensor([[0.6, 0.3, 0.1]])
    tau = 3.0
    softened = torch.softmax(answers_to_log_probs(p, "probs", 3) / tau, dim=1)
    expected = p ** (1 / tau) / (p ** (1 / tau)).sum()
    assert torch.allclose(softened, expected, atol=1e-6)


def test_topk_distribution_spreads_remaining_mass() -> None:
    full = topk_distribution(torch.tensor([[0.5, 0.3], [0.9, 0.1]]), torch.tensor([[3, 1], [0, 4]]), 5)
    expected = torch.tensor([[0.2 / 3, 0.3, 0.2 / 3, 0.5, 0.2 / 3], [0.9, 0.0, 0.0, 0.0, 0.1]])
    assert torch.allclose(full, expected, atol=1e-6)
    assert torch.allclose(full.sum(1), torch.ones(2))
    # k = C: the answer is the distribution itself
    p = torch.tensor([[0.1, 0.7, 0.2]])
    v, i = p.topk(3, dim=1)
    assert torch.allclose(topk_distribution(v, i, 3), p)
    # the same through a real topk black box
    bb = BlackBox(lambda x: torch.tensor([[0.1, 0.6, 0.05, 0.25]]).expand(x.shape[0], 4), 4, output="topk", k=2)
    logp = answers_to_log_probs(bb(torch.zeros(1, 3, 2, 2)), "topk", 4)
    assert torch.allclose(logp.exp(), torch.tensor([[0.075, 0.6, 0.075, 0.25]]), atol=1e-6)


def test_label_loss_is_smoothed_cross_entropy() -> None:
    z = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    logp = torch.log_softmax(z, 1)[0]
    assert label_loss(z, torch.tensor([0])).item() == pytest.approx(-logp[0].item(), rel=1e-6)
    eps = 0.1
    expected = -(1 - eps) * logp[2].item() - eps / 4 * logp.sum().item()
    assert label_loss(z, torch.tensor([2]), eps).item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- training
@pytest.mark.slow
@pytest.mark.parametrize("output, bar", [("probs", 0.9), ("logits", 0.9), ("topk", 0.9), ("label", 0.85)])
def test_each_output_mode_distils(task, output: str, bar: float) -> None:
    bb = make_blackbox(output, k=2)
    before = ColourTeacher()
    untrained = (make_student(0).eval()(task["xe"]).argmax(1) == before(task["xe"]).argmax(1)).float().mean().item()
    result = _run(bb, task["x"], eval_images=task["xe"], eval_labels=task["ye"])
    fid = result.fidelity
    assert untrained < 0.6
    assert fid["agreement"] >= bar and fid["eval_agreement"] >= bar
    assert fid["accuracy"] >= bar - 0.05
    assert fid["n_holdout"] == round(0.1 * N) and fid["n_eval"] == 256
    assert 0.9 <= fid["blackbox_accuracy"] <= 1.0
    if output == "label":
        assert fid["kl"] is None and fid["eval_kl"] is None
    else:
        assert math.isfinite(fid["kl"]) and 0 <= fid["kl"] < 0.1
    # every image (transfer, held-out, eval) asked exactly once
    assert bb.queries == N + 256 == result.queries
    hist = result.history
    assert [h["epoch"] for h in hist] == list(range(1, EPOCHS + 1))
    assert set(hist[0]) >= {"epoch", "loss", "agreement", "kl", "queries", "seconds"}
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert all(h["queries"] == N + 256 for h in hist)
    assert not result.student.training
    assert all(p.device.type == "cpu" for p in result.student.parameters())
    assert result.config["output"] == output and result.config["n_train"] == N - round(0.1 * N)


@pytest.mark.slow
def test_labels_are_never_used(task) -> None:
    garbage = torch.randint(0, NUM_CLASSES, (N,), generator=torch.Generator().manual_seed(5))
    runs = [
        _run(make_blackbox("probs"), task["x"], epochs=2),
        _run(make_blackbox("probs"), _Items(task["x"], task["y"]), epochs=2),
        _run(make_blackbox("probs"), _Items(task["x"], garbage), epochs=2),
    ]
    for other in runs[1:]:
        _assert_bitwise_equal(_params(runs[0].student), _params(other.student))
        assert other.history == [{**h, "seconds": o["seconds"]} for h, o in zip(runs[0].history, other.history,
                                                                                  strict=True)]


@pytest.mark.slow
def test_augmented_views_are_queried_and_counted(task) -> None:
    bb = make_blackbox("probs")
    result = _run(bb, task["x"], augment="query", epochs=3)
    n_train = result.config["n_train"]
    steps = n_train // BATCH
    assert result.queries == bb.queries == N + 3 * steps * BATCH
    assert [h["queries"] for h in result.history] == [N + e * steps * BATCH for e in (1, 2, 3)]
    assert result.fidelity["agreement"] >= 0.8
    # no augmentation at all also asks each image once
    bb2 = make_blackbox("probs")
    assert _run(bb2, task["x"], augment=False, epochs=1).queries == bb2.queries == N


@pytest.mark.slow
def test_query_budget_is_a_hard_cap(task) -> None:
    bb = make_blackbox("probs")
    result = _run(bb, task["x"], query_budget=300, epochs=2)
    assert bb.queries == result.queries == 300
    assert result.config["n_used"] == 300 and result.fidelity["n_holdout"] == 30
    # eval images are paid from the same budget
    bb = make_blackbox("probs")
    result = _run(bb, task["x"], query_budget=400, eval_images=task["xe"][:100], epochs=1)
    assert bb.queries == result.queries == 400 and result.config["n_used"] == 300
    # augmented views stop being queried when the budget is spent
    bb = make_blackbox("probs")
    result = _run(bb, task["x"], query_budget=N + 100, augment="query", epochs=2)
    assert bb.queries == result.queries == N + 100
    with pytest.raises(ValueError, match="query_budget=63 is smaller than one batch"):
        _run(make_blackbox("probs"), task["x"], query_budget=63)
    with pytest.raises(ValueError, match="query_budget"):
        _run(make_blackbox("probs"), task["x"], query_budget=300, eval_images=task["xe"])


@pytest.mark.slow
def test_torchvision_student_by_name(task) -> None:
    bb = make_blackbox("probs")
    result = distill(bb, task["x"][:96], student="resnet18", epochs=1, batch_size=32, holdout=16, progress=True)
    assert type(result.student).__name__ == "ResNet"
    assert result.student(task["x"][:2]).shape == (2, NUM_CLASSES)
    assert result.config["student"] == "resnet18" and result.queries == 96


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.slow
def test_checkpoint_resume_in_process_and_config_check(task, tmp_path) -> None:
    x = task["x"][:256]
    first = _run(make_blackbox("probs"), x, epochs=2, checkpoint_dir=tmp_path)
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["queries"] == 256 and "probs" in ckpt["answers"]
    bb = make_blackbox("probs")
    again = _run(bb, x, epochs=2, checkpoint_dir=tmp_path)  # complete: nothing left to do
    assert bb.queries == 0 and again.queries == 256 and again.config["resumed_from_epoch"] == 2
    _assert_bitwise_equal(_params(first.student), _params(again.student))
    with pytest.raises(ValueError, match="seed"):
        _run(make_blackbox("probs"), x, epochs=2, seed=1, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="student"):
        _run(make_blackbox("probs"), x, epochs=2, student=make_student(1), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="temperature"):
        _run(make_blackbox("probs"), x, epochs=2, temperature=2.0, checkpoint_dir=tmp_path)
    bb = make_blackbox("probs")
    fresh = _run(bb, x, epochs=2, seed=1, checkpoint_dir=tmp_path, resume=False)
    assert bb.queries == 256 and fresh.config["resumed_from_epoch"] is None


def _worker(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(WORKER), "--out", str(out), "--num-images", str(N), "--epochs", str(EPOCHS), *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", LWCAM_PROGRESS="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@pytest.mark.slow
def test_killed_run_resumes_without_queries_and_matches_bitwise(tmp_path) -> None:
    ckpt_dir, full, cut = tmp_path / "ckpt", tmp_path / "full", tmp_path / "cut"
    proc = subprocess.Popen(_worker(cut, "--checkpoint-dir", str(ckpt_dir), "--sleep", "0.03"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reference = subprocess.Popen(_worker(full), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    path = ckpt_dir / CHECKPOINT_NAME
    killed_at = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                epoch = torch.load(path, map_location="cpu", weights_only=True)["epoch"]
                if epoch >= 1:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = epoch
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        log = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert killed_at is not None, f"the worker ended before a first-epoch checkpoint appeared:\n{log}"
    assert proc.returncode == -signal.SIGKILL
    interrupted = torch.load(path, map_location="cpu", weights_only=True)
    assert 1 <= interrupted["epoch"] < EPOCHS and interrupted["queries"] == N
    assert not (cut / "rank0.json").exists()

    subprocess.run(_worker(cut, "--checkpoint-dir", str(ckpt_dir)), env=_env(), check=True, timeout=120,
                   capture_output=True)
    ref_log = reference.communicate(timeout=120)[0].decode(errors="replace")
    assert reference.returncode == 0, ref_log
    resumed = json.loads((cut / "rank0.json").read_text())
    assert resumed["process_queries"] == 0, "the restarted run asked the black box again"
    assert resumed["result_queries"] == N
    assert resumed["resumed_from_epoch"] == interrupted["epoch"]
    reference = json.loads((full / "rank0.json").read_text())
    assert reference["process_queries"] == N
    _assert_bitwise_equal(torch.load(cut / "rank0.pt", weights_only=True),
                          torch.load(full / "rank0.pt", weights_only=True))
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in reference["history"]]


# --------------------------------------------------------------------------- distributed
@pytest.mark.slow
def test_torchrun_two_processes(tmp_path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           "--out", str(tmp_path), "--num-images", str(N), "--epochs", str(EPOCHS)]
    proc = subprocess.run(cmd, env=_env(), timeout=240, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    _assert_bitwise_equal(torch.load(tmp_path / "rank0.pt", weights_only=True),
                          torch.load(tmp_path / "rank1.pt", weights_only=True))
    # rank 0 asks, rank 1 receives: queries counted once
    assert (r0["process_queries"], r1["process_queries"]) == (N, 0)
    assert r0["result_queries"] == r1["result_queries"] == N
    assert r0["fidelity"] == r1["fidelity"] and r0["fidelity"]["agreement"] >= 0.9


# --------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clearly(task) -> None:
    x = task["x"][:128]
    bb = make_blackbox("probs")
    with pytest.raises(ValueError, match="student='not_a_net' is not a torchvision classification model"):
        distill(bb, x, student="not_a_net")
    with pytest.raises(ValueError, match="temperature"):
        distill(bb, x, student=make_student(), temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        distill(bb, x, student=make_student(), temperature=-1.0)
    with pytest.raises(ValueError, match="query_budget=10 is smaller than one batch"):
        distill(bb, x, student=make_student(), query_budget=10, batch_size=32)
    with pytest.raises(ValueError, match="transfer_images is empty"):
        distill(bb, x[:0], student=make_student())
    with pytest.raises(ValueError, match="transfer_images is empty"):
        distill(bb, _Items(x[:0], torch.zeros(0)), student=make_student())
    with pytest.raises(ValueError, match=r"num_classes=4"):
        distill(bb, x, student=nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 7)))
    with pytest.raises(ValueError, match=r"transfer_images must have shape \(N,3,H,W\)"):
        distill(bb, x[:, :2], student=make_student())
    with pytest.raises(ValueError, match=r"transfer_images must have shape \(N,3,H,W\)"):
        distill(bb, x[0], student=make_student())
    with pytest.raises(TypeError, match="transfer_images must be a floating-point tensor"):
        distill(bb, (x * 10).long(), student=make_student())
    with pytest.raises(ValueError, match=r"transfer_images items must be images of shape \(3,H,W\)"):
        distill(bb, _Items(x[:, :1], torch.zeros(128)), student=make_student())
    with pytest.raises(ValueError, match="cannot take transfer_images of shape"):
        distill(bb, x, student=nn.Sequential(nn.Flatten(), nn.Linear(10, 4)))
    with pytest.raises(TypeError, match="blackbox must be an lwcam.BlackBox"):
        distill(ColourTeacher(), x, student=make_student())
    with pytest.raises(ValueError, match="holdout"):
        distill(bb, x, student=make_student(), holdout=1.0)
    with pytest.raises(ValueError, match="augment"):
        distill(bb, x, student=make_student(), augment="sometimes")
    with pytest.raises(ValueError, match="eval_labels"):
        distill(bb, x, student=make_student(), eval_labels=task["ye"])
    with pytest.raises(ValueError, match="epochs"):
        distill(bb, x, student=make_student(), epochs=0)
    assert bb.queries == 0  # every check happens before the black box is asked
