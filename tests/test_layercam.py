"""Tests of lwcam.cam: correctness against pytorch-grad-cam and closed forms, the
one-pass property, batching, robustness and error messages."""

from __future__ import annotations

import copy
import doctest
import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from _models import RESNET_STAGES, randomise_bn
from torch import nn

from lwcam._utils import seed_everything
from lwcam.cam import batched
from lwcam.cam.fusion import fuse, minmax_normalize
from lwcam.cam.layerwise import LayerwiseGradCAM, auto_layers
from lwcam.cam.maps import ClassifierOutputTarget, LayerMaps


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster, above all on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_resnet(seed: int = 0) -> nn.Module:
    gen = seed_everything(seed)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    randomise_bn(net, gen)
    return net.eval()


def tiny_net(inplace: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=inplace),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return make_resnet(0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 64, 64, generator=g)


@pytest.fixture(scope="module")
def small(images) -> torch.Tensor:
    """32x32 images: resnet18's auto stages are then relu, layer1, layer2, layer3 (layer4 is 1x1)."""
    return F.avg_pool2d(images, 2)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def no_hooks(model: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())


# ---------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["fixed", "top1", "top2"])
def test_matches_pytorch_grad_cam_every_auto_stage(resnet, images, which):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as PgcTarget

    with torch.no_grad():
        order = resnet(images).argsort(dim=1, descending=True)
    targets = {"fixed": [0, 3, 7, 9], "top1": order[:, 0].tolist(), "top2": order[:, 1].tolist()}[which]
    lm = LayerwiseGradCAM(resnet, verbose=False)(images, targets)
    assert lm.names == RESNET_STAGES
    modules = dict(resnet.named_modules())
    pgc_targets = [PgcTarget(t) for t in targets]
    with GradCAM(model=resnet, target_layers=[modules[n] for n in lm.names]) as ref:
        ref(input_tensor=images.clone(), targets=pgc_targets)
        # per layer: min-max normalised, then resized with cv2 (bilinear) to the input size
        theirs_per_layer = ref.compute_cam_per_layer(images, pgc_targets, False)
        acts_list = [a.numpy() for a in ref.activations_and_grads.activations]
        grads_list = [g.numpy() for g in ref.activations_and_grads.gradients]
    compared = 0
    for name, theirs, acts, grads in zip(lm.names, theirs_per_layer, acts_list, grads_list, strict=True):
        # raw, at the layer's resolution: the definition applied to their activations/gradients
        raw_ref = np.maximum((grads.mean(axis=(2, 3))[:, :, None, None] * acts).sum(1), 0)
        ours_raw = lm.raw[name].numpy()
        assert ours_raw.shape == raw_ref.shape
        scale = max(float(np.abs(raw_ref).max()), 1e-12)
        np.testing.assert_allclose(ours_raw, raw_ref, atol=1e-4 * scale, rtol=1e-4)
        # upsampled and min-max normalised like pytorch-grad-cam's output
        theirs = theirs[:, 0]
        ours = minmax_normalize(lm.maps[name]).numpy()
        assert theirs.shape == ours.shape == (4, 64, 64)
        for i in range(4):
            if theirs[i].max() == 0 and ours[i].max() == 0:
                continue
            assert pearson(ours[i], theirs[i]) >= 0.999, (name, i)
            compared += 1
    assert compared >= 12  # most maps are non-trivial, so the comparison means something


def test_inplace_relu_after_hooked_layer_matches_reference(resnet, small):
    """bn1's output is modified in place by ReLU(inplace=True); its map must be bn1's own."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as PgcTarget

    layers = ["bn1", "layer1.0.bn1", "layer2.1.bn1"]
    targets = [1, 2, 3, 4]
    ours = LayerwiseGradCAM(resnet, layers, verbose=False)(small, targets)
    safe = copy.deepcopy(resnet)
    for m in safe.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    ours_safe = LayerwiseGradCAM(safe, layers, verbose=False)(small, targets)
    safe_modules = dict(safe.named_modules())
    with GradCAM(model=safe, target_layers=[safe_modules[n] for n in layers]) as ref:
        ref(input_tensor=small.clone(), targets=[PgcTarget(t) for t in targets])
        acts_list = [a.numpy() for a in ref.activations_and_grads.activations]
        grads_list = [g.numpy() for g in ref.activations_and_grads.gradients]
    for name, acts, grads in zip(layers, acts_list, grads_list, strict=True):
        torch.testing.assert_close(ours.raw[name], ours_safe.raw[name], atol=1e-5, rtol=1e-4)
        raw_ref = np.maximum((grads.mean(axis=(2, 3))[:, :, None, None] * acts).sum(1), 0)
        np.testing.assert_allclose(ours.raw[name].numpy(), raw_ref, atol=1e-4 * raw_ref.max(), rtol=1e-4)
        # bn1's map is not the ReLU'd map (what a naive hook would return)
        assert (ours.raw[name] > 0).any()
    naive = LayerwiseGradCAM(resnet, ["relu"], verbose=False)(small, targets)
    assert not torch.allclose(naive.raw["relu"], ours.raw["bn1"], atol=1e-4)


def test_closed_form_on_linear_head():
    """conv -> ReLU(inplace) -> global average pool -> linear: Grad-CAM has a closed form."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    x = torch.randn(3, 3, 12, 10)
    targets = torch.tensor([0, 4, 2])
    lm = LayerwiseGradCAM(net, ["0", "1"], verbose=False)(x, targets)
    conv, lin = net[0], net[4]
    with torch.no_grad():
        z = F.conv2d(x, conv.weight, conv.bias, padding=1)  # (B,K,h,w)
        a = z.clamp_min(0)
        w = lin.weight[targets]  # (B,K)
        hw = z.shape[2] * z.shape[3]
        # layer "1" (after ReLU): dy/dA_k = w_k / hw everywhere
        map_relu = torch.relu((w[:, :, None, None] * a).sum(1) / hw)
        # layer "0" (before ReLU): dy/dZ_k = w_k / hw * [Z_k > 0]
        frac = (z > 0).float().mean(dim=(2, 3))
        map_conv = torch.relu(((w * frac / hw)[:, :, None, None] * z).sum(1))
    torch.testing.assert_close(lm.raw["1"], map_relu, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lm.raw["0"], map_conv, atol=1e-6, rtol=1e-5)
    assert (map_conv > 0).any() and (map_relu > 0).any()
    # the same resolution as the input, so upsampling is the identity
    torch.testing.assert_close(lm.maps["1"], map_relu, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lm.targets, targets)
    torch.testing.assert_close(lm.logits, net(x).detach())


def test_upsampling_is_bilinear_align_corners_false(resnet, images):
    lm = LayerwiseGradCAM(resnet, verbose=False)(images, 3)
    for name in lm.names:
        ref = F.interpolate(lm.raw[name][:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(lm.maps[name], ref)
        assert lm.maps[name].min() >= 0


# ---------------------------------------------------------------------------------------------
# LayerCAM weighting
# ---------------------------------------------------------------------------------------------
def _hand_acts_and_grads(net: nn.Sequential, x: torch.Tensor, cut: int, targets: list[int]):
    """A = net[:cut](x) and dy_b/dA_b, computed image by image with autograd (no hooks)."""
    acts, grads = [], []
    for b, t in enumerate(targets):
        a = net[:cut](x[b:b + 1]).detach().requires_grad_(True)
        y = net[cut:](a)[0, t]
        (g,) = torch.autograd.grad(y, a)
        acts.append(a.detach()[0])
        grads.append(g[0])
    return torch.stack(acts), torch.stack(grads)


def test_both_weightings_match_a_hand_computation():
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 6),
    )
    randomise_bn(net, torch.Generator().manual_seed(6))
    net.eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    targets = [0, 3, 5]
    layers = {"1": 2, "4": 5, "8": 9}  # layer name -> index of the module after it
    out = LayerwiseGradCAM(net, list(layers), weighting=("gradcam", "layercam"), verbose=False)(x, targets)
    assert set(out) == {"gradcam", "layercam"}
    for name, cut in layers.items():
        a, g = _hand_acts_and_grads(net, x, cut, targets)
        expected = {
            "gradcam": torch.relu((g.mean(dim=(2, 3))[:, :, None, None] * a).sum(1)),
            "layercam": torch.relu((torch.relu(g) * a).sum(1)),
        }
        for weighting, ref in expected.items():
            assert (ref > 0).any(), (name, weighting)  # a map that can tell the two apart
            lm = out[weighting]
            assert lm.weighting == weighting
            torch.testing.assert_close(lm.raw[name], ref, atol=1e-6, rtol=1e-5)
            up = F.interpolate(ref[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
            torch.testing.assert_close(lm.maps[name], up, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(out["gradcam"].raw[name], out["layercam"].raw[name], atol=1e-4)


def test_layercam_differs_from_gradcam_by_keeping_positive_gradients_only():
    """Negative gradients cancel positive ones in Grad-CAM's mean, not in LayerCAM."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        lin.weight.copy_(torch.tensor([[1.0, -1.0]]))
    # y = A[0,0] - A[0,1] on a 1x2 map: dy/dA = (+1, -1), mean 0
    net = nn.Sequential(conv, nn.Flatten(), lin)
    x = torch.tensor([[[[2.0, 2.0]]]])
    out = LayerwiseGradCAM(net, ["0"], weighting=["layercam", "gradcam"], verbose=False)(x, 0)
    assert list(out) == ["layercam", "gradcam"]
    torch.testing.assert_close(out["gradcam"].raw["0"], torch.zeros(1, 1, 2))
    torch.testing.assert_close(out["layercam"].raw["0"], torch.tensor([[[2.0, 0.0]]]))


def test_hirescam_keeps_the_gradient_sign_element_wise():
    """Two channels, a 1x2 map: HiResCAM sums G ⊙ A with signed G, LayerCAM clips G at 0, Grad-CAM averages G."""
    conv = nn.Conv2d(1, 2, 1, bias=False)
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)  # A_0 = A_1 = x = (2, 2)
        lin.weight.copy_(torch.tensor([[1.0, 1.0, -2.0, 2.0]]))  # dy/dA_0 = (1, 1), dy/dA_1 = (-2, 2)
    net = nn.Sequential(conv, nn.Flatten(), lin)
    x = torch.tensor([[[[2.0, 2.0]]]])
    out = LayerwiseGradCAM(net, ["0"], weighting=("gradcam", "layercam", "hirescam"), verbose=False)(x, 0)
    # HiResCAM: ReLU(1·2 − 2·2, 1·2 + 2·2) = (0, 6); LayerCAM: (2 + 0, 2 + 4); Grad-CAM: α = (1, 0) -> (2, 2)
    torch.testing.assert_close(out["hirescam"].raw["0"], torch.tensor([[[0.0, 6.0]]]), rtol=0, atol=0)
    torch.testing.assert_close(out["layercam"].raw["0"], torch.tensor([[[2.0, 6.0]]]), rtol=0, atol=0)
    torch.testing.assert_close(out["gradcam"].raw["0"], torch.tensor([[[2.0, 2.0]]]), rtol=0, atol=0)
    assert out["hirescam"].weighting == "hirescam"
    torch.testing.assert_close(out["hirescam"].maps["0"], out["hirescam"].raw["0"])  # 1x2 input, 1x2 map


def test_hirescam_matches_a_hand_computation_and_pytorch_grad_cam():
    torch.manual_seed(11)
    net = tiny_net().eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(12))
    targets = [2, 5, 1]  # every map non-zero somewhere, zero somewhere else
    lm = LayerwiseGradCAM(net, ["1", "4"], weighting="hirescam", verbose=False)(x, targets)
    for name, cut in (("1", 2), ("4", 5)):
        a, g = _hand_acts_and_grads(net, x, cut, targets)
        ref = torch.relu((g * a).sum(1))
        assert (ref.amax(dim=(1, 2)) > 0).all() and (ref == 0).any()  # the ReLU cuts somewhere
        torch.testing.assert_close(lm.raw[name], ref, atol=1e-6, rtol=1e-5)

    from pytorch_grad_cam import HiResCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as PgcTarget

    pgc_targets = [PgcTarget(t) for t in targets]
    with HiResCAM(model=net, target_layers=[net[4]]) as ext:
        scaled = ext(input_tensor=x.clone(), targets=pgc_targets)  # min-max scaled, resized by cv2
        acts = ext.activations_and_grads.activations[0].numpy()
        grads = ext.activations_and_grads.gradients[0].numpy()
        theirs = np.maximum(ext.get_cam_image(x, net[4], pgc_targets, acts, grads, False), 0)  # before scaling
    ours = lm.raw["4"].numpy()
    assert theirs.shape == ours.shape == (3, 8, 8)
    np.testing.assert_allclose(ours, theirs, atol=1e-6 * theirs.max(), rtol=1e-5)
    ours_scaled = minmax_normalize(lm.maps["4"]).numpy()
    for i in range(3):
        assert pearson(ours_scaled[i], scaled[i]) >= 0.999


def test_raw_layer_maps_share_the_passes_and_match_layer_maps():
    net = tiny_net().eval()
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(13))
    t = torch.tensor([0, 4, 9, 1, 3])
    counts, handle = _counters(net)
    try:
        names, raw = batched.raw_layer_maps(net, x, t, ("gradcam", "layercam", "hirescam"), batch_size=2)
    finally:
        handle.remove()
    assert counts == {"forward": 3, "backward": 3}  # chunks of 2, 2 and 1: one pass each, all weightings
    assert no_hooks(net)
    assert names == ["1", "4"] and set(raw) == {"gradcam", "layercam", "hirescam"}
    assert [tuple(m.shape) for m in raw["hirescam"]] == [(5, 16, 16), (5, 8, 8)]
    whole = LayerwiseGradCAM(net, weighting=("gradcam", "layercam", "hirescam"), verbose=False)(x, t)
    names2, stacks, res = batched.layer_maps_all_weightings(net, x, t, ("gradcam", "hirescam"), batch_size=2)
    assert names2 == names and res == {"1": (16, 16), "4": (8, 8)}
    for w, maps in raw.items():
        for i, (n, m) in enumerate(zip(names, maps, strict=True)):
            assert m.device.type == "cpu"
            torch.testing.assert_close(m, whole[w].raw[n], atol=1e-6, rtol=1e-5)
            if w in stacks:  # the upsampled stacks are the same maps, bilinearly upsampled
                up = F.interpolate(m[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
                torch.testing.assert_close(stacks[w][:, i], up.clamp_min(0), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("peer", ["torchcam", "pytorch_grad_cam"])
def test_layercam_matches_peers_every_auto_stage(resnet, images, peer):
    targets = [0, 3, 7, 9]
    lm = LayerwiseGradCAM(resnet, weighting="layercam", verbose=False)(images, targets)
    assert lm.names == RESNET_STAGES and lm.weighting == "layercam"
    modules = dict(resnet.named_modules())
    if peer == "torchcam":
        from torchcam.methods import LayerCAM

        with LayerCAM(resnet, target_layer=lm.names) as ext:
            theirs = [c.numpy() for c in ext(class_idx=targets, scores=resnet(images), normalized=False)]
    else:
        from pytorch_grad_cam import LayerCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as PgcTarget

        with LayerCAM(model=resnet, target_layers=[modules[n] for n in lm.names]) as ref:
            ref(input_tensor=images.clone(), targets=[PgcTarget(t) for t in targets])
            pairs = zip(ref.activations_and_grads.activations, ref.activations_and_grads.gradients, strict=True)
            theirs = [np.maximum(ref.get_cam_image(images, None, None, a.numpy(), g.numpy(), False), 0)
                      for a, g in pairs]
    for name, ref_raw in zip(lm.names, theirs, strict=True):
        assert ref_raw.shape == tuple(lm.raw[name].shape)
        assert ref_raw.max() > 0
        np.testing.assert_allclose(lm.raw[name].numpy(), ref_raw, atol=1e-5 * ref_raw.max(), rtol=1e-5)


@pytest.mark.parametrize("use_context", [False, True])
def test_both_weightings_one_forward_and_one_backward(resnet, small, use_context):
    net = copy.deepcopy(resnet)
    counts, handle = _counters(net)
    targets = [1, 2, 3, 4]
    try:
        cam = LayerwiseGradCAM(net, weighting=("gradcam", "layercam"), verbose=False)
        if use_context:
            cam.__enter__()
        for expected in (1, 2):
            out = cam(small, targets)
            assert counts == {"forward": expected, "backward": expected}
        if use_context:
            cam.__exit__(None, None, None)
    finally:
        handle.remove()
    assert all(p.grad is None for p in net.parameters())
    assert no_hooks(net)
    # each entry equals a call with that weighting alone
    for weighting in ("gradcam", "layercam"):
        alone = LayerwiseGradCAM(resnet, weighting=weighting, verbose=False)(small, targets)
        assert alone.weighting == out[weighting].weighting == weighting
        assert out[weighting].names == alone.names == RESNET_STAGES[:4]
        for n in alone.names:
            torch.testing.assert_close(out[weighting].raw[n], alone.raw[n], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(out[weighting].maps[n], alone.maps[n], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out[weighting].logits, alone.logits)
        assert torch.equal(out[weighting].targets, alone.targets)


def test_default_weighting_is_gradcam_and_state_is_restored():
    net = tiny_net()
    net.train()
    net[3].eval()
    before = {n: m.training for n, m in net.named_modules()}
    x = torch.randn(2, 3, 16, 16)
    cam = LayerwiseGradCAM(net, verbose=False)
    assert cam.weighting == "gradcam" and "weighting='gradcam'" in repr(cam)
    lm = cam(x, [1, 2])
    assert isinstance(lm, LayerMaps) and lm.weighting == "gradcam"
    both = LayerwiseGradCAM(net, weighting=("gradcam", "layercam"), verbose=False)
    assert both.weighting == ("gradcam", "layercam")
    out = both(x, [1, 2])
    for n in lm.names:
        torch.testing.assert_close(out["gradcam"].raw[n], lm.raw[n])
    assert out["layercam"].cpu().weighting == "layercam"
    assert {n: m.training for n, m in net.named_modules()} == before
    assert no_hooks(net) and all(p.grad is None for p in net.parameters())


def test_error_bad_weighting():
    net = tiny_net()
    with pytest.raises(ValueError, match="unknown weighting 'gradcam\\+\\+'"):
        LayerwiseGradCAM(net, weighting="gradcam++")
    with pytest.raises(ValueError, match="unknown weighting 'LayerCAM'"):
        LayerwiseGradCAM(net, weighting=("gradcam", "LayerCAM"))
    with pytest.raises(ValueError, match="weighting is an empty tuple"):
        LayerwiseGradCAM(net, weighting=())
    with pytest.raises(ValueError, match="weighting lists a name twice"):
        LayerwiseGradCAM(net, weighting=["layercam", "layercam"])
    with pytest.raises(TypeError, match="weighting must be one of"):
        LayerwiseGradCAM(net, weighting=None)
    with pytest.raises(ValueError, match="unknown weighting 3"):
        LayerwiseGradCAM(net, weighting=[3])
    assert no_hooks(net)


# ---------------------------------------------------------------------------------------------
# layer selection
# ---------------------------------------------------------------------------------------------
def test_auto_layers_tiny_sequential(capsys):
    net = tiny_net()
    cam = LayerwiseGradCAM(net)
    assert cam.layer_names is None
    lm = cam(torch.randn(2, 3, 32, 32), [1, 2])
    assert lm.names == ["1", "4"]
    assert lm.resolutions == {"1": (32, 32), "4": (16, 16)}
    assert cam.layer_names == ["1", "4"]
    out = capsys.readouterr().out
    assert "1 (32x32)" in out and "4 (16x16)" in out
    cam(torch.randn(1, 3, 32, 32), 0)
    assert capsys.readouterr().out == ""  # printed once, on the first call


def test_auto_layers_not_verbose_prints_nothing(capsys):
    LayerwiseGradCAM(tiny_net(), verbose=False)(torch.randn(1, 3, 16, 16), 0)
    assert capsys.readouterr().out == ""


EXPECTED_AUTO = {
    "resnet18": ["relu", "layer1", "layer2", "layer3", "layer4"],
    "regnet_x_400mf": ["stem", "trunk_output.block1", "trunk_output.block2", "trunk_output.block3",
                       "trunk_output.block4"],
    "shufflenet_v2_x1_0": ["conv1", "maxpool", "stage2", "stage3", "conv5"],
    "mobilenet_v3_small": ["features.0", "features.1", "features.3", "features.8", "features.12"],
    "vgg11": ["features.1", "features.4", "features.9", "features.14", "features.19", "features.20"],
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_AUTO))
def test_auto_layers_torchvision_table(arch):
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    names = auto_layers(net, 64)
    assert names == EXPECTED_AUTO[arch]
    assert f"``{arch}``" in LayerwiseGradCAM.__doc__  # the docstring table documents it
    lm = LayerwiseGradCAM(net, names, verbose=False)(torch.randn(1, 3, 64, 64), 0)
    assert isinstance(lm, LayerMaps) and lm.names == names
    sizes = [h for h, _ in lm.resolutions.values()]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert sizes[-1] == 2


def test_auto_unwraps_single_child_wrapper():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_net()

        def forward(self, x):
            return self.net(x)

    lm = LayerwiseGradCAM(Wrapper(), verbose=False)(torch.randn(1, 3, 16, 16), 0)
    assert lm.names == ["net.1", "net.4"]


def test_explicit_layers_names_and_modules_sorted_shallow_to_deep(resnet, small):
    by_name = LayerwiseGradCAM(resnet, ["layer3", "layer1"], verbose=False)(small[:2], [1, 2])
    by_module = LayerwiseGradCAM(resnet, [resnet.layer3, resnet.layer1], verbose=False)(small[:2], [1, 2])
    assert by_name.names == by_module.names == ["layer1", "layer3"]
    for n in by_name.names:
        torch.testing.assert_close(by_name.raw[n], by_module.raw[n])
    auto = LayerwiseGradCAM(resnet, verbose=False)(small[:2], [1, 2])
    torch.testing.assert_close(by_name.raw["layer3"], auto.raw["layer3"])


# ---------------------------------------------------------------------------------------------
# one pass, batching, determinism
# ---------------------------------------------------------------------------------------------
def _counters(model: nn.Module) -> tuple[dict[str, int], object]:
    counts = {"forward": 0, "backward": 0}

    def fwd(module, inputs, output):
        counts["forward"] += 1

        def bwd(grad):
            counts["backward"] += 1

        if output.requires_grad:
            output.register_hook(bwd)

    return counts, model.register_forward_hook(fwd)


@pytest.mark.parametrize("use_context", [False, True])
def test_one_forward_and_one_backward_per_call(resnet, small, use_context):
    net = copy.deepcopy(resnet)
    counts, handle = _counters(net)
    try:
        cam = LayerwiseGradCAM(net, verbose=False)
        if use_context:
            cam.__enter__()
        for expected in (1, 2, 3):  # the first (auto-probing) call included
            lm = cam(small, [1, 2, 3, 4])
            assert lm.names == RESNET_STAGES[:4]
            assert counts == {"forward": expected, "backward": expected}
        if use_context:
            cam.__exit__(None, None, None)
    finally:
        handle.remove()
    assert all(p.grad is None for p in net.parameters())  # parameters' .grad never populated
    assert no_hooks(net)


def test_per_sample_targets_equal_single_image_calls(resnet, small):
    targets = [1, 4, 7, 0]
    cam = LayerwiseGradCAM(resnet, verbose=False)
    batch = cam(small, targets)
    for i, t in enumerate(targets):
        one = cam(small[i:i + 1], t)
        for n in batch.names:
            torch.testing.assert_close(batch.raw[n][i], one.raw[n][0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(batch.maps[n][i], one.maps[n][0], atol=1e-5, rtol=1e-4)
        assert float(batch.probs[i]) == pytest.approx(float(one.probs[0]), abs=1e-6)
    # different targets really give different maps (so the check above is not vacuous)
    other = cam(small, [2, 2, 2, 2])
    assert not torch.allclose(other.raw["layer2"], batch.raw["layer2"])


def test_deterministic_given_seed(small):
    a = LayerwiseGradCAM(make_resnet(7), verbose=False)(small, [1, 2, 3, 4])
    b = LayerwiseGradCAM(make_resnet(7), verbose=False)(small, [1, 2, 3, 4])
    c = LayerwiseGradCAM(make_resnet(8), verbose=False)(small, [1, 2, 3, 4])
    for n in a.names:
        assert torch.equal(a.raw[n], b.raw[n])
        assert torch.equal(a.maps[n], b.maps[n])
    assert not torch.allclose(a.raw["layer3"], c.raw["layer3"])


# ---------------------------------------------------------------------------------------------
# targets and LayerMaps
# ---------------------------------------------------------------------------------------------
def test_target_forms_agree(resnet, images):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as PgcTarget

    images = F.avg_pool2d(images, 2)  # 32x32 is enough here, and cheaper
    cam = LayerwiseGradCAM(resnet, ["layer2"], verbose=False)
    ref = cam(images, [3, 3, 3, 3])
    assert ref.raw["layer2"].max() > 0
    variants = [3, torch.tensor(3), torch.tensor([3, 3, 3, 3]), (3, 3, 3, 3), np.array([3, 3, 3, 3]),
                ClassifierOutputTarget(3), [ClassifierOutputTarget(3)] * 4, [PgcTarget(3)] * 4,
                lambda logits: logits[:, 3]]
    for v in variants:
        lm = cam(images, v)
        torch.testing.assert_close(lm.raw["layer2"], ref.raw["layer2"])
    assert cam(images, lambda z: z[:, 3]).targets.tolist() == [-1] * 4
    assert torch.isnan(cam(images, lambda z: z[:, 3]).probs).all()
    assert cam(images, ClassifierOutputTarget(3)).targets.tolist() == [3] * 4


def test_none_targets_is_model_argmax_and_layermaps_fields(resnet, images):
    lm = LayerwiseGradCAM(resnet, verbose=False)(images)
    logits = resnet(images).detach()
    torch.testing.assert_close(lm.logits, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(lm.targets, logits.argmax(1))
    assert torch.equal(lm.student_pred, logits.argmax(1))
    torch.testing.assert_close(lm.probs, logits.softmax(1).max(1).values, atol=1e-6, rtol=1e-5)
    assert lm.targets.dtype == torch.long
    assert lm.stack().shape == (4, 5, 64, 64)
    assert torch.equal(lm.stack()[:, 2], lm.maps["layer2"])
    assert lm.agrees_with(lm.student_pred).all()
    flipped = (lm.student_pred + 1) % 10
    assert not lm.agrees_with(flipped).any()
    assert lm.agrees_with(flipped).dtype == torch.bool
    mixed = lm.student_pred.clone()
    mixed[0] = (mixed[0] + 1) % 10
    assert lm.agrees_with(mixed).tolist() == [False, True, True, True]
    torch.testing.assert_close(lm.fuse(), fuse(lm.maps))
    torch.testing.assert_close(lm.fuse(mode="max", normalize="none"), lm.stack().amax(1))
    assert len(lm) == 4 and lm.input_size == (64, 64)
    for t in [*lm.raw.values(), *lm.maps.values(), lm.logits, lm.probs]:
        assert not t.requires_grad and t.device == torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# robustness
# ---------------------------------------------------------------------------------------------
def test_works_under_no_grad_and_inference_mode(resnet, small):
    cam = LayerwiseGradCAM(resnet, verbose=False)
    ref = cam(small, [1, 2, 3, 4])
    with torch.no_grad():
        a = cam(small, [1, 2, 3, 4])
    with torch.inference_mode():
        x = small.clone()
        b = cam(x, [1, 2, 3, 4])
    for n in ref.names:
        torch.testing.assert_close(a.raw[n], ref.raw[n])
        torch.testing.assert_close(b.raw[n], ref.raw[n])
    assert torch.is_grad_enabled()


def test_eval_during_call_and_training_flags_restored():
    net = tiny_net()
    net.train()
    net[3].eval()
    before = {n: m.training for n, m in net.named_modules()}
    seen = []
    h = net[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    LayerwiseGradCAM(net, verbose=False)(torch.randn(2, 3, 16, 16), 0)
    h.remove()
    assert seen == [False]
    assert {n: m.training for n, m in net.named_modules()} == before
    assert net.training and not net[3].training


def test_batchnorm_stats_untouched_in_train_mode(resnet, small):
    net = copy.deepcopy(resnet).train()
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    LayerwiseGradCAM(net, verbose=False)(small, 0)
    for k, v in net.state_dict().items():
        assert torch.equal(v, stats[k]), k
    assert net.training


@pytest.mark.parametrize("requires_grad", [False, True])
def test_parameters_requires_grad_untouched(resnet, small, requires_grad):
    net = copy.deepcopy(resnet)
    for p in net.parameters():
        p.requires_grad_(requires_grad)
    lm = LayerwiseGradCAM(net, verbose=False)(small, [1, 2, 3, 4])
    ref = LayerwiseGradCAM(resnet, verbose=False)(small, [1, 2, 3, 4])
    for n in lm.names:
        torch.testing.assert_close(lm.raw[n], ref.raw[n])
    assert all(p.requires_grad is requires_grad for p in net.parameters())
    assert all(p.grad is None for p in net.parameters())


def test_frozen_stem_still_gives_maps_for_stem():
    net = tiny_net()
    for p in net[0].parameters():
        p.requires_grad_(False)
    lm = LayerwiseGradCAM(net, verbose=False)(torch.randn(2, 3, 16, 16), [0, 1])
    assert lm.names == ["1", "4"]


def test_hooks_removed_on_success_and_on_error(resnet, small):
    net = copy.deepcopy(resnet)
    cam = LayerwiseGradCAM(net, verbose=False)
    cam(small, 1)
    assert no_hooks(net)
    with pytest.raises(ValueError, match="out of range"):
        cam(small, 12)
    assert no_hooks(net)
    fresh = LayerwiseGradCAM(net, verbose=False)  # error during the first, probing call
    with pytest.raises(ValueError, match="out of range"):
        fresh(small, [0, 1, 2, 99])
    assert no_hooks(net)
    assert fresh._store == {}


def test_context_manager_hooks_live_inside_only(resnet, small):
    net = copy.deepcopy(resnet)
    with pytest.raises(RuntimeError, match="boom"), LayerwiseGradCAM(net, verbose=False) as cam:
        cam(small, 1)
        hooked = [n for n, m in net.named_modules() if m._forward_hooks]
        assert hooked == RESNET_STAGES[:4] == cam.layer_names  # only the chosen layers stay hooked
        out = net(small)  # the model can be used normally in between; hooks are inert
        torch.testing.assert_close(out, resnet(small))
        assert cam._store == {}
        raise RuntimeError("boom")
    assert no_hooks(net)
    with LayerwiseGradCAM(net, verbose=False) as cam:  # a failing first call still resolves the layers
        with pytest.raises(ValueError, match="out of range"):
            cam(small, 99)
        assert cam.layer_names == RESNET_STAGES[:4]
        assert [n for n, m in net.named_modules() if m._forward_hooks] == RESNET_STAGES[:4]
    assert no_hooks(net)
    with LayerwiseGradCAM(net, ["layer1"], verbose=False) as cam:
        assert [n for n, m in net.named_modules() if m._forward_hooks] == ["layer1"]
        with pytest.raises(ValueError):
            cam(small, -1)
        cam(small, 1)
    assert no_hooks(net)


def test_no_references_kept_across_many_calls():
    torch.manual_seed(0)
    net = tiny_net(inplace=True).eval()
    refs: list[weakref.ref] = []
    keep = net[4].register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    keep0 = net[0].register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    x = torch.randn(4, 3, 16, 16)
    outs = []
    with LayerwiseGradCAM(net, verbose=False) as cam:
        for i in range(25):
            outs.append(cam(x, i % 10).raw["4"].sum().item())
    cam2 = LayerwiseGradCAM(net, verbose=False)
    for i in range(25):
        outs.append(cam2(x, i % 10).raw["4"].sum().item())
    keep.remove()
    keep0.remove()
    gc.collect()
    assert len(refs) == 100
    assert all(r() is None for r in refs)
    assert no_hooks(net)
    assert cam._store == {} and cam2._store == {}
    assert outs[:25] == outs[25:]


def test_all_zero_maps_stay_zero_never_nan():
    net = tiny_net()
    with torch.no_grad():
        net[7].weight.zero_()  # the score no longer depends on the features: zero gradients
    lm = LayerwiseGradCAM(net, verbose=False)(torch.randn(3, 3, 16, 16), [0, 5, 9])
    for n in lm.names:
        assert torch.equal(lm.raw[n], torch.zeros_like(lm.raw[n]))
        assert torch.equal(lm.maps[n], torch.zeros_like(lm.maps[n]))
    fused = lm.fuse()
    assert torch.equal(fused, torch.zeros_like(fused))
    assert not torch.isnan(lm.fuse(normalize="none")).any()


def test_negative_evidence_gives_zero_map():
    # all activations after the ReLU are >= 0 and the target weights are negative: ReLU(sum) = 0
    net = tiny_net()
    with torch.no_grad():
        net[7].weight.fill_(-1.0)
    lm = LayerwiseGradCAM(net, ["4"], verbose=False)(torch.randn(2, 3, 16, 16), 3)
    assert lm.raw["4"].abs().max() == 0


def test_unused_layer_warns_and_gives_zeros():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = tiny_net()
            self.aux = nn.Conv2d(3, 2, 3, padding=1)

        def forward(self, x):
            self.aux(x)  # runs, but the logits do not depend on it
            return self.body(x)

    with pytest.warns(UserWarning, match="does not depend on layer 'aux'"):
        lm = LayerwiseGradCAM(TwoHeads(), ["aux", "body.1"], verbose=False)(torch.randn(2, 3, 8, 8), 0)
    assert torch.equal(lm.raw["aux"], torch.zeros(2, 8, 8))


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_error_unknown_layer_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown layer name 'layer9'.*valid names include.*'0'"):
        LayerwiseGradCAM(tiny_net(), ["layer9"])
    with pytest.raises(ValueError, match="not a submodule"):
        LayerwiseGradCAM(tiny_net(), [nn.ReLU()])
    with pytest.raises(ValueError, match="listed twice"):
        LayerwiseGradCAM(tiny_net(), ["1", "1"])
    with pytest.raises(ValueError, match="'auto'"):
        LayerwiseGradCAM(tiny_net(), "automatic")
    with pytest.raises(TypeError, match="nn.Module"):
        LayerwiseGradCAM(lambda x: x)


def test_error_layer_never_ran():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = tiny_net()
            self.spare = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.body(x)

    net = Unused()
    with pytest.raises(ValueError, match="'spare' did not run in the forward pass"):
        LayerwiseGradCAM(net, ["spare", "body.1"], verbose=False)(torch.randn(1, 3, 8, 8), 0)
    assert no_hooks(net)


def test_error_layer_not_4d():
    with pytest.raises(ValueError, match=r"layer '6' must output a 4-D .* shape \(1, 16\)"):
        LayerwiseGradCAM(tiny_net(), ["6"], verbose=False)(torch.randn(1, 3, 8, 8), 0)


def test_error_bad_images():
    cam = LayerwiseGradCAM(tiny_net(), verbose=False)
    with pytest.raises(ValueError, match="4-D"):
        cam(torch.randn(3, 16, 16), 0)
    with pytest.raises(ValueError, match="1 channels but the model's first convolution expects 3"):
        cam(torch.randn(2, 1, 16, 16), 0)
    with pytest.raises(TypeError, match="floating-point"):  # the one image rule of lwcam._checks
        cam(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), 0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        cam(np.zeros((2, 3, 16, 16), dtype=np.float32), 0)
    with pytest.raises(ValueError, match="empty"):
        cam(torch.zeros(0, 3, 16, 16), 0)


def test_error_bad_targets():
    cam = LayerwiseGradCAM(tiny_net(), verbose=False)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"target 10 is out of range .*num_classes=10"):
        cam(x, 10)
    with pytest.raises(ValueError, match=r"target -2 is out of range"):
        cam(x, [0, -2])
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \(2,\)"):
        cam(x, [0, 1, 2])
    with pytest.raises(TypeError, match="integer"):
        cam(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="bool"):
        cam(x, True)
    with pytest.raises(ValueError, match=r"scores \(2,\)"):
        cam(x, lambda z: z)
    with pytest.raises(ValueError, match="target 11 is out of range"):
        cam(x, [ClassifierOutputTarget(1), ClassifierOutputTarget(11)])


def test_error_model_output_not_logits():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    with pytest.raises(ValueError, match="logits of shape"):
        LayerwiseGradCAM(net, ["1"], verbose=False)(torch.randn(1, 3, 8, 8), 0)
    assert no_hooks(net)


def test_doctests():
    from lwcam.cam import layerwise, locate, maps

    for module in (layerwise, locate, maps, batched):
        assert doctest.testmod(module).failed == 0


def test_upsampled_raw_maps_are_the_stacks_of_layer_maps_all_weightings():
    """One pass serves the sums and the class-preserving fusions: upsampling the native maps gives the very stacks
    (bit for bit at the same chunking; another chunking moves the backward pass by an ulp)."""
    from lwcam.cam.batched import layer_maps_all_weightings, raw_layer_maps
    from lwcam.cam.maps import upsample_layers

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(6, 3)).eval()
    x, t = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1])
    names, stacks, _ = layer_maps_all_weightings(net, x, t, ("gradcam", "layercam"), batch_size=2)
    names2, raws = raw_layer_maps(net, x, t, ("gradcam", "layercam", "hirescam"), batch_size=2)
    assert names == names2
    for w in ("gradcam", "layercam"):
        assert torch.equal(upsample_layers(raws[w], (16, 16)), stacks[w])
