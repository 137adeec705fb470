"""#18 items 4, 9, 10: every field read back from a cache file or an unpack marker is checked, exactly.

Each field is fed wrong in turn: one line naming the file and the field, nothing the user made changed,
and nothing wrong taken as complete or up to date. A renamed class only refreshes the names.
"""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

import run_extract
from features import cache
from features.cache import CacheError
from tests.helpers import NO_WORKERS_ARGS, ROOT, error_line, extract_args, file_hash, tree_hash



@pytest.fixture(scope="module")
def data(tiny_dataset) -> Path:
    return tiny_dataset  # read-only


@pytest.fixture(scope="module")
def extracted(tiny_cache) -> Path:
    return tiny_cache  # read-only


@pytest.fixture
def cache_copy(tiny_cache_copy) -> Path:
    return tiny_cache_copy


# (attribute, a wrong value): wrong type or out of range, one at a time
WRONG = [("complete", "no"), ("complete", 1), ("format_version", "1"), ("format_version", 0), ("num_rows", -1),
         ("num_rows", 2.0), ("num_classes", 0), ("feature_dim", 0), ("dtype", "float64"), ("precision", "fp8"),
         ("split", ""), ("layers", "fc7"), ("layers", "[1]"), ("skipped", "{}"), ("weights_stamp", "[]"),
         ("batch_size", 0), ("world_size", np.int64(-2)), ("preprocess", "not json"), ("layer", np.bytes_(b"\xff"))]


@pytest.mark.parametrize("name, value", WRONG, ids=[f"{n}={v!r}" for n, v in WRONG])
def test_each_attribute_read_back_has_its_exact_type_and_range(cache_copy, name, value):
    path = cache_copy / "train.h5"
    with h5py.File(path, "a") as f:
        f.attrs[name] = value
    with pytest.raises(CacheError, match=f"{path}: attribute {name} is "):
        cache.read_attrs(path)


def test_a_string_complete_flag_is_not_complete_and_the_file_is_kept(data, cache_copy, capsys):
    """#18 item 4: ``complete = "no"`` was taken as complete (a non-empty string is true)."""
    path = cache_copy / "train.h5"
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = "no"
    before, data_before = file_hash(path), tree_hash(data)
    capsys.readouterr()
    assert run_extract.main(extract_args(data, cache_copy, *NO_WORKERS_ARGS)) == 2
    err = capsys.readouterr().err
    line = error_line(err)
    assert f"{path}: attribute complete is 'no' (str), expected true or false" in line
    assert "up to date" not in err
    assert file_hash(path) == before and tree_hash(data) == data_before  # nothing the user made changed
    assert run_extract.main(extract_args(data, cache_copy, *NO_WORKERS_ARGS, "--overwrite")) == 0  # the way out works
    assert cache.read_attrs(path)["complete"] is True


def test_an_attribute_missing_from_a_complete_file_is_named(cache_copy):
    path = cache_copy / "val.h5"
    with h5py.File(path, "a") as f:
        del f.attrs["num_rows"]
    with pytest.raises(CacheError, match="lacks the attribute.s. num_rows"):
        cache.read_attrs(path)


def test_the_compat_cache_made_by_the_old_code_passes_the_checks():
    compat = ROOT / "tests" / "data" / "compat"
    for split in ("train", "val"):
        attrs = cache.read_attrs(compat / f"{split}.h5")
        assert attrs["complete"] is True and attrs["layers"] == '["fc7"]'


# ---------------------------------------------------------------------------------------------
# item 9: the datasets present are the truth


@pytest.mark.parametrize("recorded", ['["fc6", "fc7"]', '["fc6"]', '["fc7", "fc7"]'])
def test_an_edited_layers_attribute_is_one_line_not_up_to_date(data, cache_copy, capsys, recorded):
    path = cache_copy / "train.h5"
    with h5py.File(path, "a") as f:
        f.attrs["layers"] = recorded
    before = file_hash(path)
    capsys.readouterr()
    assert run_extract.main(extract_args(data, cache_copy, *NO_WORKERS_ARGS, "--layers", "fc6,fc7")) == 2
    err = capsys.readouterr().err
    line = error_line(err)
    assert f"{path}: attribute layers is '{recorded}', but the file holds the layer datasets [\"fc7\"]" in line
    assert "up to date" not in err and "--layers" not in line  # no advice that would loop
    assert file_hash(path) == before


def test_a_layer_dataset_the_attribute_does_not_list_is_refused(cache_copy):
    path = cache_copy / "val.h5"
    with h5py.File(path, "a") as f:
        f.create_dataset("fc6", data=np.zeros((int(f.attrs["num_rows"]), 4096), np.float32))
    with pytest.raises(CacheError, match="attribute layers is .*fc6"):
        cache.read_attrs(path)


# ---------------------------------------------------------------------------------------------
# item 10: a class renamed in words.txt


def test_a_renamed_class_refreshes_the_names_in_place_without_re_extracting(data, extracted, tmp_path, caplog):
    dataset = tmp_path / "ds"
    shutil.copytree(data, dataset)
    out = tmp_path / "features"
    shutil.copytree(extracted, out)
    assert run_extract.main(extract_args(dataset, out, *NO_WORKERS_ARGS)) == 0  # the copied images' new stamps
    words = dataset / "words.txt"
    wnid = (dataset / "wnids.txt").read_text().split()[0]
    lines = [f"{wnid}\trenamed fish, a new name" if line.startswith(wnid) else line
             for line in words.read_text().splitlines()]
    words.write_text("\n".join(lines) + "\n")
    with h5py.File(out / "train.h5", "r") as f:
        features_before = f["fc7"][:]
    caplog.set_level("INFO")
    assert run_extract.main(extract_args(dataset, out, *NO_WORKERS_ARGS)) == 0
    assert "class names refreshed from words.txt (1 changed)" in caplog.text
    assert "img/s" not in caplog.text  # nothing was extracted again
    for split in ("train", "val"):
        opened = cache.open_split(out / f"{split}.h5")
        assert opened.names[0] == "renamed fish" and opened.attrs["class_full_names"].startswith("renamed fish, a new")
    with h5py.File(out / "train.h5", "r") as f:
        assert np.array_equal(f["fc7"][:], features_before)
    caplog.clear()
    assert run_extract.main(extract_args(dataset, out, *NO_WORKERS_ARGS)) == 0  # now simply up to date
    assert "refreshed" not in caplog.text and "up to date" in caplog.text


# ---------------------------------------------------------------------------------------------
# item 4: the unpack marker


MARKER_WRONG = [("zip", 5), ("size", "12"), ("size", -1), ("mtime_ns", 1.5), ("members", "abc"), ("members", None)]


@pytest.mark.parametrize("name, value", MARKER_WRONG, ids=[f"{n}={v!r}" for n, v in MARKER_WRONG])
def test_each_marker_field_is_checked(data, tmp_path, capsys, name, value):
    zip_path = tmp_path / "tiny.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(data.rglob("*")):
            if path.is_file():
                archive.write(path, f"tiny/{path.relative_to(data)}")
    assert run_extract.main(["--data", str(zip_path), "--prepare-only", "--no-progress"]) == 0
    marker = tmp_path / "tiny" / ".unpacked"
    recorded = json.loads(marker.read_text())
    recorded[name] = value
    marker.write_text(json.dumps(recorded))
    before = tree_hash(tmp_path)
    capsys.readouterr()
    assert run_extract.main(["--data", str(zip_path), "--prepare-only", "--no-progress"]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{marker}: field {name} is {value!r}" in line
    assert tree_hash(tmp_path) == before  # nothing unpacked over it, nothing removed
