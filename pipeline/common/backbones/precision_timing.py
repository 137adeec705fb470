"""``--precision auto``'s measurement: time the candidates on a real batch, keep the fastest faithful one.

Each candidate is a copy of the fp32 backbone with its weights cast once (as ``place_backbone`` casts them);
it runs once untimed (oneDNN and cuDNN pick their kernels), then is timed; its features must keep cosine >=
FIDELITY to fp32's on the same images, row by row and layer by layer. On a 2-core CPU, 16 images cost about
80 ms per fp32 forward, so the whole choice stays well under 2 s. The rules live in pipeline.common.backbones.precision.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Callable

import torch

from pipeline.common.backbones.loading import compute_dtype, set_precision
from pipeline.common.backbones.precision import FIDELITY, candidates, describe

log = logging.getLogger(__name__)

TIMED_RUNS = 2  # timed forwards per candidate after the untimed one; the fastest counts (load spikes only slow)


def time_forward(model: torch.nn.Module, run: Callable[[torch.nn.Module], dict]) -> float:
    """Seconds of one ``run(model)`` after an untimed one: the fastest of TIMED_RUNS."""
    run(model)
    best = float("inf")
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        outputs = run(model)
        if any(t.is_cuda for t in outputs.values()):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def min_cosine(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor]) -> float:
    """The lowest row cosine between two {layer: (B, dim)} outputs (two all-zero rows count as equal)."""
    lowest = 1.0
    for layer, ref in reference.items():
        a, b = ref.float(), candidate[layer].float()
        dot, norms = (a * b).sum(1), a.norm(dim=1) * b.norm(dim=1)
        both_zero = (a.norm(dim=1) == 0) & (b.norm(dim=1) == 0)
        cosine = torch.where(both_zero, torch.ones_like(dot), dot / norms.clamp_min(1e-30))
        lowest = min(lowest, float(cosine.min()))
    return lowest


@torch.inference_mode()
def choose_precision(backbone: torch.nn.Module, make_input: Callable[[torch.dtype], torch.Tensor],
                     layers: tuple[str, ...], device: torch.device, *,
                     timer: Callable[[torch.nn.Module, Callable], float] | None = None,
                     flags: set[str] | None = None) -> dict:
    """The record of auto's choice: {"chosen", "speed": {name: throughput / fp32's}, "cosine", "skipped",
    "batch_size"}; logged as one line.

    ``backbone``: the fp32 backbone on ``device`` (left as it is); ``make_input(dtype)``: the timed batch,
    normalised for that dtype. ``timer`` and ``flags`` are for tests (a stubbed clock, a CPU kind).
    """
    names, skipped = candidates(device.type, flags=flags,
                                cuda_bf16=device.type != "cuda" or torch.cuda.is_bf16_supported())
    if names == ["fp32"]:  # nothing to compare: no timing
        record = {"chosen": "fp32", "speed": {"fp32": 1.0}, "cosine": {}, "skipped": skipped, "device": device.type}
        log.info(describe(record))
        return record
    timer = timer or time_forward  # looked up now: tests stub the module's clock
    seconds, cosine, reference, batch_size = {}, {}, None, 0
    for name in names:
        set_precision(device, name)
        dtype = compute_dtype(name)
        model = backbone if name == "fp32" else copy.deepcopy(backbone).to(dtype=dtype)
        x = make_input(dtype)
        batch_size = int(x.shape[0])
        outputs: dict = {}
        seconds[name] = timer(model, lambda m: outputs.update(m.forward_layers(x, layers)) or outputs)
        outputs = outputs or model.forward_layers(x, layers)  # the last timed run's, else one more forward
        if reference is None:
            reference = outputs
        else:
            cosine[name] = round(min_cosine(reference, outputs), 6)
        del model
    speed = {name: round(seconds["fp32"] / max(s, 1e-12), 3) for name, s in seconds.items()}
    faithful = [name for name in names if name == "fp32" or cosine[name] >= FIDELITY]
    chosen = max(faithful, key=lambda name: (speed[name], name == "fp32"))  # a tie keeps fp32
    set_precision(device, chosen)
    record = {"chosen": chosen, "speed": speed, "cosine": cosine, "skipped": skipped,
              "batch_size": batch_size, "device": device.type}
    log.info(describe(record))
    return record
