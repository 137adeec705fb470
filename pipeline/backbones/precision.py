"""The compute precision of a backbone, all of it: the names, ``--precision auto``'s rules, its timing and fidelity
guard, the compute dtype and the math flags, and placing a backbone on its device.

auto times the candidate precisions on the first real batch and keeps the fastest whose features stay at
cosine >= FIDELITY to fp32's. Which precision wins depends on the machine (bf16 was 0.6x fp32 on one
AVX512-BF16 Xeon and 2.1x on an EPYC with the same flag), so:

- the rerun rule: a cache made at any precision auto may choose is up to date for auto, whichever
  machine reruns it; an explicit ``--precision`` means exactly that precision;
- a run that continues an earlier one (resume, an added layer, torchrun ranks) reuses the recorded choice
  (what extraction records in the cache is pipeline.extract.precision_choice; live's frame-time choice is
  pipeline.live.torch_classifier's).

The names and rules are torch-free (the quick rerun check needs them without importing torch); the timing and
placing import torch when called. Each candidate is a copy of the fp32 backbone with its weights cast once (as
``place_backbone`` casts them); it runs once untimed (oneDNN and cuDNN pick their kernels), then is timed; its
features must keep cosine >= FIDELITY to fp32's on the same images, row by row and layer by layer. On a 2-core
CPU, 16 images cost about 80 ms per fp32 forward, so the whole choice stays well under 2 s.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from typing import TYPE_CHECKING, Callable

from features.settings import PRECISIONS
from pipeline.common.errors import UserError
from pipeline.common.hardware import BF16_FLAGS, cpu_flags

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

AUTO = "auto"
PRECISION_CHOICES = (AUTO, *PRECISIONS)  # what --precision takes
FIDELITY = 0.999  # a candidate's features must keep at least this cosine to fp32's on the timed batch
CPU_SUB_BATCH = 16  # images timed per candidate on the CPU (~80 ms per fp32 forward on 2 cores)
AUTO_ATTR = "precision_auto"  # the cache attribute recording auto's choice and measurements (JSON)
TIMED_RUNS = 1  # timed forwards per candidate after the untimed one (a close call adds one more of each)
# a candidate whose speed is within this factor of fp32's is a close call, where a load spike could decide: both are
# timed again and each one's fastest counts. Far apart (bf16 2x fp32 on Zen 4, 4-5x on AMX) one timing decides
CLOSE_CALL = 1.25


def check_choice(precision: str | None, flag: str = "--precision") -> str:
    """The precision asked for (None: auto, the default), or one line naming the choices."""
    precision = precision or AUTO
    if precision not in PRECISION_CHOICES:
        raise UserError(f"{flag} {precision}: use {', '.join(PRECISION_CHOICES)}")
    return precision


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


# ---------------------------------------------------------------------------------------------
# The compute dtype, the math flags and the device (torch)


def compute_dtype(precision: str) -> "torch.dtype":
    """The backbone's compute dtype for a precision name (PRECISIONS)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def set_precision(device: "torch.device", precision: str) -> None:
    """The one place that sets the math flags for a precision, for extraction and live alike.

    fp32 means fp32: no TF32 convolutions or matmuls on CUDA (cuDNN's TF32 is on by default); bf16 and
    fp16 leave the flags as they are, since their convolutions never use TF32.
    """
    import torch

    if device.type == "cuda" and precision == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def place_backbone(module: "torch.nn.Module", device: "torch.device", precision: str) -> "torch.nn.Module":
    """The backbone's module on ``device`` in channels_last, its weights cast once to the precision's dtype."""
    import torch

    set_precision(device, precision)
    return module.to(device=device, dtype=compute_dtype(precision), memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------
# auto's measurement: time the candidates on a real batch, keep the fastest faithful one (torch)


def time_forward(model, run: Callable) -> float:
    """Seconds of one ``run(model)`` after an untimed one: the fastest of TIMED_RUNS."""
    import torch

    run(model)
    best = float("inf")
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        outputs = run(model)
        if any(t.is_cuda for t in outputs.values()):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def min_cosine(reference: dict, candidate: dict) -> float:
    """The lowest row cosine between two {layer: (B, dim)} outputs (two all-zero rows count as equal)."""
    import torch

    lowest = 1.0
    for layer, ref in reference.items():
        a, b = ref.float(), candidate[layer].float()
        dot, norms = (a * b).sum(1), a.norm(dim=1) * b.norm(dim=1)
        both_zero = (a.norm(dim=1) == 0) & (b.norm(dim=1) == 0)
        cosine = torch.where(both_zero, torch.ones_like(dot), dot / norms.clamp_min(1e-30))
        lowest = min(lowest, float(cosine.min()))
    return lowest


def choose_precision(backbone, make_input: Callable, layers: tuple[str, ...], device, *,
                     timer: Callable | None = None, flags: set[str] | None = None) -> dict:
    """The record of auto's choice: {"chosen", "speed": {name: throughput / fp32's}, "cosine", "skipped",
    "batch_size"}; logged as one line.

    ``backbone``: the fp32 backbone module on ``device`` (left as it is); ``make_input(dtype)``: the timed batch,
    normalised for that dtype. ``timer`` and ``flags`` are for tests (a stubbed clock, a CPU kind).
    """
    import torch

    names, skipped = candidates(device.type, flags=flags,
                                cuda_bf16=device.type != "cuda" or torch.cuda.is_bf16_supported())
    if names == ["fp32"]:  # nothing to compare: no timing
        record = {"chosen": "fp32", "speed": {"fp32": 1.0}, "cosine": {}, "skipped": skipped, "device": device.type}
        log.info(describe(record))
        return record
    timer = timer or time_forward  # looked up now: tests stub the module's clock
    with torch.inference_mode():
        seconds, cosine, batch_size = _time_candidates(backbone, make_input, layers, device, names, timer)
    speed = {name: round(seconds["fp32"] / max(s, 1e-12), 3) for name, s in seconds.items()}
    faithful = [name for name in names if name == "fp32" or cosine[name] >= FIDELITY]
    chosen = max(faithful, key=lambda name: (speed[name], name == "fp32"))  # a tie keeps fp32
    set_precision(device, chosen)
    record = {"chosen": chosen, "speed": speed, "cosine": cosine, "skipped": skipped,
              "batch_size": batch_size, "device": device.type}
    log.info(describe(record))
    return record


def cast_copy(module: "torch.nn.Module", dtype: "torch.dtype") -> "torch.nn.Module":
    """A copy of ``module`` whose floating-point weights and buffers are cast to ``dtype`` (layouts kept), made
    without first copying them at full precision: what ``copy.deepcopy(module).to(dtype=dtype)`` gives, in a third
    of the time (AlexNet: 0.04 against 0.12 s; the fp32 copy of 244 MB is never made)."""
    import torch

    memo: dict = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point() and id(tensor) not in memo:
            cast = tensor.detach().to(dtype)
            memo[id(tensor)] = torch.nn.Parameter(cast, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) \
                else cast
    return copy.deepcopy(module, memo)


def _time_candidates(backbone, make_input: Callable, layers: tuple[str, ...], device, names: list[str],
                     timer: Callable) -> tuple[dict, dict, int]:
    """({precision: seconds}, {precision: min cosine to fp32}, the batch size) over the candidates."""
    seconds, cosine, reference, batch_size, fp32_run = {}, {}, None, 0, None
    for name in names:
        set_precision(device, name)
        dtype = compute_dtype(name)
        model = backbone if name == "fp32" else cast_copy(backbone, dtype)
        x = make_input(dtype)
        batch_size = int(x.shape[0])
        outputs: dict = {}
        run = lambda m, x=x, out=outputs: out.update(m.forward_layers(x, layers)) or out  # noqa: E731
        seconds[name] = timer(model, run)
        if name == "fp32":
            fp32_run = run
        elif 1 / CLOSE_CALL < seconds["fp32"] / max(seconds[name], 1e-12) < CLOSE_CALL:  # a close call: again, both
            seconds[name] = min(seconds[name], timer(model, run))
            set_precision(device, "fp32")
            seconds["fp32"] = min(seconds["fp32"], timer(backbone, fp32_run))
        outputs = outputs or model.forward_layers(x, layers)  # the last timed run's, else one more forward
        if reference is None:
            reference = outputs
        else:
            cosine[name] = round(min_cosine(reference, outputs), 6)
        del model
    return seconds, cosine, batch_size
