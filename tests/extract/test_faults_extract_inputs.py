"""#18 items 7, 8, 11, 12 (part): bad inputs to extraction get the right one-line reason before the work.

A --data path that is not UTF-8, a split whose images all fail to decode, a malicious weights file, and a
resumed extraction with nothing left to compute. Nothing the user made changes.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import run_extract
from features import cache
from pipeline.data.synthetic import make_tiny_imagenet
from tests.helpers import TINY_SHARD_ARGS, error_line, extract_args, tree_hash



class Killed(BaseException):
    """A kill at this step: nothing after it runs, and nothing in the project catches it."""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_imagenet(tmp_path_factory.mktemp("inputs") / "ds", num_classes=2, train_per_class=2,
                              val_per_class=1)


def test_a_data_path_that_is_not_utf8_is_refused_before_any_work(data, tmp_path, capsys):
    """#18 item 7: --prepare-only passed, and extraction did all the work, then failed at assembly."""
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/data-\xff"))
    os.rename(data, odd)
    try:
        before = tree_hash(odd)
        for extra in (("--prepare-only",), ()):
            capsys.readouterr()
            assert run_extract.main(extract_args(odd, tmp_path / "features", *TINY_SHARD_ARGS, *extra)) == 2
            err = capsys.readouterr().err
            line = error_line(err)
            assert "not UTF-8" in line and "free some space" not in line, line
            assert "img/s" not in err
        assert not (tmp_path / "features").exists()  # nothing started
        assert tree_hash(odd) == before
    finally:
        os.rename(odd, data)


def test_a_split_with_no_decodable_image_is_said_at_preparation(tmp_path, capsys):
    """#18 item 8: every val image 0 bytes."""
    data = make_tiny_imagenet(tmp_path / "ds", num_classes=2, train_per_class=2, val_per_class=1)
    for image in (data / "val" / "images").iterdir():
        image.write_bytes(b"")
    before = tree_hash(data)
    capsys.readouterr()
    assert run_extract.main(["--data", str(data), "--prepare-only", "--no-progress"]) == 2
    assert "val has no decodable images" in error_line(capsys.readouterr().err)
    assert run_extract.main(extract_args(data, tmp_path / "features", *TINY_SHARD_ARGS)) == 2  # and extraction says the same
    line = error_line(capsys.readouterr().err)
    assert "val has no decodable images" in line and "chunk" not in line and "free some space" not in line
    assert not (tmp_path / "features" / "val.h5").exists()
    assert tree_hash(data) == before


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_malicious_weights_file_is_refused_without_torch_s_unsafe_advice(data, tmp_path, capsys, monkeypatch):
    """#18 item 11: never pass on "Re-running with weights_only=False will likely succeed"."""
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    torch.save({"features.0.weight": Evil()}, evil)
    capsys.readouterr()
    assert run_extract.main(extract_args(data, tmp_path / "features", *TINY_SHARD_ARGS, "--weights", str(evil))) == 2
    err = capsys.readouterr().err
    line = error_line(err)
    assert str(evil) in line and "refused" in line and "posix.system" in line
    assert "weights_only" not in err and "Re-running" not in err and "trusted source" not in err
    assert not (tmp_path / "pwned").exists()


def test_a_resumed_extraction_with_nothing_left_reports_no_speed(data, tmp_path, monkeypatch, caplog):
    """#18 item 12: it said "4 images in 0.0 s (0.0 img/s)"."""
    out = tmp_path / "features"
    assemble = cache.assemble

    def killed(*args, **kwargs):
        raise Killed
    monkeypatch.setattr(cache, "assemble", killed)
    with pytest.raises(Killed):  # every train shard is on disk, then the run dies as assembly starts
        run_extract.main(extract_args(data, out, *TINY_SHARD_ARGS))
    monkeypatch.setattr(cache, "assemble", assemble)
    caplog.set_level("INFO")
    assert run_extract.main(extract_args(data, out, *TINY_SHARD_ARGS)) == 0
    train = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train:")]
    assert train and "img/s" not in train[0] and "earlier, interrupted run" in train[0], train
    val = [r.getMessage() for r in caplog.records if r.getMessage().startswith("val:")]
    assert val and "img/s" in val[0] and "(0.0 img/s)" not in val[0]


def test_extraction_accepts_a_dataset_with_one_class(tmp_path):
    """Classes may be collected one at a time (the own-data issue): extraction stores one class."""
    data = make_tiny_imagenet(tmp_path / "one", num_classes=1, train_per_class=2, val_per_class=1)
    out = tmp_path / "features"
    assert run_extract.main(extract_args(data, out, *TINY_SHARD_ARGS)) == 0
    train = cache.open_split(out / "train.h5")
    assert train.attrs["num_classes"] == 1 and train.num_rows == 2 and set(train.labels) == {0}
