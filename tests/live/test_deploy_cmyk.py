"""CMYK JPEGs in the torch-free runtimes (issue 29, finding 6): OpenCV's CMYK -> RGB is a level off torchvision's on
almost every pixel, so they are decoded by Pillow, byte for byte what extraction (and the torch runtime) decoded,
in full and reduced, Adobe-inverted (as Photoshop and Pillow write them) or not, turned by their EXIF tag. Without
Pillow such an image is one line, or in a folder a listed skip: never a silently different decode.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import run_webcam
from pipeline.datasets.images import read_rgb
from pipeline.datasets.jpeg import EXIF_ORIENTATION, jpeg_frame
from pipeline.live.sources import opencv_decoder
from pipeline.data.photos import photo_array, save_jpeg
from tests.conftest import COMPAT, CPU, one_error_line
from tests.helpers import read_jsonl

# (width, height, EXIF orientation): small ones decoded in full; at a floor of 144, 1/4 turned, 1/8, 1/8 asked on odd
# sides (PIL's draft takes 1/4), 1/2 on a portrait photo, 1/2 asked where the draft decodes in full
CMYK_JPEGS = [(64, 64, None), (160, 120, 6), (1200, 900, 6), (1160, 1208, None), (1161, 1213, 3), (400, 300, 8),
              (287, 400, None)]


def _without_adobe_marker(data: bytes) -> bytes:
    """The JPEG without its APP14 "Adobe" segment: CMYK as a writer that does not invert it leaves it."""
    out, position = bytearray(data[:2]), 2
    while data[position + 1] != 0xDA:  # up to the start of scan, segment by segment
        end = position + 2 + int.from_bytes(data[position + 2:position + 4], "big")
        if data[position + 1] != 0xEE:
            out += data[position:end]
        position = end
    return bytes(out + data[position:])


def save_cmyk_jpeg(array: np.ndarray, path: Path, *, orientation: int | None = None, adobe: bool = True) -> Path:
    """``array`` (RGB) as a CMYK JPEG, Adobe-inverted as Pillow and Photoshop write it, or without the marker."""
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    Image.fromarray(array).convert("CMYK").save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    path.write_bytes(buffer.getvalue() if adobe else _without_adobe_marker(buffer.getvalue()))
    return path


@pytest.mark.parametrize("adobe", [True, False], ids=["adobe", "no-adobe-marker"])
@pytest.mark.parametrize("min_side", [None, 144], ids=["full", "floor-144"])
def test_opencv_runtimes_decode_a_cmyk_jpeg_as_extraction_did(tmp_path, min_side, adobe):
    decode = opencv_decoder(min_side=min_side)
    for i, (width, height, orientation) in enumerate(CMYK_JPEGS):
        path = save_cmyk_jpeg(photo_array(width, height, seed=i), tmp_path / f"{i}.jpg", orientation=orientation,
                              adobe=adobe)
        assert jpeg_frame(path.read_bytes()).components == 4
        mine, theirs = decode(path), read_rgb(path, min_side=min_side).permute(1, 2, 0).numpy()
        assert mine.shape == theirs.shape and np.array_equal(mine, theirs), (width, height, orientation)


def test_an_rgb_jpeg_is_not_taken_for_cmyk(tmp_path):
    path = save_jpeg(photo_array(64, 48), tmp_path / "rgb.jpg")
    assert jpeg_frame(path.read_bytes()) == (64, 48, 3) and jpeg_frame(b"\x89PNG\r\n\x1a\n") is None


@pytest.mark.parametrize("runtime", ["opencv", "onnxruntime"])
def test_a_cmyk_jpeg_gets_the_torch_answers(exported, tmp_path, runtime):
    pytest.importorskip(runtime if runtime != "opencv" else "cv2")
    folder = tmp_path / "cmyk"
    folder.mkdir()
    for i, (width, height, orientation) in enumerate(CMYK_JPEGS[:4]):
        save_cmyk_jpeg(photo_array(width, height, seed=i), folder / f"{i}.jpg", orientation=orientation)
    answers = {}
    runs = {"torch": ["--checkpoint", str(COMPAT)], runtime: ["--onnx", str(exported), "--runtime", runtime]}
    for name, args in runs.items():
        predictions = tmp_path / f"{name}.jsonl"
        assert run_webcam.main([*CPU, *args, "--source", str(folder), "--no-display", "--predictions",
                                str(predictions), "--top-k", "3"]) == 0
        answers[name] = read_jsonl(predictions)
    assert len(answers["torch"]) == len(answers[runtime]) == 4
    for ours, theirs in zip(answers["torch"], answers[runtime]):  # the same pixels: only the graphs' arithmetic differs
        assert [p["wnid"] for p in ours["topk"]] == [p["wnid"] for p in theirs["topk"]]
        for mine, other in zip(ours["topk"], theirs["topk"]):
            assert mine["prob"] == pytest.approx(other["prob"], abs=1e-4)


def test_without_pillow_a_cmyk_jpeg_is_one_line_and_in_a_folder_a_listed_skip(exported, tmp_path, monkeypatch,
                                                                              capsys, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    cmyk = save_cmyk_jpeg(photo_array(160, 120), folder / "a-cmyk.jpg")
    save_jpeg(photo_array(160, 120, seed=1), folder / "b-rgb.jpg")
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL fails, as where Pillow is not installed
    onnx = ["--onnx", str(exported), "--runtime", "opencv", "--no-display"]
    assert run_webcam.main([*onnx, "--source", str(cmyk)]) == 2
    line = one_error_line(capsys)
    assert str(cmyk) in line and "CMYK" in line and "pip install Pillow" in line
    predictions = tmp_path / "preds.jsonl"
    assert run_webcam.main([*onnx, "--source", str(folder), "--predictions", str(predictions)]) == 0
    assert [row["source"] for row in read_jsonl(predictions)] == [str(folder / "b-rgb.jpg")]
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(skips) == 1 and str(cmyk) in skips[0] and "Pillow" in skips[0]
