"""Every backbone promise, over a small list of each family (as timm's test_models.py runs over list_models):
fidelity to the family's own library, record and rebuild, precision, and the refusals of a mismatch.

The reference is what a practitioner would write with the library alone. torchvision: the PIL image through the
weights' own ``transforms()``, ``create_feature_extractor`` at the node, then the pooling written out here. timm:
``resolve_model_data_config`` -> ``create_transform`` -> ``forward_head(forward_features(x), pre_logits=True)``, or
``forward_intermediates`` and the head's pooling. open_clip: ``create_model_and_transforms`` ->
``encode_image(preprocess(image))``. Ours: ``open_backbone`` (the only way a stage gets a network), the pipeline's
decoder (``read_rgb``) and its batched uint8 ``Preprocess``. Random seeded weights, fp32, cosine >= 0.9999 per row.
Images are few and small (a vit_b_16 image costs ~17.5 GFLOPs at the 224 it requires), so the file stays within
seconds on a busy 2-core CPU. The timm and open_clip members need the zoo extra and skip, saying so, without it.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models.feature_extraction import create_feature_extractor

from pipeline.backbones.backbone import open_backbone, rebuild
from pipeline.backbones.precision import FIDELITY, choose_precision, place_backbone
from pipeline.common.errors import UserError
from pipeline.datasets.images import read_rgb
from pipeline.data.synthetic import class_image

MIN_COSINE = 0.9999
# (height, width): landscape, portrait and square, larger and smaller than the 224 crop
IMAGE_SHAPES = ((96, 128), (300, 240), (64, 64))


def alexnet_fc7(x):
    """AlexNet's DeCAF fc7 written out on torchvision's model: features -> avgpool -> fc6 -> fc7, post-ReLU."""
    return lambda model: model.classifier[:6](torch.flatten(model.avgpool(model.features(x)), 1))


def torchvision_reference(name: str, nodes: dict):
    """{layer: (node in plain torchvision, pooling)} -> reference(paths) -> ({layer: (B, dim)}, interpolation)."""
    def reference(paths):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()  # what --weights random --seed 0 means
        transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
        with torch.inference_mode():
            return ({layer: pooling(create_feature_extractor(model, return_nodes=[node])(batch)[node]).float()
                     for layer, (node, pooling) in nodes.items()}, transform.interpolation.value)
    return reference


def timm_reference(arch: str, blocks: dict):
    """{layer: (forward_intermediates index, pooling of its output)}, besides penultimate: plain timm."""
    def reference(paths):
        import timm

        torch.manual_seed(0)
        model = timm.create_model(arch).eval()
        config = timm.data.resolve_model_data_config(model)
        transform = timm.data.create_transform(**config)
        batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
        with torch.inference_mode():
            vectors = {"penultimate": model.forward_head(model.forward_features(batch), pre_logits=True)}
            for layer, (index, options, pooling) in blocks.items():
                vectors[layer] = pooling(model.forward_intermediates(batch, indices=[index], intermediates_only=True,
                                                                     **options)[0])
        return vectors, config["interpolation"]
    return reference


def open_clip_reference(arch: str):
    def reference(paths):
        import open_clip

        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(arch)
        batch = torch.stack([preprocess(Image.open(path)) for path in paths])
        with torch.inference_mode():
            return {"embedding": model.eval().encode_image(batch)}, preprocess.transforms[0].interpolation.value
    return reference


# name -> (the layers asked for, the family's own code for them): one model of each kind
FAMILY = {
    "alexnet": (("fc7", "pool5", "fc6", "penultimate"), torchvision_reference("alexnet", {
        "pool5": ("avgpool", lambda x: torch.flatten(x, 1)), "fc6": ("classifier.2", lambda x: x),
        "fc7": ("classifier.5", lambda x: x), "penultimate": ("classifier.5", lambda x: x)})),
    "resnet18": (("penultimate", "layer3"), torchvision_reference("resnet18", {
        "penultimate": ("flatten", lambda x: x), "layer3": ("layer3", lambda x: x.mean((2, 3)))})),
    "vit_b_16": (("penultimate", "encoder.ln"), torchvision_reference("vit_b_16", {  # exactly the normed class token
        "penultimate": ("encoder.ln", lambda x: x[:, 0]), "encoder.ln": ("encoder.ln", lambda x: x[:, 0])})),
    "swin_t": (("penultimate", "norm"), torchvision_reference("swin_t", {  # bicubic; (B, H, W, C) maps averaged
        "penultimate": ("norm", lambda x: x.mean((1, 2))), "norm": ("norm", lambda x: x.mean((1, 2)))})),
    # timm: a CNN (BatchNorm, crop_pct 0.95) and one of its stages, averaged over H and W
    "timm:resnet18": (("penultimate", "layer3"), timm_reference("resnet18", {
        "layer3": (3, {}, lambda x: x.mean((2, 3)))})),
    # a ViT whose head reads the class token, and a block asked for by index (-4: blocks.8), reduced to its class token
    "timm:vit_small_patch16_224": (("penultimate", "-4"), timm_reference("vit_small_patch16_224", {
        "blocks.8": (8, {"return_prefix_tokens": True}, lambda out: out[1][:, 0])})),
    # a ViT with no class token (one register token, mean pooling): a block is the mean of its patch tokens only
    "timm:vit_wee_patch16_reg1_gap_256": (("penultimate", "blocks.5"), timm_reference("vit_wee_patch16_reg1_gap_256", {
        "blocks.5": (5, {"output_fmt": "NLC"}, lambda x: x.mean(1))})),
    "open_clip:ViT-B-32": (("embedding",), open_clip_reference("ViT-B-32")),  # bicubic; its tokenizer is bundled
}
ZOO_INSTALLED = all(importlib.util.find_spec(package) for package in ("timm", "open_clip"))
NEEDS_ZOO = pytest.mark.skipif(not ZOO_INSTALLED, reason="the zoo extra is not installed: pip install -r "
                                                         "requirements-zoo.txt")
MEMBERS = [pytest.param(name, marks=NEEDS_ZOO) if ":" in name else name for name in FAMILY]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    """JPEGs of the synthetic dataset's pictures, cut to several shapes."""
    folder = tmp_path_factory.mktemp("family")
    paths = []
    for i, (height, width) in enumerate(IMAGE_SHAPES):
        pixels = class_image(i, i, size=max(height, width))[:height, :width]
        paths.append(folder / f"image_{i}.jpg")
        Image.fromarray(np.ascontiguousarray(pixels)).save(paths[-1], quality=90)
    return paths


@pytest.fixture(scope="module", params=MEMBERS)
def opened(request, image_files):
    """(name, the random seeded backbone with its layers, its vectors of the images: {layer: (B, dim)})."""
    name = request.param
    paths = image_files if name in ("alexnet", "resnet18", "timm:resnet18") else image_files[:2]
    backbone = open_backbone(name, "random", seed=0, layers=FAMILY[name][0], progress=False)
    with torch.inference_mode():
        vectors = backbone.module(backbone.preprocess([read_rgb(path) for path in paths]))
    return name, backbone, vectors, paths


def test_vectors_equal_the_familys_own_code(opened):
    name, backbone, vectors, paths = opened
    theirs, interpolation = FAMILY[name][1](paths)
    assert set(theirs) == set(vectors)  # a block asked for by index is recorded by its name
    for layer, reference in theirs.items():
        cosine = torch.nn.functional.cosine_similarity(vectors[layer].double(), reference.double(), dim=1)
        assert vectors[layer].shape == reference.shape == (len(paths), backbone.dims[layer]), layer
        assert cosine.min().item() >= MIN_COSINE, (layer, cosine)
    assert backbone.preprocess.interpolation == interpolation


def test_a_record_rebuilds_the_same_network(opened):
    """What a cache stores (``record()`` and the preprocessing) rebuilds the backbone: the same fingerprint and,
    bit for bit, the same vectors; a checkpoint's record (one layer's spec) rebuilds that layer alone."""
    name, backbone, vectors, paths = opened
    record = {**backbone.record(), "preprocess": backbone.preprocess.to_json()}
    again = rebuild(json.loads(json.dumps(record)))  # as read back from a file
    assert (again.fingerprint, again.weights, again.layers) == (backbone.fingerprint, "random:seed=0", backbone.layers)
    layer = backbone.layers[-1]
    one = rebuild({"backbone": name, "weights_spec": backbone.weights, "weights_fingerprint": backbone.fingerprint,
                   "layer_spec": layer.to_dict(), "preprocess": backbone.preprocess.to_dict()}, layers=(layer.name,))
    with torch.inference_mode():
        images = again.preprocess([read_rgb(path) for path in paths])
        assert all(torch.equal(again.module(images)[key], vectors[key]) for key in vectors)
        assert torch.equal(one.module(images)[layer.name], vectors[layer.name])


def test_precision_places_the_weights_once_and_auto_keeps_only_a_faithful_choice(opened):
    """bf16 (stubbed twice as fast) is chosen exactly when its vectors keep cosine >= FIDELITY to fp32's on every
    layer (random weights need not: random AlexNet's fc6 and fc7 fall to 0.7-0.9); placing casts every weight once."""
    name, backbone, vectors, paths = opened
    x = backbone.preprocess([read_rgb(path) for path in paths])
    layers = tuple(vectors)
    clock = {torch.float32: 1.0, torch.bfloat16: 0.5}
    record = choose_precision(backbone.module, lambda dtype: x.to(dtype), layers, torch.device("cpu"),
                              timer=lambda model, run: (run(model), clock[model.dtype])[1], flags={"avx512_bf16"})
    copied = copy.deepcopy(backbone.module)  # as auto's candidates are made: still in eval mode (no dropout)
    assert not any(module.training for module in copied.modules())
    half = place_backbone(copied, torch.device("cpu"), "bf16")
    assert half.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in half.parameters())
    with torch.inference_mode():
        out = half(x.to(torch.bfloat16))
    assert all(out[layer].shape == vectors[layer].shape and out[layer].isfinite().all() for layer in layers)
    assert 0 < record["cosine"]["bf16"] <= 1 and record["speed"]["bf16"] == 2.0
    assert record["chosen"] == ("bf16" if record["cosine"]["bf16"] >= FIDELITY else "fp32")


def test_mismatches_are_refused_in_one_line(opened):
    name, backbone, _, _ = opened
    record = {**backbone.record(), "preprocess": backbone.preprocess.to_json()}
    with pytest.raises(UserError, match=f"give a {name} with fingerprint") as refused:
        rebuild(record, weights="random", seed=1)  # other weights than the record's
    assert "\n" not in str(refused.value) and "--weights" in str(refused.value)
    with pytest.raises(UserError, match="has no layer 'nowhere'"):
        rebuild(record, layers=("nowhere",))
    other = "resnet18" if name != "resnet18" else "alexnet"
    with pytest.raises(UserError, match="cannot be|fingerprint|does not fit"):  # another model's weights record
        rebuild({**record, "backbone": other}, weights=backbone.weights)
    with pytest.raises(UserError, match="has no layer 'lyer4'|no layer 'lyer4'"):
        open_backbone(name, "random", layers=("lyer4",), progress=False)


def test_mobilenet_v3_small_penultimate_sits_inside_its_classifier(image_files):
    """A small CNN whose penultimate is after a Linear and Hardswish: found from the traced graph."""
    backbone = open_backbone("mobilenet_v3_small", "random", progress=False)
    (spec,) = backbone.layers
    assert (spec.name, spec.dim) == ("penultimate", 1024) and spec.node.startswith("classifier.")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small().eval()
    transform = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT.transforms()
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in image_files])
    with torch.inference_mode():
        theirs = create_feature_extractor(model, return_nodes=[spec.node])(batch)[spec.node]
        ours = backbone.module(backbone.preprocess([read_rgb(path) for path in image_files]))["penultimate"]
    assert torch.nn.functional.cosine_similarity(ours, theirs, dim=1).min() >= MIN_COSINE
