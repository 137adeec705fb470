"""Dataset preparation as a user meets it: layouts, names, messy files, bad images (paths and zips:
test_dataset_paths.py; downloads and --arrange-val: test_dataset_download.py).

Every dataset here is generated in tmp_path; the only network is a loopback HTTP server the tests start.
The CLI is driven through ``run_extract.main([... "--prepare-only"])``, which runs no network model.
"""
from __future__ import annotations

import hashlib
import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import run_extract
from pipeline.datasets.dataset import index_dataset, read_lines
from tests.conftest import one_error_line
from pipeline.datasets.images import read_rgb
from pipeline.data.synthetic import WORDS, class_image, make_tiny_imagenet

WNIDS3 = sorted(WORDS)[:3]  # the classes make_tiny_imagenet(num_classes=3) writes


# ---------------------------------------------------------------------------------------------
# helpers


def make(tmp_path: Path, name: str = "tiny-imagenet-200", **kw) -> Path:
    """3 classes, 4 train and 2 val images each (val_0..val_5), 64x64."""
    return make_tiny_imagenet(tmp_path / name, **kw)


def prepare(capsys, *args, summary: Path | None = None):
    """Run ``run_extract.py --prepare-only``; return (rc, summary dict or None, stderr)."""
    argv = ["--prepare-only", "--no-progress", *map(str, args)]
    if summary is not None:
        argv += ["--summary-json", str(summary)]
    rc = run_extract.main(argv)
    err = capsys.readouterr().err
    data = json.loads(summary.read_text()) if summary is not None and summary.is_file() else None
    return rc, data, err


def tree_state(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder`` with its kind, and for files size, mtime and sha256."""
    state = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file():
            st = path.stat()
            state[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            state[rel] = ("dir",)
    return state


def file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_summary_shape(summary: dict) -> None:
    assert isinstance(summary["num_classes"], int)
    assert set(summary["splits"]) == {"train", "val"}
    for split in summary["splits"].values():
        for key in ("images", "per_class_min", "per_class_max"):
            assert isinstance(split[key], int), (key, split)
    assert isinstance(summary["skipped"], list)
    for item in summary["skipped"]:
        assert set(item) >= {"path", "reason"} and item["reason"], item


def val_label_by_file(dataset) -> dict[str, int]:
    return {Path(p).name: label for p, label in zip(dataset.splits["val"].paths, dataset.splits["val"].labels)}


def save(array: np.ndarray, path: Path, **kw) -> None:
    Image.fromarray(array).save(path, **kw)


# ---------------------------------------------------------------------------------------------
# layouts, labels and names


@pytest.mark.parametrize("val_layout", ["official", "arranged", "flat-arranged"])
def test_layouts_give_the_right_summary(tmp_path, capsys, val_layout):
    root = make(tmp_path, val_layout=val_layout)
    rc, summary, err = prepare(capsys, "--data", root, summary=tmp_path / "out" / "prep.json")
    assert rc == 0, err
    assert_summary_shape(summary)
    assert summary["num_classes"] == 3
    assert {k: summary["splits"]["train"][k] for k in ("images", "per_class_min", "per_class_max")} == \
        {"images": 12, "per_class_min": 4, "per_class_max": 4}
    assert {k: summary["splits"]["val"][k] for k in ("images", "per_class_min", "per_class_max")} == \
        {"images": 6, "per_class_min": 2, "per_class_max": 2}
    assert summary["skipped"] == []
    assert [c["wnid"] for c in summary["classes"]] == WNIDS3
    assert Path(summary["root"]) == root


@pytest.mark.parametrize("val_layout", ["arranged", "flat-arranged"])
def test_arranged_val_has_the_same_labels_as_official(tmp_path, val_layout):
    official = index_dataset(make(tmp_path, "official"))
    arranged = index_dataset(make(tmp_path, "arranged", val_layout=val_layout))
    assert val_label_by_file(arranged) == val_label_by_file(official)
    assert arranged.splits["train"].labels == official.splits["train"].labels
    assert arranged.signature("train") == official.signature("train")


def test_labels_are_positions_in_sorted_wnids_and_names_come_from_words(tmp_path):
    root = make(tmp_path, num_classes=4)
    wnids = sorted(WORDS)[:4]
    (root / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # file order must not matter
    ds = index_dataset(root)
    assert ds.wnids == wnids and ds.num_classes == 4
    for path, label in zip(ds.splits["train"].paths, ds.splits["train"].labels):
        assert path.split("/")[1] == ds.wnids[label], path
    truth = {f: w for f, w, *_ in (line.split("\t") for line in read_lines(root / "val" / "val_annotations.txt"))}
    assert {f: ds.wnids[label] for f, label in val_label_by_file(ds).items()} == truth
    assert ds.wnids[0] == "n01443537" and ds.names[0] == "goldfish"
    assert ds.full_names[0] == "goldfish, Carassius auratus"
    assert ds.names[ds.wnids.index("n02231487")] == "walking stick"
    assert ds.full_names[ds.wnids.index("n02231487")] == "walking stick, walkingstick, stick insect"
    assert ds.names == [WORDS[w].split(",")[0] for w in wnids]
    assert ds.full_names == [WORDS[w] for w in wnids]


def test_crlf_blank_lines_and_no_final_newline_just_work(tmp_path, capsys):
    root = make(tmp_path, crlf=True)
    a, b, c = WNIDS3
    (root / "wnids.txt").write_bytes(f"\r\n{c}\r\n\r\n{a}\n  \r\n{b}".encode())  # mixed endings, no final newline
    (root / "words.txt").write_bytes(
        f"n99999999\tanother class\r\n\r\n{b}\t{WORDS[b]}\r\n{c}\t{WORDS[c]}\r\n\r\n{a}\t{WORDS[a]}".encode())
    lines = (root / "val" / "val_annotations.txt").read_bytes().decode().splitlines()
    (root / "val" / "val_annotations.txt").write_bytes(("\r\n\r\n".join(lines)).encode())  # no final newline
    ds = index_dataset(root)
    assert ds.wnids == WNIDS3
    assert ds.names == [WORDS[w].split(",")[0] for w in WNIDS3]
    assert ds.full_names == [WORDS[w] for w in WNIDS3]  # the last line, without a newline, is read whole
    assert not any("\r" in s for s in ds.names + ds.full_names + ds.wnids)
    assert len(ds.splits["val"]) == 6 and sorted(ds.splits["val"].labels) == [0, 0, 1, 1, 2, 2]
    rc, summary, err = prepare(capsys, "--data", root, summary=tmp_path / "prep.json")
    assert rc == 0, err
    assert summary["splits"]["train"]["images"] == 12 and summary["splits"]["val"]["images"] == 6


@pytest.mark.parametrize("val_layout", ["official", "arranged"])
def test_stray_files_are_ignored(tmp_path, capsys, val_layout):
    root = make(tmp_path, val_layout=val_layout)
    strays = [root / ".DS_Store", root / "train" / ".DS_Store", root / "val" / ".DS_Store",
              root / "val" / "Thumbs.db"]
    for wnid in WNIDS3:
        strays += [root / "train" / wnid / ".DS_Store", root / "train" / wnid / "images" / ".DS_Store",
                   root / "train" / wnid / "images" / "Thumbs.db",
                   root / "train" / wnid / "images" / f"._{wnid}_0.JPEG"]  # macOS resource fork: not a JPEG
    if val_layout == "official":
        strays += [root / "val" / "images" / "Thumbs.db", root / "val" / "images" / "._val_0.JPEG"]
    else:
        strays += [root / "val" / WNIDS3[0] / "images" / "Thumbs.db", root / "val" / WNIDS3[0] / "Thumbs.db",
                   root / "val" / WNIDS3[0] / "images" / "._val_0.JPEG"]
    for path in strays:
        path.write_bytes(b"\x00\x05\x16\x07 not an image")
    (root / "train" / WNIDS3[1] / "images" / ".ipynb_checkpoints").mkdir()

    ds = index_dataset(root)
    indexed = ds.splits["train"].paths + ds.splits["val"].paths
    assert len(ds.splits["train"]) == 12 and len(ds.splits["val"]) == 6
    assert not [p for p in indexed if Path(p).name.startswith(".") or not p.endswith(".JPEG")]
    assert not [p for p in indexed if "_boxes" in p or "Thumbs" in p]
    rc, summary, err = prepare(capsys, "--data", root, summary=tmp_path / "prep.json")
    assert rc == 0, err
    assert summary["skipped"] == []
    assert summary["splits"]["train"]["images"] == 12 and summary["splits"]["val"]["images"] == 6


# ---------------------------------------------------------------------------------------------
# layout errors


@pytest.mark.parametrize("case", ["extra folder", "wnid without folder", "both"])
def test_wnids_disagreeing_with_train_folders_is_an_error(tmp_path, capsys, case):
    root = make(tmp_path)
    if case in ("extra folder", "both"):
        (root / "train" / "n12345678" / "images").mkdir(parents=True)
        save(class_image(0, 0), root / "train" / "n12345678" / "images" / "n12345678_0.JPEG")
    if case in ("wnid without folder", "both"):
        (root / "wnids.txt").write_text("\n".join(WNIDS3 + ["n87654321"]) + "\n")
    rc, summary, err = prepare(capsys, "--data", root, summary=tmp_path / "prep.json")
    line = one_error_line(err)
    assert rc == 2 and summary is None
    assert str(root / "train") in line
    if case in ("extra folder", "both"):
        assert "n12345678" in line
    if case in ("wnid without folder", "both"):
        assert "n87654321" in line


def _annotations(root: Path) -> Path:
    return root / "val" / "val_annotations.txt"


def test_val_annotation_problems_are_one_error_with_counts(tmp_path, capsys):
    root = make(tmp_path)
    lines = read_lines(_annotations(root))
    lines[0] = lines[0].replace(WNIDS3[0], "n00000001")  # val_0: unknown wnid
    lines[2] = lines[2].replace(WNIDS3[1], "n00000002")  # val_2: unknown wnid
    _annotations(root).write_text("\n".join(lines) + "\n")
    (root / "val" / "images" / "val_5.JPEG").unlink()  # annotated but missing
    for name in ("extra_a.JPEG", "extra_b.JPEG", "extra_c.JPEG"):  # on disk, not annotated
        save(class_image(0, 7), root / "val" / "images" / name)
    rc, _, err = prepare(capsys, "--data", root)
    line = one_error_line(err)
    assert rc == 2
    assert str(_annotations(root)) in line
    assert "2 annotations name an unknown wnid" in line and "n00000001" in line
    assert "1 annotated files are missing" in line and "val_5.JPEG" in line
    assert "3 images have no annotation" in line and "extra_a.JPEG" in line


@pytest.mark.parametrize("problem", ["unknown wnid", "annotated file missing", "image without annotation"])
def test_each_val_annotation_problem_alone(tmp_path, capsys, problem):
    root = make(tmp_path)
    if problem == "unknown wnid":
        with open(_annotations(root), "a") as f:
            f.write("val_6.JPEG\tn00000001\t0\t0\t63\t63\n")
        save(class_image(0, 6), root / "val" / "images" / "val_6.JPEG")
        expect = ["1 annotations name an unknown wnid", "n00000001"]
    elif problem == "annotated file missing":
        (root / "val" / "images" / "val_3.JPEG").unlink()
        expect = ["1 annotated files are missing", "val_3.JPEG"]
    else:
        save(class_image(0, 6), root / "val" / "images" / "val_6.JPEG")
        expect = ["1 images have no annotation", "val_6.JPEG"]
    rc, _, err = prepare(capsys, "--data", root)
    line = one_error_line(err)
    assert rc == 2 and str(_annotations(root)) in line
    for text in expect:
        assert text in line


# ---------------------------------------------------------------------------------------------
# images: unusual but fine, and broken


def test_grayscale_cmyk_and_png_named_jpeg_are_kept(tmp_path, capsys):
    root = make(tmp_path)
    folder = root / "train" / WNIDS3[0] / "images"
    original = class_image(0, 0)
    save(original, folder / f"{WNIDS3[0]}_0.JPEG")
    Image.fromarray(original).convert("L").save(folder / f"{WNIDS3[0]}_1.JPEG", format="JPEG")
    Image.fromarray(original).convert("CMYK").save(folder / f"{WNIDS3[0]}_2.JPEG", format="JPEG")
    Image.fromarray(original).save(folder / f"{WNIDS3[0]}_3.JPEG", format="PNG")
    Image.fromarray(class_image(1, 1000)).convert("L").save(root / "val" / "images" / "val_2.JPEG", format="JPEG")

    rc, summary, err = prepare(capsys, "--data", root, summary=tmp_path / "prep.json")
    assert rc == 0, err
    assert summary["skipped"] == []
    assert summary["splits"]["train"]["images"] == 12 and summary["splits"]["val"]["images"] == 6

    rgb, gray, cmyk, png = (read_rgb(folder / f"{WNIDS3[0]}_{i}.JPEG") for i in range(4))
    for image in (rgb, gray, cmyk, png):
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.equal(png, torch.from_numpy(original).permute(2, 0, 1))  # PNG is lossless
    # CMYK decodes to the same colours (not inverted, not garbage): channel means within a few levels
    assert (cmyk.float().mean((1, 2)) - rgb.float().mean((1, 2))).abs().max() < 8


def _break_images(root: Path) -> dict[str, str]:
    """Break 3 train images (all in class 0 and 1) and 1 val image; return {path: expected reason word}."""
    good = (root / "train" / WNIDS3[0] / "images" / f"{WNIDS3[0]}_3.JPEG").read_bytes()
    bad = {
        f"train/{WNIDS3[0]}/images/{WNIDS3[0]}_0.JPEG": (b"", "empty"),
        f"train/{WNIDS3[0]}/images/{WNIDS3[0]}_2.JPEG": (good[: len(good) // 2], "truncated"),
        f"train/{WNIDS3[1]}/images/{WNIDS3[1]}_1.JPEG": (b"<html>404 not found</html>\n" * 20, "decode"),
        "val/images/val_4.JPEG": (good[:200], "truncated"),
    }
    for rel, (data, _) in bad.items():
        (root / rel).write_bytes(data)
    return {rel: word for rel, (_, word) in bad.items()}


def test_bad_images_are_skipped_counted_and_listed(tmp_path, capsys):
    root = make(tmp_path)
    bad = _break_images(root)
    rc, summary, err = prepare(capsys, "--data", root, summary=tmp_path / "prep.json")
    assert rc == 0, err
    assert_summary_shape(summary)
    train, val = summary["splits"]["train"], summary["splits"]["val"]
    assert (train["images"], train["per_class_min"], train["per_class_max"]) == (9, 2, 4)
    assert (val["images"], val["per_class_min"], val["per_class_max"]) == (5, 1, 2)
    assert train["skipped"] == 3 and val["skipped"] == 1
    listed = {item["path"]: item["reason"] for item in summary["skipped"]}
    assert set(listed) == set(bad)
    for rel, word in bad.items():
        assert word in listed[rel].lower(), (rel, listed[rel])
        assert "\n" not in listed[rel]


def test_strict_makes_a_bad_image_a_one_line_error(tmp_path, capsys):
    root = make(tmp_path)
    bad = _break_images(root)
    rc, summary, err = prepare(capsys, "--data", root, "--strict", summary=tmp_path / "prep.json")
    line = one_error_line(err)
    assert rc == 2 and summary is None
    first = next(iter(bad))  # train comes first, in index order
    assert first in line and "4 bad images" in line


# ---------------------------------------------------------------------------------------------
# a loopback mirror (finding the data: test_dataset_paths.py; downloads: test_dataset_download.py)


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """A loopback HTTP server over tmp_path/served; .url is its base address, .requests the GET paths."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(folder=served, url=f"http://127.0.0.1:{server.server_address[1]}", requests=requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
