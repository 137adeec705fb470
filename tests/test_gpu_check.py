"""The CPU kind, the worker count, and the GPU check's dry run on the CPU."""
from __future__ import annotations

import json

import torch

import pipeline.common.hardware as hardware


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


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "results"
    from benchmarks import gpu_check

    code = gpu_check.main(["--device", "cpu", "--images", "22", "--classes", "2", "--small", "6", "--real", "generated",
                           "--skip-tests", "--image-size", "64", "--resize-size", "72", "--live-frames", "4",
                           "--out", str(out), "--work", str(tmp_path / "work")])
    assert code == 0, (out / "gpu.json").read_text()
    result = json.loads((out / "gpu.json").read_text())
    steps = result["steps"]
    assert set(steps) == {"tests", "data", "fp32_vs_cpu", "bf16_vs_fp32", "full_bf16", "full_fp32", "decode",
                          "torchrun", "head", "live"}
    assert steps["tests"]["passed"] is None  # --skip-tests
    assert all(step["passed"] for name, step in steps.items() if name != "tests"), steps
    summary = result["summary"]
    assert summary["all_passed"] and summary["cosine_fp32_vs_cpu_min"] >= 0.9999
    assert summary["cosine_bf16_vs_fp32_min"] >= 0.999
    for precision in ("bf16", "fp32"):
        assert summary["steady_img_s"][precision] > 0 and summary["whole_process_s"][precision] > 0
    assert steps["full_bf16"]["images"] == 22 and steps["torchrun"]["identical"]
    assert result["cpu"]["native_bf16"] in (True, False) and result["device"] == "cpu"
