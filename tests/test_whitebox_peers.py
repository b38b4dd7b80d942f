"""Tests of the white-box peer baselines (Grad-CAM++, Score-CAM, multi-layer LayerCAM):
cross-checks against torchcam and pytorch-grad-cam, hand computations, cost records and access rules."""

from __future__ import annotations

import copy
import doctest
import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from _models import RESNET_STAGES, randomise_bn
from torch import nn

import lwcam.baselines as bl
from lwcam import BlackBox
from lwcam._utils import seed_everything
from lwcam.cam.layerwise import LayerwiseGradCAM, auto_layers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Tiny(nn.Module):
    """Two stages (16x16 and 8x8 at 16 px) and a GAP + linear head; 4 channels in the last stage."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.stage1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(6, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage2(self.stage1(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    gen = seed_everything(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    randomise_bn(net, gen)
    return net.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    return Tiny().eval()


@pytest.fixture(scope="module")
def tiny_images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _up(maps: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    t = torch.as_tensor(maps).float()
    return F.interpolate(t[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def no_hooks(model: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())


NEW = {"gradcampp": bl.gradcampp, "scorecam": bl.scorecam, "layercam": bl.layercam}


# ---------------------------------------------------------------------------------------------
# cross-checks against the peer libraries
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["last", "layer3"])
def test_gradcampp_matches_pytorch_grad_cam(resnet, images, layer):
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as PgcTarget

    targets = [1, 4, 7]
    ours = bl.gradcampp(resnet, images, targets, layer=layer)
    name = "layer4" if layer == "last" else layer
    assert layer != "last" or bl.last_layer(resnet, tuple(images.shape[1:])) == name
    module = dict(resnet.named_modules())[name]
    with GradCAMPlusPlus(model=resnet, target_layers=[module]) as ref:
        ref(input_tensor=images.clone(), targets=[PgcTarget(t) for t in targets])
        acts = ref.activations_and_grads.activations[0].numpy()
        grads = ref.activations_and_grads.gradients[0].numpy()
        theirs = np.maximum(ref.get_cam_image(images, module, None, acts, grads, False), 0)
    assert theirs.max() > 0
    expected = _up(theirs, (64, 64))  # their map at the layer's resolution, upsampled like ours
    torch.testing.assert_close(ours, expected, atol=1e-5 * float(theirs.max()), rtol=1e-5)
    # Grad-CAM++ is not Grad-CAM: the cross-check tells the weightings apart
    assert not torch.allclose(bl.minmax(ours), bl.minmax(bl.gradcam(resnet, images, targets, layer=name)), atol=1e-2)


def test_gradcampp_hand_formula(tiny, tiny_images):
    targets = [0, 3]
    a = tiny.stage2(tiny.stage1(tiny_images)).detach().requires_grad_(True)
    y = tiny.fc(a.mean(dim=(2, 3))).gather(1, torch.tensor(targets)[:, None]).sum()
    (g,) = torch.autograd.grad(y, a)
    a = a.detach()
    expected = torch.zeros(2, 8, 8)
    for b in range(2):
        for k in range(4):
            gk, ak = g[b, k], a[b, k]
            alpha = gk**2 / (2 * gk**2 + ak.sum() * gk**3 + 1e-6)
            alpha = torch.where(gk != 0, alpha, torch.zeros_like(alpha))
            expected[b] += (alpha * gk.clamp_min(0)).sum() * ak
    expected = expected.clamp_min(0)
    assert expected.max() > 0
    out = bl.gradcampp(tiny, tiny_images, targets, layer="stage2")
    torch.testing.assert_close(out, _up(expected, (16, 16)), atol=1e-6, rtol=1e-5)
    # the default layer is the deepest auto layer, as for gradcam
    torch.testing.assert_close(bl.gradcampp(tiny, tiny_images, targets), out)


def test_scorecam_matches_torchcam(resnet, images):
    from torchcam.methods import ScoreCAM

    x = F.avg_pool2d(images[:2], 2)  # 32 px, layer2 (128 channels) at 4x4: cheap enough
    targets = [2, 8]
    ours = bl.scorecam(resnet, x, targets, layer="layer2", batch_size=100)
    with ScoreCAM(resnet, "layer2", batch_size=64) as ext:
        resnet(x)
        theirs = ext(class_idx=targets, normalized=False)[0]
    assert theirs.max() > 0
    torch.testing.assert_close(ours, _up(theirs, (32, 32)), atol=1e-5 * float(theirs.max()), rtol=1e-5)


def test_scorecam_hand_formula_and_batching(tiny, tiny_images):
    targets = [1, 4]
    with torch.no_grad():
        a = tiny.stage2(tiny.stage1(tiny_images))  # (2,4,8,8)
        expected = torch.zeros(2, 8, 8)
        for b in range(2):
            scores = []
            for k in range(4):
                m = a[b, k] - a[b, k].min()
                m = m / (m.max() + 1e-8)
                mask = _up(m[None], (16, 16))[0]
                scores.append(tiny(tiny_images[b:b + 1] * mask)[0, targets[b]])
            w = torch.softmax(torch.stack(scores), 0)
            expected[b] = torch.relu((w[:, None, None] * a[b]).sum(0))
    assert expected.max() > 0
    out = bl.scorecam(tiny, tiny_images, targets)  # the default layer: the deepest auto layer, stage2
    assert bl.last_layer(tiny, tuple(tiny_images.shape[1:])) == "stage2"
    torch.testing.assert_close(out, _up(expected, (16, 16)), atol=1e-6, rtol=1e-5)
    for batch_size in (1, 3, 8, 1000):  # how the masked images are batched does not matter
        torch.testing.assert_close(bl.scorecam(tiny, tiny_images, targets, batch_size=batch_size), out,
                                   atol=1e-6, rtol=1e-5)


def test_layercam_baseline_matches_torchcam_fused(resnet, images):
    from torchcam.methods import LayerCAM

    targets = [0, 5, 9]
    ours = bl.layercam(resnet, images, targets)
    assert auto_layers(resnet, 64) == RESNET_STAGES  # the baseline's layers: those of lwcam's layers="auto"
    with LayerCAM(resnet, target_layer=RESNET_STAGES) as ext:
        cams = ext(class_idx=targets, scores=resnet(images))
        fused = ext.fuse_cams(cams)
    assert fused.shape == (3, 32, 32)  # torchcam fuses at the largest layer resolution
    torch.testing.assert_close(ours, _up(fused, (64, 64)), atol=1e-6, rtol=1e-5)
    # the fusion differs from lwcam's (min-max, sum): the baseline is a different method
    with LayerwiseGradCAM(resnet, weighting="layercam", verbose=False) as lw:
        summed = lw(images, targets).fuse()
    assert not torch.allclose(bl.minmax(ours), summed, atol=1e-2)


def test_fuse_layercam_order_of_operations():
    """min-max per layer, then tanh(gamma * map), then upsampling, then the element-wise max."""
    a = torch.tensor([[[1.0, 3.0], [5.0, 9.0]]])  # min-max -> 0, .25, .5, 1
    b = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    out = bl.fuse_layercam([a, b], gamma=2.0)
    na = torch.tanh(2.0 * torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))
    nb = torch.tanh(2.0 * b / 2.0)
    expected = torch.maximum(_up(na, (4, 4)), nb)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    # scaling after upsampling would give different values: the order is checked
    wrong = torch.maximum(torch.tanh(2.0 * _up(torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]), (4, 4))), nb)
    assert not torch.allclose(out, wrong, atol=1e-4)
    assert float(out.max()) == pytest.approx(math.tanh(2.0))
    assert torch.equal(bl.fuse_layercam([torch.zeros(2, 3, 3)]), torch.zeros(2, 3, 3))  # constant: zeros
    with pytest.raises(ValueError, match="cams is empty"):
        bl.fuse_layercam([])


def test_layercam_explicit_layers_and_gamma(tiny, tiny_images):
    with LayerwiseGradCAM(tiny, layers=["stage1", "stage2"], weighting="layercam", verbose=False) as lw:
        lm = lw(tiny_images, [2, 3])
    out = bl.layercam(tiny, tiny_images, [2, 3], layers=["stage2", "stage1"], gamma=1.0)
    expected = bl.fuse_layercam([lm.raw["stage1"], lm.raw["stage2"]], gamma=1.0)
    torch.testing.assert_close(out, expected)  # stage1 is 16x16 already: no final resize
    assert float(out.max()) <= math.tanh(1.0) + 1e-6
    assert not torch.allclose(out, bl.layercam(tiny, tiny_images, [2, 3], layers=["stage1", "stage2"]))


# ---------------------------------------------------------------------------------------------
# contract shared with the other baselines
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(NEW))
def test_cost_shape_range_and_zero_queries(tiny, tiny_images, name):
    bb = BlackBox(copy.deepcopy(tiny), 5)
    res = bl.explain(name, tiny_images, [1, 2], student=tiny, blackbox=bb)
    out = res.saliency
    torch.testing.assert_close(out, NEW[name](tiny, tiny_images, [1, 2]))
    assert out.shape == (2, 16, 16) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert not out.requires_grad and out.is_contiguous()
    assert torch.isfinite(out).all() and float(out.min()) >= 0 and float(out.max()) > 0
    if name == "layercam":
        assert float(out.max()) <= math.tanh(2.0) + 1e-6
    assert res.queries == 0 and res.queries_per_image == 0.0 and bb.queries == 0
    assert res.n_images == 2 and res.seconds >= 0 and res.seconds_per_image == res.seconds / 2


@pytest.mark.parametrize("name", list(NEW))
def test_refuses_a_blackbox(tiny, tiny_images, name):
    bb = BlackBox(tiny, num_classes=5)
    with pytest.raises(TypeError, match="white-box"):
        NEW[name](bb, tiny_images, 0)
    with pytest.raises(TypeError, match="nn.Module"):
        NEW[name](lambda x: tiny(x), tiny_images, 0)
    assert bb.queries == 0


@pytest.mark.parametrize("name", list(NEW))
def test_model_state_hooks_and_grads_restored(tiny_images, name):
    net = Tiny().train()
    net.stage1[0].eval()
    before = {n: m.training for n, m in net.named_modules()}
    params = {k: v.clone() for k, v in net.state_dict().items()}
    seen: list[bool] = []
    h = net.stage2.register_forward_hook(lambda m, i, o: seen.append(m.training))
    ref = NEW[name](Tiny().eval(), tiny_images, [0, 1])
    out = NEW[name](net, tiny_images, [0, 1])
    h.remove()
    assert seen and not any(seen)  # every forward pass ran in eval mode
    torch.testing.assert_close(out, ref)
    assert {n: m.training for n, m in net.named_modules()} == before
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, params[k]) for k, v in net.state_dict().items())
    assert no_hooks(net)


@pytest.mark.parametrize("name", list(NEW))
def test_works_under_no_grad_and_inference_mode(tiny, tiny_images, name):
    ref = NEW[name](tiny, tiny_images, [3, 4])
    with torch.no_grad():
        torch.testing.assert_close(NEW[name](tiny, tiny_images, [3, 4]), ref)
    with torch.inference_mode():
        x = tiny_images.clone()
        out = NEW[name](tiny, x, [3, 4])
    torch.testing.assert_close(out.clone(), ref)


def test_inplace_relu_after_the_layer_does_not_alter_it():
    """The layer's own output is used, even when a later ReLU(inplace=True) overwrites it."""

    def make(inplace: bool) -> nn.Sequential:
        torch.manual_seed(4)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=inplace),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    for fn in (bl.gradcampp, bl.scorecam):
        torch.testing.assert_close(fn(make(True), x, [0, 2], layer="0"), fn(make(False), x, [0, 2], layer="0"))


def test_bad_arguments_raise_clear_errors(tiny, tiny_images):
    for fn in NEW.values():
        with pytest.raises(ValueError, match="out of range|outside"):
            fn(tiny, tiny_images, [0, 5])
        with pytest.raises(ValueError, match="got 3 targets"):
            fn(tiny, tiny_images, [0, 1, 2])
        with pytest.raises(ValueError, match=r"shape \(B,3,H,W\)"):
            fn(tiny, tiny_images[0], 0)
    for fn in (bl.gradcampp, bl.scorecam):
        with pytest.raises(ValueError, match="unknown layer 'nope'"):
            fn(tiny, tiny_images, 0, layer="nope")
        with pytest.raises(ValueError, match="not a submodule"):
            fn(tiny, tiny_images, 0, layer=nn.Conv2d(6, 4, 3))
        with pytest.raises(ValueError, match=r"\(B,K,h,w\)"):
            fn(tiny, tiny_images, 0, layer="fc")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            bl.scorecam(tiny, tiny_images, 0, batch_size=bad)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match="gamma must be a positive finite number"):
            bl.layercam(tiny, tiny_images, 0, gamma=bad)
    with pytest.raises(ValueError, match="unknown layer name"):
        bl.layercam(tiny, tiny_images, 0, layers=["nope"])
    assert no_hooks(tiny)


def test_registered_in_methods_and_explain(tiny, tiny_images):
    labels = {
        "gradcampp": "Grad-CAM++ (student, last layer)",
        "scorecam": "Score-CAM (student, last layer)",
        "layercam": "LayerCAM (student, all layers, tanh + max)",
    }
    for name, label in labels.items():
        method = bl.METHODS[name]
        assert method.fn is NEW[name] and method.access == "white-box student" and method.label == label
        assert name in bl.__all__
        res = bl.explain(name, tiny_images, [1, 2], student=tiny, blackbox=BlackBox(copy.deepcopy(tiny), 5))
        torch.testing.assert_close(res.saliency, NEW[name](tiny, tiny_images, [1, 2]))
        assert res.queries == 0
        with pytest.raises(ValueError, match="needs student="):
            bl.explain(name, tiny_images, [1, 2], blackbox=BlackBox(tiny, 5))
    assert "``gradcampp``" in bl.__doc__ and "``scorecam``" in bl.__doc__ and "``layercam``" in bl.__doc__


@pytest.mark.parametrize("module", ["gradcampp", "scorecam", "layercam_multi"])
def test_doctests(module):
    # the module itself (the package re-exports a function of the same name)
    mod = importlib.import_module(f"lwcam.baselines.{module}")
    assert doctest.testmod(mod).failed == 0
