"""Real photos: EXIF orientation applied, large JPEGs decoded reduced (features as a full decode's), and small
images (Tiny ImageNet's 64x64) decoded exactly as before."""
from __future__ import annotations

import io
import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

import run_extract
from pipeline.datasets.images import decode_rgb, read_bytes, read_rgb
from pipeline.datasets.jpeg import decode_floor, jpeg_size, reduction
from pipeline.common.preprocess import Preprocess
from pipeline.data.photos import photo_array, save_jpeg
from pipeline.data.synthetic import class_image
from tests.helpers import extract_args, random_backbone

# the turn each EXIF orientation asks for, as torch.rot90 / flip of the stored pixels (C, H, W)
TURNS = {3: lambda t: torch.rot90(t, 2, (1, 2)), 6: lambda t: torch.rot90(t, -1, (1, 2)),
         8: lambda t: torch.rot90(t, 1, (1, 2)), 2: lambda t: torch.flip(t, (2,))}


@pytest.fixture(scope="module")
def backbone():
    module = random_backbone().module.eval()
    return lambda x: module(x)["fc7"]  # (B, 4096) fc7


def cached_rows(out) -> dict:
    """Image path -> cached fc7 row, over both splits."""
    rows = {}
    for split in ("train", "val"):
        with h5py.File(out / f"{split}.h5", "r") as f:
            rows.update({path.decode(): row for path, row in zip(f["paths"][:], f["fc7"][:])})
    return rows


def cosines(backbone, preprocess, a, b) -> torch.Tensor:
    with torch.inference_mode():
        return torch.nn.functional.cosine_similarity(backbone(preprocess(a)), backbone(preprocess(b)))


@pytest.mark.parametrize("orientation", sorted(TURNS))
@pytest.mark.parametrize("min_side", [None, 144], ids=["full", "reduced"])
def test_a_jpeg_turned_by_its_exif_tag_decodes_to_the_turned_pixels(tmp_path, orientation, min_side):
    pixels = photo_array(640, 480, seed=1)
    upright = read_rgb(save_jpeg(pixels, tmp_path / "upright.jpg"), min_side=min_side)
    tagged = read_rgb(save_jpeg(pixels, tmp_path / "tagged.jpg", orientation=orientation), min_side=min_side)
    assert torch.equal(tagged, TURNS[orientation](upright))
    if min_side:
        assert upright.shape == (3, 240, 320)  # at 1/2: 1/4 would make the shorter side 120 < 144
    else:
        assert upright.shape == (3, 480, 640)


def test_an_exif_turned_photo_gives_the_features_of_the_turned_pixels(tmp_path):
    """Through extraction: a tagged JPEG's row equals the row of a lossless PNG of the turned pixels."""
    root = tmp_path / "phone"
    pixels = photo_array(320, 240, seed=2)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
    tagged = save_jpeg(pixels, root / "a" / "IMG_0001.JPG", orientation=6)
    plain = read_rgb(save_jpeg(pixels, tmp_path / "plain.jpg"))
    Image.fromarray(TURNS[6](plain).permute(1, 2, 0).numpy()).save(root / "b" / "turned.png")
    for name, seed in (("a", 3), ("b", 4)):  # a second image each, so both classes have two
        save_jpeg(photo_array(320, 240, seed=seed), root / name / "other.jpg")
    assert torch.equal(read_rgb(tagged), read_rgb(root / "b" / "turned.png"))
    out = tmp_path / "features"
    assert run_extract.main(extract_args(root, out, "--val-fraction", "0.5")) == 0
    rows = cached_rows(out)
    assert np.allclose(rows["a/IMG_0001.JPG"], rows["b/turned.png"], rtol=1e-5, atol=1e-6)


def test_a_large_jpeg_decodes_reduced_with_the_features_of_a_full_decode(tmp_path, backbone):
    path = save_jpeg(photo_array(2048, 1536, seed=5), tmp_path / "photo.jpg", orientation=8)
    preprocess = Preprocess()  # AlexNet: resize to 256, crop 224 -> a decode no smaller than 512
    full, reduced = read_rgb(path), read_rgb(path, min_side=decode_floor(preprocess))
    assert full.shape == (3, 2048, 1536) and reduced.shape == (3, 1024, 768)  # 1/2: 1/4 would be 384 < 512
    assert cosines(backbone, preprocess, [full], [reduced]).min() >= 0.999


def test_extraction_decodes_large_jpegs_reduced_and_small_ones_in_full(tmp_path, backbone):
    """The extractor's reader gets the preprocessing's floor: at --resize-size 72 a 1200x900 photo decodes at
    1/4 (225 >= 144), and its cached row matches a full decode's features."""
    root = tmp_path / "photos"
    for label, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        save_jpeg(photo_array(1200, 900, seed=label), root / name / "big.jpg", orientation=6)
        Image.fromarray(class_image(label, 0)).save(root / name / "small.jpg", quality=90)
    out = tmp_path / "features"
    assert run_extract.main(extract_args(root, out, "--val-fraction", "0.5")) == 0
    preprocess = Preprocess(image_size=64, resize_size=72)
    assert decode_floor(preprocess) == 144
    rows = {path: torch.from_numpy(row) for path, row in cached_rows(out).items()}
    big = root / "a" / "big.jpg"
    assert read_rgb(big, min_side=144).shape == (3, 300, 225)  # turned by its tag: 900x1200 at 1/4
    with torch.inference_mode():
        expected_reduced = backbone(preprocess([read_rgb(big, min_side=144)]))[0]
        expected_full = backbone(preprocess([read_rgb(big)]))[0]
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(rows["a/big.jpg"], expected_reduced, dim=0) >= 0.99999  # what the reader decoded
    assert cosine(rows["a/big.jpg"], expected_full, dim=0) >= 0.999


@pytest.mark.parametrize("size", [(64, 64), (286, 400), (500, 300)])
def test_small_images_decode_exactly_as_a_plain_full_decode(tmp_path, size):
    """No reduction below twice the floor, and no EXIF in the file: the pixels torchvision always gave."""
    width, height = size
    path = tmp_path / "small.jpg"
    Image.fromarray(photo_array(width, height, seed=6)).save(path, quality=90)
    data = read_bytes(path)
    plain = decode_image(data, mode=ImageReadMode.RGB)
    for min_side in (None, 144, 512):
        if not min_side or reduction((width, height), min_side) == 1:
            assert torch.equal(decode_rgb(data, min_side=min_side), plain)
    assert reduction((64, 64), 144) == 1 and reduction((286, 400), 144) == 1  # 286 / 2 = 143 < 144
    assert reduction((287, 400), 144) == 2  # ceil(287 / 2) = 144 (PIL's draft then decodes it in full: draft_scale)
    assert reduction((300, 500), 144) == 2 and reduction((2000, 1200), 144) == 8


def test_reduction_keeps_the_shorter_side_at_least_the_floor():
    for shorter in range(100, 5000, 37):
        scale = reduction((shorter, shorter * 2), 512)
        assert -(-shorter // scale) >= 512 or scale == 1
        assert scale == 8 or -(-shorter // (scale * 2)) < 512  # the largest such scale


def test_jpeg_size_reads_the_frame_header_and_ignores_other_formats(tmp_path):
    pixels = photo_array(333, 222, seed=7)
    for options in ({}, {"progressive": True}, {"exif": Image.Exif().tobytes()}):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", **options)
        assert jpeg_size(buffer.getvalue()) == (333, 222)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    assert jpeg_size(buffer.getvalue()) is None


def test_webp_is_read(tmp_path):
    pixels = class_image(1, 0)
    Image.fromarray(pixels).save(tmp_path / "x.webp", lossless=True)
    assert torch.equal(read_rgb(tmp_path / "x.webp").permute(1, 2, 0), torch.from_numpy(pixels))


def test_prepare_only_decodes_large_photos_reduced_as_extraction_will(tmp_path, monkeypatch, capsys):
    """--prepare-only checks each image the way the extractor reads it: a 1200x900 photo at 1/4 for
    --resize-size 72, not a full decode; a truncated one is listed as a skip all the same."""
    from pipeline.datasets import images

    root = tmp_path / "photos"
    for label, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        save_jpeg(photo_array(1200, 900, seed=label), root / name / "big.jpg")
        Image.fromarray(class_image(label, 0)).save(root / name / "small.jpg", quality=90)
    whole = (root / "b" / "big.jpg").read_bytes()
    (root / "b" / "big.jpg").write_bytes(whole[:len(whole) // 2])  # cut in half: no longer decodes
    reduced = []
    real = images._decode_reduced
    monkeypatch.setattr(images, "_decode_reduced", lambda data, scale: (reduced.append(scale), real(data, scale))[1])
    summary = tmp_path / "summary.json"
    assert run_extract.main(["--data", str(root), "--prepare-only", "--image-size", "64", "--resize-size", "72",
                             "--val-fraction", "0.5", "--no-progress", "--summary-json", str(summary)]) == 0
    assert reduced == [4, 4]  # both photos, at 1/4; the small images decode in full
    skipped = json.loads(summary.read_text())["skipped"]
    assert [item["path"] for item in skipped] == ["b/big.jpg"] and "truncated" in skipped[0]["reason"]
