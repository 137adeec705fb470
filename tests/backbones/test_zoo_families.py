"""The zoo families' names, layers, preprocessing records, batch sizes and CLIP text tower (the listing without the
extra is tests/backbones/test_catalog.py's). Random weights, no network. Needs the zoo extra; skips, saying so, without it.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("timm", reason="the zoo extra is not installed: pip install -r requirements-zoo.txt")
pytest.importorskip("open_clip", reason="the zoo extra is not installed: pip install -r requirements-zoo.txt")

import torch  # noqa: E402

import run_extract  # noqa: E402
from pipeline.backbones import catalog, open_clip_family, timm_family  # noqa: E402
from pipeline.backbones.backbone import open_backbone  # noqa: E402
from pipeline.common.config import ExtractConfig  # noqa: E402
from pipeline.common.errors import UserError  # noqa: E402
from pipeline.common.preprocess import Preprocess  # noqa: E402
from pipeline.extract.loading import settle  # noqa: E402
from tests.conftest import one_error_line  # noqa: E402

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def test_the_listing_names_all_three_families_and_takes_a_pattern(capsys):
    assert run_extract.main(["--list-backbones", "dinov2"]) == 0
    out = capsys.readouterr().out
    assert "timm:vit_small_patch14_dinov2.lvd142m" in out.split() and "torchvision (0 of 80):" in out
    assert run_extract.main(["--list-backbones"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"resnet50", "timm:convnext_tiny.fb_in22k", "timm:resnet50.a1_in1k",
            "open_clip:ViT-B-32/laion2b_s34b_b79k"} <= set(listed)


def test_unknown_names_and_tags_are_one_line_with_close_names(capsys):
    assert run_extract.main(["--list-layers", "timm:vit_smal_patch16_224"]) == 2
    assert "did you mean timm:vit_small_patch16_224" in one_error_line(capsys)
    assert run_extract.main(["--list-layers", "timm:resnet18.nope"]) == 2
    assert "timm has no weights 'nope' for resnet18; its tags: a1_in1k" in one_error_line(capsys)
    assert run_extract.main(["--list-layers", "open_clip:ViT-B-32/nope"]) == 2
    assert "open_clip has no weights 'nope' for ViT-B-32; its tags:" in one_error_line(capsys)
    assert run_extract.main(["--list-layers", "keras:resnet50"]) == 2
    assert "unknown backbone family 'keras:'" in one_error_line(capsys)


def test_list_layers_names_what_each_family_offers(capsys):
    assert run_extract.main(["--list-layers", "timm:vit_small_patch16_224"]) == 0
    assert capsys.readouterr().out.split() == ["penultimate", *(f"blocks.{i}" for i in range(12))]
    assert run_extract.main(["--list-layers", "timm:resnet18"]) == 0
    assert capsys.readouterr().out.split() == ["penultimate", "act1", "layer1", "layer2", "layer3", "layer4"]
    assert run_extract.main(["--list-layers", "open_clip:ViT-B-32/laion2b_s34b_b79k"]) == 0
    assert capsys.readouterr().out.split() == ["embedding", "penultimate"]


def test_settle_resolves_indices_and_aliases_and_names_a_safe_folder():
    """Caches and checkpoints record names only: an index becomes its block's name, open_clip's penultimate its
    embedding, before anything is written; each backbone gets its own folder, one safe name."""
    config = settle(ExtractConfig(backbone="timm:vit_small_patch16_224", layers=("penultimate", "-4", "3")))
    assert config.layers == ("penultimate", "blocks.8", "blocks.3") and config.weights == "pretrained"
    assert config.out == Path("runs/features-timm-vit_small_patch16_224")
    config = settle(ExtractConfig(backbone="open_clip:ViT-B-32/laion2b_s34b_b79k", layers=("penultimate",)))
    assert config.layers == ("embedding",) and config.out == Path("runs/features-open_clip-ViT-B-32-laion2b_s34b_b79k")
    assert settle(ExtractConfig(backbone="open_clip:ViT-B-32")).layers == ("embedding",)
    assert catalog.default_out("timm:vit_small_patch14_dinov2.lvd142m").name == "features-timm-vit_small_patch14_dinov2.lvd142m"
    with pytest.raises(UserError, match="has 12 blocks, so no block 12; use 0 to 11 or -12 to -1"):
        settle(ExtractConfig(backbone="timm:vit_small_patch16_224", layers=("12",)))


def test_layer_refusals_say_what_the_model_offers():
    with pytest.raises(UserError, match=r"has no layer 'blocks\.99'; nearest: blocks\.9"):
        open_backbone("timm:vit_small_patch16_224", "random", layers=("blocks.99",), progress=False)
    with pytest.raises(UserError, match="it offers embedding .* intermediate blocks of open_clip towers are not"):
        open_backbone("open_clip:ViT-S-32-alt", "random", layers=("blocks.3",), progress=False)
    with pytest.raises(UserError, match="position embeddings take only 224x224 inputs; use --image-size 224"):
        open_backbone("timm:vit_small_patch16_224", "random", image_size=112, progress=False)
    model = torch.nn.Linear(2, 2)  # a model without forward_intermediates: one line listing what it offers
    with pytest.raises(UserError, match="has no forward_intermediates, so no layer 'layer3'; it offers: penultimate"):
        timm_family._node_of(model, "timm:x", "layer3", timm_family.block_names(model))


@pytest.mark.parametrize("data, expected", [
    ({"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.95, "crop_mode": "center"},
     dict(image_size=224, resize_size=235, mode="crop", interpolation="bicubic")),  # floor(235.79)
    ({"input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 0.875},
     dict(image_size=224, resize_size=256, mode="crop", interpolation="bilinear")),
    ({"input_size": (3, 518, 518), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center"},
     dict(image_size=518, resize_size=518, mode="crop", interpolation="bicubic")),
    ({"input_size": (3, 384, 384), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "squash"},
     dict(image_size=384, resize_size=384, mode="resize", interpolation="bicubic")),
])
def test_timm_records_become_the_projects_preprocessing(data, expected):
    """crop_pct sizes the resize as timm's transforms_imagenet_eval does (math.floor), squash is a resize."""
    record = {**data, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    assert timm_family.to_preprocess(record, "timm:x") == Preprocess(**expected, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.mark.parametrize("change, words", [({"crop_mode": "border"}, "crop_mode border"),
                                           ({"crop_mode": "squash", "crop_pct": 0.9}, "crop_mode squash with crop_pct 0.9"),
                                           ({"interpolation": "nearest"}, "nearest interpolation"),
                                           ({"input_size": (3, 224, 320)}, "a 224x320 input")])
def test_a_timm_record_the_project_does_not_run_is_one_line(change, words):
    record = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
              "mean": (0.5,) * 3, "std": (0.5,) * 3, **change}
    with pytest.raises(UserError, match=f"timm:x's preprocessing has {words}, which this project does not run"):
        timm_family.to_preprocess(record, "timm:x")


def test_presets_follow_the_weights_own_records():
    assert catalog.preprocess_of("timm:vit_small_patch14_dinov2.lvd142m", "pretrained") == Preprocess(
        image_size=518, resize_size=518, interpolation="bicubic")  # ImageNet mean and std, crop_pct 1.0
    assert catalog.preprocess_of("timm:resnet18.a1_in1k", "pretrained").resize_size == 235
    assert catalog.preprocess_of("open_clip:ViT-B-32/laion2b_s34b_b79k", "pretrained") == Preprocess(
        image_size=224, resize_size=224, interpolation="bicubic", mean=OPENAI_MEAN, std=OPENAI_STD)
    assert catalog.preprocess_of("timm:resnet18.a1_in1k", "pretrained", image_size=160).image_size == 160


def test_batch_sizes_follow_the_models_cost_and_the_free_memory():
    """DINOv2 ViT-S at its 518 px costs ~47 GFLOPs an image, ResNet-18 at 224 ~1.8, CLIP ViT-B/32 ~4.4."""
    plenty = 64 * 2**30
    assert timm_family.default_batch_size("timm:vit_small_patch14_dinov2.lvd142m", "cpu", plenty) == 8
    assert timm_family.default_batch_size("timm:resnet18.a1_in1k", "cpu", plenty) == 64
    assert open_clip_family.default_batch_size("open_clip:ViT-B-32/laion2b_s34b_b79k", "cpu", plenty) == 32
    assert timm_family.default_batch_size("timm:resnet18.a1_in1k", "cpu", 200 * 2**20) == 8  # little memory left
    assert timm_family.default_batch_size("timm:vit_small_patch14_dinov2.lvd142m", "cuda", 80 * 2**30) == 128


def test_the_text_tower_gives_l2_normalisable_class_vectors_for_the_recorded_weights():
    backbone = open_backbone("open_clip:ViT-B-32", "random", progress=False)
    record = {**backbone.record(), "preprocess": backbone.preprocess.to_json()}
    tower = open_clip_family.text_tower(record)
    assert tower.fingerprint == backbone.fingerprint
    vectors = tower.encode_text(["a photo of a goldfish.", "a photo of a black stork.", "a photo of a walking stick."])
    assert vectors.shape == (3, backbone.dims["embedding"]) and vectors.isfinite().all()
    normed = torch.nn.functional.normalize(vectors, dim=1)
    assert torch.allclose(normed.norm(dim=1), torch.ones(3)) and (normed @ normed.T).triu(1).abs().max() < 0.9999
    assert math.isclose(tower.logit_scale, math.log(1 / 0.07), rel_tol=1e-6)  # CLIP's initial temperature
    with pytest.raises(UserError, match="fingerprint"):
        open_clip_family.text_tower(record, weights="random", seed=1)  # other weights than the record's
    resnet = open_backbone("resnet18", "random", progress=False)
    with pytest.raises(UserError, match="resnet18 is not a CLIP model, so it has no text tower"):
        open_clip_family.text_tower({**resnet.record(), "preprocess": resnet.preprocess.to_json()})
