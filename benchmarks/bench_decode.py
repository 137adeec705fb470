"""Decoding large photos: a full decode against a reduced one (libjpeg scaling while decoding).

    python -m benchmarks.bench_decode                  # 8 generated 12 MP JPEGs with EXIF orientation tags

Both decodes go through ``pipeline.datasets.images.read_rgb`` (file read, decode, EXIF orientation), the
reduced one with ``min_side`` = twice AlexNet's resize (512 px: a 4000x3000 photo decodes at 1/4,
1000x750). Each is timed on the same files, alternately, in one run, and so is the whole per-image cost
of extraction's CPU side (decode + resize + crop). The fc7 of a random-weight AlexNet on both is compared
(cosine). Writes benchmarks/results/decode-<cpu>.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from pipeline.common.hardware import cpu_kind, cpu_tag
from pipeline.datasets.images import read_rgb
from pipeline.datasets.jpeg import decode_floor
from pipeline.common.preprocess import Preprocess
from pipeline.data.photos import PHOTO_SIZE, photo_array, save_jpeg

RESULTS = Path(__file__).resolve().parent / "results"
ORIENTATIONS = (1, 6, 8, 3)  # upright, and the three turns a phone writes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8, help="how many 12 MP JPEGs to generate")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the files, alternating the decodes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (extraction's CPU workers use 1 each)")
    p.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/decode-<cpu>.json)")
    return p


def _time(fn, files) -> float:
    """Seconds per image of ``fn`` over ``files``."""
    start = time.perf_counter()
    for path in files:
        fn(path)
    return (time.perf_counter() - start) / len(files)


def measure(files: list[Path], repeats: int) -> dict:
    preprocess = Preprocess()
    min_side = decode_floor(preprocess)
    ways = {
        "full_decode": lambda p: read_rgb(p),
        "reduced_decode": lambda p: read_rgb(p, min_side=min_side),
        "full_decode_resize": lambda p: preprocess.resize_crop([read_rgb(p)]),
        "reduced_decode_resize": lambda p: preprocess.resize_crop([read_rgb(p, min_side=min_side)]),
    }
    for fn in ways.values():  # warm-up: libraries loaded, files in the page cache
        fn(files[0])
    seconds = {name: [] for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            seconds[name].append(_time(fn, files))
    ms = {name: round(1000 * min(values), 1) for name, values in seconds.items()}
    return {"ms_per_image": ms, "min_side": min_side,
            "speedup_decode": round(ms["full_decode"] / ms["reduced_decode"], 2),
            "speedup_decode_resize": round(ms["full_decode_resize"] / ms["reduced_decode_resize"], 2),
            "decoded_shape_full": list(read_rgb(files[0]).shape),
            "decoded_shape_reduced": list(read_rgb(files[0], min_side=min_side).shape)}


def fc7_cosines(files: list[Path]) -> list[float]:
    """fc7 of a random-weight AlexNet on the full and the reduced decode of each file (the same preprocessing)."""
    from pipeline.backbones.backbone import open_backbone

    module = open_backbone("alexnet", "random", seed=0, progress=False).module
    backbone = lambda x: module(x)["fc7"]  # noqa: E731 - (B, 4096) fc7
    preprocess = Preprocess()
    min_side = decode_floor(preprocess)
    with torch.inference_mode():
        full = backbone(preprocess([read_rgb(p) for p in files]))
        reduced = backbone(preprocess([read_rgb(p, min_side=min_side) for p in files]))
    return [round(c, 6) for c in torch.nn.functional.cosine_similarity(full, reduced).tolist()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        files = [save_jpeg(photo_array(*PHOTO_SIZE, seed=i), Path(tmp) / f"photo_{i}.jpg",
                           orientation=ORIENTATIONS[i % len(ORIENTATIONS)]) for i in range(args.images)]
        record = {"benchmark": "decode", "images": args.images, "image_size": list(PHOTO_SIZE),
                  "orientations": [ORIENTATIONS[i % len(ORIENTATIONS)] for i in range(args.images)],
                  "file_mb": round(sum(f.stat().st_size for f in files) / len(files) / 1e6, 2),
                  "threads": args.threads, "cpu": cpu_kind(), **measure(files, args.repeats)}
        cosines = fc7_cosines(files)
    record.update(fc7_cosine_min=min(cosines), fc7_cosines=cosines, target_cosine=0.999,
                  target_met=min(cosines) >= 0.999)
    print(json.dumps({k: record[k] for k in ("ms_per_image", "speedup_decode", "speedup_decode_resize",
                                             "fc7_cosine_min")}))
    out = args.out or RESULTS / f"decode-{cpu_tag(record['cpu'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
