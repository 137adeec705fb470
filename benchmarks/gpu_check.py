"""The GPU check: one command that tests and measures the CUDA path, written for a GPU lent for minutes.

    python -m benchmarks.gpu_check                          # on a GPU machine (= make gpu-check), ~4-6 min
    python -m benchmarks.gpu_check --device cpu --images 40 --classes 4 --skip-tests --out /tmp/check   # dry run

Steps (each records pass/fail and its numbers; a failing step does not stop the others):
  tests        the test suite (pytest tests), unless --skip-tests
  data         --images generated 64x64 JPEGs in the Tiny ImageNet layout, --classes classes (1 in 11 in val)
  fp32_vs_cpu  fp32 extraction of a small real set (the 10-class subset when found) on --device vs on the CPU:
               cosine per row >= 0.9999 (TF32 off)
  bf16_vs_fp32 the same set in bf16 on --device: cosine >= 0.999 to fp32
  full_bf16, full_fp32   the whole generated set: whole-process seconds, steady img/s, GPU utilisation
               (target on one H100: <= 3 s and >= 37,000 img/s)
  bare_import, bare_forward, pack, full_bf16_pack, timeline
               the feed (benchmarks.gpu_feed): a bare import, the bare bf16 forward's whole process, the set packed,
               extracted from the pack, and the timeline of that extraction (device busy share)
  decode       torchvision.io.decode_jpeg on --device, batches of 256: img/s
  torchrun     torchrun --nproc_per_node=1 with the default precision equals a single process, bit for bit
  head         run_train_head.py on the full bf16 cache, 2 epochs on --device
  live         run_webcam.py on a generated 640x480 video file on --device
Writes OUT/gpu.json after every step (default benchmarks/results/gpu.json).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from benchmarks import gpu_feed
from benchmarks.gpu_feed import GpuSampler
from pipeline.common.hardware import cpu_kind, usable_cpus

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MINI_CANDIDATES = [os.environ.get("TINY_IMAGENET_MINI", ""), ROOT.parent / "shared/data/tiny-imagenet-mini.zip",
                   ROOT / "shared/data/tiny-imagenet-mini.zip"]
TARGET = {"whole_process_s_max": 3.0, "steady_img_s_min": 37000}
SPLIT_LINE = re.compile(r"(\w+): (\d+) images in ([\d.]+) s \(([\d.]+) img/s\)")  # SplitResult.log


def run(command: list[str], timeout: float, **kwargs) -> tuple[int, str, float]:
    """(exit code, output, seconds); the whole process group is killed at the timeout (exit code 124)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)
    try:
        output, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, code = proc.communicate()[0] + f"\n(killed after {timeout} s)", 124
    return code, output, time.perf_counter() - start


def tail(output: str, lines: int = 15) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# Data


def _write_images(job: tuple[Path, list[tuple[str, int, int]]]) -> int:
    from PIL import Image

    from pipeline.data.synthetic import class_image

    root, items = job
    for rel, label, index in items:
        Image.fromarray(class_image(label, index)).save(root / rel, quality=75)
    return len(items)


def make_dataset(root: Path, images: int, classes: int) -> dict:
    """Tiny ImageNet layout: wnids.txt, words.txt, train/<wnid>/images/, val/images/ + val_annotations.txt."""
    wnids = [f"n{9000000 + i:08d}" for i in range(classes)]
    val = max(1, round(images / 11))
    train = images - val
    items, annotations = [], []
    for i in range(train):
        wnid = wnids[i % classes]
        items.append((f"train/{wnid}/images/{wnid}_{i // classes}.JPEG", i % classes, i))
    for i in range(val):
        items.append((f"val/images/val_{i}.JPEG", i % classes, train + i))
        annotations.append(f"val_{i}.JPEG\t{wnids[i % classes]}\t0\t0\t63\t63")
    for wnid in wnids:
        (root / "train" / wnid / "images").mkdir(parents=True, exist_ok=True)
    (root / "val" / "images").mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tgenerated class {i}\n" for i, w in enumerate(wnids)))
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    procs = max(1, min(16, usable_cpus()))
    chunks = [items[i::procs * 4] for i in range(procs * 4)]
    with ProcessPoolExecutor(procs) as pool:
        written = sum(pool.map(_write_images, [(root, chunk) for chunk in chunks if chunk]))
    size = sum(f.stat().st_size for f in (root / "val" / "images").iterdir()) / max(1, val)
    return {"root": str(root), "train": train, "val": val, "written": written, "mean_jpeg_bytes": round(size)}


def small_real_set(args, work: Path, generated: Path) -> Path:
    """A dataset whose train split is the first --small train images of the real subset (or the generated set)."""
    from pipeline.datasets.dataset import index_dataset
    from pipeline.data.prepare import resolve_data

    source = generated
    if args.real != "generated":
        found = [Path(p) for p in ([args.real] if args.real != "auto" else MINI_CANDIDATES) if p and Path(p).exists()]
        source = resolve_data(found[0]) if found else generated
    full = index_dataset(source)
    root = work / "small"
    shutil.rmtree(root, ignore_errors=True)
    (root / "val" / full.wnids[0] / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(full.wnids) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in zip(full.wnids, full.full_names)))
    for wnid in full.wnids:
        (root / "train" / wnid / "images").mkdir(parents=True)
    paths = full.splits["train"].paths[:args.small]
    for path in paths:
        (root / path).symlink_to(full.root / path)
    for path in full.splits["val"].paths[:max(1, args.small // 10)]:
        (root / "val" / full.wnids[0] / "images" / Path(path).name).symlink_to(full.root / path)
    return root


# ---------------------------------------------------------------------------------------------
# Extraction runs


def extract(args, data: Path, out: Path, device: str, precision: str | None, *, torchrun: bool = False) -> dict:
    """run_extract.py in its own process: {"rc", "whole_s", "splits": {split: {"images", "s", "img_s"}}, ...}."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun \
        else [sys.executable]
    command = [*launcher, str(ROOT / "run_extract.py"), "--data", str(data), "--out", str(out), "--weights", "random",
               "--seed", "0", "--device", device, "--no-progress", "--image-size", str(args.image_size),
               "--resize-size", str(args.resize_size), *(["--precision", precision] if precision else [])]
    code, output, seconds = run(command, args.step_timeout)
    splits = {m[1]: {"images": int(m[2]), "s": float(m[3]), "img_s": float(m[4])} for m in SPLIT_LINE.finditer(output)}
    result = {"rc": code, "whole_s": round(seconds, 2), "splits": splits}
    if code != 0:
        result["output"] = tail(output)
    return result


def features(out: Path, split: str = "train") -> tuple[np.ndarray, str]:
    with h5py.File(out / f"{split}.h5", "r") as f:
        return f["features"][:], str(f.attrs["precision"])


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(((a * b).sum(axis=1) / np.maximum(norms, 1e-30)).min())


# ---------------------------------------------------------------------------------------------
# Steps


class Checker:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.dev = args.device
        self.out = args.out / "gpu.json"
        self.state: dict = {}
        import torch

        self.results = {
            "device": self.dev, "gpu": torch.cuda.get_device_name(0) if self.dev.startswith("cuda") else None,
            "cpu": cpu_kind(), "usable_cpus": usable_cpus(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "images": args.images, "classes": args.classes,
            "image_size": args.image_size, "target_on_one_h100": TARGET, "steps": {},
        }

    def step(self, name: str, function) -> None:
        start = time.perf_counter()
        print(f"[gpu-check] {name} ...", flush=True)
        try:
            entry = function() or {}
        except Exception as err:  # a step's failure is recorded; the others still run
            entry = {"passed": False, "error": f"{type(err).__name__}: {str(err).strip()[:500]}"}
        entry.setdefault("passed", True)
        entry["seconds"] = round(time.perf_counter() - start, 2)
        self.results["steps"][name] = entry
        print(f"[gpu-check] {name}: {'skipped' if entry['passed'] is None else 'passed' if entry['passed'] else 'FAILED'}"
              f" {json.dumps({k: v for k, v in entry.items() if k not in ('output',)})[:400]}", flush=True)
        self.save()

    def save(self) -> None:
        steps = self.results["steps"]
        get = lambda step, key: steps.get(step, {}).get(key)  # noqa: E731
        self.results["summary"] = {
            "cosine_fp32_vs_cpu_min": get("fp32_vs_cpu", "cosine_min"),
            "cosine_bf16_vs_fp32_min": get("bf16_vs_fp32", "cosine_min"),
            "steady_img_s": {p: get(f"full_{p}", "steady_img_s") for p in ("bf16", "fp32")},
            "whole_process_s": {p: get(f"full_{p}", "whole_process_s") for p in ("bf16", "fp32")},
            "whole_process_img_s": {p: get(f"full_{p}", "whole_process_img_s") for p in ("bf16", "fp32")},
            "decode_img_s": get("decode", "img_s"), "feed": gpu_feed.summary(steps),
            "all_passed": all(s["passed"] is not False for s in steps.values()),
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2) + "\n")

    def tests(self):
        if self.args.skip_tests:
            return {"passed": None, "skipped": "--skip-tests"}
        code, output, _ = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                              self.args.test_timeout)
        return {"passed": code == 0, "rc": code, "summary": tail(output, 1), **({"output": tail(output, 30)} if code else {})}

    def data(self):
        self.state["data"] = self.work / "generated"
        return make_dataset(self.state["data"], self.args.images, self.args.classes)

    def fp32_vs_cpu(self):
        small = self.state["small"] = small_real_set(self.args, self.work, self.state["data"])
        cpu = extract(self.args, small, self.work / "small-cpu", "cpu", "fp32")
        dev = extract(self.args, small, self.work / "small-fp32", self.dev, "fp32") if self.dev != "cpu" else cpu
        if cpu["rc"] or dev["rc"]:
            return {"passed": False, "cpu": cpu, "device_run": dev}
        cos = cosine_min(features(self.work / "small-fp32" if self.dev != "cpu" else self.work / "small-cpu")[0],
                         features(self.work / "small-cpu")[0])
        return {"passed": cos >= 0.9999, "cosine_min": cos, "threshold": 0.9999, "images": len(features(self.work / "small-cpu")[0]),
                "cpu_whole_s": cpu["whole_s"], "device_whole_s": dev["whole_s"]}

    def bf16_vs_fp32(self):
        run_ = extract(self.args, self.state["small"], self.work / "small-bf16", self.dev, "bf16")
        if run_["rc"]:
            return {"passed": False, "device_run": run_}
        reference = self.work / ("small-fp32" if self.dev != "cpu" else "small-cpu")
        low, precision = features(self.work / "small-bf16")
        cos = cosine_min(low, features(reference)[0])
        return {"passed": cos >= 0.999 and precision == "bf16", "cosine_min": cos, "threshold": 0.999,
                "whole_s": run_["whole_s"]}

    def full(self, precision: str, source: str = "data"):
        out = self.work / f"full-{precision}" if source == "data" else self.work / f"full-{precision}-{source}"
        sampler = GpuSampler(self.dev)
        result = extract(self.args, self.state[source], out, self.dev, precision)
        util = sampler.stop()
        if result["rc"]:
            return {"passed": False, "run": result, "gpu_utilisation": util}
        train = result["splits"].get("train", {})
        images = sum(s["images"] for s in result["splits"].values())
        entry = {"passed": images == self.args.images, "images": images, "whole_process_s": result["whole_s"],
                 "whole_process_img_s": round(images / result["whole_s"], 1), "steady_img_s": train.get("img_s"),
                 "splits": result["splits"], "gpu_utilisation": util}
        entry["meets_target"] = (result["whole_s"] <= TARGET["whole_process_s_max"]
                                 and (train.get("img_s") or 0) >= TARGET["steady_img_s_min"])
        return entry

    def bare_import(self):
        return gpu_feed.bare_import(run, self.args.step_timeout, self.args.bare_import_runs)

    def bare_forward(self):
        return gpu_feed.bare_forward(run, self.args, self.state["data"], self.args.images)

    def pack(self):
        self.state["pack"] = self.work / "pack"
        return gpu_feed.pack(run, self.args, self.state["data"], self.state["pack"])

    def timeline(self):
        return gpu_feed.timeline(run, self.args, self.state["pack"])

    def decode(self):
        import torch
        from torchvision.io import decode_jpeg

        from pipeline.datasets.images import read_bytes

        files = sorted((self.state["data"] / "val" / "images").iterdir())[:2048]
        data = [read_bytes(f) for f in files]
        batches = [data[i:i + 256] for i in range(0, len(data), 256)]
        decode_jpeg(batches[0], device=self.dev)  # warm-up (nvjpeg's start-up on CUDA)
        sync = torch.cuda.synchronize if self.dev.startswith("cuda") else (lambda: None)
        sync()
        start = time.perf_counter()
        for batch in batches:
            decode_jpeg(batch, device=self.dev)
        sync()
        seconds = time.perf_counter() - start
        return {"images": len(data), "img_s": round(len(data) / seconds, 1), "decode_device": self.dev}

    def torchrun(self):
        """The default (--precision auto) under torchrun: rank 0's choice, the features of a single-process run
        at that precision."""
        result = extract(self.args, self.state["small"], self.work / "small-torchrun", self.dev, None, torchrun=True)
        if result["rc"]:
            return {"passed": False, "run": result}
        a, precision = features(self.work / "small-torchrun")
        with h5py.File(self.work / "small-torchrun" / "train.h5", "r") as f:
            auto = json.loads(f.attrs.get("precision_auto", "null"))
        fp32 = self.work / ("small-fp32" if self.dev != "cpu" else "small-cpu")
        single = {"fp32": fp32, "bf16": self.work / "small-bf16"}.get(precision)
        if single is None:  # fp16, on CUDA: no single-process fp16 run; the fidelity guard's bound instead
            cos = cosine_min(a, features(fp32)[0])
            return {"passed": cos >= 0.999, "cosine_min_to_fp32": cos, "default_precision": precision, "auto": auto,
                    "whole_s": result["whole_s"]}
        identical = bool(np.array_equal(a, features(single)[0]))
        return {"passed": identical and auto is not None, "identical": identical, "default_precision": precision,
                "auto": auto, "whole_s": result["whole_s"]}

    def head(self):
        out = self.work / "head"
        code, output, seconds = run([sys.executable, str(ROOT / "run_train_head.py"), "--features",
                                     str(self.work / "full-bf16"), "--out", str(out), "--device", self.dev,
                                     "--epochs", "2", "--no-progress"], self.args.step_timeout)
        self.state["checkpoint"] = out / "best.pt"
        return {"passed": code == 0 and (out / "best.pt").is_file(), "whole_s": round(seconds, 2),
                **({"output": tail(output)} if code else {})}

    def live(self):
        import cv2

        from pipeline.data.synthetic import class_image

        video, frames = self.work / "clip.mp4", self.args.live_frames
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 30, (640, 480))
        for i in range(frames):
            writer.write(cv2.resize(class_image(i % 4, i), (640, 480)))
        writer.release()
        predictions = self.work / "live.jsonl"
        code, output, seconds = run([sys.executable, str(ROOT / "run_webcam.py"), "--checkpoint",
                                     str(self.state["checkpoint"]), "--source", str(video), "--no-display",
                                     "--predictions", str(predictions), "--device", self.dev],
                                    self.args.step_timeout)
        lines = predictions.read_text().splitlines() if predictions.is_file() else []
        latency = [json.loads(line)["latency_ms"] for line in lines]
        return {"passed": code == 0 and len(lines) == frames, "frames": len(lines), "whole_s": round(seconds, 2),
                "model_fps": round(1000 / (sum(latency) / len(latency)), 1) if latency else None,
                **({"output": tail(output)} if code else {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default where present), cuda:N or cpu (a dry run)")
    p.add_argument("--images", type=int, default=110_000, help="generated images, train + val (1 in 11 in val)")
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--small", type=int, default=512, help="train images of the small set compared with the CPU")
    p.add_argument("--real", default="auto", help="small set: auto (the 10-class subset if found), generated, or a path")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--resize-size", type=int, default=256)
    p.add_argument("--live-frames", type=int, default=64, help="frames of the generated 640x480 video")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu.json")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--bare-batch", type=int, default=256, help="the bare forward's batch (the CUDA extraction's)")
    p.add_argument("--bare-import-runs", type=int, default=2, help="bare imports timed (the fastest counts)")
    p.add_argument("--timeline-batch", type=int, default=None, help="the timeline's batch (default: the extraction's)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--test-timeout", type=float, default=300)
    p.add_argument("--step-timeout", type=float, default=150)
    args = p.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        check = Checker(args, work)
        for name, function in [("tests", check.tests), ("data", check.data), ("fp32_vs_cpu", check.fp32_vs_cpu),
                               ("bf16_vs_fp32", check.bf16_vs_fp32), ("full_bf16", lambda: check.full("bf16")),
                               ("full_fp32", lambda: check.full("fp32")), ("bare_import", check.bare_import),
                               ("bare_forward", check.bare_forward), ("pack", check.pack),
                               ("full_bf16_pack", lambda: check.full("bf16", "pack")), ("timeline", check.timeline),
                               ("decode", check.decode),
                               ("torchrun", check.torchrun), ("head", check.head), ("live", check.live)]:
            check.step(name, function)
    print(json.dumps(check.results["summary"], indent=2))
    print(f"wrote {check.out}")
    return 0 if check.results["summary"]["all_passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
