"""Fidelity: a backbone's vectors equal plain torchvision's, for one model of each family.

The reference is what a practitioner would write: the PIL image through the weights' own ``transforms()``,
``create_feature_extractor`` at the node, then the pooling written out here. Ours: the pipeline's decoder
(``read_rgb``), the batched uint8 ``Preprocess`` made from the weights, and ``LayerFeatures``. Random
seeded weights, fp32, cosine >= 0.9999 per row. Images are few and small (a vit_b_16 image costs ~17.5
GFLOPs at the 224 it requires), so the file stays within seconds on a busy 2-core CPU.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.feature_extraction import create_feature_extractor

from pipeline.common.backbones.catalog import default_weights, load_classifier, plan_layers, preprocess_for
from pipeline.common.images import read_rgb
from pipeline.data.synthetic import class_image

MIN_COSINE = 0.9999
# (height, width): landscape, portrait and square, larger and smaller than the 224 crop
IMAGE_SHAPES = ((96, 128), (300, 240), (64, 64))


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    """JPEGs of the synthetic dataset's pictures, cut to several shapes."""
    folder = tmp_path_factory.mktemp("fidelity")
    paths = []
    for i, (height, width) in enumerate(IMAGE_SHAPES):
        pixels = class_image(i, i, size=max(height, width))[:height, :width]
        paths.append(folder / f"image_{i}.jpg")
        Image.fromarray(np.ascontiguousarray(pixels)).save(paths[-1], quality=90)
    return paths


@functools.lru_cache(maxsize=None)
def random_backbone(name: str):
    """The seeded random model, loaded once per name for the whole file (not modified by the tests)."""
    return load_classifier(name, "random", seed=0)


def reference(name: str, node: str, pooling, paths: list[Path]) -> torch.Tensor:
    """Plain torchvision: the weights' own transforms() on PIL images, create_feature_extractor, then ``pooling``."""
    transform = default_weights(name).transforms()
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
    extractor = create_feature_extractor(random_backbone(name).model, return_nodes=[node])
    with torch.inference_mode():
        return pooling(extractor(batch)[node]).float()


def ours(name: str, layers: list[str], paths: list[Path]) -> tuple[dict, dict[str, torch.Tensor]]:
    """({layer: LayerSpec}, {layer: (B, dim)}) through the pipeline's decoder, Preprocess and LayerFeatures."""
    model = random_backbone(name).model
    features, specs = plan_layers(model, name, layers)
    preprocess = preprocess_for(name)
    with torch.inference_mode():
        vectors = features(preprocess([read_rgb(path) for path in paths]))
    return {spec.name: spec for spec in specs}, vectors


def assert_close_rows(mine: torch.Tensor, theirs: torch.Tensor) -> None:
    assert mine.shape == theirs.shape
    cosine = torch.nn.functional.cosine_similarity(mine.double(), theirs.double(), dim=1)
    assert cosine.min().item() >= MIN_COSINE, cosine


def test_resnet18_penultimate_and_a_feature_map(image_files):
    """A CNN with BatchNorm: the penultimate is the 512-d flatten, a conv stage is averaged over H and W."""
    specs, vectors = ours("resnet18", ["penultimate", "layer3"], image_files)
    assert (specs["penultimate"].node, specs["penultimate"].dim) == ("flatten", 512)
    assert (specs["layer3"].reduction, specs["layer3"].dim) == ("mean_hw", 256)
    assert_close_rows(vectors["penultimate"], reference("resnet18", "flatten", lambda x: x, image_files))
    assert_close_rows(vectors["layer3"], reference("resnet18", "layer3", lambda x: x.mean((2, 3)), image_files))


def test_vit_b_16_class_token(image_files):
    """ViT: an encoder block's tokens give their class token; the penultimate is the head's input."""
    paths = image_files[:2]
    specs, vectors = ours("vit_b_16", ["penultimate", "encoder.ln"], paths)
    assert specs["encoder.ln"].reduction == "class_token" and specs["penultimate"].dim == 768
    theirs = reference("vit_b_16", "encoder.ln", lambda x: x[:, 0], paths)
    assert_close_rows(vectors["encoder.ln"], theirs)
    assert_close_rows(vectors["penultimate"], theirs)  # the head reads exactly the normed class token


def test_swin_t_channels_last_and_bicubic(image_files):
    """Swin: bicubic preprocessing from its weights, its (B, H, W, C) maps averaged over H and W."""
    assert preprocess_for("swin_t").interpolation == "bicubic"
    paths = image_files[:2]
    specs, vectors = ours("swin_t", ["penultimate", "norm"], paths)
    assert (specs["norm"].reduction, specs["norm"].dim) == ("mean_hw_channels_last", 768)
    theirs = reference("swin_t", "norm", lambda x: x.mean((1, 2)), paths)
    assert_close_rows(vectors["norm"], theirs)
    assert_close_rows(vectors["penultimate"], theirs)  # Swin's head pools its normed map the same way


def test_mobilenet_v3_small_penultimate(image_files):
    """A small CNN whose penultimate sits inside its classifier (after a Linear and Hardswish)."""
    specs, vectors = ours("mobilenet_v3_small", ["penultimate"], image_files)
    node = specs["penultimate"].node
    assert specs["penultimate"].dim == 1024
    assert_close_rows(vectors["penultimate"], reference("mobilenet_v3_small", node, lambda x: x, image_files))


def test_alexnet_layers_equal_the_fc7_backbone(image_files):
    """AlexNet's DeCAF names through the generic module equal today's AlexNetLayers, bit for bit."""
    from models import AlexNetLayers
    from pipeline.common.preprocess import Preprocess

    assert preprocess_for("alexnet") == Preprocess()  # today's transform, and its record unchanged
    specs, vectors = ours("alexnet", ["pool5", "fc6", "fc7", "penultimate"], image_files)
    assert {name: spec.dim for name, spec in specs.items()} == {"pool5": 9216, "fc6": 4096, "fc7": 4096, "penultimate": 4096}
    fc7_backbone = AlexNetLayers(random_backbone("alexnet").model)
    with torch.inference_mode():
        today = fc7_backbone.forward_layers(Preprocess()([read_rgb(p) for p in image_files]), ("pool5", "fc6", "fc7"))
    for name in ("pool5", "fc6", "fc7"):
        assert torch.equal(vectors[name], today[name]), name
    assert torch.equal(vectors["penultimate"], today["fc7"])
