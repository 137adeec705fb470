"""The GPU check's feed steps (issue #37): does the data path keep a fast device busy?

- ``bare_import``: a bare ``import torch, torchvision`` on this machine, fastest of ``--bare-import-runs`` (the whole
  process's floor);
- ``bare_forward``: the bare whole process of the precision (``bench_extract --child bare``): import, build the fc7
  cut, forward over one ready batch on the device, as many images as the full extraction; its steady rate is the
  device's own, the reference for the project's;
- ``pack``: ``run_extract --pack`` of the generated set, timed;
- ``full_bf16_pack``: the whole extraction from the pack, as the folder's (``Checker.full``);
- ``timeline``: ``bench_extract --timeline`` on the pack: the main thread's wait for the workers, its own steps and
  the device's busy share (CUDA events), with a picture of a window of the steady state.
``summary`` puts the ratios beside the targets.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# on one H100 or H200, bf16: steady >= 0.85x the bare forward; whole <= bare import + 3 s; the folder >= 27.5k img/s
TARGET = {"steady_over_bare_min": 0.85, "whole_minus_bare_import_s_max": 3.0, "folder_steady_img_s_min": 27_546}


def bare_import(run, timeout: float, runs: int = 2) -> dict:
    seconds = []
    for _ in range(runs):
        code, output, wall = run([sys.executable, "-c", "import torch, torchvision"], timeout)
        if code:
            return {"passed": False, "output": output[-2000:]}
        seconds.append(round(wall, 3))
    return {"runs_s": seconds, "fastest_s": min(seconds)}


def bare_forward(run, args, data: Path, images: int, precision: str = "bf16") -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_extract", "--child", "bare", "--data", str(data), "--out",
               str(args.out / "bare-unused"), "--device", args.device, "--batch-size", str(args.bare_batch),
               "--workers", "0", "--precision", precision, "--bare-images", str(images)]
    code, output, wall = run(command, args.step_timeout)
    if code:
        return {"passed": False, "output": output[-2000:]}
    found = json.loads(output.strip().splitlines()[-1])
    return {"precision": precision, "images": images, "batch_size": args.bare_batch, "whole_process_s": round(wall, 2),
            "steady_img_s": round(found["steady_img_s"], 1) if found["steady_img_s"] else None}


def pack(run, args, data: Path, out: Path) -> dict:
    code, output, wall = run([sys.executable, str(ROOT / "run_extract.py"), "--data", str(data), "--pack", str(out)],
                             args.step_timeout)
    manifest = out / "manifest.json"
    if code or not manifest.is_file():
        return {"passed": False, "output": output[-2000:]}
    shards = json.loads(manifest.read_text())
    return {"whole_s": round(wall, 2), "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
            "shards": sum(len(split.get("shards", [])) for split in shards.get("splits", {}).values())}


def timeline(run, args, data: Path) -> dict:
    out = args.out / f"extract-timeline-{'gpu' if args.device.startswith('cuda') else 'cpu-dry-run'}.json"
    command = [sys.executable, "-m", "benchmarks.bench_extract", "--timeline", "--device", args.device, "--data",
               str(data), "--precisions", "bf16", "--out", str(out),
               *(["--batch-size", str(args.timeline_batch)] if args.timeline_batch else [])]
    code, output, wall = run(command, args.step_timeout)
    if code or not out.is_file():
        return {"passed": False, "output": output[-2000:]}
    found = json.loads(out.read_text())["timeline"]["bf16"]
    return {"json": out.name, "picture": out.with_name(f"{out.stem}-bf16.png").name, "whole_s": round(wall, 2),
            "loop_s": found["loop_s"], "share_of_loop": found["share_of_loop"]}


def summary(steps: dict) -> dict:
    """The feed's ratios against TARGET, from the steps' numbers (None where a step did not run)."""
    get = lambda step, key: (steps.get(step) or {}).get(key)  # noqa: E731
    bare, pack_steady = get("bare_forward", "steady_img_s"), get("full_bf16_pack", "steady_img_s")
    folder_steady, pack_whole = get("full_bf16", "steady_img_s"), get("full_bf16_pack", "whole_process_s")
    floor = get("bare_import", "fastest_s")
    gpu_share = ((get("timeline", "share_of_loop") or {}).get("gpu") or {}).get("gpu")
    out = {"bare_forward_img_s": bare, "pack_steady_img_s": pack_steady, "folder_steady_img_s": folder_steady,
           "pack_steady_over_bare": round(pack_steady / bare, 3) if bare and pack_steady else None,
           "folder_steady_over_bare": round(folder_steady / bare, 3) if bare and folder_steady else None,
           "pack_whole_minus_bare_import_s": round(pack_whole - floor, 2) if None not in (pack_whole, floor) else None,
           "device_busy_share_in_loop": gpu_share, "target": TARGET}
    out["meets"] = {
        "steady": out["pack_steady_over_bare"] is not None and out["pack_steady_over_bare"] >= TARGET["steady_over_bare_min"],
        "whole": out["pack_whole_minus_bare_import_s"] is not None
        and out["pack_whole_minus_bare_import_s"] <= TARGET["whole_minus_bare_import_s_max"],
        "folder": (folder_steady or 0) >= TARGET["folder_steady_img_s_min"]}
    return out


class GpuSampler:
    """GPU utilisation (%) sampled every 100 ms by `nvidia-smi -lms` in the background; None without it."""

    def __init__(self, device: str):
        self.samples: list[float] = []
        self.proc = None
        if device.startswith("cuda") and shutil.which("nvidia-smi"):
            index = device.split(":")[1] if ":" in device else "0"
            self.proc = subprocess.Popen(["nvidia-smi", "-i", index, "--query-gpu=utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "100"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def stop(self) -> dict | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        self.proc.wait()
        busy = [s for s in self.samples if s > 0]
        return {"source": "nvidia-smi", "samples": len(self.samples), "max": max(self.samples, default=None),
                "mean_while_busy": round(sum(busy) / len(busy), 1) if busy else None}
