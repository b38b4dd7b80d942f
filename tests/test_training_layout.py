"""Training in the channels_last layout, an opt-in: the same model up to rounding after a few steps, the
model given back contiguous, off unless asked, and bad switches refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lwcam import BlackBox, distill
from lwcam._utils import training_layout
from lwcam.models import train_teacher

CL = torch.channels_last


def _conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


def _toy_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    x[:, 1] += (2 * y - 1).view(-1, 1, 1) * 0.8
    return x, y


class _Flattening(nn.Module):
    """A user's network whose ``.view`` needs a contiguous activation: channels_last breaks it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).view(x.shape[0], -1))


def test_layout_inside_and_restored_after_even_on_error():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    params = list(net.parameters())
    with pytest.raises(RuntimeError, match="boom"), training_layout(net) as fmt:
        assert fmt == CL
        assert all(w.is_contiguous(memory_format=CL) and not w.is_contiguous() for w in _conv_weights(net))
        raise RuntimeError("boom")
    assert all(w.is_contiguous() for w in _conv_weights(net))
    assert all(a is b for a, b in zip(params, net.parameters(), strict=True))  # an optimiser keeps its params


def test_layout_is_a_no_op_when_off_or_not_a_convnet():
    for module, enabled in ((nn.Linear(3, 2), True), (nn.Conv2d(3, 4, 3), False)):
        with training_layout(module, enabled) as fmt:
            assert fmt == torch.contiguous_format
            assert all(p.is_contiguous() for p in module.parameters())


def test_teacher_trained_either_way_is_the_same_up_to_rounding_and_comes_back_contiguous():
    x, y = _toy_task(64, 0)
    kwargs = dict(num_classes=2, epochs=1, batch_size=32, lr=1e-2, seed=0, progress=False)
    fast = train_teacher("regnet_x_s8", x, y, channels_last=True, **kwargs).model
    plain = train_teacher("regnet_x_s8", x, y, channels_last=False, **kwargs).model
    assert all(w.is_contiguous() for w in _conv_weights(fast))
    with torch.no_grad():
        pf, pp = torch.softmax(fast(x), 1), torch.softmax(plain(x), 1)
    assert (pf - pp).abs().max() < 1e-4  # two steps: rounding only (it grows with training: bench_train_layout)
    assert not all(torch.equal(a, b) for a, b in zip(fast.parameters(), plain.parameters(), strict=True))


def test_distill_uses_the_layout_only_when_asked():
    x, _ = _toy_task(48, 1)
    teacher = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    common = dict(epochs=1, batch_size=16, holdout=8, progress=False)
    runs = [distill(BlackBox(teacher, num_classes=2), x, student="regnet_x_s8", **kw, **common)
            for kw in ({"channels_last": True}, {}, {"channels_last": False})]
    assert runs[0].config["channels_last"] is True and runs[1].config["channels_last"] is False
    assert all(w.is_contiguous() for w in _conv_weights(runs[0].student))
    for a, b in zip(runs[1].student.state_dict().values(), runs[2].student.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # off by default
    with torch.no_grad():
        diff = (torch.softmax(runs[0].student(x), 1) - torch.softmax(runs[1].student(x), 1)).abs().max()
    assert 0 < diff < 1e-3  # a different rounding, the same student after three steps
    own = distill(BlackBox(teacher, num_classes=2), x, student=_Flattening(), **common)
    assert own.queries == 48
    with pytest.raises(RuntimeError, match="view"):
        distill(BlackBox(teacher, num_classes=2), x, student=_Flattening(), channels_last=True, **common)


@pytest.mark.parametrize("bad", [1, 0, "yes", 1.0])
def test_a_layout_switch_that_is_not_a_bool_is_refused_by_name(bad):
    x, y = _toy_task(8, 2)
    with pytest.raises(ValueError, match="channels_last"):
        train_teacher("regnet_x_s8", x, y, num_classes=2, channels_last=bad)
    with pytest.raises(ValueError, match="channels_last"):
        distill(BlackBox(nn.Conv2d(3, 2, 16), num_classes=2), x, student="regnet_x_s8", channels_last=bad)
