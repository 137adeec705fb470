"""The live classifier's runtimes side by side: torch, ONNX Runtime and OpenCV's DNN (run by bench_webcam --runtimes).

One random-weight AlexNet fc7 + 4096 -> 200 head checkpoint, exported once; each runtime runs the live loop
(pipeline.live.runner.run_live) headless on synthetic 640x480 frames, in fp32: at batch 1 as a camera, and at
--batch-frames 8 as a video file; quiet, then under a competing load of one busy process per core.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.common.config import LiveConfig
from pipeline.common.hardware import cpu_kind, cpu_tag, describe_cpu
from pipeline.live import runner as live
from pipeline.live.start import open_classifier

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 8)  # a camera; a video file at the default --batch-frames


def _fps(frame_ms: list[float]) -> dict:
    a = np.asarray(frame_ms)
    return {"median_fps": round(1000 / float(np.median(a)), 1), "mean_fps": round(1000 / float(a.mean()), 1),
            "p95_ms": round(float(np.percentile(a, 95)), 2), "frames": len(a)}


def _config(runtime: str, checkpoint: Path, onnx_path: Path, batch: int, frames: int) -> LiveConfig:
    model = {"checkpoint": checkpoint} if runtime == "torch" else {"onnx": onnx_path}
    return LiveConfig(**model, runtime=runtime, device="cpu", display=False, max_frames=frames, batch_frames=batch)


def measure(runtime: str, checkpoint: Path, onnx_path: Path, frames: int, warmup: int, camera, video) -> dict:
    results = {}
    for batch in BATCHES:
        count = -(-(warmup + frames) // batch) * batch
        config = _config(runtime, checkpoint, onnx_path, batch, count)
        source = (camera if batch == 1 else video)(count)
        summary = live.run_live(config, open_classifier(config), source=source)
        results[f"batch{batch}"] = _fps(summary.frame_ms[warmup:])
    return results


class CompetingLoad:
    """One busy Python process per core, for the duration of a ``with`` block."""

    def __enter__(self):
        self.children = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
        time.sleep(1.0)  # let the scheduler spread them
        return self

    def __exit__(self, *exc):
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.wait(timeout=10)


def _table(kind: str, measured: dict) -> None:
    print(f"\nCPU: {kind}; 640x480 headless, fp32; median FPS (p95 ms per frame)")
    conditions = list(next(iter(measured.values())))
    header = "".join(f"{f'{c} b{b}':>21s}" for c in conditions for b in BATCHES)
    print(f"{'runtime':14s}{header}")
    for runtime, by_condition in measured.items():
        cells = "".join(f"{by_condition[c][f'batch{b}']['median_fps']:>13.1f} ({by_condition[c][f'batch{b}']['p95_ms']:6.1f})"
                        for c in conditions for b in BATCHES)
        print(f"{runtime:14s}{cells}")


def compare_runtimes(args, camera, video, make_checkpoint) -> int:
    """Export once, measure every runtime in ``args.runtimes`` quiet (and with ``args.load`` loaded); write JSON."""
    from pipeline.backbones.backbone import open_backbone
    from pipeline.live.export import export_classifier

    logging.getLogger().setLevel(logging.WARNING)
    runtimes = args.runtimes.split(",")
    kind = cpu_kind()
    frames, warmup = args.frames, args.warmup
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, onnx_path = Path(tmp) / "best.pt", Path(tmp) / "classifier.onnx"
        backbone = open_backbone("alexnet", "random", seed=0, progress=False)
        spec, fingerprint = backbone.weights, backbone.fingerprint
        make_checkpoint(checkpoint, spec, fingerprint, "fp32")
        export_classifier(LiveConfig(checkpoint=checkpoint, export=onnx_path))
        measured = {runtime: {} for runtime in runtimes}
        for condition in ("quiet", "loaded") if args.load else ("quiet",):
            for runtime in runtimes:
                if condition == "loaded":
                    with CompetingLoad():
                        measured[runtime][condition] = measure(runtime, checkpoint, onnx_path, frames, warmup, camera, video)
                else:
                    measured[runtime][condition] = measure(runtime, checkpoint, onnx_path, frames, warmup, camera, video)
                print(f"{runtime} {condition}: {measured[runtime][condition]}", flush=True)
    _table(describe_cpu(kind), measured)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out = args.out or RESULTS / f"runtimes-{cpu_tag(kind)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"what": __doc__.split("\n\n")[1].replace("\n", " "), "cpu_kind": describe_cpu(kind),
                               "cpu": kind, "cpu_count": os.cpu_count(), "load_average_after": load,
                               "frames": frames, "runtimes": measured}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
