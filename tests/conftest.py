"""Helpers shared by the test modules: the one-line error checks and fast extraction arguments.

Every test picks its device on purpose: CPU tests pass ``--device cpu`` (so a machine with a GPU runs
them on the CPU too), and tests marked ``gpu`` run only where CUDA is present.
"""
from __future__ import annotations

from pathlib import Path

import pytest

CPU = ("--device", "cpu")
# Fast extraction for a 2-core CPU: random weights and 64 px inputs wherever the exact AlexNet transform
# is not what is being tested. The CPU forward pass costs about the same per batch whatever its size
# (fc6 alone is 151 MB of weights to read), so the default batch size is kept.
# --precision fp32: bit-for-bit comparisons hold on every machine (auto may choose bf16 where it is faster;
# tests/test_precision_auto.py covers auto)
FAST = ("--weights", "random", "--seed", "0", "--no-progress", "--image-size", "64", "--resize-size", "72", *CPU,
        "--precision", "fp32")


def extract_args(data: Path, out: Path, *extra: str) -> list[str]:
    """Fast CPU extraction arguments; later options (``extra``) override the FAST defaults."""
    return ["--data", str(data), "--out", str(out), *FAST, *extra]


def error_line(err: str) -> str:
    """The one 'error: ...' line a failed run printed, with no traceback (log lines may precede it)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def one_error_line(err, *, allow_progress: bool = False) -> str:
    """stderr (a string, or pytest's capsys) is exactly one 'error: ...' line.

    ``allow_progress``: download progress bars may come before it.
    """
    if not isinstance(err, str):
        err = err.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    if not allow_progress:
        assert len(lines) == 1, f"stderr is not one line: {err!r}"
    return errors[0]


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
