"""The whole process at the forward's limit: CPU time per image of each extraction phase, and the fixed cost.

Used by ``python -m benchmarks.bench_extract --phases`` (issue #21 section 2). Each phase runs alone, on the
same images, in this process, with its CPU time (``time.process_time``: all threads, so core-ms) per image:
- decode: ``read_rgb`` (file read + JPEG decode);
- preprocess: the recorded uint8 resize + centre crop (``Preprocess.resize_crop``, torchvision), and beside it
  OpenCV's SIMD ``cv2.resize`` + crop where it could stand in: upscales in bilinear, checked within one level
  of the recorded pixels and at cosine >= 0.9999 on fc7; downscaling is checked separately (INTER_AREA and
  INTER_LINEAR are not PIL's antialiased bilinear);
- transfer: a reader thread's uint8 batch handed to the main thread (``read_ahead``), plus ``normalize``
  into reused buffers, as the extractor does on the CPU;
- forward: the fp32 fc7 forward at the batch size (and the bare forward's img/s);
- write: the shard write (``features.cache.write_shard``) of the fc7 rows.
The fixed cost: a whole ``run_extract.py`` on a few images minus images / bare rate, against a bare
``python -c "import torch, torchvision"`` timed in the same run; ``--precision auto``'s timing cost on top.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3  # the fastest of 3 for the subprocess timings (a loaded machine only slows)


def _cpu_ms_per_image(function, count: int, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        function()
        best = min(best, time.process_time() - start)
    return round(1000 * best / max(count, 1), 4)


def cv2_resize_crop(preprocess, image_hwc):
    """OpenCV's bilinear resize (shorter side to resize_size, half-pixel centres as PIL) then the centre crop."""
    import cv2

    height, width = image_hwc.shape[:2]
    short = preprocess.resize_size
    size = (short, max(short, round(short * height / width))) if width <= height else \
        (max(short, round(short * width / height)), short)  # (width, height) as torchvision rounds
    if preprocess.mode == "resize":
        size = (preprocess.image_size, preprocess.image_size)
    resized = cv2.resize(image_hwc, size, interpolation=cv2.INTER_LINEAR)
    top = int(round((resized.shape[0] - preprocess.image_size) / 2.0))
    left = int(round((resized.shape[1] - preprocess.image_size) / 2.0))
    return resized[top:top + preprocess.image_size, left:left + preprocess.image_size]


def check_cv2(preprocess, images, backbone) -> dict:
    """How far OpenCV's resize is from the recorded one: max level difference, fc7 cosine, and CPU ms."""
    import numpy as np
    import torch

    hwc = [np.ascontiguousarray(im.permute(1, 2, 0).numpy()) for im in images]
    recorded = preprocess.resize_crop(list(images))  # (B, 3, S, S) uint8
    fast = torch.from_numpy(np.stack([cv2_resize_crop(preprocess, im) for im in hwc])).permute(0, 3, 1, 2)
    levels = int((recorded.int() - fast.int()).abs().max())
    with torch.inference_mode():
        a = backbone.forward_layers(preprocess.normalize(recorded), ("fc7",))["fc7"]
        b = backbone.forward_layers(preprocess.normalize(fast.contiguous(memory_format=torch.channels_last)),
                                    ("fc7",))["fc7"]
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())
    upscale = all(min(im.shape[:2]) <= preprocess.resize_size for im in hwc)
    return {"kind": "upscale" if upscale else "downscale", "max_level_difference": levels,
            "fc7_cosine_min": round(cosine, 6), "matches": levels <= 1 and cosine >= 0.9999,
            "cv2_ms_per_image": _cpu_ms_per_image(lambda: [cv2_resize_crop(preprocess, im) for im in hwc], len(hwc))}


def phase_times(root: Path, paths: list[str], batch: int = 64) -> dict:
    """CPU ms per image of decode, preprocess, transfer, forward and write (fp32, CPU)."""
    import numpy as np
    import torch

    from features import cache
    from features.settings import CacheSettings
    from pipeline.backbones.backbone import open_backbone
    from pipeline.datasets.images import read_rgb
    from pipeline.common.preprocess import Preprocess
    from pipeline.extract.extractor import read_ahead

    preprocess = Preprocess()
    backbone = open_backbone("alexnet", "random", seed=0).module.to(memory_format=torch.channels_last)  # the fc7 cut
    files = [root / p for p in paths]
    images = [read_rgb(f) for f in files]
    out = {"images": len(images), "batch_size": batch}
    out["decode"] = _cpu_ms_per_image(lambda: [read_rgb(f) for f in files], len(files))
    batches = [images[i:i + batch] for i in range(0, len(images), batch)]
    out["preprocess"] = _cpu_ms_per_image(lambda: [preprocess.resize_crop(b) for b in batches], len(images))
    ready = [preprocess.resize_crop(b) for b in batches]

    reuse: dict = {}

    def transfer():  # the extractor's CPU hand-off: a reader thread's batches, normalised into reused buffers
        for x in read_ahead(ready, threads=1):
            preprocess.normalize(x, reuse=reuse)
    out["transfer"] = _cpu_ms_per_image(transfer, len(images), repeats=1)
    inputs = [preprocess.normalize(x) for x in ready]
    with torch.inference_mode():
        backbone.forward_layers(inputs[0], ("fc7",))
        start = time.perf_counter()
        out["forward"] = _cpu_ms_per_image(lambda: [backbone.forward_layers(x, ("fc7",)) for x in inputs],
                                           len(images), repeats=1)
        out["bare_forward_img_s"] = round(len(images) / (time.perf_counter() - start), 1)
        rows = np.concatenate([backbone.forward_layers(x, ("fc7",))["fc7"].numpy() for x in inputs])
    parts = root.parent / "phase-parts"
    settings = CacheSettings("alexnet", "x", preprocess.to_json(), "float32", "fp32", "x")
    cache.start_parts(parts, settings, batch_size=batch)
    out["write"] = _cpu_ms_per_image(lambda: cache.write_shard(parts, 0, {"fc7": rows}, np.arange(len(rows)), []),
                                     len(rows))
    out["cv2_upscale"] = check_cv2(preprocess, images[:batch], backbone)
    big = [torch.nn.functional.interpolate(im[None].float(), size=(375, 500), mode="bilinear").round().clamp(0, 255)
           .to(torch.uint8)[0] for im in images[:16]]  # ImageNet-sized: the downscale path
    out["cv2_downscale"] = check_cv2(preprocess, big, backbone)
    out["outside_forward_share"] = round(sum(out[k] for k in ("decode", "preprocess", "transfer", "write"))
                                         / max(out["forward"], 1e-9), 4)
    return out


def _fastest_wall(command: list[str]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
        best = min(best, time.perf_counter() - start)
    return round(best, 2)


def fixed_cost(data: Path, out: Path, images: int, bare_img_s: float) -> dict:
    """The whole process's fixed cost (wall minus images / bare rate) against a bare torch import, side by side;
    with --precision fp32 and with auto (its timing cost)."""
    bare_import = _fastest_wall([sys.executable, "-c", "import torch, torchvision"])
    result = {"bare_import_s": bare_import, "images": images, "bare_forward_img_s": bare_img_s,
              "load_average": os.getloadavg()[0]}
    for precision in ("fp32", "auto"):
        target = out / precision
        command = [sys.executable, "run_extract.py", "--data", str(data), "--out", str(target), "--weights", "random",
                   "--device", "cpu", "--no-progress", "--precision", precision, "--overwrite"]
        whole = _fastest_wall(command)
        fixed = round(whole - images / bare_img_s, 2)
        result[precision] = {"whole_s": whole, "fixed_s": fixed, "over_bare_import_s": round(fixed - bare_import, 2)}
    return result
