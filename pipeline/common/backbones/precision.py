"""``--precision auto``: the rules, torch-free (the quick rerun check needs them without importing torch).

auto times the candidate precisions on the first real batch and keeps the fastest whose features stay at
cosine >= FIDELITY to fp32's (pipeline.common.backbones.precision_timing). Which precision wins depends on the
machine (bf16 was 0.6x fp32 on one AVX512-BF16 Xeon and 2.1x on an EPYC with the same flag), so:

- the rerun rule: a cache made at any precision auto may choose is up to date for auto, whichever
  machine reruns it; an explicit ``--precision`` means exactly that precision;
- a run that continues an earlier one (resume, an added layer, torchrun ranks) reuses the recorded choice.
"""
from __future__ import annotations

import json

from features.settings import PRECISIONS
from pipeline.common.hardware import BF16_FLAGS, cpu_flags

AUTO = "auto"
PRECISION_CHOICES = (AUTO, *PRECISIONS)  # what --precision takes
FIDELITY = 0.999  # a candidate's features must keep at least this cosine to fp32's on the timed batch
CPU_SUB_BATCH = 16  # images timed per candidate on the CPU (~80 ms per fp32 forward on 2 cores)
AUTO_ATTR = "precision_auto"  # the cache attribute recording auto's choice and measurements (JSON)


def accepts(requested: str, recorded: str) -> bool:
    """Whether a cache computed at ``recorded`` is what ``--precision requested`` asks for (the rerun rule)."""
    return recorded in PRECISIONS if requested == AUTO else recorded == requested


def candidates(device_type: str, *, cuda_bf16: bool = True, flags: set[str] | None = None) -> tuple[list[str], dict]:
    """(precisions to time, fp32 first; {skipped precision: why}) on this device.

    The CPU times bf16 only where /proc/cpuinfo lists native bf16 (avx512_bf16, amx_bf16, aarch64 bf16):
    emulated bf16 is several times slower than fp32, timing it is wasted. fp16 is timed on CUDA only.
    """
    if device_type == "cuda":
        timed = ["fp32", "bf16", "fp16"] if cuda_bf16 else ["fp32", "fp16"]
        return timed, {} if cuda_bf16 else {"bf16": "this GPU has no bf16"}
    flags = cpu_flags() if flags is None else flags
    skipped = {"fp16": "timed on CUDA only"}
    if flags & set(BF16_FLAGS):
        return ["fp32", "bf16"], skipped
    return ["fp32"], {"bf16": "no native bf16 in /proc/cpuinfo (avx512_bf16, amx_bf16 or aarch64 bf16)", **skipped}


def describe(record: dict) -> str:
    """The one log line of a choice: "precision auto at batch 16: bf16 0.60x fp32 here: using fp32"."""
    if record.get("reused"):
        return f"precision auto: {record['chosen']}, as chosen for {record['reused']} (not timed again)"
    parts = []
    for name, speed in record.get("speed", {}).items():
        if name == "fp32":
            continue
        cosine = record.get("cosine", {}).get(name)
        failed = cosine is not None and cosine < FIDELITY
        parts.append(f"{name} {speed:.2f}x fp32" + (f" but cosine {cosine:.5f} < {FIDELITY}" if failed else ""))
    parts += [f"{name} skipped ({why})" for name, why in record.get("skipped", {}).items()
              if not (name == "fp16" and why == "timed on CUDA only")]
    at = f" at batch {record['batch_size']}" if record.get("batch_size") else ""
    return f"precision auto{at}: {'; '.join(parts) or 'nothing else to try'} here: using {record['chosen']}"


def encode(record: dict) -> str:
    """The cache attribute's value."""
    return json.dumps(record, sort_keys=True)


def decode(value: str | None) -> dict | None:
    """A recorded choice, or None where there is none (an explicit precision, an older cache)."""
    if not value:
        return None
    try:
        record = json.loads(value)
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("chosen") in PRECISIONS else None


def reused(precision: str, source: str, earlier: dict | None = None) -> dict:
    """The record of a choice taken over from an earlier run (its measurements kept where it has them)."""
    return {**(earlier or {}), "chosen": precision, "reused": source}
