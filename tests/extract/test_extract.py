"""Stage one end to end: run_extract.py fills an fc7 cache a user can trust.

Kept fast for a 2-core CPU: tiny generated datasets, random weights, and 64 px inputs wherever the
exact AlexNet transform is not what is being tested.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
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
from features.cache import CacheError, exclusive_writer, open_split
from pipeline.datasets.dataset import index_dataset
from pipeline.common.preprocess import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.synthetic import make_tiny_imagenet
from tests.conftest import CPU, FAST, error_line, extract_args
from tests.helpers import ROOT, h5_datasets, random_backbone


SETTING_ATTRS = ("backbone", "layer", "weights_fingerprint", "preprocess", "dtype", "precision", "dataset_signature")


def read_all(path: Path) -> dict:
    """Every dataset and attribute of a cache file, read with plain h5py."""
    with h5py.File(path, "r") as f:
        data = h5_datasets(f)
        attrs = dict(f.attrs)
    return {"data": data, "attrs": attrs}


def file_state(path: Path) -> tuple[int, int, bytes]:
    st = path.stat()
    return st.st_mtime_ns, st.st_ino, path.read_bytes()


@pytest.fixture(scope="module")
def dataset(tiny_dataset) -> Path:
    return tiny_dataset  # 3 classes x 4 train, 2 val per class (read-only)


@pytest.fixture(scope="module")
def extracted(tiny_cache) -> Path:
    return tiny_cache  # its finished cache, train in 2 shards (read-only: take cache_copy to change)


@pytest.fixture
def cache_copy(tiny_cache_copy) -> Path:
    return tiny_cache_copy


# ---------------------------------------------------------------------------------------------
# Fidelity


def test_features_equal_plain_torchvision_reference(tmp_path):
    """Default preprocessing (resize 256, crop 224) gives the features of the textbook torchvision pipeline."""
    data = make_tiny_imagenet(tmp_path / "ds", num_classes=2, train_per_class=2, val_per_class=1)
    # Tiny ImageNet is 64x64 (upscaled to 256); one larger, non-square image also checks the downscale
    big = data / "train/n02002724/images/n02002724_1.JPEG"
    Image.open(big).convert("RGB").resize((640, 560), Image.BICUBIC).save(big, quality=90)
    out = tmp_path / "features"
    rc = run_extract.main([*CPU, "--data", str(data), "--out", str(out), "--weights", "random", "--seed", "0",
                           "--no-progress", "--batch-size", "4", "--precision", "fp32"])
    assert rc == 0

    reference_transform = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None).eval()
    index = index_dataset(data)
    for split in ("train", "val"):
        with h5py.File(out / f"{split}.h5", "r") as f:
            features = f["features"][:]
            labels = f["labels"][:]
            paths = list(f["paths"].asstr()[:])
        assert paths == index.splits[split].paths  # relative to the dataset root, in index order
        assert labels.tolist() == index.splits[split].labels
        assert all(not Path(p).is_absolute() and (data / p).is_file() for p in paths)

        x = torch.stack([reference_transform(Image.open(data / p).convert("RGB")) for p in paths])
        with torch.no_grad():
            reference = alexnet.classifier[:6](torch.flatten(alexnet.avgpool(alexnet.features(x)), 1)).numpy()
        assert features.shape == reference.shape == (len(paths), 4096)
        assert features.dtype == np.float32
        norms = np.linalg.norm(features, axis=1) * np.linalg.norm(reference, axis=1)
        assert (norms > 0).all()
        cosine = (features * reference).sum(axis=1) / norms
        assert cosine.min() >= 0.9999, cosine
        np.testing.assert_allclose(features, reference, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# What the cache holds


def test_cache_content_is_complete_and_self_describing(dataset, extracted):
    index = index_dataset(dataset)
    fingerprint = random_backbone().fingerprint
    for split in ("train", "val"):
        path = extracted / f"{split}.h5"
        with h5py.File(path, "r") as f:  # plain h5py, no project code
            assert {"features", "labels", "paths", "class_wnids", "class_names"} <= set(f)
            n = len(index.splits[split])
            assert f["features"].shape == (n, 4096) and f["features"].dtype == np.float32
            assert f["labels"].shape == (n,) and f["labels"].dtype.kind == "i"
            assert list(f["paths"].asstr()[:]) == index.splits[split].paths
            assert f["labels"][:].tolist() == index.splits[split].labels
            assert list(f["class_wnids"].asstr()[:]) == index.wnids
            assert list(f["class_names"].asstr()[:]) == index.names == ["goldfish", "black stork", "walking stick"]
            features = f["features"][:]
            attrs = dict(f.attrs)
        assert (features >= 0).all() and (features.sum(axis=1) > 0).all()  # post-ReLU fc7, not zeros
        assert not np.array_equal(features[0], features[1])
        assert bool(attrs["complete"]) is True
        assert attrs["layer"] == "fc7" and attrs["backbone"] == "alexnet"
        assert attrs["weights_spec"] == "random:seed=0"
        assert attrs["weights_fingerprint"] == fingerprint
        assert attrs["num_rows"] == n and attrs["num_skipped"] == 0 and json.loads(attrs["skipped"]) == []
        assert attrs["dtype"] == "float32" and attrs["precision"] == "fp32"
        assert attrs["split"] == split and attrs["num_classes"] == 3 and attrs["feature_dim"] == 4096
        assert attrs["dataset_signature"] == index.signature(split)
        preprocess = json.loads(attrs["preprocess"])
        assert preprocess["image_size"] == 64 and preprocess["resize_size"] == 72 and preprocess["mode"] == "crop"
        assert preprocess["mean"] == list(IMAGENET_MEAN) and preprocess["std"] == list(IMAGENET_STD)

        opened = open_split(path)  # and the project's reader agrees
        assert opened.num_rows == n and opened.paths == index.splits[split].paths
        np.testing.assert_array_equal(opened.read_features(), features)
    assert not (extracted / ".train.parts").exists() and not (extracted / ".val.parts").exists()


# ---------------------------------------------------------------------------------------------
# Reruns


def test_rerun_is_up_to_date_and_leaves_the_files_alone(dataset, cache_copy, caplog):
    before = {split: file_state(cache_copy / f"{split}.h5") for split in ("train", "val")}
    time.sleep(0.01)
    caplog.set_level(logging.INFO)
    assert run_extract.main(extract_args(dataset, cache_copy, "--shard-size", "8")) == 0
    messages = [r.getMessage() for r in caplog.records]
    for split in ("train", "val"):
        assert any("up to date" in m and f"{split}.h5" in m for m in messages), messages
        assert file_state(cache_copy / f"{split}.h5") == before[split]
    assert not any("images in" in m for m in messages)  # nothing was extracted


def test_up_to_date_rerun_does_not_import_torch(dataset, cache_copy):
    """The rerun check is torch-free (importing torch takes seconds): it answers from the recorded settings."""
    code = ("import sys, run_extract; rc = run_extract.main(sys.argv[1:]); "
            "print('torch imported:', 'torch' in sys.modules); raise SystemExit(rc)")
    done = subprocess.run([sys.executable, "-c", code, *extract_args(dataset, cache_copy)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stdout
    assert "up to date" in done.stderr


def test_touched_weights_file_gets_the_full_check(dataset, tmp_path, caplog):
    """A weights file whose stamp changed is fingerprinted again: same tensors -> still up to date."""
    torch.manual_seed(0)
    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)
    args = ["--data", str(dataset), "--weights", str(weights), "--out", str(tmp_path / "out"), "--image-size", "64",
            "--resize-size", "72", "--no-progress", *CPU]
    assert run_extract.main(args) == 0
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))  # new mtime: the quick check cannot vouch
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert run_extract.main(args) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("train: up to date") and str(tmp_path / "out" / "train.h5") in m for m in messages), messages


def test_imagenet_file_name_is_torchvision_s():
    from pipeline.backbones.catalog import hub_file
    assert hub_file("alexnet", "imagenet") == os.path.basename(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url)


@pytest.mark.parametrize("option, value, changed", [
    ("--seed", "1", "weights_fingerprint"),
    ("--image-size", "80", "preprocess"),
    ("--dtype", "float16", "dtype"),
])
def test_mismatched_settings_need_overwrite(dataset, cache_copy, capsys, option, value, changed):
    before = file_state(cache_copy / "train.h5")
    old = read_all(cache_copy / "train.h5")
    old_attrs = old["attrs"]
    capsys.readouterr()
    rc = run_extract.main(extract_args(dataset, cache_copy, option, value))
    assert rc == 2
    line = error_line(capsys.readouterr().err)
    assert "--overwrite" in line and "train.h5" in line and changed in line
    assert file_state(cache_copy / "train.h5") == before  # the refused run touched nothing

    assert run_extract.main(extract_args(dataset, cache_copy, option, value, "--overwrite")) == 0
    for split in ("train", "val"):
        attrs = open_split(cache_copy / f"{split}.h5").attrs
        assert bool(attrs["complete"])
        assert attrs[changed] != old_attrs[changed]
    new = read_all(cache_copy / "train.h5")
    if option == "--seed":
        assert new["attrs"]["weights_spec"] == "random:seed=1"
        assert new["attrs"]["weights_fingerprint"] == random_backbone(seed=1).fingerprint
    elif option == "--image-size":
        assert json.loads(new["attrs"]["preprocess"])["image_size"] == 80
    else:  # --dtype float16: the same features, stored in half precision
        assert new["data"]["features"].dtype == np.float16 and new["data"]["features"].shape == (12, 4096)
        np.testing.assert_allclose(new["data"]["features"].astype(np.float32), old["data"]["features"],
                                   rtol=2e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Crash safety


def test_resume_after_kill_9_is_bit_identical(tmp_path, monkeypatch):
    data = make_tiny_imagenet(tmp_path / "ds", num_classes=3, train_per_class=8, val_per_class=1)
    out, reference = tmp_path / "resumed", tmp_path / "reference"
    # batches of 2 take ~0.1 s each on the CPU, so the kill lands well before train is done
    args = ["--data", str(data), *FAST, "--batch-size", "2", "--shard-size", "4"]
    parts = cache.parts_folder(out, "train")
    proc = subprocess.Popen([sys.executable, "run_extract.py", *args, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(parts.glob("shard-*.npz")):
            assert proc.poll() is None, f"extraction ended before the kill: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no shard was written in 120 s"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as `kill -9 PID` does
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert not (out / "train.h5").exists()
        done = cache.done_shards(parts)
        assert 0 < len(done) < 6  # 24 images in shards of 4: killed part-way

        # a partial extraction is never taken for a cache
        with pytest.raises(CacheError, match="interrupted"):
            open_split(out / "train.h5")
        # the lock died with the process, although its DataLoader worker may live on for a few seconds
        with exclusive_writer(out):
            pass
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the killed run's session: its leftover worker, if any
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stderr.close()

    written = []
    write_shard = cache.write_shard

    def recording_write_shard(parts_dir, shard, *rest, **kwargs):
        written.append((parts_dir.name, shard))
        return write_shard(parts_dir, shard, *rest, **kwargs)

    monkeypatch.setattr(cache, "write_shard", recording_write_shard)
    assert run_extract.main([*args, "--out", str(out)]) == 0
    # the rerun resumed: it computed only the shards the killed run had not finished
    assert sorted(s for name, s in written if name == ".train.parts") == sorted(set(range(6)) - done)
    monkeypatch.undo()
    assert run_extract.main([*args, "--out", str(reference)]) == 0
    for split in ("train", "val"):
        resumed, fresh = read_all(out / f"{split}.h5"), read_all(reference / f"{split}.h5")
        assert set(resumed["data"]) == set(fresh["data"])
        for name in fresh["data"]:
            assert np.array_equal(resumed["data"][name], fresh["data"][name]), name
        assert resumed["data"]["features"].shape == ((24 if split == "train" else 3), 4096)
        for key in (*SETTING_ATTRS, "num_rows", "num_skipped", "complete"):
            assert resumed["attrs"][key] == fresh["attrs"][key], key
    assert not parts.exists()


def test_partial_or_missing_files_are_rejected(tmp_path):
    missing = tmp_path / "none" / "train.h5"
    with pytest.raises(CacheError, match="no feature cache"):
        open_split(missing)

    partial = tmp_path / "train.h5"
    with h5py.File(partial, "w") as f:
        f.create_dataset("features", data=np.zeros((2, 4096), np.float32))
        f.create_dataset("labels", data=np.zeros(2, np.int64))
        f.create_dataset("paths", data=np.array(["a", "b"], dtype=object), dtype=cache.STR)
        f.create_dataset("class_wnids", data=np.array(["n1"], dtype=object), dtype=cache.STR)
        f.create_dataset("class_names", data=np.array(["one"], dtype=object), dtype=cache.STR)
        f.attrs["format_version"] = cache.FORMAT_VERSION
        f.attrs["num_rows"] = 2
        f.attrs["complete"] = False
    with pytest.raises(CacheError, match="not a complete feature cache"):
        open_split(partial)
    with h5py.File(partial, "a") as f:
        del f.attrs["complete"]
    with pytest.raises(CacheError, match="not a complete feature cache"):
        open_split(partial)

    garbage = tmp_path / "val.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(CacheError, match="not a readable HDF5 file"):
        open_split(garbage)


def test_an_incomplete_file_is_not_taken_as_up_to_date(dataset, cache_copy, capsys):
    with h5py.File(cache_copy / "train.h5", "a") as f:
        f.attrs["complete"] = False
    capsys.readouterr()
    assert run_extract.main(extract_args(dataset, cache_copy)) == 2
    line = error_line(capsys.readouterr().err)
    assert "incomplete" in line and "--overwrite" in line


def test_second_writer_is_refused(dataset, tmp_path, capsys):
    out = tmp_path / "features"
    with exclusive_writer(out):
        capsys.readouterr()
        rc = run_extract.main(extract_args(dataset, out))
        line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "another extraction" in line and f"pid {os.getpid()}" in line
    assert not (out / "train.h5").exists() and not (out / "val.h5").exists()
    with exclusive_writer(out):  # released when the holder is done: no stale lock
        pass
