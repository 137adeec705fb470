"""``run_extract.py --data DIR --pack OUT`` (issue #36): tar shards of the original bytes and a manifest, read
back by ``--data OUT`` with the split made when packing; and its faults: a full disk or a kill while packing
leaves no manifest (nothing that looks complete) and keeps a pack that was there, a damaged or truncated shard
is one line."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

import pipeline.data.pack as pack_module
import run_extract
from pipeline.datasets.dataset import index_dataset
from pipeline.datasets.holdout import in_val
from pipeline.datasets.packs import PackDamaged, check_shard, key_of, path_of, read_manifest
from tests.helpers import one_error_line
from tests.imagefolders import make_flat, write_class


def pack(data: Path, out: Path, *extra: str) -> int:
    return run_extract.main(["--data", str(data), "--pack", str(out), *extra])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def packed(generated_dataset, tmp_path_factory) -> dict:
    """A 2-class Tiny ImageNet (4 train, 1 val per class) packed in shards of 3. Read-only."""
    data = generated_dataset(2, 4, 1)
    out = tmp_path_factory.mktemp("pack") / "packed"
    assert pack(data, out, "--shard-size", "3") == 0
    return {"data": data, "out": out, "manifest": read_manifest(out)}


def test_packing_writes_the_original_bytes_as_key_ext_and_key_cls_with_a_manifest(packed):
    data, out, manifest = packed["data"], packed["out"], packed["manifest"]
    folder = index_dataset(data)
    assert manifest["format"] == "fc7-pack" and manifest["version"] == 1
    assert [c["id"] for c in manifest["classes"]] == folder.wnids
    assert [c["full_name"] for c in manifest["classes"]] == folder.full_names
    assert manifest["split_rule"]["rule"] == "folders"
    for split in ("train", "val"):
        shards = manifest["splits"][split]["shards"]
        assert [s["name"] for s in shards] == [f"{split}/{i:06d}.tar" for i in range(len(shards))]
        assert sorted(p.name for p in (out / split).iterdir()) == [s["name"].split("/")[1] for s in shards]
        assert [s["samples"] for s in shards[:-1]] == [3] * (len(shards) - 1)
        rels, labels = [], []
        for shard in shards:
            path = out / shard["name"]
            assert shard["bytes"] == path.stat().st_size and shard["sha256"] == sha256(path)
            with tarfile.open(path) as tar:
                members = tar.getmembers()
                assert [m.name for m in members] == [f"{k}.{e}" for k, e in zip(shard["keys"], shard["extensions"])
                                                     for e in (e, "cls")]
                for member, offset in zip(members[::2], shard["offsets"]):
                    assert member.offset_data == offset
                for key, member, cls in zip(shard["keys"], members[::2], members[1::2]):
                    rel = path_of(key) + ".JPEG"
                    assert tar.extractfile(member).read() == (data / rel).read_bytes()  # never re-encoded
                    rels.append(rel)
                    labels.append(int(tar.extractfile(cls).read()))
        assert rels == folder.splits[split].paths and labels == folder.splits[split].labels  # the index's order


def test_a_pack_reads_as_the_folder_did_and_packing_again_gives_the_same_shards(packed, tmp_path):
    dataset, folder = index_dataset(packed["out"]), index_dataset(packed["data"])
    assert dataset.layout == "pack" and dataset.wnids == folder.wnids and dataset.names == folder.names
    for split in ("train", "val"):
        paths = dataset.splits[split].paths
        assert [p.split(".tar/", 1)[1] for p in paths] == [key_of(p) for p in folder.splits[split].paths]
        assert paths[0].startswith(f"{split}/000000.tar/")  # SHARD/KEY
        assert dataset.splits[split].labels == folder.splits[split].labels
        assert dataset.read_bytes(paths[-1]) == (packed["data"] / folder.splits[split].paths[-1]).read_bytes()
    summary = tmp_path / "prep.json"
    assert run_extract.main(["--data", str(packed["out"]), "--prepare-only", "--no-progress", "--summary-json",
                             str(summary)]) == 0  # every sample decoded once
    prep = json.loads(summary.read_text())
    assert prep["layout"] == "pack" and prep["splits"]["train"]["images"] == 8 and not prep["skipped"]
    assert pack(packed["data"], tmp_path / "again", "--shard-size", "3") == 0
    again = read_manifest(tmp_path / "again")
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in packed["manifest"]["splits"]["train"]["shards"]]
    assert pack(tmp_path / "again", tmp_path / "repacked", "--shard-size", "3") == 0  # a pack packed again
    repacked = read_manifest(tmp_path / "repacked")
    for split in ("train", "val"):
        assert [s["sha256"] for s in repacked["splits"][split]["shards"]] == \
            [s["sha256"] for s in packed["manifest"]["splits"][split]["shards"]]
    assert repacked["split_rule"] == packed["manifest"]["split_rule"]


def test_one_imagefolder_is_split_when_packing_and_the_rule_is_recorded(tmp_path):
    data = make_flat(tmp_path / "flat", classes=("cat", "dog"), per_class=12)
    write_class(data / "dog", 1, 1, start=50, suffix=".png")
    (data / "dog" / "img_051.v2.jpg").write_bytes((data / "dog" / "img_000.jpg").read_bytes())  # a dot in the name
    assert pack(data, tmp_path / "packed", "--val-fraction", "0.25") == 0
    manifest = read_manifest(tmp_path / "packed")
    assert manifest["split_rule"]["rule"] == "hash" and manifest["split_rule"]["val_fraction"] == 0.25
    dataset = index_dataset(tmp_path / "packed", val_fraction=0.9)  # reading does not split again
    folder = index_dataset(data, val_fraction=0.25)
    for split in ("train", "val"):
        keys = [p.split(".tar/", 1)[1] for p in dataset.splits[split].paths]
        assert keys == [key_of(p) for p in folder.splits[split].paths]
        assert all(in_val(p, 0.25) == (split == "val") for p in folder.splits[split].paths)
    assert any(p.endswith("/dog/img_051%2Ev2") for split in dataset.splits.values() for p in split.paths)
    assert any(e == "png" for s in ("train", "val") for sh in manifest["splits"][s]["shards"] for e in sh["extensions"])


def test_skips_are_listed_in_the_manifest_as_the_index_lists_them(tmp_path, capsys):
    data = make_flat(tmp_path / "flat", classes=("cat", "dog"), per_class=6)
    (data / "cat" / "photo.heic").write_bytes(b"not read")
    assert pack(data, tmp_path / "packed") == 0
    manifest = read_manifest(tmp_path / "packed")
    skipped = manifest["splits"]["train"]["skipped"] + manifest["splits"]["val"]["skipped"]
    assert [s["path"] for s in skipped] == ["cat/photo.heic"] and "HEIC" in skipped[0]["reason"]
    dataset = index_dataset(tmp_path / "packed")
    assert [s["path"] for split in dataset.splits.values() for s in split.excluded] == ["cat/photo.heic"]


def test_wrong_targets_and_two_formats_of_one_name_are_one_line(packed, tmp_path, capsys):
    data = packed["data"]
    assert pack(data, tmp_path / "a", "--out", str(tmp_path / "f")) == 2
    assert "drop --out" in one_error_line(capsys)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert pack(data, tmp_path / "busy") == 2
    assert "holds other files" in one_error_line(capsys)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    flat = make_flat(tmp_path / "flat", classes=("cat", "dog"), per_class=4)
    assert pack(flat, flat / "cat" / "packed") == 2
    assert "inside the dataset" in one_error_line(capsys)
    write_class(flat / "dog", 1, 1, start=0, suffix=".png")  # dog/img_000.jpg and dog/img_000.png
    assert pack(flat, tmp_path / "two") == 2
    assert "rename one" in one_error_line(capsys)
    assert not (tmp_path / "two" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------
# Faults


class Killed(BaseException):
    """A kill at this step: nothing in the project catches it."""


def test_a_full_disk_or_a_kill_while_packing_keeps_the_old_pack_and_leaves_nothing_complete(packed, tmp_path,
                                                                                           monkeypatch, capsys):
    out = tmp_path / "packed"
    shutil.copytree(packed["out"], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_add = pack_module._ShardWriter.add
    calls = []

    def full(self, *args):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, *args)

    monkeypatch.setattr(pack_module._ShardWriter, "add", full)
    assert pack(packed["data"], out, "--shard-size", "2") == 2
    assert "No space left on device" in one_error_line(capsys)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the old pack, untouched
    assert index_dataset(out).splits["train"].paths

    def killed(*args):
        raise Killed
    monkeypatch.setattr(pack_module._ShardWriter, "add", real_add)
    monkeypatch.setattr(pack_module.os, "replace", killed)  # as the manifest is published
    with pytest.raises(Killed):
        pack(packed["data"], out, "--shard-size", "2")
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()
    assert run_extract.main(["--data", str(out), "--prepare-only", "--no-progress"]) == 2
    assert "unfinished pack" in one_error_line(capsys)
    assert pack(packed["data"], out, "--shard-size", "3") == 0  # the rerun finishes it
    assert [s["sha256"] for s in read_manifest(out)["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in packed["manifest"]["splits"]["train"]["shards"]]


def test_a_truncated_or_damaged_shard_is_one_line(packed, tmp_path, capsys):
    out = tmp_path / "packed"
    shutil.copytree(packed["out"], out)
    shard = out / "train" / "000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first image's bytes: same size, another sha256
    shard.write_bytes(bytes(data))
    entry = next(s for s in read_manifest(out)["splits"]["train"]["shards"] if s["name"] == "train/000001.tar")
    with pytest.raises(PackDamaged, match="damaged"):
        check_shard(out, entry)
    assert run_extract.main(["--data", str(out), "--prepare-only", "--no-progress"]) == 2
    assert "000001.tar is damaged" in one_error_line(capsys)
    os.truncate(shard, 1000)
    assert run_extract.main(["--data", str(out), "--prepare-only", "--no-progress"]) == 2
    assert "000001.tar is truncated" in one_error_line(capsys)
    shard.unlink()
    assert run_extract.main(["--data", str(out), "--prepare-only", "--no-progress"]) == 2
    assert "000001.tar is missing" in one_error_line(capsys)
    (out / "manifest.json").write_text(json.dumps({"format": "fc7-pack", "version": 99}))
    assert run_extract.main(["--data", str(out), "--prepare-only", "--no-progress"]) == 2
    assert "version 99" in one_error_line(capsys)
