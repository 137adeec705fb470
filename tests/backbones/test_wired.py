"""Backbones other than AlexNet through the three commands: extract, heads (and a cross-backbone grid), live.

resnet18 at 64 px on a 3-class dataset of 9 images: its ImageNet weights come from a pre-filled $TORCH_HOME
(seeded tensors under torchvision's file name: no network), so the exact-enum path is the one tested.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision

import run_extract
import run_train_head
import run_webcam
from features.cache import open_split
from models import weights_fingerprint
from pipeline.backbones.torchvision_family import plan
from pipeline.common.config import ExtractConfig
from pipeline.datasets.images import read_rgb
from pipeline.common.preprocess import Preprocess
from pipeline.data.synthetic import make_tiny_imagenet
from pipeline.extract.loading import hub_name, preprocess_of, settle
from tests.conftest import CPU, one_error_line

SMALL = ("--image-size", "64", "--resize-size", "72", "--no-progress", "--precision", "fp32", *CPU)  # fp32: exact comparisons
RESNET18_FILE = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)  # resnet18-f37072fd.pth


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny dataset; its resnet18 cache (imagenet weights from a pre-filled TORCH_HOME, two layers) and
    AlexNet cache (random weights); a linear head on the resnet18 cache."""
    root = tmp_path_factory.mktemp("wired")
    torch_home = root / "torch_home"
    torch.manual_seed(7)
    model = torchvision.models.resnet18()
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(model.state_dict(), torch_home / "hub" / "checkpoints" / RESNET18_FILE)
    ds = make_tiny_imagenet(root / "ds", num_classes=3, train_per_class=2, val_per_class=1)
    r18, alex, head = root / "r18", root / "alex", root / "head"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(torch_home))
        assert run_extract.main(["--data", str(ds), "--out", str(r18), "--backbone", "resnet18",
                                 "--layers", "penultimate,layer3", *SMALL]) == 0
        assert run_train_head.main([*CPU, "--features", str(r18), "--out", str(head), "--epochs", "2",
                                    "--no-progress"]) == 0
    assert run_extract.main(["--data", str(ds), "--out", str(alex), "--weights", "random", *SMALL]) == 0
    return {"root": root, "ds": ds, "r18": r18, "alex": alex, "head": head, "torch_home": torch_home, "model": model}


def test_the_cache_records_the_backbone_its_exact_weights_layers_and_preprocessing(made):
    attrs = open_split(made["r18"] / "train.h5", "penultimate").attrs
    assert attrs["backbone"] == "resnet18" and attrs["weights_spec"] == "imagenet"
    assert attrs["weights_enum"] == "ResNet18_Weights.IMAGENET1K_V1" and attrs["weights_file"] == RESNET18_FILE
    assert attrs["weights_fingerprint"] == weights_fingerprint(made["model"])
    assert json.loads(attrs["weights_stamp"])["file"] == str(made["torch_home"] / "hub" / "checkpoints" / RESNET18_FILE)
    assert json.loads(attrs["layers_json"]) == [
        {"name": "penultimate", "node": "flatten", "reduction": "none", "dim": 512},
        {"name": "layer3", "node": "layer3", "reduction": "mean_hw", "dim": 256}]
    assert attrs["layer"] == "penultimate" and attrs["feature_dim"] == 512
    preset = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    preprocess = Preprocess.from_dict(json.loads(attrs["preprocess"]))
    assert (preprocess.image_size, preprocess.resize_size) == (64, 72)  # the sizes given replace the model's
    assert preprocess.mean == tuple(preset.mean) and preprocess.std == tuple(preset.std)
    assert preprocess.interpolation == preset.interpolation.value


def test_each_cached_row_is_the_backbone_modules_output(made):
    """The cache holds what the one-pass module (whose fidelity to torchvision is tests/backbones/test_family.py)
    computes for each image under the recorded preprocessing."""
    model = made["model"].eval()
    module, _ = plan(model, "resnet18", ["penultimate", "layer3"], image_size=64)
    for split in ("train", "val"):
        cached = {layer: open_split(made["r18"] / f"{split}.h5", layer) for layer in ("penultimate", "layer3")}
        preprocess = Preprocess.from_dict(json.loads(cached["layer3"].attrs["preprocess"]))
        images = [read_rgb(made["ds"] / rel) for rel in cached["layer3"].paths]
        with torch.inference_mode():
            expected = module(preprocess.normalize(preprocess.resize_crop(images)))
        for layer, split_cache in cached.items():
            np.testing.assert_allclose(split_cache.read_features(), expected[layer].numpy(), rtol=1e-4, atol=1e-5)


def test_defaults_follow_the_backbone():
    """Each backbone has its own --out and default layer; only the sizes given override the weights' own."""
    assert settle(ExtractConfig()).out == Path("runs/features") and settle(ExtractConfig()).layers == ("fc7",)
    config = settle(ExtractConfig(backbone="efficientnet_b1"))
    assert config.out == Path("runs/features-efficientnet_b1") and config.layers == ("penultimate",)
    preset = torchvision.models.EfficientNet_B1_Weights.DEFAULT.transforms()
    ours = preprocess_of(config)
    assert (ours.image_size, ours.resize_size, ours.interpolation) == (preset.crop_size[0], preset.resize_size[0],
                                                                       preset.interpolation.value)
    assert preprocess_of(ExtractConfig(backbone="efficientnet_b1", image_size=200)).image_size == 200
    assert hub_name(ExtractConfig(backbone="resnet18")) == RESNET18_FILE  # the file the quick look stats
    parser = run_extract.build_parser()
    for argv, out, layers in ((["--backbone", "resnet50"], "runs/features-resnet50", ("penultimate",)),
                              ([], "runs/features", ("fc7",))):
        args = vars(parser.parse_args(argv))
        config = settle(ExtractConfig(**{**args, "image_size": None, "resize_size": None}))  # as run_extract.main makes it
        assert (config.out, config.layers) == (Path(out), layers)


def test_a_rerun_is_up_to_date_and_an_unknown_backbone_or_layer_is_one_line(made, capsys, caplog, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(made["torch_home"]))
    caplog.set_level("INFO")
    before = (made["r18"] / "train.h5").stat().st_mtime_ns
    assert run_extract.main(["--data", str(made["ds"]), "--out", str(made["r18"]), "--backbone", "resnet18",
                             "--layers", "layer3", *SMALL]) == 0
    assert "up to date" in caplog.text and (made["r18"] / "train.h5").stat().st_mtime_ns == before
    capsys.readouterr()
    assert run_extract.main(["--backbone", "resnt18", "--data", str(made["ds"])]) == 2
    assert "did you mean resnet18" in one_error_line(capsys)
    out = made["root"] / "never"
    assert run_extract.main(["--data", str(made["ds"]), "--out", str(out), "--backbone", "resnet18", "--layers",
                             "lyer4", *SMALL]) == 2
    assert "no layer 'lyer4'; nearest: layer4" in one_error_line(capsys, allow_progress=True)
    assert not (out / "train.h5").exists()


def test_live_on_a_resnet18_head_gives_the_cached_answers(made, monkeypatch):
    """The checkpoint alone rebuilds resnet18 at its penultimate layer: each val image gets softmax(head(cached row))."""
    monkeypatch.setenv("TORCH_HOME", str(made["torch_home"]))
    checkpoint = torch.load(made["head"] / "best.pt", map_location="cpu", weights_only=True)
    assert (checkpoint["backbone"], checkpoint["weights_enum"]) == ("resnet18", "ResNet18_Weights.IMAGENET1K_V1")
    assert checkpoint["layer_spec"] == {"name": "penultimate", "node": "flatten", "reduction": "none", "dim": 512}
    predictions = made["root"] / "preds.jsonl"
    assert run_webcam.main([*CPU, "--checkpoint", str(made["head"] / "best.pt"), "--source",
                            str(made["ds"] / "val" / "images"), "--no-display", "--predictions", str(predictions),
                            "--top-k", "3"]) == 0
    lines = {Path(item["source"]).name: item for item in map(json.loads, predictions.read_text().splitlines())}
    val = open_split(made["r18"] / "val.h5", "penultimate")
    rows = torch.from_numpy(val.read_features())
    probs = torch.softmax(rows @ checkpoint["head"]["weight"].T + checkpoint["head"]["bias"], dim=1).numpy()
    assert len(lines) == len(probs) == 3
    for rel, expected in zip(val.paths, probs):
        top = lines[Path(rel).name]["topk"]
        assert [t["name"] for t in top] == [val.names[i] for i in np.argsort(-expected)]
        assert [t["prob"] for t in top] == pytest.approx(sorted(expected, reverse=True), abs=1e-4)


@pytest.mark.parametrize("weights, message", [
    ("random", "give a resnet18 with fingerprint"),
    ("AlexNet_Weights.IMAGENET1K_V1", "cannot be the resnet18 backbone this head was trained on"),
])
def test_live_refuses_another_backbone_in_one_line(made, capsys, weights, message):
    assert run_webcam.main([*CPU, "--checkpoint", str(made["head"] / "best.pt"), "--source",
                            str(made["ds"] / "val" / "images"), "--no-display", "--weights", weights]) == 2
    assert message in one_error_line(capsys)


def test_a_cache_mixing_backbones_is_one_line(made, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(made["r18"] / "train.h5", mixed / "train.h5")
    shutil.copy(made["alex"] / "val.h5", mixed / "val.h5")
    assert run_train_head.main([*CPU, "--features", str(mixed), "--layers", "penultimate", "--out",
                                str(tmp_path / "head"), "--no-progress"]) == 2
    assert "different backbones" in one_error_line(capsys)


def test_a_cross_backbone_grid_compares_them_in_one_table(made, tmp_path):
    out = tmp_path / "grid"
    assert run_train_head.main([*CPU, "--features", f"{made['alex']},{made['r18']}", "--out", str(out), "--head",
                                "linear,knn", "--k", "2", "--epochs", "1", "--no-progress"]) == 0
    with open(out / "experiments.csv") as f:
        table = list(csv.DictReader(f))
    assert {(r["backbone"], r["layer"], r["head"]) for r in table} == {
        ("alexnet", "fc7", "linear"), ("alexnet", "fc7", "knn"),
        ("resnet18", "penultimate", "linear"), ("resnet18", "penultimate", "knn")}
    assert {"alexnet_fc7_knn_all", "resnet18_penultimate_knn_all"} <= {p.name for p in out.iterdir()}
    assert "| backbone | layer |" in (out / "experiments.md").read_text()
    assert (out / "experiments.png").is_file() and (out / "best.pt").is_file()


def test_caches_of_different_datasets_and_backbones_each_train_on_their_own(made, tmp_path):
    """#33: --features may name caches of different datasets; each head reads its own cache's rows and classes."""
    other = make_tiny_imagenet(tmp_path / "other", num_classes=2, train_per_class=2, val_per_class=1)
    feats = tmp_path / "feats"
    assert run_extract.main(["--data", str(other), "--out", str(feats), "--weights", "random", *SMALL]) == 0
    out = tmp_path / "grid"
    assert run_train_head.main([*CPU, "--features", f"{made['r18']},{feats}", "--out", str(out), "--head", "knn",
                                "--k", "1", "--select", "val", "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "experiments.csv")))
    assert len(rows) == 2 and len({r["backbone"] for r in rows}) == 2
    records = [json.loads(p.read_text()) for p in sorted(out.rglob("result.json"))]
    assert sorted(r["cache"]["val"]["num_rows"] for r in records) == sorted(
        [len(open_split(made["r18"] / "val.h5", "penultimate").labels), len(open_split(feats / "val.h5").labels)])


def test_alexnet_refuses_another_models_weights_enum_in_one_line():
    from pipeline.backbones.backbone import open_backbone
    from pipeline.common.errors import UserError

    with pytest.raises(UserError) as err:
        open_backbone("alexnet", "ResNet18_Weights.IMAGENET1K_V1")
    assert "are not alexnet's" in str(err.value) and "\n" not in str(err.value)


def test_a_models_features_module_is_cached_under_the_node_the_refusal_names(generated_dataset, tmp_path, capsys):
    """mobilenet_v3_small's ``features`` module: the name is the cache's link, so --layers features is one line
    naming features.12 (the module's last node), and that node is cached under its own name."""
    out = tmp_path / "features"
    argv = ["--data", str(generated_dataset(3, 2, 1)), "--out", str(out), "--backbone", "mobilenet_v3_small",
            "--weights", "random", "--precision", "fp32", *SMALL]
    assert run_extract.main([*argv, "--layers", "features"]) == 2
    line = one_error_line(capsys, allow_progress=True)
    assert "reserves the name 'features'" in line and "pass --layers features.12 instead" in line, line
    assert not (out / "train.h5").exists()
    assert run_extract.main([*argv, "--layers", "features.12"]) == 0
    with h5py.File(out / "train.h5", "r") as f:
        assert f["features.12"].shape == (6, 576) and f.get("features", getlink=True).path == "/features.12"
        assert json.loads(f.attrs["layers_json"])[0]["node"] == "features.12"
