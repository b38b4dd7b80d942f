"""BlackBox: output modes, query counting, cache, retries, validation."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lwcam.blackbox import BlackBox, BlackBoxError, TopK, as_prob_fn


def _net(num_classes: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_probs_mode_matches_softmax_of_module(images):
    net = _net()
    bb = BlackBox(net, num_classes=6)
    assert bb.fn_returns == "logits"  # auto: a module returns logits
    out = bb(images)
    with torch.no_grad():
        ref = torch.softmax(net(images), 1)
    torch.testing.assert_close(out, ref)
    assert bb.queries == 10


def test_logits_mode_returns_logits_and_callable_probs_become_log_probs(images):
    net = _net()
    with torch.no_grad():
        ref = net(images)
    torch.testing.assert_close(BlackBox(net, 6, output="logits")(images), ref)
    probs_fn = lambda x: torch.softmax(net(x), 1)  # noqa: E731 - a plain callable returns probabilities
    out = BlackBox(probs_fn, 6, output="logits")(images)
    torch.testing.assert_close(torch.softmax(out, 1), torch.softmax(ref, 1), atol=1e-5, rtol=1e-4)


def test_topk_mode_reveals_only_k(images):
    bb = BlackBox(_net(), 6, output="topk", k=2)
    top = bb(images)
    assert isinstance(top, TopK)
    assert top.values.shape == (10, 2) and top.indices.shape == (10, 2)
    full = BlackBox(_net(), 6)(images)
    ref_v, ref_i = full.topk(2, dim=1)
    torch.testing.assert_close(top.values, ref_v)
    assert torch.equal(top.indices, ref_i)
    assert (top.values[:, 0] >= top.values[:, 1]).all()


def test_label_mode_returns_indices(images):
    bb = BlackBox(_net(), 6, output="label")
    labels = bb(images)
    assert labels.shape == (10,) and labels.dtype == torch.long
    assert torch.equal(labels, BlackBox(_net(), 6)(images).argmax(1))


def test_batches_in_order_and_counts_queries(images):
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return torch.softmax(x.mean(dim=(2, 3)).repeat(1, 2), 1)

    bb = BlackBox(fn, 6, batch_size=3)
    out = bb(images)
    assert calls == [3, 3, 3, 1]
    assert bb.queries == 10 and bb.calls == 4
    torch.testing.assert_close(out, fn(images))  # order kept across batches
    bb(images[:2])
    assert bb.queries == 12
    bb.reset_queries()
    assert bb.queries == 0


def test_cache_hit_costs_no_query_and_survives_restart(images, tmp_path):
    bb = BlackBox(_net(), 6, cache_dir=tmp_path)
    first = bb(images)
    assert bb.queries == 10
    again = bb(images)
    assert bb.queries == 10 and bb.cache_hits == 10
    torch.testing.assert_close(first, again)
    bb.close()
    # a new process with the same model (same weights) sees the same answers without querying
    code = textwrap.dedent(
        f"""
        import torch
        from torch import nn
        from lwcam.blackbox import BlackBox
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))
        calls = []
        net.register_forward_hook(lambda *a: calls.append(1))
        bb = BlackBox(net, 6, cache_dir={str(tmp_path)!r})
        imgs = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        out = bb(imgs)
        print(bb.queries, len(calls), float(out[0].max()))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    queries, n_calls, top = res.stdout.split()
    assert queries == "0" and n_calls == "0"
    assert float(top) == float(first[0].max())


def test_cache_dedupes_inside_a_batch(tmp_path):
    bb = BlackBox(_net(), 6, cache_dir=tmp_path)
    x = torch.randn(1, 3, 8, 8).repeat(4, 1, 1, 1)
    out = bb(x)
    assert bb.queries == 1
    assert torch.allclose(out, out[:1].expand_as(out))


def test_cache_is_consistent_after_a_crash_mid_write(tmp_path):
    # a process killed while inserting leaves the database readable (SQLite transactions)
    code = textwrap.dedent(
        f"""
        import os, torch
        from lwcam.blackbox import BlackBox
        n = 0
        def fn(x):
            global n
            n += 1
            if n == 3:
                os._exit(1)  # die hard between two batches
            return torch.softmax(torch.randn(len(x), 6), 1)
        bb = BlackBox(fn, 6, batch_size=2, cache_dir={str(tmp_path)!r}, cache_namespace="crash")
        bb(torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(5)))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    calls = []

    def fn(x):
        calls.append(len(x))
        return torch.softmax(torch.zeros(len(x), 6), 1)

    bb = BlackBox(fn, 6, batch_size=2, cache_dir=tmp_path, cache_namespace="crash")  # the same name: shared answers
    bb(torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(5)))
    assert bb.cache_hits == 4 and bb.queries == 6  # the two committed batches were kept


def test_retries_then_succeeds(images):
    failures = {"left": 2}

    def flaky(x):
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("transient")
        return torch.full((len(x), 6), 1 / 6)

    bb = BlackBox(flaky, 6, retries=3, backoff=0.0)
    out = bb(images)
    assert out.shape == (10, 6) and bb.queries == 10


def test_retries_exhausted_raises(images):
    attempts = []

    def broken(x):
        attempts.append(1)
        raise ConnectionError("down")

    bb = BlackBox(broken, 6, retries=2, backoff=0.0)
    with pytest.raises(BlackBoxError, match="failed 3 times") as err:
        bb(images)
    assert isinstance(err.value.__cause__, ConnectionError)
    assert len(attempts) == 3 and bb.queries == 0


@pytest.mark.parametrize(
    "answer, match",
    [
        (lambda x: torch.full((len(x), 5), 0.2), r"expected \(10, 6\)"),
        (lambda x: torch.full((len(x) - 1, 6), 1 / 6), r"expected \(10, 6\)"),
        (lambda x: torch.full((len(x), 6), float("nan")), "NaN or Inf"),
        (lambda x: torch.full((len(x), 6), float("inf")), "NaN or Inf"),
        (lambda x: torch.full((len(x), 6), 0.5), "sum to 1"),
        (lambda x: torch.full((len(x), 6), -0.5), r"outside \[0, 1\]"),
        (lambda x: [[0.0] * 6] * len(x), "tensor"),
    ],
)
def test_invalid_answers_raise(images, answer, match):
    with pytest.raises(BlackBoxError, match=match):
        BlackBox(answer, 6, retries=0)(images)


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (torch.randn(3, 8, 8), ValueError, "4 dimensions"),
        (torch.randn(2, 1, 8, 8), ValueError, "3 channels"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), TypeError, "floating-point"),
        (torch.full((2, 3, 8, 8), float("nan")), ValueError, "NaN"),
        (torch.randn(0, 3, 8, 8), ValueError, "empty batch"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise(bad, exc, match):
    with pytest.raises(exc, match=match):
        BlackBox(_net(), 6)(bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"output": "scores"}, "output"),
        ({"fn_returns": "probabilities"}, "fn_returns"),
        ({"k": 7, "output": "topk"}, "k must be"),
        ({"batch_size": 0}, "batch_size"),
        ({"retries": -1}, "retries"),
    ],
)
def test_bad_construction(kwargs, match):
    args = {"num_classes": 6, **kwargs}
    with pytest.raises(ValueError, match=match):
        BlackBox(_net(), **args)


def test_k_is_only_checked_for_topk(images):
    assert BlackBox(_net(4), num_classes=4)(images).shape == (10, 4)  # default k=5 > 4 is fine for probs


def test_module_state_restored_and_no_grad(images):
    net = _net().train()
    BlackBox(net, 6)(images)
    assert net.training
    assert all(p.grad is None for p in net.parameters())


def test_as_prob_fn_modes(images):
    net = _net()
    ref = BlackBox(net, 6)(images)
    torch.testing.assert_close(as_prob_fn(BlackBox(net, 6, output="logits"))(images), ref)
    torch.testing.assert_close(as_prob_fn(net)(images), ref)
    top = as_prob_fn(BlackBox(net, 6, output="topk", k=2))(images)
    assert ((top > 0).sum(1) == 2).all()
    with pytest.raises(ValueError, match="label"):
        as_prob_fn(BlackBox(net, 6, output="label"))
    with pytest.raises(TypeError):
        as_prob_fn(42)  # type: ignore[arg-type]
