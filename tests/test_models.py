"""Models: torchvision architectures by name, the local-weights route, teacher training."""

from __future__ import annotations

import pytest
import torch

from lwcam.models import build_model, load_checkpoint, random_flip_shift, save_checkpoint, train_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["resnet18", "regnet_x_400mf", "shufflenet_v2_x1_0", "resnet18"])
def test_build_by_name_sized_to_classes(name):
    net = build_model(name, num_classes=7).eval()
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 7)


def test_unknown_name_and_bad_class_count():
    with pytest.raises(ValueError, match="unknown architecture 'resnet9000'"):
        build_model("resnet9000", 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18", 1)


def test_local_weight_file_roundtrip(tmp_path):
    torch.manual_seed(0)
    src = build_model("resnet18", 5).eval()
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    dst = build_model("resnet18", 5, weights=path).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x))
    # a checkpoint dict with a "model" entry works too, and meta survives
    save_checkpoint(src, tmp_path / "ckpt.pt", arch="resnet18", num_classes=5)
    loaded, meta = load_checkpoint(tmp_path / "ckpt.pt")
    assert meta == {"arch": "resnet18", "num_classes": 5}
    torch.testing.assert_close(loaded(x), src(x))
    with pytest.raises(FileNotFoundError):
        build_model("resnet18", 5, weights=tmp_path / "missing.pth")


def test_weights_enum_name_is_resolved_without_download(monkeypatch):
    import torchvision

    seen = {}

    def fake_get_model(name, weights=None, **kw):
        seen["weights"] = weights
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(torchvision.models, "get_model", fake_get_model)
    build_model("resnet18", 1000, weights="IMAGENET1K_V1")
    assert seen["weights"] is torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(ValueError, match="1000 classes"):
        build_model("resnet18", 10, weights="ResNet18_Weights.IMAGENET1K_V1")


def test_augmentation_is_seeded_and_label_preserving_shape():
    x = torch.randn(4, 3, 16, 16)
    a = random_flip_shift(x, torch.Generator().manual_seed(3))
    b = random_flip_shift(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape


def _toy_task(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = (x[:, 0, 4:12, 4:12].mean(dim=(1, 2)) > 0).long()
    x[:, 1] += (2 * y - 1).view(-1, 1, 1) * 0.8  # a learnable cue
    return x, y


def test_train_teacher_learns_is_deterministic_and_writes_atomically(tmp_path):
    x, y = _toy_task(256, 0)
    xv, yv = _toy_task(128, 1)
    kwargs = dict(num_classes=2, val_images=xv, val_labels=yv, epochs=3, batch_size=32, lr=1e-2, seed=0)
    r1 = train_teacher("regnet_x_s8", x, y, checkpoint_path=tmp_path / "t.pt", **kwargs)
    r2 = train_teacher("regnet_x_s8", x, y, **kwargs)
    assert r1.val_accuracy > 0.8
    assert len(r1.history) == 3
    for p1, p2 in zip(r1.model.parameters(), r2.model.parameters(), strict=True):
        assert torch.equal(p1, p2)
    assert (tmp_path / "t.pt").exists()
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    model, meta = load_checkpoint(tmp_path / "t.pt")
    assert meta["arch"] == "regnet_x_s8" and meta["seed"] == 0
    with pytest.raises(ValueError, match="images must be"):
        train_teacher("regnet_x_s8", x[0], y, num_classes=2)


def test_pixel_dropout_sets_a_bounded_share_of_pixels_to_the_substrate():
    from lwcam.models import random_pixel_dropout

    x = torch.ones(2000, 3, 8, 8)
    out = random_pixel_dropout(x, torch.Generator().manual_seed(0), max_rate=0.5, p=0.5)
    dropped = (out == 0).float().mean(dim=(1, 2, 3))
    assert ((out == 0).all(dim=1) == (out == 0).any(dim=1)).all()  # all channels of a pixel together
    assert 0.4 < (dropped == 0).float().mean() < 0.6  # about half the images untouched
    assert dropped.max() <= 0.7 and abs(dropped.mean().item() - 0.125) < 0.02
    again = random_pixel_dropout(x, torch.Generator().manual_seed(0), max_rate=0.5, p=0.5)
    assert torch.equal(out, again)
    assert torch.equal(random_pixel_dropout(x, torch.Generator(), max_rate=0.0), x)
