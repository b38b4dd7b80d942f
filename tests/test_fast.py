"""lwcam.fast: a module's forward pass on a faster engine equals eager's, checks its arguments, pickles,
and is wired into the pipeline's black box (same answers, same cache namespace) and Score-CAM."""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch
from torch import nn

from lwcam import BlackBox
from lwcam.baselines.scorecam import scorecam
from lwcam.fast import ENGINES, AccelerationError, FastForward, accelerate, onnxruntime_available
from lwcam.models import build_model
from lwcam.study import pipeline
from lwcam.study.profiles import Profile

SHAPE = (3, 16, 16)
NEEDS_ORT = pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime is not installed")


def tiny(classes: int = 5, seed: int = 0) -> nn.Module:
    """A small convnet with BatchNorm, its last layer scaled so that the probabilities are far from uniform."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
        net[-1].weight.mul_(40)
    return net.eval()


def prob_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((torch.softmax(a, 1) - torch.softmax(b, 1)).abs().max())


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def available_engines() -> list[str]:
    return [e for e in ENGINES if e != "onnxruntime" or onnxruntime_available()]


@pytest.fixture(scope="module")
def fasts() -> dict[str, tuple[nn.Module, FastForward]]:
    torch.set_num_threads(1)
    net = tiny()
    return {engine: (net, accelerate(net, SHAPE, engine=engine)) for engine in available_engines()}


@pytest.mark.parametrize("engine", available_engines())
def test_engine_equals_eager_within_1e_5_at_any_batch_size_and_layout(fasts, engine):
    net, fast = fasts[engine]
    assert fast.engine == engine and fast.max_prob_diff <= 1e-5 and fast.setup_seconds > 0
    assert fast.num_classes == 5 and fast.image_shape == SHAPE
    for n in (1, 3, 7, 33):
        x = images(n, seed=n)
        with torch.no_grad():
            ref = net(x)
        out = fast(x)
        assert out.shape == (n, 5) and out.dtype == torch.float32 and not out.requires_grad
        assert prob_gap(out, ref) <= 1e-5
        assert prob_gap(fast(x.contiguous(memory_format=torch.channels_last)), ref) <= 1e-5
        assert prob_gap(fast(x.double()), ref) <= 1e-5
    assert float(torch.softmax(ref, 1).max()) > 0.5  # a real test: the probabilities are not all uniform


@NEEDS_ORT
def test_default_networks_on_onnxruntime():
    """The default black box and student (weights=None) at a small size: ONNX Runtime, within 1e-5."""
    torch.set_num_threads(1)
    for name in ("mobilenet_v2_s8", "regnet_x_s8"):
        net = build_model(name, 10).eval()
        fast = accelerate(net, (3, 32, 32))
        x = images(5).repeat(1, 1, 2, 2)
        with torch.no_grad():
            assert fast.engine == "onnxruntime" and prob_gap(fast(x), net(x)) <= 1e-5


def test_a_module_in_training_mode_is_exported_in_eval_mode_and_left_as_it_was():
    net = tiny().train()
    net[1].eval()  # a frozen BatchNorm inside a training model keeps its own flag
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = accelerate(net, SHAPE, engine=available_engines()[0])
    assert net.training and net[0].training and not net[1].training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # no running statistic moved
    x = images(4)
    with torch.no_grad():
        assert prob_gap(fast(x), net.eval()(x)) <= 1e-5


def test_later_changes_to_the_module_are_not_seen():
    net = tiny()
    fast = accelerate(net, SHAPE, engine="eager")
    x = images(2)
    before = fast(x)
    with torch.no_grad():
        net[-1].bias.add_(100)
    assert torch.equal(fast(x), before)


@pytest.mark.parametrize("engine", available_engines())
def test_pickles_and_gives_the_same_logits(fasts, engine):
    _, fast = fasts[engine]
    again = pickle.loads(pickle.dumps(fast))
    x = images(3)
    assert isinstance(again, FastForward) and again.engine == engine and torch.equal(again(x), fast(x))


@NEEDS_ORT
def test_onnxruntime_threads_follow_torch(fasts):
    _, fast = fasts["onnxruntime"]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fast(images(2))
            assert fast._run.threads == threads  # type: ignore[attr-defined]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("engine", available_engines())
def test_non_finite_pixels_behave_like_eager(fasts, engine):
    net, fast = fasts[engine]
    x = images(3)
    x[1, 0, 2, 3] = float("nan")
    x[2, 1, 0, 0] = float("inf")
    with torch.no_grad():
        ref = net(x)
    out = fast(x)
    assert torch.equal(torch.isfinite(out).all(1), torch.isfinite(ref).all(1))
    assert prob_gap(out[:1], ref[:1]) <= 1e-5
    # a BlackBox rejects such images before they reach either
    for fn in (net, fast):
        with pytest.raises(ValueError, match="NaN or Inf"):
            BlackBox(fn, num_classes=5, fn_returns="logits")(x)


@pytest.mark.parametrize(("kwargs", "error", "name"), [
    ({"module": lambda x: x}, TypeError, "module"),
    ({"image_shape": (3, 16)}, ValueError, "image_shape"),
    ({"image_shape": (3, 16, 0)}, ValueError, "image_shape"),
    ({"image_shape": (3, 16, True)}, ValueError, "image_shape"),
    ({"engine": "tensorrt"}, ValueError, "engine"),
    ({"atol": 0.0}, ValueError, "atol"),
    ({"atol": float("nan")}, ValueError, "atol"),
    ({"probe": torch.zeros(2, 3, 8, 8)}, ValueError, "probe"),
    ({"probe": torch.full((2, *SHAPE), float("nan"))}, ValueError, "probe"),
    ({"probe_batch": 0}, ValueError, "probe_batch"),
    ({"reuse": "yes"}, ValueError, "reuse"),
])
def test_bad_arguments_raise_errors_naming_them(kwargs, error, name):
    args = {"module": tiny(), "image_shape": SHAPE, "engine": "eager", **kwargs}
    with pytest.raises(error, match=name):
        accelerate(args.pop("module"), args.pop("image_shape"), **args)


def test_bad_images_raise_errors_naming_them(fasts):
    _, fast = fasts["eager"]
    with pytest.raises(TypeError, match="images"):
        fast(images(2).numpy())
    with pytest.raises(TypeError, match="images"):
        fast(torch.zeros(2, *SHAPE, dtype=torch.int64))
    for bad in (torch.zeros(2, 3, 8, 8), torch.zeros(0, *SHAPE), torch.zeros(*SHAPE)):
        with pytest.raises(ValueError, match="images"):
            fast(bad)


class _ThroughNumpy(nn.Module):
    """A forward pass that leaves torch (through NumPy): no tracer can follow it, eager runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.from_numpy(x.detach().cpu().numpy().copy()).flatten(1))


def test_a_module_no_engine_can_follow_raises_for_a_named_engine_and_falls_back_for_auto():
    net = _ThroughNumpy().eval()
    with pytest.raises(AccelerationError, match="torchscript"):
        accelerate(net, SHAPE, engine="torchscript")
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        fast = accelerate(net, SHAPE)
    x = images(3)
    with torch.no_grad():
        assert fast.engine == "eager" and torch.equal(fast(x), net(x))
    with pytest.raises(AccelerationError, match="one \\(B, classes\\) logit tensor"):
        accelerate(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4), nn.Unflatten(1, (2, 2))), SHAPE)


@NEEDS_ORT
def test_auto_takes_onnxruntime_and_reuse_pays_the_set_up_once():
    net = tiny()
    first = accelerate(net, SHAPE, reuse=True)
    again = accelerate(net, SHAPE, reuse=True)
    assert first.engine == "onnxruntime" and not first.reused and first.setup_seconds > 0
    assert again.reused and again.setup_seconds == 0.0 and again.engine == first.engine
    with torch.no_grad():
        net[-1].bias.add_(1.0)  # other weights: a new set-up
    assert not accelerate(net, SHAPE, reuse=True).reused
    assert not accelerate(net, SHAPE).reused  # without reuse, always a new set-up


def test_blackbox_answers_and_cache_namespace_match_the_module(tmp_path):
    net = tiny()
    fast = accelerate(net, SHAPE)
    x = images(9)
    eager_bb = BlackBox(net, num_classes=5, cache_dir=tmp_path / "a", cache_namespace="teacher")
    fast_bb = BlackBox(fast, num_classes=5, fn_returns="logits", cache_dir=tmp_path / "b", cache_namespace="teacher")
    assert eager_bb.cache.namespace == fast_bb.cache.namespace  # type: ignore[union-attr]
    assert float((eager_bb(x) - fast_bb(x)).abs().max()) <= 1e-5
    other = accelerate(tiny(seed=1), SHAPE)
    assert BlackBox(other, 5, fn_returns="logits", cache_dir=tmp_path / "c", cache_namespace="teacher"
                    ).cache.namespace != fast_bb.cache.namespace  # type: ignore[union-attr]
    again = pickle.loads(pickle.dumps(fast_bb))
    assert torch.equal(again(x), fast_bb(x)) and again.cache_hits == 9


def test_pipeline_blackbox_uses_the_fast_forward_and_logs_its_set_up_once(tmp_path):
    paths = pipeline.RunPaths(profile="test", root=tmp_path)
    paths.run.mkdir(parents=True)
    teacher = tiny(classes=4)
    profile = Profile(profile="test", image_size=16, num_classes=4, topk=2)
    bb = pipeline.make_blackbox(teacher, profile, paths, cache=False)
    scorer = pipeline.make_blackbox(teacher, profile, paths, cache=False, output="probs")
    plain = pipeline.make_blackbox(teacher, profile.replace(fast_forward=False), paths, cache=False)
    assert isinstance(bb.fn, FastForward) and isinstance(scorer.fn, FastForward) and plain.fn is teacher
    x = torch.randn(6, *SHAPE)
    assert float((bb(x) - plain(x)).abs().max()) <= 1e-5
    rows = [json.loads(line) for line in paths.stage_log.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["stage"].startswith("fast forward set-up: black box (")


def test_scorecam_fast_equals_eager():
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    x = images(2)
    eager = scorecam(net, x, [0, 2], layer="2")
    fast = scorecam(net, x, [0, 2], layer="2", fast=True)
    assert float((eager - fast).abs().max()) <= 1e-5 * max(1.0, float(eager.abs().max()))
    with pytest.raises(ValueError, match="fast"):
        scorecam(net, x, [0, 2], fast=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reused set-up warns about nothing
        scorecam(net, x, [0, 2], layer="2", fast=True)
