"""Tests of lwcam.baselines: shapes, determinism, access rules, query counts, and correctness on toys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import lwcam.baselines as bl
from lwcam import BlackBox
from lwcam._ops import gaussian_blur
from lwcam.cam.layerwise import LayerwiseGradCAM

SIZE = 32
PATCH = (slice(8, 16), slice(16, 24))  # rows, cols of the region that carries the class


def _inside(maps: torch.Tensor) -> torch.Tensor:
    """Bool (B,): the argmax of each map lies in PATCH."""
    b, h, w = maps.shape
    idx = maps.reshape(b, -1).argmax(1)
    r, c = idx // w, idx % w
    return (r >= PATCH[0].start) & (r < PATCH[0].stop) & (c >= PATCH[1].start) & (c < PATCH[1].stop)


def _patch_images(b: int = 2, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = 0.5 + noise * torch.randn(b, 3, SIZE, SIZE, generator=g)
    x[:, :, PATCH[0], PATCH[1]] += 1.5  # a bright square: the class evidence
    return x


class PatchNet(nn.Module):
    """Differentiable toy: only PATCH matters. Logits (0, 4·(s − 1), 0), s the mean intensity of PATCH.

    On :func:`_patch_images` (s = 2) the class-1 probability is 0.96; with PATCH removed it is below 0.1.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :, PATCH[0], PATCH[1]].mean(dim=(1, 2, 3))
        zero = torch.zeros_like(s)
        return torch.stack([zero, 4.0 * (s - 1.0), zero], dim=1)


def _patch_blackbox() -> BlackBox:
    net = PatchNet()
    return BlackBox(lambda x: torch.softmax(net(x), dim=1), num_classes=3, k=3)


class TinyGAP(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.fixture(scope="module")
def tiny() -> TinyGAP:
    return TinyGAP().eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- shapes and determinism
def test_every_method_returns_finite_maps(tiny, images):
    bb = BlackBox(tiny, num_classes=5)
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    masks[:, 4:9, 4:9] = True
    params = {"rise": {"n_masks": 40}, "lime": {"n_samples": 20, "n_segments": 9},
              "meaningful_perturbation": {"iters": 3}}
    for name, method in bl.METHODS.items():
        before = bb.queries
        res = bl.explain(name, images, [1, 4], blackbox=bb, student=tiny, teacher=tiny, masks=masks,
                         **params.get(name, {}))
        assert isinstance(res, bl.Explanation), name
        out = res.saliency
        assert out.shape == (2, SIZE, SIZE) and res.n_images == 2, name
        assert out.dtype == torch.float32 and out.device.type == "cpu", name
        assert torch.isfinite(out).all(), name
        assert res.seconds >= 0 and res.queries == bb.queries - before, name
        assert (res.queries > 0) == (method.access == "black-box"), name
    assert {"lwcam", "lwcam_selected"} <= set(bl.METHODS)  # lwcam is registered like every other method
    assert bl.METHODS["lwcam"].label == "lwcam (paper)" and bl.METHODS["lwcam"].access == "white-box student"


def test_seeds_make_outputs_deterministic(images):
    bb = _patch_blackbox()
    a = bl.rise(bb, images, 1, n_masks=30, grid_size=4, seed=3)
    b = bl.rise(bb, images, 1, n_masks=30, grid_size=4, seed=3, batch_size=7)  # chunking does not matter
    c = bl.rise(bb, images, 1, n_masks=30, grid_size=4, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    la = bl.lime(bb, images, 1, n_samples=30, segmentation="grid", n_segments=16, seed=5)
    lb = bl.lime(bb, images, 1, n_samples=30, segmentation="grid", n_segments=16, seed=5)
    lc = bl.lime(bb, images, 1, n_samples=30, segmentation="grid", n_segments=16, seed=6)
    assert torch.equal(la, lb) and not torch.equal(la, lc)
    assert torch.equal(bl.random_saliency(images, seed=2), bl.random_saliency(images, seed=2))
    assert not torch.equal(bl.random_saliency(images, seed=2), bl.random_saliency(images, seed=3))
    state = torch.get_rng_state()
    bl.random_saliency(images, seed=9)
    assert torch.equal(state, torch.get_rng_state())  # the global random state is left alone


def test_rise_masks_follow_the_reference_construction():
    m = bl.rise_masks(200, (SIZE, SIZE), grid_size=4, p_keep=0.3, seed=0)
    assert m.shape == (200, SIZE, SIZE)
    assert m.min() >= 0 and m.max() <= 1
    assert abs(m.mean().item() - 0.3) < 0.05  # about p of each mask is kept
    assert not torch.equal(m[0], m[1])


# ----------------------------------------------------------------------------- access rules and costs
def test_blackbox_methods_refuse_a_module(tiny, images):
    for fn in (bl.rise, bl.lime, bl.occlusion):
        with pytest.raises(TypeError, match="BlackBox"):
            fn(tiny, images, 0)
        with pytest.raises(TypeError, match="BlackBox"):
            fn(lambda x: torch.softmax(tiny(x), 1), images, 0)
    label_bb = BlackBox(tiny, num_classes=5, output="label")
    with pytest.raises(ValueError, match="label"):
        bl.rise(label_bb, images, 0, n_masks=4)


def test_whitebox_methods_refuse_a_blackbox(tiny, images):
    bb = BlackBox(tiny, num_classes=5)
    for fn in (bl.gradcam, bl.cam, bl.meaningful_perturbation):
        with pytest.raises(TypeError, match="white-box"):
            fn(bb, images, 0)


def test_queries_are_counted_exactly(tiny, images):
    bb = BlackBox(tiny, num_classes=5, batch_size=16)
    res = bl.explain("rise", images, [0, 1], blackbox=bb, n_masks=37, grid_size=4, batch_size=10)
    assert res.queries == bb.queries == 2 * 37 and res.queries_per_image == 37
    bb.reset_queries()
    res = bl.explain("occlusion", images, [0, 1], blackbox=bb, window=8, stride=4)
    windows = ((SIZE - 8) // 4 + 1) ** 2  # 7 x 7 positions, each one forward
    assert res.queries == bb.queries == 2 * (windows + 1)  # + the unoccluded image
    assert bl.occlusion_queries(SIZE, SIZE, 8, 4) == windows + 1
    bb.reset_queries()
    res = bl.explain("lime", images, [0, 1], blackbox=bb, n_samples=23, n_segments=9, batch_size=10)
    assert res.queries == bb.queries == 2 * 23
    for name in ("gradcam", "cam", "lwcam"):
        assert bl.explain(name, images, [0, 0], blackbox=bb, student=tiny).queries == 0
    assert bb.queries == 2 * 23  # white-box methods never touch the black box


def test_topk_blackbox_is_accepted(tiny, images):
    bb = BlackBox(tiny, num_classes=5, output="topk", k=2)
    out = bl.rise(bb, images, [0, 1], n_masks=16, grid_size=4)
    assert out.shape == (2, SIZE, SIZE) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- correctness on toys
def test_blackbox_methods_find_the_class_region():
    x = _patch_images()
    bb = _patch_blackbox()
    assert _inside(bl.rise(bb, x, 1, n_masks=300, grid_size=4, seed=0)).all()
    assert _inside(bl.occlusion(bb, x, 1, window=8, stride=4)).all()
    assert _inside(bl.lime(bb, x, 1, n_samples=100, segmentation="grid", n_segments=16)).all()
    clean = _patch_images(noise=0.01)  # SLIC superpixels follow the square's edges on a clean image
    assert _inside(bl.lime(bb, clean, 1, n_samples=100, n_segments=30)).all()


def test_meaningful_perturbation_deletes_the_class_region():
    x = _patch_images()
    net = PatchNet()
    sal = bl.meaningful_perturbation(net, x, 1, iters=60, mask_size=(8, 8), blur_sigma=4.0)
    assert sal.min() >= 0 and sal.max() <= 1
    assert sal[:, PATCH[0], PATCH[1]].min() > 0.5  # the mask covers the whole square (its argmax ties at 1)
    inside = sal[:, PATCH[0], PATCH[1]].mean()
    outside = (sal.sum() - sal[:, PATCH[0], PATCH[1]].sum()) / (sal.numel() - 2 * 64)
    assert inside > 0.9 and outside < 0.5
    blurred = gaussian_blur(x, 25, 4.0, border="replicate", kernel_dtype=torch.float32)  # MP's blur at σ = 4
    with torch.no_grad():
        final = torch.softmax(net(x * (1 - sal[:, None]) + blurred * sal[:, None]), dim=1)[:, 1]
    assert final.max() < 0.5  # from 0.96: the learnt deletion removed most of the evidence


def test_meaningful_perturbation_leaves_the_model_alone(tiny, images):
    tiny.features[1].train()  # a submodule in training mode keeps its own flag
    with torch.no_grad():  # the mask still gets gradients
        out = bl.meaningful_perturbation(tiny, images, [0, 1], iters=3)
    assert out.abs().sum() > 0
    assert all(p.grad is None and p.requires_grad for p in tiny.parameters())
    assert tiny.features[1].training and not tiny.training
    tiny.features[1].eval()


def test_cam_equals_the_hand_formula(tiny, images):
    out = bl.cam(tiny, images, [2, 4])
    assert bl.find_cam_head(tiny, images) == ("features", "fc")
    with torch.no_grad():
        a = tiny.features(images)
        logits = tiny(images)
    hand = torch.stack([(tiny.fc.weight[c][:, None, None] * a[i]).sum(0) for i, c in enumerate([2, 4])])
    # CAM's identity: the class logit is the mean of the map plus the bias
    assert torch.allclose(hand.mean(dim=(1, 2)) + tiny.fc.bias[[2, 4]], logits[[0, 1], [2, 4]], atol=1e-5)
    expected = F.interpolate(hand[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(out, expected, atol=1e-5)
    rectified = F.interpolate(hand.clamp_min(0)[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    assert torch.allclose(bl.cam(tiny, images, [2, 4], relu=True), rectified[:, 0], atol=1e-5)  # ReLU, then upsample


def test_cam_finds_torchvision_heads_and_refuses_others():
    x = torch.randn(1, 3, SIZE, SIZE)
    torch.manual_seed(0)
    assert bl.find_cam_head(torchvision.models.resnet18(num_classes=4), x) == ("layer4", "fc")
    assert bl.find_cam_head(torchvision.models.shufflenet_v2_x0_5(num_classes=4), x) == ("conv5", "fc")
    with pytest.raises(ValueError, match="not global average pooling"):
        bl.cam(torchvision.models.mobilenet_v3_small(num_classes=4), x, 0)


def test_gradcam_is_the_last_layer_of_layerwise_gradcam(tiny, images):
    out = bl.gradcam(tiny, images, [1, 3])
    with LayerwiseGradCAM(tiny, verbose=False) as lw:
        lm = lw(images, [1, 3])
    assert bl.last_layer(tiny, tuple(images.shape[1:])) == lm.names[-1]
    assert torch.allclose(out, lm.maps[lm.names[-1]].cpu(), atol=1e-6)
    first = bl.gradcam(tiny, images, [1, 3], layer=lm.names[0])
    assert torch.allclose(first, lm.maps[lm.names[0]].cpu(), atol=1e-6)


def test_simple_maps():
    x = torch.zeros(3, 3, 9, 11)
    c = bl.center_saliency(x)
    assert c.shape == (3, 9, 11) and divmod(int(c[0].argmax()), 11) == (4, 5)
    r = bl.random_saliency(x)
    assert r.shape == (3, 9, 11) and r.min() >= 0 and r.max() < 1 and not torch.equal(r[0], r[1])
    m = torch.zeros(2, 4, 4, dtype=torch.bool)
    m[0, 1, 1] = True
    assert torch.equal(bl.mask_saliency(m), m.float())
    assert torch.equal(bl.minmax(torch.full((1, 2, 2), 3.0)), torch.zeros(1, 2, 2))


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors(tiny, images):
    bb = BlackBox(tiny, num_classes=5)
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        bl.rise(bb, images, [0, 5], n_masks=4)
    with pytest.raises(ValueError, match="2 targets|3 targets"):
        bl.occlusion(bb, images, [0, 1, 2])
    with pytest.raises(TypeError, match="integer"):
        bl.lime(bb, images, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="bool"):
        bl.cam(tiny, images, True)
    with pytest.raises(ValueError, match="outside"):
        bl.cam(tiny, images, 7)
    with pytest.raises(ValueError, match="out of range"):
        bl.gradcam(tiny, images, 9)
    with pytest.raises(ValueError, match="outside"):
        bl.meaningful_perturbation(tiny, images, -1, iters=1)
    with pytest.raises(ValueError, match="shape"):
        bl.rise(bb, images[0], 0)
    with pytest.raises(ValueError, match="NaN"):
        bl.gradcam(tiny, torch.full((1, 3, 8, 8), float("nan")), 0)
    with pytest.raises(ValueError, match="n_masks"):
        bl.rise(bb, images, 0, n_masks=0)
    with pytest.raises(ValueError, match="window"):
        bl.occlusion(bb, images, 0, window=64)
    with pytest.raises(ValueError, match="seed"):
        bl.random_saliency(images, seed=-1)
    with pytest.raises(ValueError, match="unknown method"):
        bl.explain("nope", images, 0)
    with pytest.raises(ValueError, match="blackbox="):
        bl.explain("rise", images, 0, student=tiny)
