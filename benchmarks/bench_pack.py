"""A packed input against the folder it was packed from (issue #36), side by side in one run on this CPU.

    python -m benchmarks.bench_pack                        # 1,000 train images of 10 classes, 3 rounds
    python -m benchmarks.bench_pack --per-class 200 --index-images 110000

(a) extraction, whole process (start-up included) and steady state (the extraction's own images/s over its
    compute loop), folder and pack alternating (folder, pack, folder, pack, ...), median of ``--rounds``;
    the same images, settings and batches (the pack's shards hold --shard-size images, as the folder's cache
    shards do), so the features agree bit for bit, which is checked;
(a') the reader alone (read, hash, decode, resize; no backbone), folder and pack alternating in one process, median
    of 5: the only part of the steady state that differs, measured apart from the backbone's noise;
(b) indexing a pack of ``--index-images`` samples (real 64x64 JPEG bytes, 200 classes): ``index_dataset`` on it,
    in this process with a warm page cache, median of ``--rounds``.
Writes benchmarks/results/pack-<cpu tag>.json.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.extract_feed import pack

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=100, help="train images per class (val: a tenth)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    p.add_argument("--index-images", type=int, default=110_000, help="samples in the pack whose indexing is timed")
    p.add_argument("--extract-args", default="--weights random --precision fp32 --device cpu --no-progress",
                   help="extraction options besides --data and --out")
    p.add_argument("--out", type=Path, default=None, help="the JSON (default benchmarks/results/pack-<cpu>.json)")
    return p


def extract_once(data: Path, out: Path, extra: list[str]) -> dict:
    """One whole extraction process: its wall time, and the steady images/s it reports for train."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "run_extract.py"), "--data", str(data), "--out", str(out),
                           *extra], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    line = next(line for line in done.stderr.splitlines() if line.startswith("train: "))
    return {"whole_s": round(wall, 3), "steady_img_s": float(line.split("(")[1].split(" img/s")[0])}


def same_features(a: Path, b: Path) -> bool:
    import h5py
    import numpy as np

    for split in ("train", "val"):
        with h5py.File(a / f"{split}.h5", "r") as fa, h5py.File(b / f"{split}.h5", "r") as fb:
            if not (np.array_equal(fa["features"][:], fb["features"][:])
                    and np.array_equal(fa["labels"][:], fb["labels"][:])):
                return False
    return True


def measure_extraction(args, tmp: Path) -> dict:
    from pipeline.data.synthetic import make_tiny_imagenet

    data = make_tiny_imagenet(tmp / "folder", num_classes=args.classes, train_per_class=args.per_class,
                              val_per_class=max(1, args.per_class // 10))
    pack(data, tmp / "pack")
    extra = args.extract_args.split()
    runs: dict[str, list[dict]] = {"folder": [], "pack": []}
    for _ in range(args.rounds):
        for name, source in (("folder", data), ("pack", tmp / "pack")):
            runs[name].append(extract_once(source, tmp / f"out-{name}", extra))
            print(name, runs[name][-1], flush=True)
    median = {name: {key: statistics.median(r[key] for r in found) for key in ("whole_s", "steady_img_s")}
              for name, found in runs.items()}
    reading = measure_reading(data, tmp / "pack", rounds=max(5, args.rounds))
    return {"images": args.classes * args.per_class, "runs": runs, "median": median, "reading": reading,
            "pack_whole_over_folder": round(median["pack"]["whole_s"] / median["folder"]["whole_s"], 3),
            "pack_steady_over_folder": round(median["pack"]["steady_img_s"] / median["folder"]["steady_img_s"], 3),
            "bit_for_bit": same_features(tmp / "out-folder", tmp / "out-pack")}


def measure_reading(folder: Path, pack: Path, rounds: int) -> dict:
    """The part of the steady state that differs: reading, hashing, decoding and resizing every train image as the
    extraction's reader does (pipeline.extract.reading.BatchReader, batches of 64, one thread), no backbone; folder
    and pack alternating in this process, median of ``rounds``."""
    import numpy as np

    from pipeline.common.preprocess import Preprocess
    from pipeline.datasets.dataset import index_dataset
    from pipeline.extract.reading import BatchReader

    seconds: dict[str, list[float]] = {"folder": [], "pack": []}
    for _ in range(rounds):
        for name, source in (("folder", folder), ("pack", pack)):
            dataset = index_dataset(source)  # a fresh index: a pack checks each shard's sha256 again
            paths = dataset.splits["train"].paths
            batches = [(0, np.arange(i, min(i + 64, len(paths)))) for i in range(0, len(paths), 64)]
            reader = BatchReader(dataset.root, paths, batches, Preprocess(), min_side=None,
                                 read=dataset.read_bytes if dataset.source is not None else None)
            start = time.perf_counter()
            for i in range(len(reader)):
                reader[i]
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(found) for name, found in seconds.items()}
    return {"seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
            "median_s": {k: round(v, 3) for k, v in median.items()},
            "pack_over_folder": round(median["pack"] / median["folder"], 3)}


def write_big_pack(folder: Path, images: int, classes: int = 200) -> None:
    """A pack of ``images`` samples written by the packer's own shard writer, every sample one real 64x64 JPEG's
    bytes (generating 110,000 distinct JPEGs would take longer than the measurement)."""
    from PIL import Image

    from pipeline.common.config import ExtractConfig
    from pipeline.data import pack as packing
    from pipeline.data.synthetic import class_image
    from pipeline.datasets.dataset import Dataset, Split

    buffer = io.BytesIO()
    Image.fromarray(class_image(0, 0)).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    wnids = [f"n{i:08d}" for i in range(classes)]
    splits = {}
    for name, count in (("train", images * 10 // 11), ("val", images - images * 10 // 11)):
        paths = [f"{name}/{wnids[i % classes]}/images/{wnids[i % classes]}_{i}.JPEG" for i in range(count)]
        splits[name] = Split(paths=paths, labels=[i % classes for i in range(count)])
    dataset = Dataset(root=folder / "virtual", wnids=wnids, names=wnids, full_names=wnids, splits=splits)
    dataset.read_bytes = lambda rel: jpeg  # the same bytes for every sample
    config = ExtractConfig(pack=folder / "pack")
    incoming = folder / "pack" / packing.INCOMING
    written = {name: packing._write_split(dataset, name, incoming, config.shard_size) for name in splits}
    packing._publish(folder / "pack", incoming, packing._manifest(dataset, written, config), [])


def measure_indexing(args, tmp: Path) -> dict:
    from pipeline.datasets.dataset import index_dataset

    write_big_pack(tmp / "big", args.index_images)
    seconds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        dataset = index_dataset(tmp / "big" / "pack")
        seconds.append(time.perf_counter() - start)
    count = sum(len(split) for split in dataset.splits.values())
    manifest = (tmp / "big" / "pack" / "manifest.json").stat().st_size
    return {"images": count, "seconds": [round(s, 3) for s in seconds], "median_s": round(statistics.median(seconds), 3),
            "manifest_mib": round(manifest / 2**20, 1), "shards": len(list((tmp / "big" / "pack").glob("*/*.tar")))}


def main(argv=None) -> int:
    from pipeline.common.hardware import cpu_kind, cpu_tag, describe_cpu

    args = build_parser().parse_args(argv)
    kind = cpu_kind()
    results = {"cpu": kind, "cpu_kind": describe_cpu(kind), "args": vars(args) | {"out": None}}
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        results["indexing"] = measure_indexing(args, Path(tmp))
        print("indexing", results["indexing"], flush=True)
        results["extraction"] = measure_extraction(args, Path(tmp))
    out = args.out or RESULTS / f"pack-{cpu_tag(kind)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    ext = results["extraction"]
    print(f"pack / folder, median of {args.rounds}: whole process {ext['pack_whole_over_folder']}x the time, steady "
          f"{ext['pack_steady_over_folder']}x the images/s; bit for bit: {ext['bit_for_bit']}")
    print(f"reading, decoding and resizing alone, median of {len(ext['reading']['seconds']['pack'])}: pack "
          f"{ext['reading']['pack_over_folder']}x the folder's time")
    print(f"indexing a pack of {results['indexing']['images']} images: {results['indexing']['median_s']} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
