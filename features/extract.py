"""Stage one: run the frozen AlexNet once over train and val and store fc7 in the HDF5 cache.

Data path: DataLoader workers read and decode whole batches of JPEGs (and on the CPU also resize and
crop them, as uint8); the main process normalises on the device, runs the backbone in channels_last,
and writes one shard file per ``shard_size`` rows. Under torchrun each rank takes every world_size-th
shard; rank 0 assembles the shards into ``train.h5`` / ``val.h5``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from features import cache
from models import FC7_DIM
from pipeline.backbone import load_backbone, resolve_device
from pipeline.dataset import (TINY_IMAGENET_MD5, TINY_IMAGENET_URL, TinyImageNet, arrange_val, index_dataset,
                              resolve_data)
from pipeline.errors import UserError
from pipeline.images import ImageDecodeError, Skipped, enforce_skip_policy, read_rgb
from pipeline.preprocess import Preprocess
from pipeline.weights_spec import weights_stamp

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = ("float32", "float16")
MIN_IMAGE_SIZE = 63  # smaller inputs shrink to nothing in AlexNet's third max-pool


@dataclass
class ExtractConfig:
    data: str | None = None  # dataset folder or zip; None: data/tiny-imagenet-200
    download: bool = False  # fetch the official zip first
    url: str = TINY_IMAGENET_URL
    md5: str | None = TINY_IMAGENET_MD5
    out: Path = Path("runs/features")  # train.h5 and val.h5 go here
    weights: str = "imagenet"  # imagenet, random, or a state_dict path
    seed: int = 0  # for --weights random
    device: str = "auto"
    precision: str = "fp32"  # compute precision: fp32, bf16 or fp16 (autocast)
    dtype: str = "float32"  # storage dtype of the features
    batch_size: int | None = None  # None: 64 on CPU, 256 on CUDA
    workers: int | None = None  # DataLoader workers; None: 1 on CPU, up to 8 on CUDA
    preprocess: Preprocess = field(default_factory=Preprocess)
    shard_size: int = 2048  # rows per resumable shard
    compression: str | None = None  # None, "gzip" or "lzf"
    overwrite: bool = False
    strict: bool = False  # an undecodable image is an error instead of a listed skip
    arrange_val: bool = False  # hard-link val images into val/<wnid>/images/ first (writes into the dataset)
    splits: tuple[str, ...] = ("train", "val")
    progress: bool = True


class BatchReader(Dataset):
    """Item i is the i-th batch of the work list: its shard, positions, uint8 images and skips."""

    def __init__(self, root: Path, paths: list[str], batches: list[tuple[int, np.ndarray]], preprocess: Preprocess | None):
        self.root, self.paths, self.batches, self.preprocess = root, paths, batches, preprocess

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        shard, positions = self.batches[i]
        images, kept, skipped = [], [], []
        for position in positions:
            try:
                images.append(read_rgb(self.root / self.paths[position]))
                kept.append(position)
            except (ImageDecodeError, OSError) as err:
                skipped.append(Skipped(self.paths[position], str(err)).to_dict())
        if not images:
            batch = None
        elif self.preprocess is not None:  # CPU extraction: resize and crop here, off the main process
            batch = self.preprocess.resize_crop(images)
        elif len({tuple(im.shape) for im in images}) == 1:
            batch = torch.stack(images)  # (B, 3, H, W) uint8
        else:
            batch = images  # mixed sizes, resized on the device one by one
        return {"shard": shard, "positions": np.asarray(kept, dtype=np.int64), "images": batch,
                "skipped": skipped, "count": len(positions)}


def _start(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun with several ranks: one GPU per rank (cuda:LOCAL_RANK)
    and NCCL, or the CPU and gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device_name in ("auto", "cuda") and torch.cuda.is_available():
        device_name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    device = resolve_device(device_name)
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL addresses "the current device"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def resize_in_workers(device: torch.device) -> bool:
    """Where the uint8 resize and crop run: in the CPU workers for CPU extraction; on the GPU otherwise,
    so the workers only decode and small 64x64 images cross the bus."""
    return device.type == "cpu"


def _shards(num_rows: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]


def extract(config: ExtractConfig) -> dict:
    """Fill ``config.out`` with train.h5 and val.h5. Returns the summary (also logged)."""
    if config.precision not in PRECISIONS:
        raise UserError(f"--precision {config.precision}: use fp32, bf16 or fp16")
    if config.dtype not in DTYPES:
        raise UserError(f"--dtype {config.dtype}: use float32 or float16")
    if config.batch_size is not None and config.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {config.batch_size}")
    if config.shard_size <= 0:
        raise UserError(f"--shard-size must be positive, got {config.shard_size}")
    if config.preprocess.image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image-size {config.preprocess.image_size} is too small: AlexNet needs at least "
                        f"{MIN_IMAGE_SIZE} px (224 is its usual input)")
    rank, world, device = _start(config.device)
    if device.type == "cuda" and config.precision == "fp32":
        # fp32 means fp32: no TF32 convolutions or matmuls behind the user's back
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if config.precision == "fp16" and device.type == "cpu":
        log.warning("fp16 on the CPU is slow and rarely supported well; bf16 or fp32 are better choices")
    batch_size = config.batch_size or (256 if device.type == "cuda" else 64)
    workers = config.workers if config.workers is not None else (min(8, os.cpu_count() or 1) if device.type == "cuda" else 1)

    # rank 0 alone downloads or unpacks; the others learn the folder from it
    root = resolve_data(config.data, download=config.download, url=config.url, md5=config.md5) if rank == 0 else None
    if rank == 0 and config.arrange_val:
        log.info("arranged val: %d new links under %s/val/<wnid>/images", arrange_val(index_dataset(root)), root)
    if world > 1:
        shared = [str(root) if root else None]
        dist.broadcast_object_list(shared, src=0)
        root = Path(shared[0])
    dataset = index_dataset(root)
    backbone, weights_spec, fingerprint = load_backbone(config.weights, seed=config.seed)
    out = Path(config.out)

    summary = {"out": str(out), "dataset": str(dataset.root), "weights": weights_spec, "weights_fingerprint": fingerprint,
               "device": str(device), "precision": config.precision, "dtype": config.dtype, "batch_size": batch_size,
               "world_size": world, "splits": {}}
    lock = cache.exclusive_writer(out) if rank == 0 else nullcontext()
    try:
        with lock:
            if world > 1:
                dist.barrier()  # nobody writes before rank 0 holds the lock
            backbone = backbone.to(device, memory_format=torch.channels_last)
            for split in config.splits:
                settings = cache.CacheSettings(
                    backbone="alexnet", layer="fc7", weights_fingerprint=fingerprint,
                    preprocess=config.preprocess.to_json(), dtype=config.dtype, precision=config.precision,
                    dataset_signature=dataset.signature(split))
                summary["splits"][split] = _extract_split(
                    dataset, split, settings, config, backbone=backbone, device=device, batch_size=batch_size,
                    workers=workers, weights_spec=weights_spec, rank=rank, world=world)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return summary


def _check_existing(path: Path, settings: cache.CacheSettings, overwrite: bool) -> dict | None:
    """Attributes of an up-to-date cache at ``path``; None when there is work to do; an error on a mismatch."""
    attrs = cache.read_attrs(path)
    if attrs is None:
        return None
    existing = cache.CacheSettings.from_attrs(attrs) if attrs.get("complete") else None
    if existing == settings:
        return attrs
    if not overwrite:
        changed = ", ".join(existing.differences(settings)) if existing else "it is incomplete"
        raise UserError(f"{path} was extracted with other settings ({changed}); "
                        "pass --overwrite to replace it, or another --out")
    return None


def _extract_split(dataset: TinyImageNet, split: str, settings: cache.CacheSettings, config: ExtractConfig, *,
                   backbone, device: torch.device, batch_size: int, workers: int, weights_spec: str,
                   rank: int, world: int) -> dict:
    out = Path(config.out)
    final = cache.split_file(out, split)
    attrs = _check_existing(final, settings, config.overwrite)
    if attrs is not None:
        log.info("%s: up to date (%d rows)", final, attrs["num_rows"])
        return {"status": "up to date", "images": attrs["num_rows"], "skipped": attrs["num_skipped"],
                "file": str(final), "file_mb": round(final.stat().st_size / 2**20, 1)}

    paths, labels = dataset.splits[split].paths, dataset.splits[split].labels
    parts = cache.parts_folder(out, split)
    shards = _shards(len(paths), config.shard_size)
    if world > 1:
        dist.barrier()  # every rank has read the old file before rank 0 removes it
    if rank == 0:
        if final.exists():  # --overwrite of a different cache
            final.unlink()
        # shards from another batch size or device type would not match bit for bit: they are discarded
        cache.start_parts(parts, settings, batch_size=batch_size, shard_size=config.shard_size, num_rows=len(paths),
                          device=device.type)
    if world > 1:
        dist.barrier()
    done = cache.done_shards(parts)
    mine = [i for i in range(len(shards)) if i % world == rank and i not in done]
    batches = [(i, np.arange(b, min(b + batch_size, shards[i].stop)))
               for i in mine for b in range(shards[i].start, shards[i].stop, batch_size)]
    in_workers = resize_in_workers(device)
    reader = BatchReader(dataset.root, paths, batches, config.preprocess if in_workers else None)
    loader = DataLoader(reader, batch_size=None, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    autocast = torch.autocast(device.type, dtype=PRECISIONS[config.precision]) \
        if config.precision != "fp32" else nullcontext()
    storage = getattr(torch, config.dtype)

    already = sum(len(shards[i]) for i in done)
    bar = tqdm(total=len(paths), initial=already, desc=f"extract {split}", unit="img", dynamic_ncols=True,
               disable=not config.progress or rank != 0, smoothing=0.1)
    pending: dict[int, dict] = {}  # shard -> rows gathered so far
    start = time.perf_counter()
    processed = 0
    with torch.inference_mode():
        for item in loader:
            shard = item["shard"]
            acc = pending.setdefault(shard, {"features": [], "positions": [], "skipped": [], "seen": 0})
            if item["skipped"]:
                enforce_skip_policy([Skipped(**s) for s in item["skipped"]], strict=config.strict)
            if item["images"] is not None:
                images = item["images"]
                if isinstance(images, list):
                    images = [im.to(device, non_blocking=True) for im in images]
                else:
                    images = images.to(device, non_blocking=True)
                x = config.preprocess.normalize(images if in_workers else config.preprocess.resize_crop(images))
                with autocast:
                    fc7 = backbone(x)  # (B, 4096) post-ReLU
                acc["features"].append(fc7.to(storage).cpu().numpy())
            acc["positions"].append(item["positions"])
            acc["skipped"] += item["skipped"]
            acc["seen"] += item["count"]
            processed += item["count"]
            if acc["seen"] == len(shards[shard]):
                features = np.concatenate(acc["features"]) if acc["features"] else np.zeros((0, FC7_DIM), config.dtype)
                cache.write_shard(parts, shard, features, np.concatenate(acc["positions"]), acc["skipped"])
                del pending[shard]
                if world > 1:  # rank 0 shows everyone's progress: count the finished shards on disk
                    bar.n = sum(len(shards[i]) for i in cache.done_shards(parts))
                    bar.refresh()
            if world == 1:
                bar.update(item["count"])
    bar.close()
    seconds = time.perf_counter() - start

    if world > 1:
        dist.barrier()  # every rank's shards are on disk
    if rank != 0:
        return {"status": "extracted by rank 0", "images": processed, "seconds": round(seconds, 2)}
    record = cache.assemble(
        out, split, settings=settings, num_shards=len(shards), paths=paths, labels=labels,
        wnids=dataset.wnids, names=dataset.names, compression=config.compression,
        attrs={"weights_spec": weights_spec, "weights_stamp": weights_stamp(weights_spec), "feature_dim": FC7_DIM, "batch_size": batch_size,
               "shard_size": config.shard_size, "dataset_root": str(dataset.root), "versions": _versions(),
               "class_full_names": "\n".join(dataset.full_names), "world_size": world})
    return {"status": "extracted", "images": record["num_rows"], "skipped": record["num_skipped"],
            "skipped_list": json.loads(record["skipped"]), "seconds": round(seconds, 2),
            "images_per_s": round(processed / seconds, 1) if seconds > 0 else None,
            "file": str(final), "file_mb": round(final.stat().st_size / 2**20, 1)}


def _versions() -> str:
    import h5py
    import torchvision
    return json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__,
                       "h5py": h5py.__version__, "numpy": np.__version__})
