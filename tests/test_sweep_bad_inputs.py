"""Bad inputs found by the failure sweep (docs/failure_sweep.md): each is refused by name or gets a finite answer.

Three patterns: a 0 (or a negative count) silently replaced by a default; extreme but finite values
(up to float32's ±3.4e38, float64's ±1e308) overflowing a range, a sum or a softmax; and a parameter
that reached a bare ZeroDivisionError, KeyError, AttributeError or BadZipFile.
"""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from lwcam import data, models, scoring
from lwcam._ops import minmax_normalize
from lwcam.baselines import center_saliency, fuse_layercam, lime, meaningful_perturbation
from lwcam.baselines.scorecam import _channel_masks
from lwcam.blackbox import BlackBox
from lwcam.distillation import kd_loss
from lwcam.scoring import evaluation
from lwcam.study import analysis, scorecard
from lwcam.study.profiles import Profile, ProfileError

BIG32 = 3e38  # within float32's range (3.4e38); a difference of two of them is not
BIG64 = 1e308  # within float64's range (1.8e308); a sum of two of them is not


def _net(pixels: int = 3 * 4 * 4, classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(pixels, classes))


def _row(*values: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor([[list(values)]], dtype=dtype)


# ----------------------------------------------------------------------------- extreme but finite values
@pytest.mark.parametrize("x, expected", [
    (_row(-BIG32, BIG32, dtype=torch.float32), [0.0, 1.0]),
    (_row(-BIG32, 0.0, BIG32, dtype=torch.float32), [0.0, 0.5, 1.0]),
    (_row(-BIG64, 0.0, BIG64), [0.0, 0.5, 1.0]),
])
def test_minmax_of_extreme_maps_is_finite(x, expected):
    out = minmax_normalize(x)
    assert torch.isfinite(out).all()
    assert out.flatten().tolist() == pytest.approx(expected)


def test_minmax_with_eps_of_extreme_maps_is_finite():
    out = minmax_normalize(_row(-BIG32, BIG32, dtype=torch.float32), eps=1e-8)
    assert out.flatten().tolist() == pytest.approx([0.0, 1.0])


def test_layercam_fusion_and_scorecam_masks_of_extreme_maps_are_finite():
    fused = fuse_layercam([_row(-BIG32, BIG32, dtype=torch.float32)[0:1]])
    assert torch.isfinite(fused).all() and fused.flatten().tolist() == pytest.approx([0.0, math.tanh(2.0)])
    masks = _channel_masks(torch.tensor([[[[-BIG32, BIG32]]]]))
    assert masks.flatten().tolist() == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("fn, expected", [
    (lambda: scoring.sparseness(_row(0.0, BIG64)), [0.5]),
    (lambda: scoring.targeted_mass(_row(BIG64, 0.0), torch.tensor([[[True, False]]]),
                                    torch.tensor([[[False, True]]])), [1.0]),
    (lambda: scoring.relevance_mass(_row(BIG64, BIG64), torch.tensor([[[True, False]]])), [0.5]),
    (lambda: scoring.game_auc(torch.tensor([BIG64, BIG64, BIG64], dtype=torch.float64)).reshape(1), [BIG64]),
])
def test_float64_extremes_get_the_right_finite_answer(fn, expected):
    out = fn()
    assert torch.isfinite(out).all()
    assert out.tolist() == pytest.approx(expected)


def test_max_sensitivity_of_float64_extreme_maps_is_scale_free():
    images = torch.ones(1, 3, 2, 2)
    plain = scoring.max_sensitivity(lambda x, y: x.mean(1).double(), images, 0, radius=0.5, n_samples=2)
    huge = scoring.max_sensitivity(lambda x, y: x.mean(1).double() * BIG64, images, 0, radius=0.5, n_samples=2)
    assert float(plain) > 0 and float(huge) == pytest.approx(float(plain), rel=1e-12)


@pytest.mark.parametrize("student, teacher, temperature, expected", [
    ([BIG32, -BIG32], [BIG32, -BIG32], 1.0, 0.0),  # 0·log 0 on the far class
    ([0.0, 0.0], [BIG32, -BIG32], 0.5, math.log(2) * 0.25),  # a teacher logit / τ past float32
    ([BIG32, BIG32], [-BIG32, -BIG32], 0.5, 0.0),
])
def test_kd_loss_of_extreme_logits_is_finite(student, teacher, temperature, expected):
    loss = kd_loss(torch.tensor([student]), torch.tensor([teacher]), temperature=temperature, reduction="none")
    assert torch.isfinite(loss).all()
    assert float(loss) == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------- measures refuse by name
@pytest.mark.parametrize("bad", [[[2.0, 0.5]], [[-0.5, 0.5]]])
def test_road_score_refuses_values_that_are_not_probabilities(bad):
    with pytest.raises(ValueError, match="scores must be probabilities"):
        scoring.road_score(torch.tensor(bad))


@pytest.mark.parametrize("noise", [BIG64, 3.0e38])
def test_road_refuses_a_noise_that_overflows_float32(noise):
    with pytest.raises(ValueError, match="noise"):
        scoring.road(_net(), torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4), 0, percentages=(50,), noise=noise)


@pytest.mark.parametrize("images, radius", [(torch.ones(1, 3, 2, 2), BIG64), (torch.full((1, 3, 2, 2), 1e38), BIG32)])
def test_max_sensitivity_refuses_a_radius_that_overflows_the_images(images, radius):
    with pytest.raises(ValueError, match="radius"):
        scoring.max_sensitivity(lambda x, y: x.mean(1), images, 0, radius=radius, n_samples=1)


def test_game_auc_refuses_nan():
    with pytest.raises(ValueError, match="curves"):
        scoring.game_auc(torch.tensor([math.nan, 1.0]))


def test_bootstrap_refuses_values_whose_mean_overflows():
    with pytest.raises(ValueError, match="values"):
        scoring.bootstrap_ci([BIG64, BIG64], n_boot=10)


@pytest.mark.parametrize("a, b", [([5e307, 5e307], [-5e307, -5e307]), ([1.5e308], [-1.5e308])])
def test_paired_test_refuses_differences_past_float64(a, b):
    with pytest.raises(ValueError, match=re.escape("a - b")):
        scoring.paired_test(a, b, n_boot=10)


@pytest.mark.parametrize("layer_auc, random_auc, name", [([-BIG64], BIG64, "random_auc"), ([1.5], 0.5, "layer_auc")])
def test_learned_weights_refuse_aucs_outside_0_1(layer_auc, random_auc, name):
    with pytest.raises(ValueError, match=name):
        analysis.learned_layer_weights(layer_auc, random_auc)


# ----------------------------------------------------------------------------- 0 is not a default
def test_synthetic_image_size_0_is_refused_not_replaced_by_64():
    with pytest.raises(ValueError, match="image_size"):
        data.get_dataset("synthetic", image_size=0, n=1)


def test_real_data_image_size_0_is_refused_not_replaced_by_224(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        data.get_dataset("imagenet", root=tmp_path, image_size=0)


def test_render_arrays_refuses_n_0():
    with pytest.raises(ValueError, match="n must"):
        data.render_arrays(lambda i: (np.zeros((16, 16, 3)), 0, np.zeros((16, 16), bool)), 0, workers=1)


def test_synthetic_n_true_is_not_one_image():
    with pytest.raises(ValueError, match="n must be a positive int"):
        data.SyntheticTextures("val", n=True)


def test_queries_tradeoff_n_images_0_is_refused_not_the_default():
    with pytest.raises(ValueError, match="n_images"):
        analysis.queries_tradeoff({"rise_masks": 10, "n_tradeoff": 2}, None, None, torch.zeros(1, 3, 8, 8),
                                  torch.zeros(1, dtype=torch.long), {}, 0, n_images=0)


def test_load_checkpoint_num_classes_0_is_refused_not_read_from_the_file(tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save({"model": {}, "meta": {"arch": "resnet18", "num_classes": 3}}, path)
    with pytest.raises(ValueError, match="num_classes"):
        models.load_checkpoint(path, num_classes=0)


# ----------------------------------------------------------------------------- profiles
@pytest.mark.parametrize("key, bad", [
    ("n_test", 0), ("n_transfer", 0), ("n_eval", 0), ("image_size", 0), ("num_classes", 1), ("rise_masks", -1),
    ("n_randomisation", -1), ("n_road", -1), ("holdout", 1.0), ("temperature", 0.0), ("teacher_lr", math.nan),
    ("teacher_pixel_dropout", 1.5), ("query_budget", 0),
])
def test_profile_refuses_out_of_range_numbers_by_key(key, bad):
    with pytest.raises(ProfileError, match=f"'{key}'"):
        Profile(**{key: bad})


@pytest.mark.parametrize("text", ["0\n", "[]\n", "false\n", "a: [\n"])
def test_profile_file_that_is_not_a_mapping_is_refused_by_name(tmp_path, text):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=re.escape(str(path))):
        Profile.from_yaml(path)


# ----------------------------------------------------------------------------- data
@pytest.mark.parametrize("masks", [np.zeros((1, 0, 0), bool), np.full((1, 2, 2), 2)])
def test_object_area_fractions_refuses_empty_or_non_binary_masks(masks):
    with pytest.raises(ValueError, match="masks"):
        data.object_area_fractions(masks)


def test_conflict_classes_needs_two_classes():
    with pytest.raises(ValueError, match="num_classes"):
        data.conflict_classes(0, "test", 0, first=0, num_classes=1)


def test_a_corrupt_cache_file_is_named(tmp_path):
    ds = data.SyntheticTextures("val", n=2, image_size=16, num_classes=4, cache_dir=tmp_path)
    buf = io.BytesIO()
    np.savez(buf, images=np.zeros((2, 16, 16, 3), np.uint8), labels=np.zeros(2), masks=np.zeros((2, 16, 16), bool))
    ds._cache_file().write_bytes(buf.getvalue()[:100])  # a write cut short: a truncated zip
    with pytest.raises(ValueError, match=re.escape(ds._cache_file().name)):
        ds.arrays(workers=1)


# ----------------------------------------------------------------------------- scorecard
@pytest.mark.parametrize("height, width, name", [(0, 10, "height"), (10, 0, "width")])
def test_scene_method_params_refuse_a_zero_side(height, width, name):
    with pytest.raises(ValueError, match=name):
        scorecard.scene_method_params(height, width)


def test_object_size_table_refuses_no_scenes():
    with pytest.raises(ValueError, match="masks"):
        scorecard.object_size_table(torch.zeros(0, 2, 4, 8, dtype=torch.bool))


def _scenes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    masks = torch.zeros(1, 2, 8, 16, dtype=torch.bool)
    masks[0, 0, :4, :4] = masks[0, 1, :4, 8:12] = True
    return torch.rand(1, 3, 8, 16), torch.tensor([[0, 1]]), masks


@pytest.mark.parametrize("name, bad", [("n_randomisation", -1), ("n_robustness", -2), ("n_road", -1)])
def test_run_scorecard_refuses_counts_before_explaining(name, bad):
    images, labels, masks = _scenes()
    with pytest.raises(ValueError, match=name):
        scorecard.run_scorecard(images, labels, masks, methods=["random"], blackbox=None, student=None,
                                **{name: bad})


def test_explain_scenes_refuses_no_methods():
    images, labels, masks = _scenes()
    with pytest.raises(ValueError, match="methods"):
        scorecard.explain_scenes(images, labels, masks, methods=[])


def test_conflict_fusion_refuses_a_negative_tolerance():
    with pytest.raises(ValueError, match="tolerance"):
        scorecard.select_fusion_conflict(None, pd.DataFrame(), *_scenes(), tolerance=-1.0)


def test_separation_table_refuses_alpha_outside_0_1():
    with pytest.raises(ValueError, match="alpha"):
        scorecard.separation_table(pd.DataFrame(), pd.DataFrame(), alpha=0.0)


# ----------------------------------------------------------------------------- evaluation and models
def _per_image() -> pd.DataFrame:
    return pd.DataFrame({"method": ["a", "a", "b", "b"], "image": [0, 1, 0, 1], "x": [1.0, 2.0, 3.0, 4.0]})


def test_compare_names_an_unknown_metric():
    with pytest.raises(ValueError, match="metric"):
        evaluation.compare(_per_image(), "a", "b", "nope")


def test_summarize_names_an_unknown_metric():
    with pytest.raises(ValueError, match="metrics"):
        evaluation.summarize(_per_image(), {}, metrics=["nope"])


@pytest.mark.parametrize("chunk, subset, name", [(0, None, "chunk"), (50, [], "subset")])
def test_run_methods_refuses_chunk_0_and_an_empty_subset(chunk, subset, name):
    with pytest.raises(ValueError, match=name):
        evaluation.run_methods(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long),
                               torch.zeros(2, 8, 8, dtype=torch.bool), methods=["random"], chunk=chunk,
                               subset=subset, subset_methods=["random"])


@pytest.mark.parametrize("content", [b"not a checkpoint", "list", "no model"])
def test_an_unreadable_checkpoint_is_named(tmp_path, content):
    path = tmp_path / "teacher.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save([1] if content == "list" else {"meta": {}}, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        models.load_checkpoint(path, arch="resnet18", num_classes=2)


def test_an_unreadable_weight_file_is_named(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        models.load_weights(_net(), path)


@pytest.mark.parametrize("images, batch_size, name", [(torch.rand(2, 3, 4, 4), 0, "batch_size"),
                                                      (torch.rand(0, 3, 4, 4), 8, "images")])
def test_predict_logits_refuses_batch_size_0_and_no_images(images, batch_size, name):
    with pytest.raises(ValueError, match=name):
        models.predict_logits(_net(), images, batch_size=batch_size)


# ----------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("sigma", [1e-300, 1e200])
def test_centre_bias_refuses_a_sigma_whose_square_is_not_a_float(sigma):
    with pytest.raises(ValueError, match="sigma"):
        center_saliency(torch.zeros(1, 3, 3, 3), sigma=sigma)


@pytest.mark.parametrize("kernel_width", [1e-200, 1e200])
def test_lime_refuses_a_kernel_width_whose_square_is_not_a_float(kernel_width):
    bb = BlackBox(_net(3 * 8 * 8), num_classes=2)
    with pytest.raises(ValueError, match="kernel_width"):
        lime(bb, torch.rand(1, 3, 8, 8), 0, n_samples=4, n_segments=4, kernel_width=kernel_width)


@pytest.mark.parametrize("name, bad", [("lr", math.inf), ("noise", math.inf), ("blur_sigma", math.nan)])
def test_meaningful_perturbation_refuses_non_finite_settings(name, bad):
    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=name):
        meaningful_perturbation(net, torch.rand(1, 3, 8, 8), 0, iters=1, **{name: bad})
