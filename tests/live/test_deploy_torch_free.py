"""Without torch (the deploy set-up: opencv-python, numpy, onnxruntime), each command that needs torch is one line
naming requirements.txt and the torch-free ``--onnx`` path, exit 2, no traceback (issue 29, finding 7): torch not
installed at all, or installed but failing while it is imported (a missing shared library).

That ``run_webcam.py --onnx X.onnx --runtime opencv`` still runs there is tests/test_deploy.py's
test_runtime_opencv_runs_with_torch_torchvision_and_h5py_unimportable.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import FAST_EXTRACT_ARGS, ROOT, error_line, torch_free_env

COMPAT = ROOT / "tests" / "data" / "compat" / "best.pt"
BROKEN_TORCH = 'raise ImportError("libtorch_cpu.so: cannot open shared object file: No such file or directory")\n'


def _commands(dataset: Path) -> dict[str, list[str]]:
    return {
        "webcam": ["run_webcam.py"],  # runs/head/best.pt on camera 0
        "webcam-checkpoint": ["run_webcam.py", "--checkpoint", str(COMPAT), "--source", "0"],
        "webcam-export": ["run_webcam.py", "--checkpoint", str(COMPAT), "--export", "classifier.onnx"],
        "extract": ["run_extract.py", "--data", str(dataset), "--out", "features", *FAST_EXTRACT_ARGS],
        "train-head": ["run_train_head.py", "--features", "features", "--out", "head"],
    }


def _broken_torch_env(tmp_path: Path) -> dict:
    """torch and torchvision are found, but importing them fails as a broken install does."""
    for package in ("torch", "torchvision"):
        (tmp_path / "broken" / package).mkdir(parents=True)
        (tmp_path / "broken" / package / "__init__.py").write_text(BROKEN_TORCH)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "broken"), str(ROOT)])}


@pytest.mark.parametrize("torch_state", ["absent", "broken"])
@pytest.mark.parametrize("command", ["webcam", "webcam-checkpoint", "webcam-export", "extract", "train-head"])
def test_each_command_without_torch_is_one_line(tiny_dataset, tmp_path, command, torch_state):
    absent = torch_state == "absent"
    env = torch_free_env(tmp_path, blocked=("torch", "torchvision")) if absent else _broken_torch_env(tmp_path)
    script, *args = _commands(tiny_dataset)[command]
    run = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    line = error_line(run.stderr)
    assert run.returncode == 2, run.stderr
    assert line.startswith("error: torch cannot be imported (")
    assert "pip install -r requirements.txt" in line and "--onnx" in line
    assert ("No module named 'torch'" if absent else "libtorch_cpu.so") in line
    assert not (tmp_path / "classifier.onnx").exists() and not (tmp_path / "classifier.json").exists()
