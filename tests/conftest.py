"""Fixtures shared by the test modules, built once per session where that is safe, and the pytest hooks.

The session fixtures are read-only: a test that changes a cache or a run folder takes a copy
(``tiny_cache_copy``, or ``shutil.copytree`` into its own ``tmp_path``). Plain helpers are in
``tests/helpers.py``; the names below are re-exported from there for modules that import them from here.
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

import run_train_head
from pipeline.data.synthetic import make_tiny_imagenet
from tests.helpers import (CPU_ARGS, FAST_EXTRACT_ARGS, ROOT, error_line, extract_args,  # noqa: F401 (re-exported)
                           extract_into, one_error_line)

COMPAT = ROOT / "tests" / "data" / "compat" / "best.pt"  # 3 classes, random backbone, 64 px inputs
CPU = CPU_ARGS  # re-exported names: argv for the CPU, and the fast extraction arguments
FAST = FAST_EXTRACT_ARGS


@pytest.fixture(scope="session")
def generated_dataset(tmp_path_factory):
    """``generated_dataset(num_classes, train_per_class, val_per_class)``: a generated dataset of that size,
    made once per session (read-only: copy it to change it)."""
    made: dict[tuple[int, int, int], Path] = {}

    def make(num_classes: int, train_per_class: int, val_per_class: int) -> Path:
        key = (num_classes, train_per_class, val_per_class)
        if key not in made:
            made[key] = make_tiny_imagenet(tmp_path_factory.mktemp("generated") / "ds", num_classes=num_classes,
                                           train_per_class=train_per_class, val_per_class=val_per_class)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_dataset(generated_dataset) -> Path:
    """3 classes x 4 train, 2 val per class: 12 train and 6 val images (read-only)."""
    return generated_dataset(3, 4, 2)


@pytest.fixture(scope="session")
def tiny_cache(tiny_dataset, tmp_path_factory) -> Path:
    """A finished float32 fc7 cache of ``tiny_dataset`` (FAST_EXTRACT_ARGS; train in 2 shards). Read-only."""
    return extract_into(tmp_path_factory.mktemp("tiny"), tiny_dataset, "--shard-size", "8")


@pytest.fixture
def tiny_cache_copy(tiny_cache, tmp_path) -> Path:
    """A copy of ``tiny_cache`` in this test's tmp_path, free to change."""
    out = tmp_path / "features"
    shutil.copytree(tiny_cache, out)
    return out


@pytest.fixture(scope="session")
def tiny18_cache(generated_dataset, tmp_path_factory) -> Path:
    """The fc7 cache (FAST_EXTRACT_ARGS) of ``generated_dataset(3, 6, 3)``, 18 train and 9 val images. Read-only."""
    return extract_into(tmp_path_factory.mktemp("tiny18"), generated_dataset(3, 6, 3))


@pytest.fixture(scope="session")
def tiny_head(tiny_cache, tmp_path_factory) -> Path:
    """A linear head trained on ``tiny_cache`` for 2 epochs: its run folder (read-only)."""
    out = tmp_path_factory.mktemp("tiny") / "head"
    assert run_train_head.main([*CPU_ARGS, "--features", str(tiny_cache), "--out", str(out), "--epochs", "2",
                                "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Path:
    """tests/data/compat/best.pt exported as ``classifier.onnx`` and its sidecar ``classifier.json`` (read-only: link
    or copy them to change them). Skipped where the deploy extra (requirements-deploy.txt) is not installed."""
    for package in ("onnx", "onnxscript"):
        pytest.importorskip(package, reason="the deploy extra is not installed: pip install -r requirements-deploy.txt")
    import run_webcam

    onnx_path = tmp_path_factory.mktemp("deploy") / "classifier.onnx"
    assert run_webcam.main([*CPU_ARGS, "--checkpoint", str(COMPAT), "--export", str(onnx_path)]) == 0
    return onnx_path


_RANDOM_MODELS: dict[tuple[str, str], tuple] = {}


@pytest.fixture(scope="session", autouse=True)
def reuse_random_models():
    """Each seeded random backbone is built once per session, and every later load gets a fresh copy of it.

    Loading ``random`` weights is a pure function of the model name and the seed, and for AlexNet it costs about
    2 s of CPU (61 M random numbers and the SHA-256 fingerprint of 228 MB) in each of the suite's many in-process
    extractions and live runs (a CLIP ViT-B-32, 151 M). A load here returns a deep copy (callers cast it in place),
    the same spec and fingerprint, the same warning, and leaves the global RNG where the real load leaves it. Every
    family's ``load`` is wrapped (timm's and open_clip's where the zoo extra is installed).
    tests/backbones/test_alexnet.py calls the real function; other specs (imagenet, pretrained, files) and subprocesses are
    not affected.
    """
    import importlib

    from pipeline.backbones.catalog import FAMILIES

    with pytest.MonkeyPatch.context() as patch:
        for module in FAMILIES.values():
            try:
                family = importlib.import_module(module)
            except ModuleNotFoundError:  # a zoo family without the zoo extra
                continue
            patch.setattr(family, "load", _reusing(family.load, family))
        yield


def _reusing(real, family):
    """``family.load`` returning a copy of the first load of each (name, random seed)."""
    from pipeline.backbones import torchvision_family, zoo

    warn, text = ((torchvision_family.log, "backbone %s has RANDOM weights (%s): features are not ImageNet features")
                  if family is torchvision_family else
                  (zoo.log, "backbone %s has RANDOM weights (%s): its features are not pretrained features"))

    def load(name: str, spec: str = "pretrained", *, seed: int = 0, progress: bool = True):
        recorded = f"random:seed={seed}" if spec == "random" else spec
        if not recorded.startswith("random:seed="):
            return real(name, spec, seed=seed, progress=progress)
        key = (name, recorded)
        if key in _RANDOM_MODELS:
            warn.warning(text, name, recorded)
        else:
            _RANDOM_MODELS[key] = (real(name, spec, seed=seed, progress=progress), torch.get_rng_state())
        loaded, rng_after = _RANDOM_MODELS[key]
        torch.set_rng_state(rng_after)
        return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))

    load.__wrapped__ = real  # tests/backbones/test_alexnet.py tests the real one
    return load


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
