"""Head training reads cached features only, streams them, and refuses bad caches and numbers with one line."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from features.cache import open_split
from pipeline.heads.readers import StreamedFeatures
from tests.helpers import one_error_line, write_synthetic_cache
from tests.heads.test_train_head import accuracy_and_loss, data, extract, feats, history, load_ckpt, raw_features, train  # noqa: F401


# ---------------------------------------------------------------------------------------------
# Training reads features only


def test_training_never_reads_an_image(data, feats, tmp_path, monkeypatch):
    import pipeline.datasets.images

    def no_images(*args, **kwargs):
        raise AssertionError("an image was read during head training")

    monkeypatch.setattr(pipeline.datasets.images, "read_bytes", no_images)
    monkeypatch.setattr(pipeline.datasets.images, "decode_rgb", no_images)
    monkeypatch.setattr(Image, "open", no_images)
    moved = data.with_name(data.name + "-moved")
    data.rename(moved)
    try:
        assert not data.exists()
        assert train(feats, tmp_path / "run", "--epochs", "2", "--lr", "0.01", "--batch-size", "4") == 0
    finally:
        moved.rename(data)
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "report.md").is_file()


def test_streamed_features_train(feats, tmp_path, monkeypatch):
    seen = []  # (rows, label counts, feature sum) of every training epoch
    real_batches = StreamedFeatures.batches

    def counting(self, batch_size, generator):
        rows, labels, total = 0, [], 0.0
        for x, y in real_batches(self, batch_size, generator):
            rows, total = rows + len(y), total + x.double().sum().item()
            labels.append(y)
            yield x, y
        if generator is not None:
            seen.append((rows, torch.cat(labels).bincount(minlength=3).tolist(), total))

    monkeypatch.setattr(StreamedFeatures, "batches", counting)
    out = tmp_path / "stream"
    assert train(feats, out, "--stream", "--epochs", "3", "--lr", "0.01", "--batch-size", "4") == 0
    x, y = raw_features(feats / "train.h5")
    assert len(seen) == 3
    for rows, counts, total in seen:  # every row exactly once per epoch
        assert rows == 18 and counts == y.bincount(minlength=3).tolist()
        assert total == pytest.approx(x.double().sum().item(), rel=1e-6)
    rows = history(out)
    assert len(rows) == 3 and all(0 <= r["val_top1"] <= 100 for r in rows)
    assert max(r["val_top1"] for r in rows) > 100 / 3  # learns: better than chance
    ckpt = load_ckpt(out / "best.pt")
    assert accuracy_and_loss(ckpt, feats / "val.h5")[0] == rows[ckpt["epoch"] - 1]["val_top1"]


def test_streamed_blocks_cover_every_row_once(feats):
    split = open_split(feats / "train.h5")
    source = StreamedFeatures(split, block_rows=5)  # 18 rows: four blocks, the last one short
    x, y = raw_features(feats / "train.h5")
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        got_x, got_y = zip(*source.batches(4, generator))
        got_x, got_y = torch.cat(got_x).float(), torch.cat(got_y)
        assert len(got_y) == 18
        # match every yielded row to its cache row
        match = (got_x[:, None, :] == x[None, :, :]).all(-1)
        rows = match.float().argmax(1)
        assert match.any(1).all() and sorted(rows.tolist()) == list(range(18))
        assert torch.equal(got_y, y[rows])


def test_streamed_blocks_mix_classes(tmp_path):
    """Rows are stored in class order; a streamed block must still hold several classes, not one class run."""
    folder = write_synthetic_cache(tmp_path / "big", classes=4, train_per_class=20, val_per_class=1, dim=8)
    split = open_split(folder / "train.h5")
    source = StreamedFeatures(split, block_rows=20)  # one class run is 20 rows: a contiguous block would be one class
    source.chunk_rows = 4  # 5 random 4-row chunks per block, from anywhere in the file
    generator = torch.Generator().manual_seed(0)
    blocks = [y for _, y in source.batches(20, generator)]
    assert sorted(torch.cat(blocks).tolist()) == sorted(split.labels.tolist())  # every row once
    assert all(len(set(y.tolist())) > 1 for y in blocks)


def test_float16_cache_trains(data, tmp_path_factory, tmp_path):
    half = tmp_path_factory.mktemp("feats16")
    extract(data, half, "--dtype", "float16")
    assert open_split(half / "train.h5").read_features(0, 1).dtype == np.float16
    out = tmp_path / "run"
    assert train(half, out, "--epochs", "3", "--lr", "0.01", "--batch-size", "4") == 0
    rows = history(out)
    assert len(rows) == 3 and max(r["val_top1"] for r in rows) > 100 / 3
    ckpt = load_ckpt(out / "best.pt")
    assert ckpt["head"]["weight"].dtype == torch.float32 and ckpt["head"]["weight"].shape == (3, 4096)
    assert accuracy_and_loss(ckpt, half / "val.h5")[0] == rows[ckpt["epoch"] - 1]["val_top1"]


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2 and one line on stderr


def test_missing_cache_folder(tmp_path, capsys):
    assert train(tmp_path / "nothing-here", tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert "run_extract.py" in line and "nothing-here" in line


def test_partial_cache_val_missing(feats, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(feats / "train.h5", partial / "train.h5")
    assert train(partial, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert "val.h5" in line and "run_extract.py" in line


def test_partial_cache_incomplete_file(feats, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(feats, partial)
    with h5py.File(partial / "val.h5", "a") as f:
        f.attrs["complete"] = False
    assert train(partial, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert "val.h5" in line and "not a complete" in line


def test_train_and_val_from_different_weights(data, feats, tmp_path, capsys):
    other = tmp_path / "seed1"
    extract(data, other, "--seed", "1")
    capsys.readouterr()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(feats / "train.h5", mixed / "train.h5")
    shutil.copy(other / "val.h5", mixed / "val.h5")
    assert train(mixed, tmp_path / "out") == 2
    assert "different weights" in one_error_line(capsys)


@pytest.mark.parametrize("flags, flag", [
    (("--lr", "0"), "--lr"),
    (("--lr", "-1"), "--lr"),
    (("--lr", "0.01,0"), "--lr"),
    (("--lr", "nan"), "--lr"),
    (("--weight-decay", "-1"), "--weight-decay"),
    (("--weight-decay", "nan"), "--weight-decay"),
    (("--momentum", "nan"), "--momentum"),
    (("--epochs", "0"), "--epochs"),
    (("--batch-size", "0"), "--batch-size"),
])
def test_bad_numbers(feats, tmp_path, capsys, flags, flag):
    assert train(feats, tmp_path / "out", *flags) == 2
    assert flag in one_error_line(capsys)


def test_unwritable_out(feats, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert train(feats, blocker / "run", "--epochs", "1") == 2
    line = one_error_line(capsys)
    assert "--out" in line and str(blocker) in line
    assert blocker.read_text() == "not a folder"
