"""Stage two at ImageNet-1k scale: how each head's time and memory grow with the rows of a float16 cache.

    python -m benchmarks.bench_head_scale                          # 100,000 and 400,000 rows
    python -m benchmarks.bench_head_scale --sizes 1281167 --limit-rows 200000   # full size, timed on a prefix

For each size it writes a generated cache (1,000 classes x 4,096 float16, clustered post-ReLU rows in class
order, as extraction writes them) with ``features.cache``'s own functions, then times each head in a fresh
child process, so each peak RSS (VmHWM) is that head's alone:

- linear (streamed): one SGD epoch of ``fit_head`` (batch 100) over ``StreamedFeatures``, page cache cold
  (``posix_fadvise(DONTNEED)`` on the file first) and warm (the file read just before);
- linear (in memory): the same epoch over ``InMemoryFeatures`` (load time reported apart), where it fits;
- logreg (streamed): one L-BFGS evaluation (objective and gradient, one pass of ``StreamedSoftmax``) over
  the head's own chunks (``FeatureReader.chunks``, STREAM_ROWS rows each, standardized), cold and warm;
- knn (streamed): ``knn_predict_streamed`` for 1,000 val rows over every train row (k = 20), over the head's
  own chunks (L2-normalised), cold and warm.

Warm runs read the whole file first; above ``--warm-max-rows`` only cold runs are made (a 10.5 GB file read
before each run would flush the page cache of everyone sharing the machine).

``--limit-rows`` caps the rows one measurement reads (the SGD epoch stops early, the logreg and kNN passes
read a prefix); the epoch time is then rows / measured throughput, and the record says so (measured_rows).
The standardization statistics come from the first 20,000 rows (a real run makes one more streamed pass).
Writes benchmarks/results/head-scale-<cpu tag>.json (``hardware.cpu_tag``). The cache files are deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.synthetic_cache import write_synthetic_cache

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES, DIM = 1000, 4096
SHARD_ROWS = 20_000
STATS_ROWS = 20_000
KNN_QUERIES = 1000


# ---------------------------------------------------------------------------------------------
# The cache


def write_cache(folder: Path, split: str, rows: int, seed: int) -> Path:
    """A complete float16 cache file of ``rows`` clustered rows in class order; returns its path."""
    prototypes = np.random.default_rng(1234).standard_normal((CLASSES, DIM), dtype=np.float32)
    rng = np.random.default_rng(seed)
    labels = np.minimum(np.arange(rows) * CLASSES // rows, CLASSES - 1)  # class order, balanced

    def block(start: int, n: int) -> np.ndarray:
        rows_ = rng.standard_normal((n, DIM), dtype=np.float32)
        rows_ += 0.5 * prototypes[labels[start:start + n]]
        return np.maximum(rows_, 0, out=rows_)

    return write_synthetic_cache(folder, split, labels, block, dtype="float16", shard_rows=SHARD_ROWS, dim=DIM,
                                 classes=CLASSES)


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


# ---------------------------------------------------------------------------------------------
# One measurement, in a child process


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class Limited:
    """A FeatureSource that stops after ``limit`` rows (an epoch's throughput from its start)."""

    def __init__(self, source, limit: int):
        self.source, self.limit = source, limit
        self.num_rows, self.seen = source.num_rows, 0

    def batches(self, batch_size, generator):
        self.seen = 0
        for x, y in self.source.batches(batch_size, generator):
            if self.seen >= self.limit:
                return
            self.seen += len(y)
            yield x, y


def child(args) -> dict:
    import torch

    from pipeline.heads import knn
    from pipeline.heads.linear import Recipe, fit_head
    from pipeline.heads.standardize import Standardizer
    from features.cache import open_split
    from pipeline.heads.readers import STREAM_ROWS, FeatureReader, InMemoryFeatures, StreamedFeatures
    from pipeline.heads.solvers.softmax import StreamedSoftmax

    split = open_split(args.cache)
    limit = args.limit_rows or split.num_rows
    sample = torch.from_numpy(split.read_features(0, STATS_ROWS)).float()
    standardizer = Standardizer(sample.mean(0), torch.where(sample.std(0) > 1e-6, 1 / sample.std(0), torch.ones(DIM)))
    del sample
    out = {"head": args.child, "rows": split.num_rows, "chunk_rows": STREAM_ROWS, "threads": torch.get_num_threads()}

    transform = knn.normalize_rows if args.child == "knn" else standardizer
    factory = FeatureReader(split).chunks(torch.device("cpu"), transform=transform)  # what the heads stream

    read = [0]  # rows the last pass read

    def chunks():  # the heads' chunks over the first ``limit`` rows
        read[0] = 0
        for x, y in factory():
            if read[0] >= limit:
                return
            read[0] += len(y)
            yield x, y

    start = time.perf_counter()
    if args.child in ("linear-streamed", "linear-memory"):
        if args.child == "linear-memory":
            source = InMemoryFeatures.load(split, torch.device("cpu"), progress=False)
            out["load_seconds"] = time.perf_counter() - start
        else:
            source = StreamedFeatures(split)
        val = InMemoryFeatures(torch.rand(1000, DIM).half(), torch.randint(0, CLASSES, (1000,)))
        limited = Limited(source, limit)
        start = time.perf_counter()
        fit_head(limited, val, Recipe(epochs=1), standardizer, num_classes=CLASSES, device=torch.device("cpu"),
                 progress=False)
        measured = limited.seen
    elif args.child == "logreg":
        problem = StreamedSoftmax(chunks, CLASSES, 0.001)
        theta = torch.zeros(CLASSES * (DIM + 1))
        problem.evaluate(theta)
        measured = read[0]
    else:
        queries = knn.normalize_rows(torch.rand(KNN_QUERIES, DIM))
        knn.knn_predict_streamed(chunks, queries, ks=(20,), num_classes=CLASSES, temperature=0.07, chunk_rows=256)
        measured = read[0]
    seconds = time.perf_counter() - start
    return {**out, "measured_rows": measured, "measured_seconds": seconds, "rows_per_second": measured / seconds,
            "epoch_seconds": split.num_rows * seconds / measured, "peak_rss_bytes": peak_rss()}


def run_child(cache_path: Path, head: str, limit: int | None, page_cache: str) -> dict:
    if page_cache == "cold":
        drop_page_cache(cache_path)
    else:
        warm_page_cache(cache_path)
    command = [sys.executable, "-m", "benchmarks.bench_head_scale", "--child", head, "--cache", str(cache_path)]
    if limit:
        command += ["--limit-rows", str(limit)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    result = json.loads(done.stdout.strip().splitlines()[-1]) | {"page_cache": page_cache}
    print(f"  {head:16s} {page_cache:4s}: {result['measured_rows']:>9,} rows in {result['measured_seconds']:7.1f}s "
          f"({result['rows_per_second']:8.0f} rows/s, epoch {result['epoch_seconds']:7.1f}s)  "
          f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,400000", help="train rows per cache, comma-separated")
    p.add_argument("--limit-rows", type=int, help="rows one measurement reads (default: all)")
    p.add_argument("--heads", default="linear-streamed,linear-memory,logreg,knn")
    p.add_argument("--memory-max-rows", type=int, default=400_000, help="the in-memory linear head up to this size")
    p.add_argument("--warm-max-rows", type=int, default=400_000, help="warm page-cache runs up to this size")
    p.add_argument("--folder", type=Path, help="where the caches go (default: a temporary folder; it needs the file sizes free)")
    p.add_argument("--out", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    from pipeline.common.hardware import cpu_kind, cpu_tag

    kind = cpu_kind()
    out = args.out or RESULTS / f"head-scale-{cpu_tag(kind)}.json"
    record = {"cpu": kind, "classes": CLASSES, "dim": DIM, "dtype": "float16", "limit_rows": args.limit_rows,
              "cores": os.cpu_count(), "load_average": os.getloadavg(), "sizes": []}
    heads = args.heads.split(",")
    root = Path(tempfile.mkdtemp(prefix="head-scale-", dir=args.folder))
    try:
        for rows in (int(v) for v in args.sizes.split(",")):
            start = time.perf_counter()
            path = write_cache(root / str(rows), "train", rows, seed=rows)
            size = {"rows": rows, "file_bytes": path.stat().st_size, "write_seconds": time.perf_counter() - start,
                    "runs": []}
            print(f"{rows:,} rows: {size['file_bytes'] / 2**30:.2f} GiB written in {size['write_seconds']:.0f}s", flush=True)
            for head in heads:
                if head == "linear-memory" and rows > args.memory_max_rows:
                    continue
                temperatures = ("warm",) if head == "linear-memory" else ("cold", "warm")
                if rows > args.warm_max_rows:
                    temperatures = ("cold",)
                for page_cache in temperatures:
                    size["runs"].append(run_child(path, head, args.limit_rows, page_cache))
            record["sizes"].append(size)
            shutil.rmtree(root / str(rows))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=2, default=str) + "\n")  # after every size: partial runs count
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
