"""Reading the images of an extraction: whole batches of files read, hashed and decoded ahead of the backbone.

On the CPU, threads of the extracting process also resize and crop them as uint8 (``read_ahead``); on CUDA,
DataLoader worker processes decode and the GPU resizes. Each image's bytes are hashed as they are read: the
digest is what its cache row records of the content it was made from (pipeline.extract.incremental).
"""
from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from features.errors import describe_error
from pipeline.datasets import images
from pipeline.datasets.images import ImageDecodeError, Skipped, decode_rgb, stack_or_list
from pipeline.datasets.packs import PackDamaged
from pipeline.common.preprocess import Preprocess

__all__ = ["BatchReader", "read_ahead", "resize_in_workers"]


class BatchReader(Dataset):
    """Item i is the i-th batch of the work list: its shard, positions, uint8 images and skips."""

    def __init__(self, root: Path, paths: list[str], batches: list[tuple[int, np.ndarray]], preprocess: Preprocess | None,
                 min_side: int | None = None, read: Callable[[str], bytes] | None = None):
        self.root, self.paths, self.batches, self.preprocess = root, paths, batches, preprocess
        self.min_side = min_side  # a large JPEG is decoded reduced, to no less than this (images.decode_floor)
        self.read = read  # a pack's reader (Dataset.read_bytes), which takes the path; None: the files under root

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        shard, positions = self.batches[i]
        decoded, kept, skipped, digests = [], [], [], []
        for position in positions:
            try:
                rel = self.paths[position]
                data = images.read_bytes(rel, self.read) if self.read is not None else images.read_bytes(self.root / rel)
                decoded.append(decode_rgb(data, min_side=self.min_side))
                kept.append(position)
                digests.append(hashlib.sha256(data.numpy()).digest())  # what the row is made from: a later update
                # compares it with the file when only the size still matches
            except ImageDecodeError as err:  # bad content: a listed skip
                skipped.append(Skipped(self.paths[position], str(err)).to_dict())
            except OSError as err:  # a read failure stops the run; returned as data, so no worker traceback
                return {"shard": shard, "read_error": {"path": self.paths[position], "reason": describe_error(err)}}
            except PackDamaged as err:  # a pack's shard that is not the one packed: its own line
                return {"shard": shard, "read_error": {"path": self.paths[position], "reason": "damaged",
                                                       "line": str(err)}}
        if not decoded:
            batch = None
        elif self.preprocess is not None:  # CPU extraction: resize and crop here, off the main process
            batch = self.preprocess.resize_crop(decoded)
        else:
            batch = stack_or_list(decoded)  # (B, 3, H, W) uint8, or mixed sizes resized on the device one by one
        return {"shard": shard, "positions": np.asarray(kept, dtype=np.int64), "images": batch,
                "sha256": np.frombuffer(b"".join(digests), np.uint8).reshape(-1, 32),
                "skipped": skipped, "count": len(positions), "read_error": None}


def read_ahead(reader: BatchReader, threads: int, ahead: int = 2) -> Iterator[dict]:
    """``reader``'s batches in order, each read by one of ``threads`` threads of this process while the
    backbone runs (``ahead`` batches besides the one in use); ``threads`` 0: in the calling thread.

    The CPU data path. Threads, not DataLoader worker processes: decoding and the uint8 resize release the GIL,
    and a batch needs no hand-off through shared memory (a fresh 9.6 MB mapping per batch of 64, faulted in
    page by page in both processes). Measured on 2 cores, paired with the bare forward in one process: worker
    process 0.91x, one thread 0.94x (benchmarks/bench_extract.py has the whole-process figures)."""
    if threads == 0:
        yield from (reader[i] for i in range(len(reader)))
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="extract-read")
    pending: deque = deque()
    try:
        for i in range(len(reader)):
            pending.append(pool.submit(reader.__getitem__, i))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # stopped early (an error, a skip under --strict): what has not started is dropped
        pool.shutdown(wait=True, cancel_futures=True)


def resize_in_workers(device: torch.device) -> bool:
    """Where the uint8 resize and crop run: in the reader threads for CPU extraction (read_ahead); on the GPU
    otherwise, so the DataLoader workers only decode and small 64x64 images cross the bus."""
    return device.type == "cpu"
