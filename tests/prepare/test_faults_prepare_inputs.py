"""Preparing a dataset from bad or unusual input: read errors, image formats, class lists, the first run's download."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.datasets.images
import pipeline.data.unpack
import run_extract
from pipeline.datasets.dataset import index_dataset
from pipeline.datasets.images import ImageDecodeError, ImageReadError, decode_rgb, read_rgb
from pipeline.data.prepare import resolve_data
from pipeline.data.synthetic import make_tiny_imagenet
from tests.helpers import zip_dataset
from tests.helpers import extract_args, one_error_line
from tests.datasets.test_dataset import file_md5, http_server, make, prepare, tree_state  # noqa: F401 (a fixture)
from tests.helpers import ROOT
from tests.prepare.test_faults_prepare import GRAY16, NAME, WNIDS3, dead_pid, make_zip  # noqa: F401


# ---------------------------------------------------------------------------------------------
# 7. a file that cannot be read stops the run (it is not an undecodable image)


@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES, errno.ENOENT])
def test_a_read_error_stops_prepare_with_one_line_naming_the_file(tmp_path, capsys, monkeypatch, code):
    root = make(tmp_path)
    victim = root / "train" / WNIDS3[1] / "images" / f"{WNIDS3[1]}_2.JPEG"
    before = tree_state(root)
    real_open = open

    def failing_open(path, *args, **kwargs):
        if Path(path) == victim:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(pipeline.datasets.images, "open", failing_open, raising=False)
    with pytest.raises(ImageReadError) as info:
        read_rgb(victim)
    assert isinstance(info.value, OSError) and info.value.errno == code and info.value.filename == str(victim)
    rc, summary, err = prepare(capsys, "--data", root, summary=tmp_path / "prep.json")
    line = one_error_line(err)
    assert rc == 2 and summary is None  # no summary that looks complete
    assert str(victim) in line and os.strerror(code) in line
    assert tree_state(root) == before

    monkeypatch.undo()  # the drive is back: the rerun reads it and skips nothing
    rc, summary, err = prepare(capsys, "--data", root, summary=tmp_path / "prep.json")
    assert rc == 0 and summary["skipped"] == [] and summary["splits"]["train"]["images"] == 12, err


def test_decode_failures_are_not_read_errors(tmp_path):
    path = tmp_path / "page.JPEG"
    path.write_bytes(b"<html>not an image</html>")
    with pytest.raises(ImageDecodeError) as info:
        read_rgb(path)
    assert not isinstance(info.value, OSError)


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def write_gray16(path: Path) -> torch.Tensor:
    Image.fromarray(GRAY16).save(path, format="PNG")
    expected = torch.from_numpy((GRAY16 >> 8).astype(np.uint8))
    return expected.expand(3, *expected.shape)


def write_rgb16(path: Path) -> torch.Tensor:
    rgb = np.stack([GRAY16, GRAY16[::-1].copy(), 65535 - GRAY16], -1)  # (H, W, 3) uint16
    ok, encoded = cv2.imencode(".png", rgb[..., ::-1].copy())  # OpenCV writes BGR
    assert ok
    path.write_bytes(encoded.tobytes())
    return torch.from_numpy((rgb >> 8).astype(np.uint8)).permute(2, 0, 1)


def write_animated_gif(path: Path) -> torch.Tensor:
    frames = [Image.fromarray(np.full((24, 40, 3), colour, np.uint8)) for colour in COLOURS]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return torch.tensor(COLOURS[0], dtype=torch.uint8)[:, None, None].expand(3, 24, 40)


@pytest.mark.parametrize("writer", [write_gray16, write_rgb16, write_animated_gif])
def test_16_bit_png_and_animated_gif_decode_to_8_bit_rgb(tmp_path, writer):
    path = tmp_path / "image.JPEG"  # the suffix lies, as it may in a dataset
    expected = writer(path)
    image = read_rgb(path)
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    assert torch.equal(image, expected)

    from pipeline.live.sources import open_source  # the live runner decodes the same way

    frames = list(open_source(str(path)))
    assert len(frames) == 1 and torch.equal(torch.from_numpy(frames[0].rgb).permute(2, 0, 1), expected)


def test_formats_the_decoder_rejects_are_skips_that_say_why(tmp_path):
    path = tmp_path / "image.JPEG"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format="BMP")
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        read_rgb(path)
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_rgb(torch.empty(0, dtype=torch.uint8))


def _unusual_dataset(tmp_path: Path) -> Path:
    """make()'s dataset with a 16-bit PNG, an RGB 16-bit PNG and an animated GIF among the .JPEGs, and one
    image whose file name is not UTF-8."""
    root = make(tmp_path)
    folder = root / "train" / WNIDS3[0] / "images"
    write_gray16(folder / f"{WNIDS3[0]}_0.JPEG")
    write_rgb16(folder / f"{WNIDS3[0]}_1.JPEG")
    write_animated_gif(root / "val" / "images" / "val_1.JPEG")
    good = (folder / f"{WNIDS3[0]}_3.JPEG").read_bytes()
    with open(os.path.join(os.fsencode(root / "train" / WNIDS3[2] / "images"), b"bad\xff.JPEG"), "wb") as f:
        f.write(good)
    return root


def test_prepare_counts_unusual_formats_as_images_and_a_bad_name_as_a_listed_skip(tmp_path, capsys):
    root = _unusual_dataset(tmp_path)
    before = tree_state(root)
    rc, summary, err = prepare(capsys, "--data", root, summary=tmp_path / "prep.json")
    assert rc == 0, err
    train, val = summary["splits"]["train"], summary["splits"]["val"]
    assert (train["images"], train["skipped"]) == (12, 1) and (val["images"], val["skipped"]) == (6, 0)
    [skip] = summary["skipped"]
    assert skip["path"] == f"train/{WNIDS3[2]}/images/bad\\xff.JPEG" and "UTF-8" in skip["reason"]
    assert "bad\\xff" in skip["reason"]
    assert tree_state(root) == before

    rc, _, err = prepare(capsys, "--data", root, "--strict")
    line = one_error_line(err)
    assert rc == 2 and "bad\\xff.JPEG" in line


def test_extraction_agrees_with_prepare_on_unusual_formats_and_names(tmp_path, capsys):
    root = _unusual_dataset(tmp_path)
    dataset = index_dataset(root)
    assert len(dataset.splits["train"]) == 12
    assert [item["path"] for item in dataset.splits["train"].excluded] == [f"train/{WNIDS3[2]}/images/bad\\xff.JPEG"]
    out = tmp_path / "features"
    rc = run_extract.main(extract_args(root, out, "--batch-size", "8"))
    assert rc == 0, capsys.readouterr().err
    for split, rows in (("train", 12), ("val", 6)):
        with h5py.File(out / f"{split}.h5", "r") as f:
            assert f.attrs["complete"] and f.attrs["num_rows"] == rows
            assert np.isfinite(f["features"][:]).all()
    # the name the cache cannot store is counted and listed there, as --prepare-only lists it
    with h5py.File(out / "train.h5", "r") as f:
        skipped = json.loads(f.attrs["skipped"])
        assert f.attrs["num_skipped"] == 1 and skipped[0]["path"] == f"train/{WNIDS3[2]}/images/bad\\xff.JPEG"
    rc = run_extract.main(extract_args(root, tmp_path / "strict", "--batch-size", "8", "--strict"))
    assert rc == 2 and "bad\\xff.JPEG" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 10, 11. class lists and folders


def test_a_byte_order_mark_and_trailing_spaces_in_wnids_are_stripped(tmp_path, capsys):
    root = make(tmp_path)
    (root / "wnids.txt").write_bytes(("\ufeff" + "\r\n".join(f"{w}  \t" for w in WNIDS3) + "\r\n").encode())
    (root / "words.txt").write_bytes(b"\xef\xbb\xbf" + (root / "words.txt").read_bytes())
    dataset = index_dataset(root)
    assert dataset.wnids == WNIDS3 and dataset.names[0] == "goldfish"
    rc, summary, err = prepare(capsys, "--data", root, summary=tmp_path / "prep.json")
    assert rc == 0 and summary["splits"]["train"]["images"] == 12, err


def test_names_that_differ_invisibly_are_shown_with_repr(tmp_path, capsys):
    root = make(tmp_path)
    (root / "train" / WNIDS3[0]).rename(root / "train" / f"{WNIDS3[0]} ")  # a folder with a trailing space
    rc, _, err = prepare(capsys, "--data", root)
    line = one_error_line(err)
    assert rc == 2 and f"'{WNIDS3[0]} '" in line and f"'{WNIDS3[0]}'" in line


def test_a_class_list_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys):
    root = make(tmp_path)
    (root / "wnids.txt").write_bytes("\n".join(WNIDS3).encode("utf-16"))  # Notepad's "Unicode"
    rc, _, err = prepare(capsys, "--data", root)
    line = one_error_line(err)
    assert rc == 2 and str(root / "wnids.txt") in line and "UTF-8" in line


def test_an_empty_class_folder_is_warned_about(tmp_path, capsys, caplog):
    root = make(tmp_path)
    for path in (root / "train" / WNIDS3[1] / "images").iterdir():
        path.unlink()
    with caplog.at_level(logging.WARNING):
        rc, summary, err = prepare(capsys, "--data", root, summary=tmp_path / "prep.json")
    assert rc == 0, err
    assert summary["splits"]["train"]["per_class_min"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 class folders" in w and repr(WNIDS3[1]) in w for w in warnings), warnings


def test_val_images_that_is_a_file_is_named_in_the_error(tmp_path, capsys):
    root = make(tmp_path)
    shutil.rmtree(root / "val" / "images")
    (root / "val" / "images").write_text("oops\n")
    rc, _, err = prepare(capsys, "--data", root)
    line = one_error_line(err)
    assert rc == 2 and str(root / "val" / "images") in line and "is a file" in line
    assert "val_annotations" not in line


def test_scanning_a_folder_that_cannot_be_listed_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    root = make(tmp_path)
    real_scandir = os.scandir

    def failing(path="."):
        if Path(path) == root / "train" / WNIDS3[0] / "images":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", failing)
    rc, _, err = prepare(capsys, "--data", root)
    line = one_error_line(err)
    assert rc == 2 and "Permission denied" in line and str(root / "train" / WNIDS3[0] / "images") in line


# ---------------------------------------------------------------------------------------------
# 12. the first run: make run fetches the data when there is none


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("present, data, expect", [
    ([], "", "--download"),
    ([f"data/{NAME}/"], "", None),
    ([f"data/{NAME}.zip"], "", None),
    ([], "elsewhere.zip", "--data elsewhere.zip"),
])
def test_make_run_downloads_only_when_there_is_no_data(tmp_path, present, data, expect):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "requirements.txt").write_text("")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").touch()
    os.utime(tmp_path / "requirements.txt", (1, 1))  # the venv looks up to date: make -n prints only the run
    (tmp_path / ".venv" / ".installed").touch()
    for rel in present:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).mkdir() if rel.endswith("/") else (tmp_path / rel).touch()
    done = subprocess.run(["make", "-n", "run", f"DATA={data}"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    extract_line = next(line for line in done.stdout.splitlines() if "run_extract.py" in line)
    if expect is None:
        assert "--download" not in extract_line and "--data" not in extract_line
    else:
        assert expect in extract_line and (expect == "--download") == ("--download" in extract_line)


def test_the_first_run_downloads_into_data_and_the_next_finds_it_there(tmp_path, capsys, monkeypatch, http_server):
    """What `make run` does on a fresh machine (--download with no --data), then on the next run (neither)."""
    src = make_tiny_imagenet(tmp_path / "src" / NAME)
    md5 = file_md5(zip_dataset(src, http_server.folder / f"{NAME}.zip"))
    monkeypatch.chdir(tmp_path / "src")  # a checkout with no data/ yet
    url = f"{http_server.url}/{NAME}.zip"
    rc, first, err = prepare(capsys, "--download", "--url", url, "--md5", md5, summary=tmp_path / "first.json")
    assert rc == 0, err
    assert Path(first["root"]) == (tmp_path / "src" / "data" / NAME / NAME).resolve()
    assert file_md5(tmp_path / "src" / "data" / f"{NAME}.zip") == md5
    assert sorted(p.name for p in (tmp_path / "src" / "data").iterdir()) == [NAME, f"{NAME}.zip"]  # no temp left
    fetched = len(http_server.requests)
    rc, second, err = prepare(capsys, summary=tmp_path / "second.json")  # make run's next time: no flag at all
    assert rc == 0 and second == first, err
    assert len(http_server.requests) == fetched


def test_download_never_deletes_a_file_it_did_not_write(tmp_path, capsys, http_server):
    src = make_tiny_imagenet(tmp_path / "src" / "tiny")
    md5 = file_md5(zip_dataset(src, http_server.folder / "tiny.zip"))
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "tiny.zip").write_bytes(b"the user's own file")
    dead = dead_pid()
    (dl / f".tiny.zip.download-{dead}").write_bytes(b"half a download, killed")
    args = ["--download", "--url", f"{http_server.url}/tiny.zip", "--md5", md5, "--data", dl]
    rc, _, err = prepare(capsys, *args)
    line = one_error_line(err)
    assert rc == 2 and str(dl / "tiny.zip") in line and "md5" in line
    assert (dl / "tiny.zip").read_bytes() == b"the user's own file" and not http_server.requests
    assert not (dl / f".tiny.zip.download-{dead}").exists()  # the killed download's part is gone

    (dl / "tiny.zip").unlink()  # the user moved it away: the rerun fetches and unpacks
    rc, summary, err = prepare(capsys, *args, summary=tmp_path / "prep.json")
    assert rc == 0 and summary["num_classes"] == 3, err
    assert file_md5(dl / "tiny.zip") == md5


def test_a_dataset_beside_a_zip_in_a_read_only_folder_is_used(tmp_path, monkeypatch):
    """Read-only zip folder: its unpacked dataset beside it is used as it is, not unpacked again under data/."""
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    zip_path = make_zip(tmp_path, shelf / "tiny-imagenet-200.zip")
    beside = make(shelf)  # the user's own unpacked copy, no marker of this tool
    before = tree_state(shelf)
    monkeypatch.chdir(tmp_path)
    shelf.chmod(0o555)
    try:
        assert resolve_data(zip_path) == beside.resolve()
    finally:
        shelf.chmod(0o755)
    assert not (tmp_path / "data").exists()  # nothing unpacked elsewhere
    assert tree_state(shelf) == before


def test_an_image_link_whose_target_vanished_stops_with_one_line(tmp_path, capsys):
    """A dangling link (its drive gone) is a read failure naming the file, not a silently ignored entry."""
    root = make(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    image = next((root / "train").rglob("*.JPEG"))
    shutil.move(image, store / image.name)
    image.symlink_to(store / image.name)
    assert index_dataset(root).splits["train"].paths  # the link works while its target is there
    shutil.rmtree(store)  # the drive disappears
    rc, _, err = prepare(capsys, "--data", root)
    line = one_error_line(err)
    assert rc == 2 and image.name in line and "does not exist" in line
    rc = run_extract.main(extract_args(root, tmp_path / "features"))
    assert rc == 2 and image.name in capsys.readouterr().err
    assert not (tmp_path / "features" / "train.h5").exists()
