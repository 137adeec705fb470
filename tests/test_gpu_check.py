"""The CPU kind, the worker count, and the GPU check's dry run on the CPU."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import time
from pathlib import Path

import torch

import pipeline.common.hardware as hardware
import run_extract
import run_train_head
import run_webcam


# ---------------------------------------------------------------------------------------------
# Workers and the CPU kind


def test_workers_follow_the_usable_cpus_and_the_local_world(monkeypatch):
    assert hardware.default_workers("cpu", cpus=64) == 1
    assert hardware.default_workers("cuda", local_world=1, cpus=16) == 15
    assert hardware.default_workers("cuda", local_world=8, cpus=16) == 1  # torchrun x 8 on 16 cores: 8, not 64
    assert hardware.default_workers("cuda", local_world=1, cpus=128) == hardware.MAX_CUDA_WORKERS
    assert hardware.default_workers("cuda", local_world=4, cpus=2) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 16)
    assert hardware.default_workers("cuda") == 7


def test_cpu_kind_reads_native_bf16(monkeypatch):
    hardware.cpu_kind.cache_clear()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    monkeypatch.setattr(hardware, "_proc_cpuinfo", lambda: ("Some CPU", {"avx2", "fma", "sse2"}))
    kind = hardware.cpu_kind()
    assert kind["model"] == "Some CPU" and kind["native_bf16"] is False and kind["flags"] == ["avx2", "fma"]
    assert isinstance(kind["capability"], str)
    hardware.cpu_kind.cache_clear()
    monkeypatch.setattr(hardware, "_proc_cpuinfo", lambda: ("EPYC", {"avx2", "avx512f", "avx512_bf16"}))
    assert hardware.cpu_kind()["native_bf16"] is True
    hardware.cpu_kind.cache_clear()
    monkeypatch.setattr(hardware, "_proc_cpuinfo", lambda: ("Xeon", {"avx2"}))
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert hardware.cpu_kind()["native_bf16"] is True
    hardware.cpu_kind.cache_clear()


# ---------------------------------------------------------------------------------------------
# The GPU check's dry run


ENTRY_SCRIPTS = {"run_extract.py": run_extract, "run_train_head.py": run_train_head, "run_webcam.py": run_webcam}


def _main_of(command: list[str]):
    """What ``command`` runs, as a function of this process: ``python run_*.py ARGS``, ``python -m
    benchmarks.bench_extract ARGS`` and ``python -c CODE``; None for anything else."""
    if command[0] != sys.executable:
        return None
    if command[1] == "-c":
        return lambda: exec(command[2], {}) or 0
    if command[1:3] == ["-m", "benchmarks.bench_extract"]:
        from benchmarks import bench_extract
        return lambda: bench_extract.main(command[3:])
    script = ENTRY_SCRIPTS.get(Path(command[1]).name)
    return (lambda: script.main(command[2:])) if script else None


def in_this_process(real_run):
    """gpu_check.run, but the entry scripts, bench_extract's children and timeline, and the bare import run as
    functions in this process, their stdout, stderr and log lines captured as the subprocess's output would be.
    They then pay no interpreter and torch start-up, and extractions share the session's random backbone; torchrun
    (and anything else) still runs as a real subprocess through ``real_run``."""

    def run(command: list[str], timeout: float, **kwargs) -> tuple[int, str, float]:
        main = _main_of(command)
        if main is None:
            return real_run(command, timeout, **kwargs)
        start, output = time.perf_counter(), io.StringIO()
        handler, root = logging.StreamHandler(output), logging.getLogger()
        level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                code = main()
        finally:
            root.removeHandler(handler)
            root.setLevel(level)
        return code, output.getvalue(), time.perf_counter() - start

    return run


def test_gpu_check_dry_run_on_the_cpu(tmp_path, monkeypatch):
    out = tmp_path / "results"
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "run", in_this_process(gpu_check.run))
    from pipeline.common.preprocess import Preprocess
    from pipeline.extract import extractor, reading
    real_steps = (Preprocess.normalize, reading.decode_rgb, reading.hashlib, extractor._Forward.add, extractor.read_ahead)

    code = gpu_check.main(["--device", "cpu", "--images", "22", "--classes", "2", "--small", "6", "--real", "generated",
                           "--skip-tests", "--image-size", "64", "--resize-size", "72", "--live-frames", "4",
                           "--bare-batch", "4", "--bare-import-runs", "1", "--out", str(out), "--work", str(tmp_path / "work")])
    assert code == 0, (out / "gpu.json").read_text()
    result = json.loads((out / "gpu.json").read_text())
    steps = result["steps"]
    assert set(steps) == {"tests", "data", "fp32_vs_cpu", "bf16_vs_fp32", "full_bf16", "full_fp32", "bare_import",
                          "bare_forward", "pack", "full_bf16_pack", "timeline", "decode", "torchrun", "head", "live"}
    assert steps["tests"]["passed"] is None  # --skip-tests
    assert all(step["passed"] for name, step in steps.items() if name != "tests"), steps
    summary = result["summary"]
    assert summary["all_passed"] and summary["cosine_fp32_vs_cpu_min"] >= 0.9999
    assert summary["cosine_bf16_vs_fp32_min"] >= 0.999
    for precision in ("bf16", "fp32"):
        assert summary["steady_img_s"][precision] > 0 and summary["whole_process_s"][precision] > 0
    assert steps["full_bf16"]["images"] == 22 and steps["torchrun"]["identical"]
    assert steps["full_bf16_pack"]["images"] == 22 and steps["pack"]["shards"] >= 2  # train and val
    feed = summary["feed"]  # the ratios issue 37 asks for, each measured
    assert feed["bare_forward_img_s"] > 0 and feed["pack_steady_over_bare"] > 0 and feed["folder_steady_over_bare"] > 0
    assert feed["pack_whole_minus_bare_import_s"] is not None and set(feed["meets"]) == {"steady", "whole", "folder"}
    shares = steps["timeline"]["share_of_loop"]
    assert shares["main"]["forward"] > 0 and (out / steps["timeline"]["picture"]).is_file()
    assert result["cpu"]["native_bf16"] in (True, False) and result["device"] == "cpu"
    # the timeline ran in this process: every step it timed is the real one again
    assert (Preprocess.normalize, reading.decode_rgb, reading.hashlib, extractor._Forward.add, extractor.read_ahead) == real_steps
