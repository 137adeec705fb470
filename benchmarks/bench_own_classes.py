"""Teach it your own classes: the whole loop, timed as a user runs it, from the end of collection to the first
live prediction, then a fourth class added.

    python -m benchmarks.bench_own_classes                 # 3 classes x 60 frames at 640x480, fp32, CPU
    python -m benchmarks.bench_own_classes --frames 60 --bursts 2 --weights random

Each class is collected from a generated 640x480 video (a coloured shape moving over a noisy background) with
``run_webcam.py --collect CLASS --into DIR`` in ``--bursts`` runs (one burst each), so the hash val split keeps
each burst whole. Then, every step a separate process as the user types it:

1. ``run_extract.py --data DIR --precision fp32``    the backbone over every collected frame;
2. ``run_train_head.py``                             the linear head (its defaults);
3. ``run_webcam.py --source VIDEO --max-frames 1``   the first live prediction.

Then a fourth class is collected and steps 1-2 run again: the extraction is incremental, so only the new
class's frames pass through the backbone. Targets (issue 20): steps 1-3 <= 60 s, the fourth class <= 20 s on
2 CPU cores in fp32.

The split reported: start-up (a bare ``import torch, torchvision`` process, timed side by side, once per
step that pays it), backbone (the extraction's own per-split seconds from its log: decode + forward + write),
and the rest (indexing, head training, the live runner's set-up). No pretrained weights can be downloaded
here, so ``--weights random`` is the default: the speed is AlexNet's all the same; accuracy is not meaningful.
Writes benchmarks/results/own-classes-<cpu tag>.json with the CPU kind.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.common.hardware import cpu_kind, cpu_tag, describe_cpu

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {"circle": (40, 40, 230), "square": (40, 200, 40), "triangle": (230, 90, 30), "cross": (30, 220, 240)}
SECONDS = re.compile(r"(\w+): (\d+) images in ([\d.]+) s")
COUNTS = re.compile(r"reused (\d+), extracted (\d+), dropped (\d+)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60, help="frames collected per class")
    parser.add_argument("--bursts", type=int, default=2, help="collection runs per class")
    parser.add_argument("--weights", default="random", help="backbone weights (imagenet where they are cached)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the files here (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: results/own-classes-<cpu>.json)")
    return parser


def make_video(path: Path, shape: str, frames: int, seed: int) -> Path:
    """A 640x480 mp4 of one coloured shape moving over a noisy grey background."""
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (640, 480))
    color = SHAPES[shape]
    for i in range(frames):
        frame = rng.integers(90, 140, (480, 640, 3), dtype=np.uint8)
        cx, cy = 200 + 6 * i % 240, 160 + 4 * i % 160
        if shape == "circle":
            cv2.circle(frame, (cx, cy), 90, color, -1)
        elif shape == "square":
            cv2.rectangle(frame, (cx - 80, cy - 80), (cx + 80, cy + 80), color, -1)
        elif shape == "triangle":
            cv2.fillPoly(frame, [np.array([[cx, cy - 100], [cx - 100, cy + 80], [cx + 100, cy + 80]])], color)
        else:
            cv2.line(frame, (cx - 90, cy), (cx + 90, cy), color, 30)
            cv2.line(frame, (cx, cy - 90), (cx, cy + 90), color, 30)
        writer.write(frame)
    writer.release()
    return path


def run(args: list[str], cwd: Path) -> tuple[float, str]:
    """Run one command as the user would; (wall seconds, its log). A failure stops the benchmark with its log."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout + done.stderr


def collect(work: Path, data: Path, shape: str, frames: int, bursts: int, seed: int) -> float:
    """Collect ``frames`` of one class in ``bursts`` runs; the seconds the collection took."""
    per_burst = -(-frames // bursts)
    total = 0.0
    for b in range(bursts):
        video = make_video(work / f"{shape}-{b}.mp4", shape, per_burst, seed * 100 + b)
        seconds, _ = run([str(ROOT / "run_webcam.py"), "--collect", shape, "--into", str(data), "--source", str(video),
                          "--every", "1", "--count", str(per_burst), "--countdown", "0", "--no-display"], work)
        total += seconds
    return total


def bare_import() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, torchvision"], check=True)
    return time.perf_counter() - start


def extract_step(work: Path, data: Path, cache: Path, options: argparse.Namespace) -> dict:
    seconds, log = run([str(ROOT / "run_extract.py"), "--data", str(data), "--out", str(cache), "--device", "cpu",
                        "--weights", options.weights, "--precision", options.precision, "--no-progress"], work)
    backbone = sum(float(m.group(3)) for m in SECONDS.finditer(log))
    counts = [tuple(map(int, m.groups())) for m in COUNTS.finditer(log)]
    return {"seconds": round(seconds, 2), "backbone_seconds": round(backbone, 2),
            "images": sum(int(m.group(2)) for m in SECONDS.finditer(log)),
            "reused_extracted_dropped": [sum(c[i] for c in counts) for i in range(3)] if counts else None}


def loop(work: Path, options: argparse.Namespace) -> dict:
    data, cache, head = work / "my-classes", work / "cache", work / "head"
    shapes = list(SHAPES)
    collected = sum(collect(work, data, shape, options.frames, options.bursts, i) for i, shape in enumerate(shapes[:3]))
    steps = {"collect_seconds": round(collected, 2), "bare_import_seconds": round(bare_import(), 2)}
    steps["extract"] = extract_step(work, data, cache, options)
    seconds, _ = run([str(ROOT / "run_train_head.py"), "--features", str(cache), "--out", str(head),
                      "--device", "cpu", "--no-progress"], work)
    steps["train_head_seconds"] = round(seconds, 2)
    live_video = make_video(work / "live.mp4", shapes[0], 2, 99)
    seconds, _ = run([str(ROOT / "run_webcam.py"), "--checkpoint", str(head / "best.pt"), "--source", str(live_video),
                      "--max-frames", "1", "--no-display", "--predictions", str(work / "live.jsonl"),
                      "--device", "cpu"], work)
    steps["first_prediction_seconds"] = round(seconds, 2)
    steps["first_prediction"] = json.loads((work / "live.jsonl").read_text().splitlines()[0])
    steps["total_seconds"] = round(steps["extract"]["seconds"] + steps["train_head_seconds"] + seconds, 2)
    collect(work, data, shapes[3], options.frames, options.bursts, 3)
    steps["fourth_class_extract"] = extract_step(work, data, cache, options)
    seconds, _ = run([str(ROOT / "run_train_head.py"), "--features", str(cache), "--out", str(head),
                      "--device", "cpu", "--no-progress"], work)
    steps["fourth_class_train_head_seconds"] = round(seconds, 2)
    steps["fourth_class_total_seconds"] = round(steps["fourth_class_extract"]["seconds"] + seconds, 2)
    return steps


def split_of(steps: dict) -> dict:
    """Start-up (three processes pay the bare import), backbone, and the rest of the three steps."""
    startup = 3 * steps["bare_import_seconds"]
    backbone = steps["extract"]["backbone_seconds"]
    return {"startup_seconds": round(startup, 2), "backbone_seconds": backbone,
            "head_and_rest_seconds": round(steps["total_seconds"] - startup - backbone, 2)}


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="own-classes-") as tmp:
        work = options.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        steps = loop(work, options)
    load = os.getloadavg()[0]
    record = {"benchmark": "own_classes", "cpu": describe_cpu(), "cpu_kind": cpu_kind(), "cores": os.cpu_count(),
              "load_average_1min": round(load, 2), "frames_per_class": options.frames, "bursts": options.bursts,
              "weights": options.weights, "precision": options.precision, **steps, "split": split_of(steps),
              "targets": {"total_seconds": 60, "fourth_class_total_seconds": 20}}
    out = options.out or RESULTS / f"own-classes-{cpu_tag()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"collection end -> first live prediction: {steps['total_seconds']:.1f} s (target <= 60 s); "
          f"fourth class: {steps['fourth_class_total_seconds']:.1f} s (target <= 20 s); on {describe_cpu()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
