"""Files a user already has keep working: a cache and a head checkpoint made by an earlier main.

The fixtures under tests/data/compat/ were made once by main at 0ae642e, and those under
tests/data/compat/0cda565/ (with their dataset) by main at 0cda565 (see their READMEs); they are never
regenerated: every later change must still read them, train on them, run live from them, and find the 0cda565
cache of its dataset up to date.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import run_extract
import run_train_head
import run_webcam
from features.cache import open_split
from tests.helpers import CPU_ARGS, ROOT

COMPAT = ROOT / "tests" / "data" / "compat"


def _digests() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(COMPAT.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """Copies of the fixtures (a run may take a lock file beside a cache); the originals are checked after."""
    before = _digests()
    root = tmp_path_factory.mktemp("compat")
    features = root / "features"
    features.mkdir()
    for name in ("train.h5", "val.h5"):
        shutil.copy2(COMPAT / name, features / name)
    shutil.copy2(COMPAT / "best.pt", root / "best.pt")
    yield {"root": root, "features": features, "best": root / "best.pt"}
    assert _digests() == before, "a test changed the committed compat fixtures"


def test_the_old_cache_reads(copies):
    train, val = open_split(copies["features"] / "train.h5"), open_split(copies["features"] / "val.h5")
    assert (train.num_rows, val.num_rows) == (12, 6)
    assert train.read_features().shape == (12, 4096)
    assert [int(label) for label in val.labels] == [0, 0, 1, 1, 2, 2]
    assert list(val.wnids) == ["n01443537", "n02002724", "n02231487"] and list(train.wnids) == list(val.wnids)
    assert list(val.names) == ["goldfish", "black stork", "walking stick"]


@pytest.mark.parametrize("head", ["linear", "logreg", "knn"])
def test_the_old_cache_trains_every_head(copies, head):
    out = copies["root"] / f"head-{head}"
    assert run_train_head.main([*CPU_ARGS, "--features", str(copies["features"]), "--out", str(out), "--head", head,
                                "--epochs", "1", "--no-progress"]) == 0
    assert (out / "run.json").is_file()


def test_the_old_checkpoint_runs_live_with_the_cached_answers(copies):
    """Live on the old checkpoint: the same rebuilt backbone (recorded weights spec and preprocessing) gives
    softmax(head(cached fc7)) for each val image."""
    predictions = copies["root"] / "preds.jsonl"
    assert run_webcam.main([*CPU_ARGS, "--checkpoint", str(copies["best"]), "--source", str(COMPAT / "val_images"),
                            "--no-display", "--predictions", str(predictions), "--top-k", "3"]) == 0
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(lines) == 6
    checkpoint = torch.load(copies["best"], map_location="cpu", weights_only=True)
    val = open_split(copies["features"] / "val.h5")
    fc7 = torch.from_numpy(val.read_features()).float()
    cached = torch.softmax(fc7 @ checkpoint["head"]["weight"].T + checkpoint["head"]["bias"], dim=1).numpy()
    names = list(val.names)
    for line, probs in zip(sorted(lines, key=lambda item: item["source"]), cached):
        top = line["topk"][0]
        assert top["name"] == names[int(np.argmax(probs))]
        assert top["prob"] == pytest.approx(float(probs.max()), abs=2e-3)  # the cache stores float16


# ---------------------------------------------------------------------------------------------
# The set made at 0cda565: a cache with per-row stamps (no content digests), with its dataset

COMPAT_0CDA565 = ROOT / "tests" / "data" / "compat" / "0cda565"
MADE_WITH = ("--weights", "random", "--seed", "0", "--image-size", "64", "--resize-size", "72", "--precision", "fp32",
             "--layers", "pool5,fc6,fc7", "--device", "cpu", "--no-progress")
MTIME = 1_764_000_000_000_000_000  # every file's mtime when the cache was made (README there)
# Another CPU kind computes the fc layers' float32 sums in another order: an AVX512-FP16 Xeon differed from the
# recorded cache by up to 1.3e-6 of a layer's largest value (pool5 equal); a changed preprocessing or cut moves
# them by 1e-3 or more.
FC_TOLERANCE = 1e-5


@pytest.fixture
def made_at_0cda565(tmp_path):
    """A copy of the 0cda565 dataset, its mtimes as they were, and of its cache."""
    data, features = tmp_path / "data", tmp_path / "features"
    shutil.copytree(COMPAT_0CDA565 / "data", data)
    shutil.copytree(COMPAT_0CDA565 / "features", features)
    for path in data.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(MTIME, MTIME))
    return {"data": data, "features": features}


def test_the_0cda565_cache_is_up_to_date_and_left_as_it_is(made_at_0cda565, caplog):
    """Its rows record no inode, ctime or digest: they are trusted on (path, size, mtime), as they were then."""
    before = {p.name: p.read_bytes() for p in made_at_0cda565["features"].glob("*.h5")}
    caplog.set_level(logging.INFO)
    assert run_extract.main(["--data", str(made_at_0cda565["data"]), "--out", str(made_at_0cda565["features"]),
                             *MADE_WITH]) == 0
    assert caplog.text.count("up to date") == 2
    assert {p.name: p.read_bytes() for p in made_at_0cda565["features"].glob("*.h5")} == before


def test_the_0cda565_cache_gets_its_digests_at_its_next_update(made_at_0cda565, caplog):
    data, features = made_at_0cda565["data"], made_at_0cda565["features"]
    old = open_split(features / "train.h5", "fc6")
    old_fc6 = dict(zip(old.paths, old.read_features()))
    shutil.copy(data / "train/n01443537/images/n01443537_0.JPEG", data / "train/n01443537/images/n01443537_9.JPEG")
    caplog.set_level(logging.INFO)
    assert run_extract.main(["--data", str(data), "--out", str(features), *MADE_WITH]) == 0
    assert "reused 12, extracted 1, dropped 0" in caplog.text and "val: up to date" in caplog.text
    new = open_split(features / "train.h5", "fc6")
    fc6 = dict(zip(new.paths, new.read_features()))
    assert all(np.array_equal(fc6[path], row) for path, row in old_fc6.items())
    with h5py.File(features / "train.h5", "r") as f:
        digests = dict(zip(f["paths"].asstr()[:], f["identity/sha256"][:]))
    assert all(bytes(digests[path]) == hashlib.sha256((data / path).read_bytes()).digest() for path in digests)


def test_the_0cda565_checkpoint_runs_live_with_its_recorded_probabilities(tmp_path):
    predictions = tmp_path / "preds.jsonl"
    shutil.copytree(COMPAT_0CDA565 / "data", tmp_path / "data")
    assert run_webcam.main([*CPU_ARGS, "--checkpoint", str(COMPAT_0CDA565 / "best.pt"), "--source",
                            str(tmp_path / "data/val/images"), "--no-display", "--predictions", str(predictions),
                            "--top-k", "3"]) == 0
    recorded = [json.loads(line) for line in (COMPAT_0CDA565 / "preds.jsonl").read_text().splitlines()]
    now = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [Path(line["source"]).name for line in now] == [Path(line["source"]).name for line in recorded]
    for got, want in zip(now, recorded):
        assert [t["wnid"] for t in got["topk"]] == [t["wnid"] for t in want["topk"]]
        # abs 1e-5, not bit for bit: the fc layers' float32 sums differ by CPU kind (see FC_TOLERANCE)
        assert [t["prob"] for t in got["topk"]] == pytest.approx([t["prob"] for t in want["topk"]], abs=1e-5)


def test_a_fresh_extraction_of_the_0cda565_images_equals_its_cache_bit_for_bit(made_at_0cda565, tmp_path):
    """AlexNet through the backbone package: pool5, fc6 and fc7 as the hand-cut AlexNet computed them, with the same
    weights fingerprint (and the 0ae642e cache's: the same seed, the same digest). On the CPU kind that made the
    cache they are equal bit for bit; elsewhere the float32 sums of the matrix products differ in their last bits
    (oneDNN picks its kernels by ISA), so each layer is compared to within FC_TOLERANCE of its largest value.
    test_cached_layers.py holds the bit-for-bit check against plain torchvision on the machine itself."""
    out = tmp_path / "fresh"
    assert run_extract.main(["--data", str(made_at_0cda565["data"]), "--out", str(out), *MADE_WITH]) == 0
    for split in ("train", "val"):
        with h5py.File(out / f"{split}.h5", "r") as new, h5py.File(COMPAT_0CDA565 / "features" / f"{split}.h5") as old:
            assert list(new["paths"].asstr()[:]) == list(old["paths"].asstr()[:])
            for layer in ("pool5", "fc6", "fc7"):
                now, then = new[layer][:], old[layer][:]
                assert np.abs(now - then).max() <= FC_TOLERANCE * np.abs(then).max(), (split, layer)
            assert new.attrs["weights_fingerprint"] == old.attrs["weights_fingerprint"]
            assert new.attrs["preprocess"] == old.attrs["preprocess"] and new.attrs["layers"] == old.attrs["layers"]
    with h5py.File(COMPAT / "train.h5", "r") as oldest:
        assert oldest.attrs["weights_fingerprint"] == open_split(out / "train.h5").attrs["weights_fingerprint"]
