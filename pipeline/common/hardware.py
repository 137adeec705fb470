"""What the machine offers: the CPU kind (for benchmark records), its bf16 flags, and worker counts.

Torch-free at import: the quick rerun check (pipeline.extract.freshness) reads the precision rules
(pipeline.backbones.precision) without importing torch, which alone takes seconds. torch is imported inside
``cpu_kind`` only. Which precision is fastest is measured, not guessed from flags (pipeline.backbones.precision).
"""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path


BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # /proc/cpuinfo flags of native bf16 (bf16: aarch64)
# the /proc/cpuinfo flags that decide the backbone's CPU speed, recorded by the benchmarks
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
               "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16")
MAX_CUDA_WORKERS = 16  # ~100 us of CPU per 64x64 JPEG: 16 workers feed ~160k img/s, more than one GPU takes


def _proc_cpuinfo() -> tuple[str | None, set[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; (None, empty) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, set()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # x86, aarch64
            flags = set(value.split())
    return model, flags


def cpu_flags() -> set[str]:
    """The first CPU's /proc/cpuinfo flags (empty where there is no /proc/cpuinfo)."""
    return _proc_cpuinfo()[1]


@functools.lru_cache(maxsize=1)
def cpu_kind() -> dict:
    """{"model", "native_bf16", "capability", "flags"}: whether bf16 arithmetic is native on this CPU.

    native_bf16 comes from /proc/cpuinfo (avx512_bf16, amx_bf16, aarch64 bf16) or torch's own CPU query;
    capability is torch's dispatch level (AVX2, AVX512, ...); flags is the subset in SPEED_FLAGS.
    """
    model, flags = _proc_cpuinfo()
    capability, torch_bf16 = None, False
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        torch_bf16 = bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
        model = model or caps.get("cpu_name")
    except Exception:  # an old torch without the query: /proc/cpuinfo decides
        pass
    native = torch_bf16 or bool(flags & set(BF16_FLAGS)) or "BF16" in (capability or "").upper()
    return {"model": model or platform.processor() or platform.machine(), "native_bf16": native,
            "capability": capability, "flags": sorted(flags & set(SPEED_FLAGS))}


def describe_cpu(kind: dict | None = None) -> str:
    """One line for tables and logs: "Intel(R) Xeon(R) ... (AVX512; no native bf16)"."""
    kind = kind or cpu_kind()
    bf16 = "native bf16" if kind["native_bf16"] else "no native bf16"
    return f"{kind['model']} ({kind['capability'] or 'unknown capability'}; {bf16})"


def cpu_tag(kind: dict | None = None) -> str:
    """A short name for result files: amx, avx512-bf16, avx512, avx2 or the machine type."""
    kind = kind or cpu_kind()
    flags = set(kind["flags"])
    for tag, flag in (("amx", "amx_bf16"), ("avx512-bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if flag in flags:
            return tag
    return platform.machine() or "cpu"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_workers(device_type: str, local_world: int | None = None, cpus: int | None = None) -> int:
    """Image readers when --workers is not given: threads on the CPU, DataLoader worker processes on CUDA.

    CPU: 1 (the main process's threads run the backbone; one thread decodes and resizes beside it).
    CUDA: the usable CPUs shared among the ranks on this node (LOCAL_WORLD_SIZE), one left for each rank's
    main process, capped at MAX_CUDA_WORKERS: under torchrun x 8 on 16 cores that is 1 each, not 8.
    """
    if device_type != "cuda":
        return 1
    local_world = local_world or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cpus = cpus or usable_cpus()
    return max(1, min(MAX_CUDA_WORKERS, cpus // max(1, local_world) - 1))


def available_memory() -> int | None:
    """Bytes the kernel can give without swapping: MemAvailable (free pages plus reclaimable cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def free_memory(device) -> int | None:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or ``available_memory()`` on the CPU.
    A bare ``cuda`` (no index) means the current GPU: ``torch.cuda.mem_get_info`` refuses it without one."""
    if device.type != "cuda":
        return available_memory()
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.mem_get_info(index)[0]


def resolve_device(name: str):
    """'auto', 'cpu', 'cuda' or 'cuda:N' -> a usable torch.device, or a clear error. Imports torch, not torchvision
    (which costs seconds more): stage two needs no torchvision."""
    import torch

    from pipeline.common.errors import UserError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for CUDA, but no CUDA device is available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices are visible")
        if device.index is None:  # torch.cuda.set_device, mem_get_info and others refuse a GPU without its index
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device
