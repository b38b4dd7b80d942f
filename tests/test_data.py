"""Data: the synthetic default (determinism, disjoint splits, masks) and real-data loaders on fixture trees."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from lwcam import data
from lwcam.data import SPLITS, SyntheticTextures, get_dataset, render_synthetic


def _digest(x: np.ndarray | torch.Tensor) -> str:
    arr = x.numpy() if isinstance(x, torch.Tensor) else x
    return hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()


def test_items_have_the_protocol_types():
    ds = get_dataset("synthetic", split="test", n=3)
    image, label, mask = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    assert mask.shape == (64, 64) and mask.dtype == torch.bool
    assert len(ds) == 3 and ds.classes[0] == "stripes"


def test_pure_function_of_seed_split_index():
    a = render_synthetic(0, "val", 5)
    b = render_synthetic(0, "val", 5)
    c = render_synthetic(1, "val", 5)
    assert _digest(a[0]) == _digest(b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])
    assert _digest(a[0]) != _digest(c[0])
    # on the fly and materialised agree
    ds = SyntheticTextures("val", n=6)
    on_the_fly = ds[5][0]
    ds.arrays()
    torch.testing.assert_close(ds[5][0], on_the_fly)


def test_splits_are_disjoint():
    seen: dict[str, str] = {}
    for split in SPLITS:
        for i in range(40):
            h = _digest(render_synthetic(0, split, i)[0])
            assert h not in seen, f"{split}[{i}] equals {seen[h]}"
            seen[h] = f"{split}[{i}]"


def test_labels_are_balanced_enough_and_cover_all_classes():
    ds = SyntheticTextures("train", n=300)
    _, labels, _ = ds.tensors()
    counts = torch.bincount(labels, minlength=10)
    assert (counts > 10).all(), counts


def test_mask_marks_the_textured_object():
    # inside the mask the picture depends on the class texture; outside it does not:
    # rendering the same (seed, split, index) with the class texture swapped changes only masked pixels
    img, label, mask = render_synthetic(0, "test", 3)
    assert 0.02 < mask.mean() < 0.5
    # the object is fully inside the image: no mask pixel on the border
    assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()
    # high-frequency energy (texture) concentrates inside the mask
    gray = img.mean(axis=2)
    lap = np.abs(4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:])
    inner = mask[1:-1, 1:-1]
    assert lap[inner].mean() > 1.5 * lap[~inner].mean()


def test_normalisation_constants_match_the_data():
    x, _, _ = SyntheticTextures("train", n=400).tensors()
    pix = x * torch.tensor(data.SYNTHETIC_STD).view(1, 3, 1, 1) + torch.tensor(data.SYNTHETIC_MEAN).view(1, 3, 1, 1)
    mean = pix.mean(dim=(0, 2, 3))
    std = pix.std(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.tensor(data.SYNTHETIC_MEAN), atol=0.02, rtol=0)
    torch.testing.assert_close(std, torch.tensor(data.SYNTHETIC_STD), atol=0.02, rtol=0)
    back = data.denormalize(x[:2])
    assert back.min() >= 0 and back.max() <= 1


def test_colour_alone_does_not_tell_the_class():
    # mean colour inside the object is spread the same way for every class
    ds = SyntheticTextures("train", n=300)
    x, y, m = ds.tensors()
    pix = data.denormalize(x)
    means = torch.stack([(pix[i][:, m[i]]).mean(1) for i in range(len(x))])
    overall = means.mean(0)
    for c in range(10):
        assert (means[y == c].mean(0) - overall).abs().max() < 0.12


def test_cache_dir_roundtrip(tmp_path):
    a = SyntheticTextures("test", n=5, cache_dir=tmp_path)
    xa, ya, ma = a.tensors()
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    b = SyntheticTextures("test", n=5, cache_dir=tmp_path)
    xb, yb, mb = b.tensors()
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ma, mb)


def test_image_size_and_class_count_are_parameters():
    ds = SyntheticTextures("val", n=20, image_size=32, num_classes=4)
    x, y, m = ds.tensors()
    assert x.shape == (20, 3, 32, 32) and m.shape == (20, 32, 32)
    assert int(y.max()) < 4


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"name": "mnist"}, ValueError, "unknown data set"),
        ({"name": "synthetic", "split": "holdout"}, ValueError, "split"),
        ({"name": "imagenet"}, ValueError, "root"),
        ({"name": "synthetic", "split": "test", "num_classes": 11}, ValueError, "num_classes"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        get_dataset(**kwargs)


# ------------------------------------------------------------------ real layouts, tiny fixtures
def _jpeg(path, size=(40, 30), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_imagenet_imagefolder_layout(tmp_path):
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            _jpeg(tmp_path / split / wnid / f"{wnid}_1.JPEG")
    ds = get_dataset("imagenet", root=tmp_path, split="test", image_size=32)
    x, y, m = ds[1]
    assert x.shape == (3, 32, 32) and y == 1 and not m.any()
    assert ds.classes == ["n01440764", "n01443537"]


def test_cub200_layout_mask_is_the_bounding_box(tmp_path):
    base = tmp_path / "CUB_200_2011"
    (base / "images" / "001.Black_footed_Albatross").mkdir(parents=True)
    (base / "images" / "002.Laysan_Albatross").mkdir(parents=True)
    rows = [(1, "001.Black_footed_Albatross/a.jpg", 1, 1), (2, "002.Laysan_Albatross/b.jpg", 2, 0),
            (3, "002.Laysan_Albatross/c.jpg", 2, 1)]
    for _, rel, _, _ in rows:
        _jpeg(base / "images" / rel, size=(100, 100))
    (base / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in rows))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (base / "bounding_boxes.txt").write_text("1 10.0 10.0 20.0 30.0\n2 0.0 0.0 50.0 50.0\n3 50.0 50.0 50.0 50.0\n")
    (base / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    train = get_dataset("cub200", root=tmp_path, split="train", image_size=100)
    test = get_dataset("cub200", root=tmp_path, split="test", image_size=100)
    assert len(train) == 2 and len(test) == 1
    x, y, m = test[0]
    assert y == 1 and x.shape == (3, 100, 100)
    # resize 100 -> 114 (256/224), centre crop 100: the box [0,50) maps to about [0,50*1.14-7)
    rows_on = torch.nonzero(m.any(1)).flatten()
    assert rows_on.min() == 0 and 45 <= rows_on.max() <= 52
    assert 0.2 < m.float().mean() < 0.3
    _, y0, m0 = train[0]
    assert y0 == 0 and m0.any()
    with pytest.raises(FileNotFoundError, match="CUB_200_2011"):
        (tmp_path / "empty").mkdir()
        get_dataset("cub200", root=tmp_path / "empty", split="test")


def test_stanford_cars_layout(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    base = tmp_path / "stanford_cars"
    devkit = base / "devkit"
    devkit.mkdir(parents=True)
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], dtype=object)
    scipy_io.savemat(devkit / "cars_meta.mat", {"class_names": names.reshape(1, -1)})
    annos = np.zeros((1, 2), dtype=[("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
                                     ("class", "O"), ("fname", "O")])
    for i, (cls, fname) in enumerate([(1, "00001.jpg"), (2, "00002.jpg")]):
        annos[0, i] = (1, 1, 10, 10, cls, fname)
        _jpeg(base / "cars_test" / fname)
    scipy_io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annos})
    ds = get_dataset("cars", root=tmp_path, split="test", image_size=24)
    assert len(ds) == 2
    x, y, m = ds[1]
    assert x.shape == (3, 24, 24) and y == 1 and not m.any()


def test_fgvc_aircraft_layout(tmp_path):
    base = tmp_path / "fgvc-aircraft-2013b" / "data"
    (base / "images").mkdir(parents=True)
    (base / "variants.txt").write_text("707-320\nA300B4\n")
    (base / "images_variant_test.txt").write_text("0000001 707-320\n0000002 A300B4\n")
    _jpeg(base / "images" / "0000001.jpg")
    _jpeg(base / "images" / "0000002.jpg")
    ds = get_dataset("aircraft", root=tmp_path, split="test", image_size=24)
    assert len(ds) == 2
    x, y, m = ds[1]
    assert x.shape == (3, 24, 24) and y == 1 and not m.any()


def test_parallel_rendering_gives_the_same_bytes_as_one_process(monkeypatch):
    """Rendering on two processes, in chunks, gives byte for byte what one process (and the per-image loop) gives."""
    monkeypatch.setattr(data, "RENDER_CHUNK", 7)  # several chunks, the last one short
    one = SyntheticTextures("val", n=23, image_size=32, num_classes=5, seed=3).arrays(workers=1)
    two = SyntheticTextures("val", n=23, image_size=32, num_classes=5, seed=3).arrays(workers=2)
    loop = [render_synthetic(3, "val", i, 32, 5) for i in range(23)]
    expected = (np.stack([np.round(img * 255).astype(np.uint8) for img, _, _ in loop]),
                np.array([label for _, label, _ in loop], dtype=np.int64), np.stack([m for _, _, m in loop]))
    for a, b, c in zip(one, two, expected, strict=True):
        assert a.dtype == b.dtype == c.dtype and a.shape == b.shape == c.shape
        assert _digest(a) == _digest(b) == _digest(c)
    with pytest.raises(ValueError, match="workers"):
        SyntheticTextures("val", n=2, image_size=32).arrays(workers=0)
