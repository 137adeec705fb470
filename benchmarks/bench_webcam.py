"""Live-runner speed: synthetic 640x480 frames through the whole per-frame path, no camera, no window.

    python -m benchmarks.bench_webcam                       # 200 timed frames per variant, fp32 and bf16
    python -m benchmarks.bench_webcam --frames 500 --device cuda
    python -m benchmarks.bench_webcam --runtimes torch,onnxruntime,opencv --load   # the runtimes side by side

--runtimes compares the classifier's runtimes (pipeline.live.classifier) on the same exported classifier, in
fp32, headless at batch 1 (a camera) and at --batch-frames 8 (a video file), quiet and then (--load) under a
competing CPU load the benchmark starts: one busy process per core. It reports FPS side by side with the CPU
kind (benchmarks/bench_runtimes.py) and writes results/runtimes-<cpu tag>.json.

The frames go through pipeline.live.runner.run_live exactly as camera frames do (BGR -> RGB, the checkpoint's
Preprocess, channels_last AlexNet fc7 + a 4096 -> 200 head, softmax, top-k, predictions line), with a
random-weight backbone. Variants:
(a) headless: --no-display --predictions (no drawing);
(b) drawn: as (a) plus the overlay drawn on every frame and handed to a no-op window (a windowed run
    minus imshow/waitKey's own cost);
(c) video: as (b) plus the annotated mp4 written;
all three as a camera (one frame per forward pass), and then as a video file is read, --batch-frames N
frames per forward pass (headless_b4, headless_b8, video_b8): the same per-frame results, with fc6/fc7's
weights read once per batch. For batched rows the per-frame times are the batch's divided by its frames;
"batch ms" is the model time of a whole batch, the delay before its first frame's result.
Against the limit: the bare batch-1 fc7 + head forward on a ready (1, 3, 224, 224) tensor, timed before
and after the live runs (and the per-image time of bare batch-4, -8 and -64 forwards; 64 is what
extraction sees: at batch 1, fc6/fc7's 218 MB of weights are read once per frame).
Each precision (--precisions, default fp32,bf16) uses a checkpoint recording it, so the live runner casts
the backbone's weights once, as extraction did; bf16 runs the camera path only (batch 1, --bf16-frames).
Writes benchmarks/results/webcam-<cpu tag>.json with the CPU kind; other processes' CPU use during the run
is recorded with it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from models import LayerClassifier
from pipeline.live import sources
from pipeline.backbones.backbone import open_backbone
from pipeline.backbones.precision import place_backbone
from pipeline.common.hardware import resolve_device
from pipeline.common.checkpoint import make_checkpoint as build_checkpoint, save_checkpoint
from pipeline.common.config import LiveConfig
from pipeline.common.hardware import cpu_kind, cpu_tag, describe_cpu
from pipeline.common.preprocess import Preprocess
from pipeline.live import overlay
from pipeline.live import runner as live
from pipeline.live.start import open_classifier

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FC7_DIM = 4096  # AlexNet's fc7, the layer these heads read
NUM_CLASSES = 200


class SyntheticCamera(sources.FrameSource):
    """640x480 BGR frames from a small pool of smooth random pictures; a fresh buffer per frame, as a capture gives."""

    camera = True  # one frame per forward pass, as from a real camera

    def __init__(self, frames: int, width: int = 640, height: int = 480, pool: int = 8):
        rng = np.random.default_rng(0)
        self.pool = [cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 6)
                     for _ in range(pool)]
        self.frames, self.label, self.fps = frames, "synthetic", 30.0

    def __iter__(self):
        for i in range(self.frames):
            yield sources.bgr_to_frame(self.label, self.pool[i % len(self.pool)].copy())

    def release(self):
        pass


class SyntheticVideo(SyntheticCamera):
    """The same frames, as from a video file: run_live batches them (--batch-frames)."""

    camera = False


class NullWindow(overlay.Display):
    """A window that shows nothing and never sees a key."""

    def __init__(self):
        super().__init__("bench")

    def show(self, image):
        pass

    def key(self, delay_ms):
        return -1

    def closed(self):
        return False

    def close(self):
        pass


def make_checkpoint(path: Path, spec: str, fingerprint: str, precision: str = "fp32") -> None:
    """A head checkpoint for ``NUM_CLASSES`` made-up classes, written as run_train_head.py writes one."""
    torch.manual_seed(1)
    head = nn.Linear(FC7_DIM, NUM_CLASSES)
    attrs = {"feature_dim": FC7_DIM, "backbone": "alexnet", "layer": "fc7", "weights_spec": spec,
             "weights_fingerprint": fingerprint, "preprocess": Preprocess().to_json(), "precision": precision}
    save_checkpoint(build_checkpoint({k: v.detach().clone() for k, v in head.state_dict().items()}, metrics={},
                                     epoch=0, cache_attrs=attrs, wnids=[f"n{9000000 + i:08d}" for i in range(NUM_CLASSES)],
                                     names=[f"class {i}" for i in range(NUM_CLASSES)], config={}), path)


def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, of this process) so far; None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / tick, (int(mine[11]) + int(mine[12])) / tick


def stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"frames": len(a), "mean_ms": round(float(a.mean()), 3), "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p95_ms": round(float(np.percentile(a, 95)), 3), "fps": round(1000 / float(a.mean()), 2)}


def bare_forward(model: LayerClassifier, device: torch.device, iters: int, warmup: int) -> list[float]:
    x = torch.randn(1, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            model(x)  # fc7 in the backbone's dtype, the head in fp32, as live runs it
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    return times


def batch_forward(model: LayerClassifier, device: torch.device, batch: int = 64, iters: int | None = None) -> float:
    """ms per image of a bare batch-``batch`` forward (64: the throughput extraction sees)."""
    iters = iters or max(3, 192 // batch)
    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)  # fc7 in the backbone's dtype, the head in fp32, as live runs it
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / (iters * batch)


VARIANTS = {"headless": 1, "drawn": 1, "video": 1, "headless_b4": 4, "headless_b8": 8, "video_b8": 8}  # name: batch


def run_variant(name: str, checkpoint: Path, tmp: Path, device: str, frames: int, warmup: int) -> dict:
    kind, batch = name.split("_")[0], VARIANTS[name]
    drawn = kind in ("drawn", "video")
    warmup = -(-warmup // batch) * batch  # whole batches, so the timed frames are whole batches too
    frames = -(-frames // batch) * batch
    config = LiveConfig(checkpoint=checkpoint, device=device, display=drawn, max_frames=warmup + frames,
                             batch_frames=batch, predictions=tmp / f"{name}.jsonl",
                             output=tmp / f"{name}.mp4" if kind == "video" else None)
    source = (SyntheticCamera if batch == 1 else SyntheticVideo)(warmup + frames)
    summary = live.run_live(config, open_classifier(config), source=source, display=NullWindow() if drawn else None)
    result = {"batch_frames": batch, **stats(summary.frame_ms[warmup:])}
    result["model_latency"] = stats(summary.latencies_ms[warmup:])
    result["model_ms_per_batch"] = round(result["model_latency"]["mean_ms"] * batch, 3)
    return result


def measure(precision: str, args, device: torch.device, spec: str, fingerprint: str, tmp: Path) -> dict:
    """The bare forwards and the live variants for one precision (bf16: the camera path only)."""
    backbone = open_backbone("alexnet", "random", seed=0, progress=False).module  # the fc7 cut
    model = LayerClassifier(place_backbone(backbone, device, precision), "fc7", nn.Linear(FC7_DIM, NUM_CLASSES).to(device))
    checkpoint = tmp / f"best-{precision}.pt"
    make_checkpoint(checkpoint, spec, fingerprint, precision)
    frames, warmup = (args.frames, args.warmup) if precision == "fp32" else (args.bf16_frames, args.bf16_warmup)
    names = list(VARIANTS) if precision == "fp32" else ["headless"]
    bare = bare_forward(model, device, frames, warmup)
    variants = {name: run_variant(name, checkpoint, tmp, args.device, frames, warmup) for name in names}
    bare += bare_forward(model, device, frames, warmup)
    batched_ms = {batch: batch_forward(model, device, batch) for batch in ((4, 8, 64) if precision == "fp32" else (8,))}
    bare_stats = stats(bare)
    return {
        "bare_forward": bare_stats,
        **{f"bare_forward_batch{batch}": {"ms_per_image": round(ms, 3), "images_per_s": round(1000 / ms, 2)}
           for batch, ms in batched_ms.items()},
        "live": variants,
        "ratio_fps_live_over_bare": {k: round(v["fps"] / bare_stats["fps"], 3) for k, v in variants.items()},
    }


def print_table(precision: str, result: dict) -> None:
    bare_stats = result["bare_forward"]
    print(f"\n{precision}, 640x480; per frame: wall ms (reading, preprocessing, model, outputs), FPS, model ms; "
          "batch ms: model time of a whole batch")
    print(f"{'':24s} {'batch':>5s} {'mean ms':>8s} {'p50 ms':>8s} {'p95 ms':>8s} {'FPS':>7s} {'vs bare':>8s} "
          f"{'model ms':>9s} {'batch ms':>9s}")
    print(f"{'bare forward':24s} {1:5d} {bare_stats['mean_ms']:8.2f} {bare_stats['p50_ms']:8.2f} "
          f"{bare_stats['p95_ms']:8.2f} {bare_stats['fps']:7.1f} {1:8.2f} {bare_stats['mean_ms']:9.2f} "
          f"{bare_stats['mean_ms']:9.2f}")
    for key, value in result.items():
        if key.startswith("bare_forward_batch"):
            batch, ms = int(key[len("bare_forward_batch"):]), value["ms_per_image"]
            print(f"{'bare forward':24s} {batch:5d} {ms:8.2f} {'':8s} {'':8s} {1000 / ms:7.1f} "
                  f"{bare_stats['mean_ms'] / ms:8.2f} {ms:9.2f} {ms * batch:9.2f}")
    for name, v in result["live"].items():
        print(f"{'live ' + name:24s} {v['batch_frames']:5d} {v['mean_ms']:8.2f} {v['p50_ms']:8.2f} {v['p95_ms']:8.2f} "
              f"{v['fps']:7.1f} {result['ratio_fps_live_over_bare'][name]:8.2f} "
              f"{v['model_latency']['mean_ms']:9.2f} {v['model_ms_per_batch']:9.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=200, help="timed frames per fp32 variant")
    p.add_argument("--warmup", type=int, default=20, help="untimed frames first")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    p.add_argument("--bf16-frames", type=int, default=40, help="timed frames for reduced precisions (slow without native bf16)")
    p.add_argument("--bf16-warmup", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default results/webcam-<cpu tag>.json)")
    p.add_argument("--runtimes", default=None, help="compare these runtimes instead: torch,onnxruntime,opencv")
    p.add_argument("--load", action="store_true", help="with --runtimes: also measure under a competing CPU load")
    args = p.parse_args(argv)
    if args.runtimes:
        from benchmarks.bench_runtimes import compare_runtimes

        return compare_runtimes(args, SyntheticCamera, SyntheticVideo, make_checkpoint)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    device = resolve_device(args.device)
    kind = cpu_kind()
    out = args.out or RESULTS / f"webcam-{cpu_tag(kind)}.json"
    print(f"CPU: {describe_cpu(kind)}")

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    opened = open_backbone("alexnet", "random", seed=0, progress=False)
    spec, fingerprint = opened.weights, opened.fingerprint
    with tempfile.TemporaryDirectory() as tmp:
        measured = {precision: measure(precision, args, device, spec, fingerprint, Path(tmp))
                    for precision in args.precisions.split(",")}

    cpu_end, wall = cpu_seconds(), time.perf_counter() - wall_start
    others = None  # cores' worth of CPU that other processes used meanwhile: > 0.2 means the numbers are disturbed
    if cpu_start and cpu_end:
        others = round(((cpu_end[0] - cpu_start[0]) - (cpu_end[1] - cpu_start[1])) / wall, 2)
    result = {
        "what": "640x480 synthetic frames through pipeline.live.runner.run_live (random AlexNet fc7 + 4096->200 head), "
                "one frame per forward (as a camera) and --batch-frames 4/8 (as a video file), against the bare "
                "batch-1 forward on a ready channels_last tensor; batched rows: per-frame times = batch's / frames; "
                "per precision, the backbone's weights cast once as the checkpoint records",
        "cpu": kind, "cpu_kind": describe_cpu(kind),
        "device": str(device), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "torch": torch.__version__, "opencv": cv2.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "other_processes_cores_busy": others,
        "precisions": measured,
    }
    for precision, values in measured.items():
        print_table(precision, values)
    print(f"(other processes kept {others} cores busy meanwhile)")
    if others is not None and others > 0.2:
        print("WARNING: other processes used the CPU during the run: these timings are disturbed")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
