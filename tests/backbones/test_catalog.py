"""Backbones by name: lookup, weights (random, file, the torchvision weights API), layers, sizes, batch sizes.

Structure-only checks run on meta-device models (no weights, no compute); the fidelity of the vectors is
tests/backbones/test_family.py.
"""
from __future__ import annotations

import functools
import hashlib
import os
import urllib.error

import pytest
import torch
import torchvision

import run_extract
from models import weights_fingerprint
from pipeline.backbones import catalog
from pipeline.backbones import torchvision_family as family
from pipeline.backbones.catalog import LayerSpec, check_name, default_batch_size, default_layers
from pipeline.common.errors import UserError

load_classifier = family.load


def plan_layers(model, name, layers=None, *, image_size=224):
    return family.plan(model, name, layers or default_layers(name), image_size=image_size)


def preprocess_for(name, weights=None, *, image_size=None, resize_size=None):
    spec = family.enum_name(weights) if weights is not None else "imagenet"
    return catalog.preprocess_of(name, spec, image_size=image_size, resize_size=resize_size)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@functools.lru_cache(maxsize=None)
def meta_model(name: str) -> torch.nn.Module:
    return family.structure(name)


def test_unknown_backbone_is_one_line_with_close_names_and_the_listing():
    with pytest.raises(UserError) as err:
        check_name("resnet05")
    message = one_line(err)
    assert "'resnet05'" in message and "resnet50" in message and catalog.LIST_BACKBONES in message
    with pytest.raises(UserError) as err:
        check_name("ResNet50")  # case is a typo too: the right spelling is offered
    assert "resnet50" in one_line(err)


def test_the_listing_is_torchvisions_classification_models(capsys):
    names = family.names()
    assert {"alexnet", "resnet50", "vit_b_16", "swin_t", "convnext_tiny", "efficientnet_b0"} <= set(names)
    assert not any(n.startswith(("fasterrcnn", "fcn_", "r3d", "raft", "quantized")) for n in names)
    assert run_extract.main(["--list-backbones"]) == 0
    assert "mobilenet_v3_large" in capsys.readouterr().out.split()
    assert run_extract.main(["--list-layers", "resnt18"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown backbone 'resnt18'; did you mean resnet18")


def test_without_the_zoo_extra_its_families_say_how_to_install_it(monkeypatch, capsys):
    """timm and open_clip as if not installed (what make test without requirements-zoo.txt meets): the listing keeps
    torchvision's names and says how to add the others; a zoo backbone is one line naming the extra."""
    import sys

    for package in ("timm", "open_clip"):
        monkeypatch.setitem(sys.modules, package, None)  # import fails as for a package that is not installed
    for module in ("pipeline.backbones.timm_family", "pipeline.backbones.open_clip_family"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    assert run_extract.main(["--list-backbones"]) == 0
    out = capsys.readouterr().out
    assert "torchvision (80):" in out and "resnet50" in out.split()
    assert "timm: not installed; pip install -r requirements-zoo.txt" in out
    assert "open_clip: not installed; pip install -r requirements-zoo.txt" in out
    assert run_extract.main(["--backbone", "timm:vit_small_patch14_dinov2.lvd142m", "--data", "nowhere"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: backbone 'timm:vit_small_patch14_dinov2.lvd142m' needs the timm family's "
                           "packages") and line.endswith("pip install -r requirements-zoo.txt")


def test_pretrained_is_imagenet_on_torchvision():
    """--weights pretrained (the default) names each model's DEFAULT weights, recorded as imagenet as always."""
    assert catalog.own_weights("resnet50", "pretrained") == "imagenet"
    assert catalog.own_weights("timm:resnet50.a1_in1k", "pretrained") == "pretrained"
    assert family.named_weights("resnet50", "pretrained") == torchvision.models.ResNet50_Weights.DEFAULT


def test_layer_listing_names_aliases_nodes_and_module_paths(capsys):
    assert run_extract.main(["--list-layers", "alexnet"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed[:4] == ["pool5", "fc6", "fc7", "penultimate"] and "classifier.5" in listed
    assert run_extract.main(["--list-layers", "resnet18"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed.index("layer4.1.relu_1") < listed.index("layer4") < listed.index("avgpool")


def test_default_layers_and_penultimate_nodes():
    """fc7 stays AlexNet's default; elsewhere the penultimate: the input of the last nn.Linear."""
    assert default_layers("alexnet") == ("fc7",) and default_layers("resnet50") == ("penultimate",)
    _, specs = plan_layers(meta_model("alexnet"), "alexnet", ["penultimate", "fc7", "pool5"])
    assert [s.to_dict() for s in specs] == [
        {"name": "penultimate", "node": "classifier.5", "reduction": "none", "dim": 4096},
        {"name": "fc7", "node": "classifier.5", "reduction": "none", "dim": 4096},
        {"name": "pool5", "node": "avgpool", "reduction": "flatten", "dim": 9216}]
    _, specs = plan_layers(meta_model("resnet18"), "resnet18")
    assert specs == [LayerSpec("penultimate", "flatten", "none", 512)]
    _, specs = plan_layers(meta_model("vit_b_16"), "vit_b_16", ["encoder.layers.encoder_layer_11", "penultimate"])
    assert [(s.reduction, s.dim) for s in specs] == [("class_token", 768), ("none", 768)]
    _, specs = plan_layers(meta_model("swin_t"), "swin_t", ["features.5", "permute"])
    assert [(s.reduction, s.dim) for s in specs] == [("mean_hw_channels_last", 384), ("mean_hw", 768)]


def test_unknown_node_is_one_line_with_the_nearest_nodes():
    with pytest.raises(UserError) as err:
        plan_layers(meta_model("alexnet"), "alexnet", ["fc8"])
    message = one_line(err)
    assert "no layer 'fc8'" in message and "fc7" in message and "python run_extract.py --list-layers alexnet" in message
    with pytest.raises(UserError) as err:
        plan_layers(meta_model("resnet18"), "resnet18", ["layer5"])
    assert "layer4" in one_line(err)


def test_a_model_without_a_linear_classifier_has_no_penultimate():
    with pytest.raises(UserError) as err:
        plan_layers(meta_model("squeezenet1_0"), "squeezenet1_0")
    assert "no single nn.Linear" in one_line(err)
    _, specs = plan_layers(meta_model("squeezenet1_0"), "squeezenet1_0", ["features.12.cat"])  # its features' output
    assert specs[0].reduction == "mean_hw" and specs[0].dim == 512


@pytest.mark.parametrize("name, node", [("mobilenet_v3_small", "features.12"), ("squeezenet1_0", "features.12.cat"),
                                        ("densenet121", "features.norm5")])
def test_the_cache_s_own_names_are_refused_naming_the_node_that_gives_the_same_output(name, node):
    """``features`` is the cache's link to its main layer, never a layer: a model's ``features`` module is asked
    for by the graph node that ends it, which gives the same output."""
    with pytest.raises(UserError) as err:
        plan_layers(meta_model(name), name, ["features"])
    message = one_line(err)
    assert "reserves the name 'features'" in message and "link to the main layer" in message, message
    assert f"pass --layers {node} instead" in message, message
    model = load_classifier(name, "random", seed=0).model
    module, specs = plan_layers(model, name, [node], image_size=64)
    image = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(module(image)[node], model.features(image).mean((2, 3)))  # the module's own output
    with pytest.raises(UserError) as err:
        plan_layers(meta_model("resnet18"), "resnet18", ["labels"])
    assert "reserves the name 'labels'" in one_line(err) and "--list-layers resnet18" in one_line(err)


def test_an_image_size_the_model_cannot_take_is_one_line():
    with pytest.raises(UserError) as err:
        plan_layers(meta_model("vit_b_16"), "vit_b_16", image_size=64)
    assert "--image-size 64" in one_line(err) and "224" in one_line(err)
    with pytest.raises(UserError) as err:  # AlexNet's third max-pool leaves nothing of 31 pixels
        plan_layers(meta_model("alexnet"), "alexnet", image_size=31)
    assert "--image-size 31 does not fit alexnet" in one_line(err)
    _, specs = plan_layers(meta_model("resnet18"), "resnet18", ["layer4"], image_size=64)
    assert specs[0].dim == 512  # CNNs with a global pool take smaller inputs


def test_preprocessing_follows_the_weights():
    resnet = preprocess_for("resnet50")  # ResNet50_Weights.IMAGENET1K_V2: resize 232, crop 224
    assert (resnet.resize_size, resnet.image_size, resnet.interpolation) == (232, 224, "bilinear")
    efficientnet = preprocess_for("efficientnet_b0")
    assert (efficientnet.resize_size, efficientnet.image_size, efficientnet.interpolation) == (256, 224, "bicubic")
    assert '"interpolation": "bicubic"' in efficientnet.to_json()
    small = preprocess_for("efficientnet_b0", image_size=64, resize_size=72)
    assert (small.image_size, small.resize_size, small.interpolation) == (64, 72, "bicubic")
    assert preprocess_for("resnet50", image_size=300).resize_size == 300  # never below the crop
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1  # an older recipe: resize 256
    assert preprocess_for("resnet50", weights).resize_size == 256


def test_random_weights_are_seeded_torchvision_models():
    loaded = load_classifier("resnet18", "random", seed=4)
    torch.manual_seed(4)
    expected = torchvision.models.resnet18()
    assert loaded.weights == "random:seed=4" and loaded.weights_enum == ""
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), expected.state_dict().values()))
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())


@pytest.fixture(scope="module")
def saved_resnet18(tmp_path_factory):
    """A seeded resnet18 state_dict under the exact file name torchvision's weights API expects."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    torch.manual_seed(7)
    model = torchvision.models.resnet18()
    name = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)  # resnet18-f37072fd.pth
    path = torch_home / "hub" / "checkpoints" / name
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    return torch_home, path, model


def test_imagenet_weights_come_from_the_hub_cache_and_record_the_exact_enum(saved_resnet18, monkeypatch):
    """The weights API reads a pre-filled $TORCH_HOME: no network. torch.hub checks the sha256 prefix in the
    name only when it downloads, so a cached file of other bytes loads (as here: the prefix is not ours)."""
    torch_home, path, model = saved_resnet18
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    prefix = path.stem.rsplit("-", 1)[1]
    assert not hashlib.sha256(path.read_bytes()).hexdigest().startswith(prefix)
    assert family.hub_path(torchvision.models.ResNet18_Weights.DEFAULT) == path
    loaded = load_classifier("resnet18", "imagenet", progress=False)
    assert (loaded.weights, loaded.weights_enum) == ("imagenet", "ResNet18_Weights.IMAGENET1K_V1")
    assert loaded.fingerprint == weights_fingerprint(model)
    exact = load_classifier("resnet18", "ResNet18_Weights.IMAGENET1K_V1", progress=False)
    assert (exact.weights, exact.weights_enum, exact.fingerprint) == (
        "ResNet18_Weights.IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", loaded.fingerprint)


def test_missing_imagenet_weights_offline_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """No file and no network: one line with the exact path, nothing written, never random weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as err:
        load_classifier("resnet18", "imagenet", progress=False)
    message = one_line(err)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in message and "ResNet18_Weights.IMAGENET1K_V1" in message and "--weights PATH" in message
    assert not expected.exists()


def test_a_damaged_file_in_the_hub_cache_is_one_line_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    damaged = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"<html>proxy login</html>")
    with pytest.raises(UserError) as err:
        load_classifier("resnet18", "imagenet", progress=False)
    assert f"{damaged} is not usable as ResNet18_Weights.IMAGENET1K_V1" in one_line(err) and "delete it" in one_line(err)
    assert damaged.read_bytes() == b"<html>proxy login</html>"  # the user's file is not touched


def test_weights_of_another_model_are_one_line():
    with pytest.raises(UserError) as err:
        load_classifier("resnet18", "ResNet50_Weights.IMAGENET1K_V2")
    assert "not resnet18's" in one_line(err) and "ResNet18_Weights.IMAGENET1K_V1" in one_line(err)


def test_a_weights_file_is_loaded_and_checked(saved_resnet18, tmp_path):
    _, path, model = saved_resnet18
    loaded = load_classifier("resnet18", str(path))
    assert loaded.weights == f"file:{path}" and loaded.fingerprint == weights_fingerprint(model)
    with pytest.raises(UserError) as err:
        load_classifier("resnet34", str(path))
    assert "does not fit torchvision's resnet34" in one_line(err)
    with pytest.raises(UserError) as err:
        load_classifier("resnet18", str(tmp_path / "missing.pth"))
    assert "weights file not found" in one_line(err)


def test_batch_size_defaults():
    assert default_batch_size("alexnet") == 64 and default_batch_size("alexnet", "cuda") == 256  # as today
    assert default_batch_size("vit_b_16") < default_batch_size("resnet50") <= default_batch_size("resnet18")
    assert default_batch_size("vit_b_16", "cuda", free_bytes=2 * 2**30) < default_batch_size("vit_b_16", "cuda",
                                                                                             free_bytes=100 * 2**30)
    assert default_batch_size("vit_h_14", "cuda", free_bytes=2**30) >= 8
