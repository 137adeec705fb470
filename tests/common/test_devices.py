"""Device plumbing without a GPU: a bare ``--device cuda`` (no index) must reach CUDA's memory query with an index.

The GPU check found it on an H200: ``torch.cuda.mem_get_info(torch.device("cuda"))`` raises "Expected a torch.device
with a specified index", so every CUDA extraction stopped before its first batch. These tests stand in for CUDA
with a fake that refuses an unindexed device exactly as torch does.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.common import hardware


@pytest.fixture
def fake_cuda(monkeypatch):
    asked = []

    def mem_get_info(device=None):
        if isinstance(device, torch.device) and device.index is None:  # torch's own refusal
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        asked.append(device.index if isinstance(device, torch.device) else device)
        return 7 * 2**30, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    return asked


def test_a_bare_cuda_device_asks_the_current_gpu(fake_cuda):
    assert hardware.free_memory(torch.device("cuda")) == 7 * 2**30
    assert hardware.free_memory(torch.device("cuda", 1)) == 7 * 2**30
    assert fake_cuda == [3, 1]


def test_the_cpu_reports_available_memory():
    free = hardware.free_memory(torch.device("cpu"))
    assert free is None or free > 0


def test_head_and_extraction_memory_checks_take_a_bare_cuda_device(fake_cuda):
    from pipeline.extract.loading import default_batch_size
    from pipeline.heads.readers import _fits_in_memory

    assert _fits_in_memory(2**30, torch.device("cuda"))
    assert not _fits_in_memory(7 * 2**30, torch.device("cuda"))
    assert default_batch_size("resnet18", torch.device("cuda")) > 0
    assert fake_cuda and set(fake_cuda) == {3}


def test_a_bare_cuda_resolves_to_the_current_gpu_with_its_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert hardware.resolve_device("cuda") == torch.device("cuda", 2)
    assert hardware.resolve_device("auto") == torch.device("cuda", 2)
    assert hardware.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert hardware.resolve_device("cpu") == torch.device("cpu")
