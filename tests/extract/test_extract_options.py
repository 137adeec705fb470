"""Extraction of bad images, and the options that change how features are computed or stored."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

import run_extract
from features.cache import open_split
from pipeline.common.preprocess import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.synthetic import make_tiny_imagenet
from tests.helpers import error_line, extract_args
from tests.extract.test_extract import dataset, extracted, read_all  # noqa: F401


# ---------------------------------------------------------------------------------------------
# Bad images


def test_undecodable_image_is_skipped_and_recorded_or_refused_with_strict(tmp_path, capsys):
    data = make_tiny_imagenet(tmp_path / "ds", num_classes=2, train_per_class=3, val_per_class=1)
    bad = "train/n01443537/images/n01443537_1.JPEG"
    (data / bad).write_bytes(b"")
    out = tmp_path / "features"
    assert run_extract.main(extract_args(data, out)) == 0

    with h5py.File(out / "train.h5", "r") as f:
        paths = list(f["paths"].asstr()[:])
        labels = f["labels"][:].tolist()
        wnids = list(f["class_wnids"].asstr()[:])
        assert f["features"].shape == (5, 4096)
        assert f.attrs["num_rows"] == 5 and f.attrs["num_skipped"] == 1
        skipped = json.loads(f.attrs["skipped"])
    assert bad not in paths and len(paths) == 5
    assert [wnids[label] for label in labels] == [p.split("/")[1] for p in paths]  # rows still line up
    assert len(skipped) == 1 and skipped[0]["path"] == bad and skipped[0]["reason"]
    assert open_split(out / "val.h5").attrs["num_skipped"] == 0

    capsys.readouterr()
    strict_out = tmp_path / "strict"
    assert run_extract.main(extract_args(data, strict_out, "--strict")) == 2
    line = error_line(capsys.readouterr().err)
    assert bad in line and "--strict" in line
    assert not (strict_out / "train.h5").exists()


def test_device_side_resize_path_gives_the_same_cache(dataset, extracted, tmp_path, monkeypatch):
    """The GPU data path (workers only decode; resize, crop and normalise on the device), run on the CPU:
    it must fill the cache with the same features as the CPU path."""
    from pipeline.extract import extractor as extract_module

    monkeypatch.setattr(extract_module, "resize_in_workers", lambda device: False)
    assert run_extract.main(extract_args(dataset, tmp_path / "device-path", "--shard-size", "8")) == 0
    for split in ("train", "val"):
        a = read_all(extracted / f"{split}.h5")["data"]
        b = read_all(tmp_path / "device-path" / f"{split}.h5")["data"]
        assert np.array_equal(a["labels"], b["labels"]) and np.array_equal(a["paths"], b["paths"])
        assert np.allclose(a["features"], b["features"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The options that change how features are computed or stored


def test_preprocessing_defaults_are_torchvision_s_alexnet_transform():
    """The defaults are AlexNet_Weights.IMAGENET1K_V1.transforms(): resize 256, crop 224, mean/std, bilinear."""
    from torchvision.models import AlexNet_Weights
    from torchvision.transforms import InterpolationMode

    from pipeline.common.config import ExtractConfig
    from pipeline.common.preprocess import Preprocess
    from pipeline.extract.loading import preprocess_of

    reference = AlexNet_Weights.IMAGENET1K_V1.transforms()
    ours = preprocess_of(ExtractConfig())
    assert ours == Preprocess()
    assert list(reference.resize_size) == [ours.resize_size] and list(reference.crop_size) == [ours.image_size]
    assert tuple(reference.mean) == ours.mean and tuple(reference.std) == ours.std
    assert reference.interpolation == InterpolationMode.BILINEAR and ours.mode == "crop"  # Preprocess resizes bilinear
    parser = run_extract.build_parser()  # sizes not given are the weights' own
    assert (parser.get_default("image_size"), parser.get_default("resize_size")) == (None, None)


def test_resize_mode_resize_squashes_the_whole_image(tmp_path):
    """--resize-mode resize: the whole image squashed to image-size (no crop), as Resize((S, S)) does."""
    data = make_tiny_imagenet(tmp_path / "ds", num_classes=2, train_per_class=2, val_per_class=1)
    big = data / "train/n02002724/images/n02002724_1.JPEG"
    Image.open(big).convert("RGB").resize((160, 96), Image.BICUBIC).save(big, quality=90)  # not square
    out = tmp_path / "features"
    assert run_extract.main(extract_args(data, out, "--image-size", "96", "--resize-mode", "resize")) == 0
    split = open_split(out / "train.h5")
    assert json.loads(split.attrs["preprocess"])["mode"] == "resize"
    reference_transform = transforms.Compose([transforms.Resize((96, 96)), transforms.ToTensor(),
                                              transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None).eval()
    x = torch.stack([reference_transform(Image.open(data / p).convert("RGB")) for p in split.paths])
    with torch.no_grad():
        reference = alexnet.classifier[:6](torch.flatten(alexnet.avgpool(alexnet.features(x)), 1))
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(split.read_features()), reference, dim=1)
    assert cosine.min() >= 0.9999, cosine


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_compression_stores_the_same_features(dataset, extracted, tmp_path, compression):
    out = tmp_path / "features"
    assert run_extract.main(extract_args(dataset, out, "--shard-size", "8", "--compression", compression)) == 0
    for split in ("train", "val"):
        with h5py.File(out / f"{split}.h5", "r") as f, h5py.File(extracted / f"{split}.h5", "r") as ref:
            assert f["features"].compression == compression
            np.testing.assert_array_equal(f["features"][:], ref["features"][:])  # lossless: bit for bit


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_extraction_is_close_to_fp32(dataset, extracted, tmp_path, precision):
    """bf16 and fp16 cast the backbone's weights once; their fc7 stays at cosine >= 0.999 to fp32's."""
    out = tmp_path / precision
    assert run_extract.main(extract_args(dataset, out, "--shard-size", "8", "--precision", precision)) == 0
    for split in ("train", "val"):
        low, ref = open_split(out / f"{split}.h5"), open_split(extracted / f"{split}.h5")
        assert low.attrs["precision"] == precision and low.attrs["dtype"] == "float32"
        assert low.paths == ref.paths
        cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(low.read_features()),
                                                       torch.from_numpy(ref.read_features()), dim=1)
        assert cosine.min() >= 0.999, cosine


@pytest.mark.parametrize("size, words", [("62", ("--image-size 62", "63")), ("100000", ("100000 px", "--image-size"))],
                         ids=["too-small", "batch-cannot-fit-in-memory"])
def test_an_image_size_out_of_reach_is_a_one_line_error(dataset, tmp_path, capsys, size, words):
    """--image-size 100000 asked for a 540 GB allocation and ended in a traceback."""
    capsys.readouterr()
    assert run_extract.main(extract_args(dataset, tmp_path / "features", "--image-size", size)) == 2
    line = error_line(capsys.readouterr().err)
    assert all(word in line for word in words), line
    assert not (tmp_path / "features" / "train.h5").exists()


# ---------------------------------------------------------------------------------------------
# Start-up


def test_a_one_shot_extraction_imports_without_collection_then_freezes_the_start_up(dataset, tmp_path, monkeypatch):
    """``python run_extract.py``: collection is off while torch imports (nothing made then is garbage), back on with
    every object alive frozen out of later walks before the backbone runs. Called as a function (the app, tests),
    run_extract.main leaves the collector alone; --prepare-only never turns it off."""
    import gc

    from pipeline.extract import extractor, freshness

    seen = {}
    real_look, real_extract = freshness.quick_look_applies, extractor.extract
    monkeypatch.setattr(freshness, "quick_look_applies", lambda config: (seen.setdefault("look", gc.isenabled()),
                                                                         real_look(config))[1])
    monkeypatch.setattr(extractor, "extract", lambda *a: (seen.setdefault("run", (gc.isenabled(), gc.get_freeze_count())),
                                                          real_extract(*a))[1])
    gc.unfreeze()
    try:
        monkeypatch.setattr("sys.argv", ["run_extract.py", *extract_args(dataset, tmp_path / "one-shot")])
        assert run_extract.main() == 0
        assert seen["look"] is False  # off before torch is imported
        assert seen["run"][0] is True and seen["run"][1] > 0 and gc.isenabled()  # on, the start-up frozen
    finally:
        gc.unfreeze()
    seen.clear()
    assert run_extract.main(extract_args(dataset, tmp_path / "called")) == 0
    assert seen["look"] is True and seen["run"] == (True, 0)
    monkeypatch.setattr("sys.argv", ["run_extract.py", "--data", str(dataset), "--prepare-only"])
    assert run_extract.main() == 0 and gc.isenabled() and gc.get_freeze_count() == 0
