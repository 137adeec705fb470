"""DeCAF's layers in the cache (issue #13): pool5, fc6 and fc7 from one backbone pass, one dataset each.

(tests/test_layers.py checks the code's architecture; this file is about the cached network layers.)
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

import run_extract
from features import cache
from features.cache import open_split
from models.backbones import LayerFeatures
from pipeline.backbones.catalog import entry
from pipeline.common.preprocess import IMAGENET_MEAN, IMAGENET_STD
from tests.helpers import ROOT, extract_args, extract_into, one_error_line

LAYERS = ("pool5", "fc6", "fc7")  # DeCAF's, in network order


@pytest.fixture(scope="module")
def data(generated_dataset) -> Path:
    return generated_dataset(2, 3, 1)  # read-only


@pytest.fixture(scope="module")
def all_layers(data, tmp_path_factory) -> Path:
    return extract_into(tmp_path_factory.mktemp("layers"), data, "--layers", "fc7,pool5,fc6")


def raw_bytes(path: Path, name: str) -> bytes:
    with h5py.File(path, "r") as f:
        return f[name][:].tobytes()


def test_the_cache_format_knows_no_backbone_s_layers():
    """The backbone's catalog entry names its layers; the cache stores any layer name (other backbones name theirs)."""
    assert not hasattr(cache, "LAYER_DATASETS") and tuple(entry("alexnet").layers)[:3] == LAYERS


def test_each_layer_equals_the_plain_torchvision_computation(data, all_layers):
    transform = transforms.Compose([transforms.Resize(72), transforms.CenterCrop(64), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None).eval()
    for split in ("train", "val"):
        path = all_layers / f"{split}.h5"
        with h5py.File(path, "r") as f:  # plain h5py: a dataset per layer, `features` links to fc7
            assert json.loads(f.attrs["layers"]) == ["pool5", "fc6", "fc7"]
            assert f.attrs["layer"] == "fc7" and f.attrs["feature_dim"] == 4096
            assert f.get("features", getlink=True).path == "/fc7"
            assert np.array_equal(f["features"][:], f["fc7"][:])
            paths = list(f["paths"].asstr()[:])
            stored = {name: f[name][:] for name in LAYERS}
        x = torch.stack([transform(Image.open(data / p).convert("RGB")) for p in paths])
        with torch.no_grad():
            pool5 = torch.flatten(alexnet.avgpool(alexnet.features(x)), 1)
            reference = {"pool5": pool5, "fc6": alexnet.classifier[:3](pool5), "fc7": alexnet.classifier[:6](pool5)}
        for name in LAYERS:
            assert stored[name].shape == (len(paths), entry("alexnet").layers[name].dim) and stored[name].dtype == np.float32
            cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(stored[name]), reference[name], dim=1)
            assert cosine.min() >= 0.9999, (name, cosine)
            np.testing.assert_array_equal(open_split(path, name).read_features(), stored[name])


def test_a_rerun_adds_a_layer_without_touching_the_others(data, tmp_path, monkeypatch, caplog):
    out = tmp_path / "features"
    assert run_extract.main(extract_args(data, out)) == 0  # fc7 only, the default
    before = {split: raw_bytes(out / f"{split}.h5", "fc7") for split in ("train", "val")}
    computed = []
    forward_layers = LayerFeatures.forward_layers
    monkeypatch.setattr(LayerFeatures, "forward_layers",
                        lambda self, x, layers: (computed.append(tuple(layers)), forward_layers(self, x, layers))[1])
    caplog.set_level(logging.INFO)
    assert run_extract.main(extract_args(data, out, "--layers", "pool5,fc7")) == 0
    assert set(computed) == {("pool5",)}  # the backbone's rows of the missing layer only are kept
    assert any("adding pool5" in r.getMessage() for r in caplog.records)
    for split in ("train", "val"):
        path = out / f"{split}.h5"
        assert raw_bytes(path, "fc7") == before[split]  # bit for bit
        split_file = open_split(path, "pool5")
        assert split_file.attrs["complete"] and json.loads(split_file.attrs["layers"]) == ["pool5", "fc7"]
        assert split_file.feature_dim == 9216 and not (split_file.read_features() == 0).all()
        assert not list(out.glob(f".{split}.parts*")) and not (out / f"{split}.h5.tmp").exists()


def test_a_layer_is_added_to_a_file_from_before_layers(data, all_layers, tmp_path):
    """Today's fc7-only files (fc7 as the dataset `features`, no `layers`) are read, and can gain layers."""
    out = tmp_path / "features"
    out.mkdir()
    for split in ("train", "val"):
        with h5py.File(all_layers / f"{split}.h5", "r") as new, h5py.File(out / f"{split}.h5", "w") as old:
            for name in ("labels", "paths", "class_wnids", "class_names"):
                new.copy(new[name], old, name=name)
            new.copy(new["fc7"], old, name="features")
            for key, value in new.attrs.items():
                if key != "layers":
                    old.attrs[key] = value
    fc7 = raw_bytes(out / "train.h5", "features")
    np.testing.assert_array_equal(open_split(out / "train.h5").read_features(),
                                  open_split(all_layers / "train.h5").read_features())
    assert run_extract.main(extract_args(data, out, "--layers", "fc6")) == 0
    assert raw_bytes(out / "train.h5", "fc7") == fc7
    assert json.loads(open_split(out / "train.h5").attrs["layers"]) == ["fc6", "fc7"]
    np.testing.assert_array_equal(open_split(out / "train.h5", "fc6").read_features(),
                                  open_split(all_layers / "train.h5", "fc6").read_features())


def test_layers_all_present_are_up_to_date_without_importing_torch(data, all_layers):
    code = ("import sys, run_extract; rc = run_extract.main(sys.argv[1:]); "
            "print('torch imported:', 'torch' in sys.modules); raise SystemExit(rc)")
    done = subprocess.run([sys.executable, "-c", code, *extract_args(data, all_layers, "--layers", "fc6,pool5")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stdout
    assert "train: up to date" in done.stderr and "val: up to date" in done.stderr


def test_an_unknown_layer_is_a_one_line_error(data, tmp_path, capsys):
    capsys.readouterr()
    assert run_extract.main(extract_args(data, tmp_path / "features", "--layers", "fc7,conv5")) == 2
    line = one_error_line(capsys)
    assert "alexnet has no layer 'conv5'" in line and "--list-layers alexnet" in line
    assert not (tmp_path / "features").exists()
