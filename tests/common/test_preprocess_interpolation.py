"""Preprocess.interpolation: bicubic where the weights say so, and AlexNet's record unchanged byte for byte.

Also the one-pass LayerFeatures module's contract: always eval, any compute dtype.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from models.backbones import LayerFeatures, reduction_for
from pipeline.backbones.torchvision_family import load, plan
from pipeline.common.preprocess import Preprocess
from pipeline.data.synthetic import class_image
from tests.helpers import ROOT

COMPAT_CACHE = ROOT / "tests" / "data" / "compat" / "train.h5"  # made by main before this field existed
# what every AlexNet cache made before the interpolation field records
TODAYS_JSON = ('{"color": "RGB", "image_size": 224, "mean": [0.485, 0.456, 0.406], "mode": "crop", '
               '"resize_size": 256, "std": [0.229, 0.224, 0.225]}')


def images(size: int = 80, count: int = 2) -> torch.Tensor:
    """(count, 3, size, size) uint8 synthetic pictures."""
    return torch.stack([torch.from_numpy(class_image(i, i, size)).permute(2, 0, 1) for i in range(count)])


def test_bilinear_records_exactly_as_before():
    assert Preprocess().to_json() == TODAYS_JSON
    assert "interpolation" not in Preprocess(image_size=64, resize_size=72).to_dict()
    old = Preprocess.from_dict({"image_size": 224, "resize_size": 256, "mode": "crop", "mean": [0.485, 0.456, 0.406],
                                "std": [0.229, 0.224, 0.225], "color": "RGB"})  # an old cache: no key
    assert old == Preprocess() and old.interpolation == "bilinear"
    with h5py.File(COMPAT_CACHE, "r") as cache:
        recorded = cache.attrs["preprocess"]
    assert Preprocess.from_dict(json.loads(recorded)).to_json() == recorded


def test_bicubic_is_recorded_and_read_back():
    bicubic = Preprocess(resize_size=232, interpolation="bicubic")
    assert bicubic.to_dict()["interpolation"] == "bicubic"
    assert Preprocess.from_dict(bicubic.to_dict()) == bicubic
    assert bicubic.to_json() != Preprocess(resize_size=232).to_json()  # a cache check tells them apart
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(interpolation="nearest")


@pytest.mark.parametrize("size", [64, 300])  # an upscale and a downscale
def test_bicubic_resize_is_torchvisions(size):
    """The uint8 path equals torchvision's own resize(BICUBIC, antialias=True) then centre crop, bit for bit."""
    batch = images(size)
    preprocess = Preprocess(image_size=224, resize_size=256, interpolation="bicubic")
    expected = F.center_crop(F.resize(batch, [256], interpolation=InterpolationMode.BICUBIC, antialias=True), [224, 224])
    assert torch.equal(preprocess.resize_crop(batch), expected)
    assert not torch.equal(Preprocess().resize_crop(batch), expected)  # the field is honoured


def test_the_float_path_stays_in_range_and_near_the_uint8_path():
    """The device path (float resize) with bicubic: clamped to 0..255 and close to the uint8 path on average.

    Not equal: the uint8 path rounds and saturates between its horizontal and vertical passes, which moves
    hard edges (these pictures' stripes) by up to ~11 levels."""
    batch = images(64)
    preprocess = Preprocess(image_size=224, resize_size=256, interpolation="bicubic")
    floats = preprocess.resize_crop_float(batch)
    assert floats.min() >= 0 and floats.max() <= 255
    assert (floats - preprocess.resize_crop(batch).float()).abs().mean() < 1.0


def test_layer_features_stay_in_eval_and_take_any_dtype():
    loaded = load("mobilenet_v3_small", "random", seed=1)
    features, specs = plan(loaded.model, "mobilenet_v3_small", ["penultimate", "features.12"], image_size=64)
    features.train()  # dropout and BatchNorm statistics must not come back on
    assert not features.training and not any(module.training for module in features.modules())
    x = Preprocess(image_size=64, resize_size=72)(images(72))
    with torch.inference_mode():
        first, second = features(x), features(x)
        assert {k: v.shape for k, v in first.items()} == {s.name: (2, s.dim) for s in specs}
        assert all(torch.equal(first[k], second[k]) for k in first)
        half = features.to(torch.bfloat16)(x)  # the weights cast once; the input follows them
    assert all(v.dtype == torch.bfloat16 for v in half.values())
    cosine = torch.nn.functional.cosine_similarity(half["penultimate"].float(), first["penultimate"], dim=1)
    assert cosine.min() > 0.99


def test_shapes_without_a_reduction_are_refused():
    assert reduction_for((2, 197, 768)) is None  # tokens of a model with no class token
    assert reduction_for((2, 197, 768), class_token=True) == "class_token"
    assert reduction_for((2, 7, 7, 768), channels_last=True) == "mean_hw_channels_last"
    assert reduction_for((2, 768, 7, 7), channels_last=True) == "mean_hw"
    assert reduction_for((2, 3, 4, 5, 6)) is None
    with pytest.raises(ValueError):
        LayerFeatures(torch.nn.Sequential(torch.nn.Linear(2, 2)), {"x": ("0", "max")})
