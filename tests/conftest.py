"""Fixtures shared by the test modules, built once per session where that is safe, and the pytest hooks.

The session fixtures are read-only: a test that changes a cache or a run folder takes a copy
(``tiny_cache_copy``, or ``shutil.copytree`` into its own ``tmp_path``). Plain helpers are in
``tests/helpers.py``; the names below are re-exported from there for modules that import them from here.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import run_extract
import run_train_head
from pipeline.data.synthetic import make_tiny_imagenet
from tests.helpers import (CPU_ARGS, FAST_EXTRACT_ARGS, error_line, extract_args,  # noqa: F401 (re-exported)
                           one_error_line)

CPU = CPU_ARGS  # re-exported names: argv for the CPU, and the fast extraction arguments
FAST = FAST_EXTRACT_ARGS


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """3 classes x 4 train, 2 val per class: 12 train and 6 val images (read-only)."""
    return make_tiny_imagenet(tmp_path_factory.mktemp("tiny") / "ds", num_classes=3, train_per_class=4,
                              val_per_class=2)


@pytest.fixture(scope="session")
def tiny_cache(tiny_dataset, tmp_path_factory) -> Path:
    """A finished float32 fc7 cache of ``tiny_dataset`` (FAST_EXTRACT_ARGS; train in 2 shards). Read-only."""
    out = tmp_path_factory.mktemp("tiny") / "features"
    assert run_extract.main(extract_args(tiny_dataset, out, "--shard-size", "8")) == 0
    return out


@pytest.fixture
def tiny_cache_copy(tiny_cache, tmp_path) -> Path:
    """A copy of ``tiny_cache`` in this test's tmp_path, free to change."""
    out = tmp_path / "features"
    shutil.copytree(tiny_cache, out)
    return out


@pytest.fixture(scope="session")
def tiny18_dataset(tmp_path_factory) -> Path:
    """3 classes x 6 train, 3 val per class: 18 train and 9 val images, for the head's tests (read-only)."""
    return make_tiny_imagenet(tmp_path_factory.mktemp("tiny18") / "ds", num_classes=3, train_per_class=6,
                              val_per_class=3)


@pytest.fixture(scope="session")
def tiny18_cache(tiny18_dataset, tmp_path_factory) -> Path:
    """The fc7 cache of ``tiny18_dataset`` (FAST_EXTRACT_ARGS). Read-only."""
    out = tmp_path_factory.mktemp("tiny18") / "features"
    assert run_extract.main(extract_args(tiny18_dataset, out)) == 0
    return out


@pytest.fixture(scope="session")
def tiny_head(tiny_cache, tmp_path_factory) -> Path:
    """A linear head trained on ``tiny_cache`` for 2 epochs: its run folder (read-only)."""
    out = tmp_path_factory.mktemp("tiny") / "head"
    assert run_train_head.main([*CPU_ARGS, "--features", str(tiny_cache), "--out", str(out), "--epochs", "2",
                                "--no-progress"]) == 0
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; compares by cosine; skipped where CUDA is absent")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds folder names too
            item.add_marker(skip)
