"""No silent wrong answers: the eight failure cases, each a test that names what must hold.

1. answers read back from the cache (or a checkpoint) are checked like fresh ones;
2. a model's per-submodule train/eval flags come back exactly;
3. distillation refuses non-finite numbers and stops when its loss diverges;
4. the games refuse scores that are not probabilities;
5. a cached BlackBox works from any thread;
6. one image rule (float dtypes become float32) and retries only for transient errors;
7. distillation checks its checkpoint folder before paying for a query;
8. two models sharing one cache folder never share answers.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import resnet18

import lwcam
from lwcam._ops import gaussian_blur
from lwcam.baselines import METHODS, explain, gradcam, lime, occlusion, rise
from lwcam.baselines.rise import rise_masks
from lwcam.blackbox import BlackBox, BlackBoxError, CacheError
from lwcam.data import SyntheticTextures
from lwcam.distillation import CHECKPOINT_NAME, DistillConfig, distill
from lwcam.scoring.games import deletion_game, insertion_game

C = 4


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, C)).eval()


def _images(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _probs_fn(net: nn.Module):
    """A plain callable returning probabilities, image by image (so an answer never depends on its batch)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([torch.softmax(net(x[i : i + 1]), dim=1) for i in range(len(x))])

    return fn


def _damage(cache_dir: Path, value: bytes, row: int = 0) -> str:
    """Overwrite the value of one stored answer (the ``row``-th by key) and return its key."""
    with sqlite3.connect(Path(cache_dir) / "answers.sqlite") as conn:
        key = conn.execute("SELECT key FROM answers ORDER BY key LIMIT 1 OFFSET ?", (row,)).fetchone()[0]
        conn.execute("UPDATE answers SET value=? WHERE key=?", (value, key))
    return key


def _student() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, C))


# --------------------------------------------------------------------------- 1. cache and checkpoint contents
@pytest.mark.parametrize("bad", [np.full(C, np.nan, np.float32), np.array([5, -3, 7, 0], np.float32),
                                 np.full(C, 0.1, np.float32), b"\x00\x01"])
def test_1_damaged_cache_row_is_reported_and_asked_again(tmp_path, one_thread, bad):
    net, x = _net(), _images(6)
    ref = BlackBox(_probs_fn(net), C, cache_dir=tmp_path, cache_namespace="net")(x)
    key = _damage(tmp_path, bad if isinstance(bad, bytes) else bad.tobytes(), row=2)
    bb = BlackBox(_probs_fn(net), C, cache_dir=tmp_path, cache_namespace="net")
    with pytest.warns(RuntimeWarning, match=rf"answers\.sqlite.*{key}.*damaged"):
        out = bb(x)
    assert torch.equal(out, ref)  # never NaN, never a renormalised [5, -3, 7]
    assert bb.queries == 1 and bb.cache_hits == 5  # only the damaged row is paid again
    bb2 = BlackBox(_probs_fn(net), C, cache_dir=tmp_path, cache_namespace="net")
    assert torch.equal(bb2(x), ref) and bb2.queries == 0  # the repaired row is sound


def test_1_unreadable_cache_file_names_the_file(tmp_path):
    (tmp_path / "answers.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(CacheError, match=r"answers\.sqlite.*cannot be opened"):
        BlackBox(_net(), C, cache_dir=tmp_path)(_images(2))


def test_1_distill_on_a_damaged_cache_learns_the_true_answers(tmp_path, one_thread):
    net, x = _net(), _images(32)
    BlackBox(_probs_fn(net), C, cache_dir=tmp_path, cache_namespace="net")(x)
    _damage(tmp_path, np.full(C, np.nan, np.float32).tobytes(), row=5)
    bb = BlackBox(_probs_fn(net), C, cache_dir=tmp_path, cache_namespace="net")
    with pytest.warns(RuntimeWarning, match="damaged"):
        res = distill(bb, x, student=_student(), epochs=1, batch_size=16, progress=False)
    assert bb.queries == 1
    assert all(np.isfinite(h["loss"]) for h in res.history) and np.isfinite(res.fidelity["kl"])


def test_1_nan_answers_in_a_checkpoint_name_the_file(tmp_path, one_thread):
    x = _images(32)
    distill(BlackBox(_net(), C), x, student=_student(), epochs=2, batch_size=16, checkpoint_dir=tmp_path,
            progress=False)
    path = tmp_path / CHECKPOINT_NAME
    ckpt = torch.load(path, weights_only=True)
    ckpt["answers"]["probs"][3] = float("nan")
    ckpt["epoch"], ckpt["history"] = 1, ckpt["history"][:1]
    torch.save(ckpt, path)
    bb = BlackBox(_net(), C)
    with pytest.raises(ValueError, match=rf"{CHECKPOINT_NAME} is damaged.*row 3: NaN"):
        distill(bb, x, student=_student(), epochs=2, batch_size=16, checkpoint_dir=tmp_path, progress=False)
    path.write_bytes(b"truncated")
    with pytest.raises(ValueError, match=rf"{CHECKPOINT_NAME} cannot be read"):
        distill(bb, x, student=_student(), epochs=2, batch_size=16, checkpoint_dir=tmp_path, progress=False)
    assert bb.queries == 0


# --------------------------------------------------------------------------- 2. per-submodule train/eval flags
def _mixed() -> nn.Module:
    net = _net().train()
    net[1].eval()  # a frozen BatchNorm inside a training model
    return net


def _flags(net: nn.Module) -> list[bool]:
    return [m.training for m in net.modules()]


def test_2_blackbox_games_and_baselines_restore_every_flag(one_thread):
    x = _images(2)
    net = _mixed()
    want = _flags(net)
    BlackBox(net, C)(x)
    assert _flags(net) == want
    sal = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))
    deletion_game(net, x, sal, 0, step=64)
    insertion_game(net, x, sal, 0, step=64)
    assert _flags(net) == want
    bb = BlackBox(net, C)
    rise(bb, x, 0, n_masks=8, grid_size=4)
    lime(bb, x, 0, n_samples=8, n_segments=4)
    occlusion(bb, x, 0, window=8, stride=8)
    assert _flags(net) == want


def test_2_distill_keeps_a_frozen_batchnorm_frozen(one_thread):
    student = _student().train()
    student[1].eval()
    seen: list[bool] = []
    student[1].register_forward_pre_hook(lambda m, args: seen.append(m.training))
    before = student[1].running_mean.clone()
    res = distill(BlackBox(_net(), C), _images(32), student=student, epochs=1, batch_size=16, holdout=0,
                  progress=False)
    assert seen and not any(seen)  # never put back in training mode
    assert torch.equal(res.student[1].running_mean, before)  # so its statistics never moved


_FAST = {"rise": {"n_masks": 8, "grid_size": 4}, "lime": {"n_samples": 8, "n_segments": 4},
         "occlusion": {"window": 8, "stride": 8}, "meaningful_perturbation": {"iters": 2},
         "scorecam": {"batch_size": 8}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_2_every_registered_method_restores_every_flag(name, one_thread):
    """A torchvision ResNet in train mode with one frozen BatchNorm comes back from every method unchanged."""
    net = resnet18(weights=None, num_classes=C).train()
    net.layer2[0].bn1.eval()  # a frozen BatchNorm inside a training model
    want = _flags(net)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    out = explain(name, x, torch.tensor([0, 1]), student=net, teacher=net, blackbox=BlackBox(net, C), masks=masks,
                  **_FAST.get(name, {}))
    assert out.saliency.shape == (2, 32, 32)
    assert _flags(net) == want


# --------------------------------------------------------------------------- 3. distillation numbers and divergence
@pytest.mark.parametrize("kwargs, name", [
    ({"lr": float("inf")}, "lr"), ({"lr": float("nan")}, "lr"), ({"weight_decay": float("inf")}, "weight_decay"),
    ({"temperature": float("inf")}, "temperature"), ({"label_smoothing": float("nan")}, "label_smoothing"),
    ({"holdout": float("nan")}, "holdout"), ({"lr": "0.1"}, "lr"),
])
def test_3_non_finite_numbers_are_refused_before_any_query(kwargs, name):
    bb = BlackBox(_net(), C)
    with pytest.raises(ValueError, match=rf"^{name}"):
        distill(bb, _images(32), student=_student(), epochs=1, batch_size=16, progress=False, **kwargs)
    assert bb.queries == 0


def test_3_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, one_thread):
    x, kw = _images(32), {"batch_size": 8, "optimizer": "sgd", "holdout": 0, "progress": False}
    distill(BlackBox(_net(), C), x, student=_student(), epochs=1, checkpoint_dir=tmp_path, **kw)
    good = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(FloatingPointError, match=r"epoch 1, step \d+ of 4"):
        distill(BlackBox(_net(), C), x, student=_student(), epochs=1, lr=1e30, checkpoint_dir=tmp_path / "b", **kw)
    saved = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)
    assert saved["epoch"] == 0  # what was written before the divergence stays; nothing diverged was saved
    assert all(torch.isfinite(v).all() for v in saved["student"].values() if v.is_floating_point())
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == good


# --------------------------------------------------------------------------- 4. the games trust no callable
def test_4_games_refuse_logits_from_a_plain_callable(one_thread):
    net, x = _net(), _images(3)
    sal = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))

    def logits(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return 3 * net(z)

    for game in (deletion_game, insertion_game):
        with pytest.raises(ValueError, match=r"outside \[0, 1\].*fn_returns='logits'"):
            game(logits, x, sal, 0, step=64)
        with pytest.raises(ValueError, match="do not sum to 1"):
            game(lambda z: torch.full((len(z), C), 0.5), x, sal, 0, step=64)
        wrapped = game(BlackBox(logits, C, fn_returns="logits"), x, sal, 0, step=64)
        direct = game(net, x, sal, 0, step=64)
        assert ((wrapped.auc >= 0) & (wrapped.auc <= 1)).all()
        torch.testing.assert_close(wrapped.auc, game(_probs_fn_scaled(net), x, sal, 0, step=64).auc)
        assert ((direct.auc >= 0) & (direct.auc <= 1)).all()


def _probs_fn_scaled(net: nn.Module):
    def fn(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(3 * net(z), dim=1)

    return fn


# --------------------------------------------------------------------------- 5. threads
def test_5_a_cached_blackbox_answers_from_another_thread(tmp_path, one_thread):
    net, x = _net(), _images(8)
    bb = BlackBox(net, C, cache_dir=tmp_path)
    first = bb(x[:4])
    out: dict[str, object] = {}

    def work() -> None:
        try:
            out["value"] = bb(x)
        except Exception as err:  # reported below
            out["error"] = err

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=60)
    assert "error" not in out, out.get("error")
    assert torch.equal(out["value"][:4], first)  # type: ignore[index]
    assert bb.queries == 8 and bb.cache_hits == 4
    bb.close()


# --------------------------------------------------------------------------- 6. one image rule, transient retries
def test_6_float64_images_are_float32_everywhere(one_thread):
    net, x = _net(), _images(2)
    x64 = x.double()
    bb = BlackBox(net, C)
    assert torch.equal(bb(x64), bb(x)) and bb.calls == 2  # no retry, no error
    sal = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))
    for game in (deletion_game, insertion_game):
        assert torch.equal(game(net, x64, sal, 0, step=64).curves, game(net, x, sal, 0, step=64).curves)
    assert torch.equal(gradcam(net, x64, 0, layer="0"), gradcam(net, x, 0, layer="0"))
    assert torch.equal(rise(bb, x64, 0, n_masks=8, grid_size=4), rise(bb, x, 0, n_masks=8, grid_size=4))
    assert torch.equal(occlusion(bb, x64, 0, window=8, stride=8), occlusion(bb, x, 0, window=8, stride=8))


def test_6_non_float_images_are_refused_naming_the_dtype(one_thread):
    net, xi = _net(), torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    sal = torch.rand(2, 16, 16)
    for call in (lambda: BlackBox(net, C)(xi), lambda: deletion_game(net, xi, sal, 0),
                 lambda: gradcam(net, xi, 0), lambda: rise(BlackBox(net, C), xi, 0, n_masks=4)):
        with pytest.raises(TypeError, match="torch.uint8"):
            call()


def test_6_only_transient_errors_are_retried(one_thread):
    attempts: list[int] = []

    def wrong(z: torch.Tensor) -> torch.Tensor:
        attempts.append(1)
        raise ValueError("expected 224x224 images")

    with pytest.raises(BlackBoxError, match="fn raised ValueError: expected 224x224 images.*not retried"):
        BlackBox(wrong, C, retries=3, backoff=0.0)(_images(2))
    assert len(attempts) == 1

    class Busy(Exception):
        pass

    def busy_once(z: torch.Tensor) -> torch.Tensor:
        attempts.append(1)
        if len(attempts) == 2:
            raise Busy("try later")
        return torch.full((len(z), C), 1 / C)

    bb = BlackBox(busy_once, C, retries=1, backoff=0.0, retry_on=(Busy,))
    assert bb(_images(2)).shape == (2, C) and len(attempts) == 3


# --------------------------------------------------------------------------- 7. fail before spending
@pytest.mark.parametrize("where", ["a_file", "a_file/sub"])
def test_7_an_unusable_checkpoint_dir_fails_before_any_query(tmp_path, where):
    (tmp_path / "a_file").write_text("not a folder")
    bb = BlackBox(_net(), C)
    with pytest.raises(ValueError, match=r"checkpoint_dir .*a_file"):
        distill(bb, _images(32), student=_student(), epochs=1, batch_size=16, checkpoint_dir=tmp_path / where,
                progress=False)
    assert bb.queries == 0


# --------------------------------------------------------------------------- 8. one cache, many models
def test_8_two_models_in_one_cache_folder_keep_their_own_answers(tmp_path, one_thread):
    x = _images(5)
    a, b = BlackBox(_net(0), C, cache_dir=tmp_path), BlackBox(_net(1), C, cache_dir=tmp_path)
    out_a, out_b = a(x), b(x)
    assert a.queries == 5 and b.queries == 5  # the second model pays for its own answers
    assert not torch.allclose(out_a, out_b)
    with torch.no_grad():
        torch.testing.assert_close(out_b, torch.softmax(_net(1)(x), 1))
    again = BlackBox(_net(0), C, cache_dir=tmp_path)  # the same weights: the same answers, free
    assert torch.equal(again(x), out_a) and again.queries == 0
    with pytest.raises(ValueError, match="cache_namespace"):
        BlackBox(_probs_fn(_net()), C, cache_dir=tmp_path)



@pytest.mark.parametrize("call, message", [
    (lambda: gaussian_blur(torch.rand(1, 3, 8, 8), 3, 1e300), "blur sigma"),
    (lambda: rise_masks(4, (8, 8), grid_size=10**9), "grid_size"),
    (lambda: DistillConfig(temperature=1e300), "temperature"),
    (lambda: DistillConfig(temperature=1e-300), "temperature"),
    (lambda: SyntheticTextures("test", n=1, image_size=10**6), "image_size"),
    (lambda: lwcam.fuse({"a": torch.rand(0, 8, 8)}), "at least one image"),
], ids=["blur-sigma", "rise-grid", "huge-temperature", "tiny-temperature", "image-size", "empty-fuse"])
def test_extreme_but_finite_and_empty_inputs_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_a_switch_that_is_not_a_bool_is_refused_by_name(bad):
    from lwcam.baselines import scorecam
    from lwcam.fast import accelerate

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="fast must be a bool"):
        scorecam(net, torch.rand(1, 3, 8, 8), [0], fast=bad)
    with pytest.raises(ValueError, match="reuse must be a bool"):
        accelerate(net, (3, 8, 8), reuse=bad)


def test_atomic_write_keeps_the_usual_file_mode(tmp_path: Path) -> None:
    """A table written atomically is readable as a plain write's would be (0o666 less the umask), not 0o600."""
    import os

    from lwcam._utils import atomic_write_bytes

    umask = os.umask(0o022)
    try:
        path = atomic_write_bytes(b"a,b\n1,2\n", tmp_path / "T.csv")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert path.read_bytes() == b"a,b\n1,2\n"
    assert not list(tmp_path.glob(".T.csv.*"))  # no temporary file left behind
