"""Extraction from a pack (issue #36): the same features, bit for bit, and the same labels as the folder, matched
by key; an incremental update of a re-packed dataset reuses the rows of unchanged samples; a kill resumes with
the finished shards kept; a damaged shard is one line and never a complete-looking cache."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import run_extract
from features import cache
from pipeline.data.synthetic import class_image
from pipeline.datasets.packs import key_of
from tests.helpers import extract_args, one_error_line

# pack shards of 3 and cache shards of 3, batches of 3: the folder's batches are the pack's
SHARDS = ("--shard-size", "3", "--batch-size", "3", "--workers", "1")


class Killed(BaseException):
    """A kill at this step: nothing in the project catches it."""


def extract(data: Path, out: Path, *extra: str) -> int:
    return run_extract.main(extract_args(data, out, *SHARDS, *extra))


def pack(data: Path, out: Path) -> None:
    assert run_extract.main(["--data", str(data), "--pack", str(out), "--shard-size", "3"]) == 0


def rows(out: Path, split: str) -> dict[str, tuple[np.ndarray, int]]:
    """{key: (fc7, label)} of a complete cache file; a folder's paths keyed as the pack keys them."""
    with h5py.File(out / f"{split}.h5", "r") as f:
        assert f.attrs["complete"]
        paths = [p.decode() for p in f["paths"][:]]
        keys = [p.split(".tar/", 1)[1] if ".tar/" in p else key_of(p) for p in paths]
        return {k: (v, int(label)) for k, v, label in zip(keys, f["fc7"][:], f["labels"][:])}


def assert_equal_rows(a: Path, b: Path) -> None:
    for split in ("train", "val"):
        ra, rb = rows(a, split), rows(b, split)
        assert list(ra) == list(rb), split
        for key in ra:
            assert np.array_equal(ra[key][0], rb[key][0]) and ra[key][1] == rb[key][1], (split, key)


@pytest.fixture(scope="module")
def sources(generated_dataset, tmp_path_factory) -> dict:
    """A dataset, its pack, and the caches of both. Read-only."""
    root = tmp_path_factory.mktemp("packed")
    data = generated_dataset(2, 4, 1)
    pack(data, root / "pack")
    assert extract(data, root / "folder-features") == 0
    assert extract(root / "pack", root / "pack-features") == 0
    return {"data": data, "pack": root / "pack", "folder": root / "folder-features", "packed": root / "pack-features"}


def test_a_pack_gives_the_folders_features_bit_for_bit_and_its_labels(sources):
    assert_equal_rows(sources["packed"], sources["folder"])
    with h5py.File(sources["packed"] / "train.h5", "r") as f:
        assert f["paths"][0].decode() == "train/000000.tar/train/n01443537/images/n01443537_0"  # SHARD/KEY


def test_a_repacked_dataset_updates_incrementally(sources, tmp_path, caplog):
    data, out = tmp_path / "ds", tmp_path / "features"
    shutil.copytree(sources["data"], data)
    shutil.copytree(sources["packed"], out)
    images = data / "train" / "n01443537" / "images"
    from PIL import Image
    for i in (7, 8, 9):  # added: they shift every later sample to another shard, and add a fourth shard
        Image.fromarray(class_image(0, 90 + i)).save(images / f"n01443537_{i}.JPEG", quality=90)
    (data / "train" / "n02002724" / "images" / "n02002724_3.JPEG").unlink()  # removed: its row dropped
    pack(data, tmp_path / "pack")
    assert len(list((tmp_path / "pack" / "train").glob("*.tar"))) == 4  # was 3
    caplog.set_level(logging.INFO)
    assert extract(tmp_path / "pack", out) == 0
    assert "reused 7, extracted 3, dropped 1" in caplog.text
    fresh = tmp_path / "fresh"
    assert extract(tmp_path / "pack", fresh) == 0
    old, new, want = rows(sources["packed"], "train"), rows(out, "train"), rows(fresh, "train")
    assert list(new) == list(want) and [v[1] for v in new.values()] == [v[1] for v in want.values()]
    for key in new:  # reused rows are the old file's, bit for bit; the new one is a fresh extraction's (another
        # batch composition: within float rounding, as for a folder's update)
        if key in old:
            assert np.array_equal(new[key][0], old[key][0]), key
        else:
            np.testing.assert_allclose(new[key][0], want[key][0], rtol=1e-4, atol=1e-5)


def test_a_kill_resumes_on_a_pack_keeping_the_finished_shards(sources, tmp_path, monkeypatch):
    out = tmp_path / "features"
    written = []
    real = cache.write_shard

    def killed_after_two(*args, **kwargs):
        if len(written) == 2:
            raise Killed
        written.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "write_shard", killed_after_two)
    with pytest.raises(Killed):
        extract(sources["pack"], out)
    monkeypatch.undo()
    assert not (out / "train.h5").exists()
    assert cache.done_shards(cache.parts_folder(out, "train")) == {0, 1}  # pack shards 0 and 1 of 3
    again = []
    monkeypatch.setattr(cache, "write_shard", lambda *args, **kwargs: (again.append(args[1]), real(*args, **kwargs)))
    assert extract(sources["pack"], out) == 0
    assert again == [2, 0]  # train: only its third shard is computed again; then val's one shard
    assert_equal_rows(out, sources["packed"])


def test_a_damaged_shard_is_one_line_and_never_a_complete_cache(sources, tmp_path, capsys):
    packed = tmp_path / "pack"
    shutil.copytree(sources["pack"], packed)
    shard = packed / "train" / "000001.tar"
    data = bytearray(shard.read_bytes())
    data[1500] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "features"
    assert extract(packed, out) == 2
    assert "train/000001.tar is damaged" in one_error_line(capsys)
    assert not (out / "train.h5").exists() and not (out / "val.h5").exists()
    shutil.copy(sources["pack"] / "train" / "000001.tar", shard)  # restored: the rerun finishes
    assert extract(packed, out) == 0
    assert_equal_rows(out, sources["packed"])
