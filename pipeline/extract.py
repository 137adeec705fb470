"""Stage one: run the frozen AlexNet once over train and val and store fc7 in the HDF5 cache.

Data path: DataLoader workers read and decode whole batches of JPEGs (and on the CPU also resize and
crop them, as uint8); the main process normalises on the device, runs the backbone in channels_last
with its weights cast once to the compute precision, and writes one shard file per ``shard_size`` rows
(features.cache). Under torchrun each rank takes every world_size-th shard; rank 0 assembles the shards
into ``train.h5`` / ``val.h5``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from features import cache
from models import FC7_DIM, MIN_IMAGE_SIZE
from pipeline.backbone import (HostCopy, load_backbone, place_backbone, resolve_precision, start_distributed,
                               warm_up)
from pipeline.config import ExtractConfig
from pipeline.dataset import TinyImageNet, arrange_val, index_dataset
from pipeline.errors import UserError
from pipeline.freshness import log_up_to_date, split_settings
from pipeline.hardware import default_workers, log_precision_hint
from pipeline.images import ImageDecodeError, Skipped, enforce_skip_policy, read_rgb, stack_or_list
from pipeline.prepare import resolve_data
from pipeline.weights_spec import weights_stamp

log = logging.getLogger(__name__)


@dataclass
class SplitResult:
    """What extraction did for one split."""

    split: str
    file: Path
    rows: int  # rows in the finished file (on ranks other than 0: images this rank processed)
    skipped: list[dict] = field(default_factory=list)  # [{"path", "reason"}]
    up_to_date: bool = False  # the file was already complete with these settings: nothing was done
    assembled: bool = True  # this process wrote the file (under torchrun only rank 0 does)
    seconds: float | None = None
    images_per_s: float | None = None

    def log(self) -> None:
        if self.up_to_date:
            log_up_to_date(self.file, {"split": self.split, "num_rows": self.rows})
        elif self.assembled:
            log.info("%s: %d images in %.1f s (%.1f img/s), %d skipped -> %s (%.1f MiB)", self.split, self.rows,
                     self.seconds or 0, self.images_per_s or 0, len(self.skipped), self.file,
                     self.file.stat().st_size / 2**20)
            for item in self.skipped:
                log.info("  skipped %s: %s", item["path"], item["reason"])


@dataclass
class ExtractResult:
    """What one run of stage one did, split by split."""

    out: Path
    dataset: Path
    weights_spec: str
    weights_fingerprint: str
    device: str
    batch_size: int
    world_size: int
    splits: dict[str, SplitResult] = field(default_factory=dict)


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
        else:
            batch = stack_or_list(images)  # (B, 3, H, W) uint8, or mixed sizes resized on the device one by one
        return {"shard": shard, "positions": np.asarray(kept, dtype=np.int64), "images": batch,
                "skipped": skipped, "count": len(positions)}


def resize_in_workers(device: torch.device) -> bool:
    """Where the uint8 resize and crop run: in the CPU workers for CPU extraction; on the GPU otherwise,
    so the workers only decode and small 64x64 images cross the bus."""
    return device.type == "cpu"


def _shards(num_rows: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]


def extract(config: ExtractConfig, dataset: TinyImageNet | None = None) -> ExtractResult:
    """Fill ``config.out`` with train.h5 and val.h5. ``dataset``: already indexed (saves indexing twice)."""
    config.check()
    if config.preprocess.image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image-size {config.preprocess.image_size} is too small: AlexNet needs at least "
                        f"{MIN_IMAGE_SIZE} px (224 is its usual input)")
    rank, world, device = start_distributed(config.device)  # under torchrun: one GPU per rank, NCCL or gloo
    config = replace(config, precision=resolve_precision(config.precision, device))  # None: bf16 on CUDA, else fp32
    if rank == 0:
        log_precision_hint(device.type, config.precision)
    batch_size = config.batch_size or (256 if device.type == "cuda" else 64)
    workers = config.workers if config.workers is not None else default_workers(device.type)

    if dataset is None or config.download or config.arrange_val or world > 1:
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

    result = ExtractResult(out=out, dataset=dataset.root, weights_spec=weights_spec, weights_fingerprint=fingerprint,
                           device=str(device), batch_size=batch_size, world_size=world)
    lock = cache.exclusive_writer(out) if rank == 0 else nullcontext()
    try:
        with lock:
            if world > 1:
                dist.barrier()  # nobody writes before rank 0 holds the lock
            backbone = place_backbone(backbone, device, config.precision)
            warm_up(backbone, config.preprocess, device, batch_size)  # CUDA start-up before the timed loop
            for split in config.splits:
                settings = split_settings(dataset, split, config, fingerprint)
                result.splits[split] = _extract_split(
                    dataset, split, settings, config, backbone=backbone, device=device, batch_size=batch_size,
                    workers=workers, weights_spec=weights_spec, rank=rank, world=world)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return result


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
        return SplitResult(split, final, attrs["num_rows"], json.loads(attrs["skipped"]), up_to_date=True)

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
                preprocess = config.preprocess.normalize if in_workers else config.preprocess
                fc7 = backbone(preprocess(images, backbone.dtype))  # (B, 4096) post-ReLU, in the backbone's dtype
                acc["features"].append(HostCopy(fc7.to(storage)))  # on CUDA: pinned, without waiting
            acc["positions"].append(item["positions"])
            acc["skipped"] += item["skipped"]
            acc["seen"] += item["count"]
            processed += item["count"]
            if acc["seen"] == len(shards[shard]):
                features = (np.concatenate([copy.numpy() for copy in acc["features"]]) if acc["features"]
                            else np.zeros((0, FC7_DIM), config.dtype))
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
        return SplitResult(split, final, processed, assembled=False, seconds=round(seconds, 2))
    record = cache.assemble(
        out, split, settings=settings, num_shards=len(shards), paths=paths, labels=labels,
        wnids=dataset.wnids, names=dataset.names, compression=config.compression,
        attrs={"weights_spec": weights_spec, "weights_stamp": weights_stamp(weights_spec), "feature_dim": FC7_DIM, "batch_size": batch_size,
               "shard_size": config.shard_size, "dataset_root": str(dataset.root), "versions": _versions(),
               "class_full_names": "\n".join(dataset.full_names), "world_size": world})
    return SplitResult(split, final, record["num_rows"], json.loads(record["skipped"]), seconds=round(seconds, 2),
                       images_per_s=round(processed / seconds, 1) if seconds > 0 else None)


def _versions() -> str:
    import h5py
    import torchvision
    return json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__,
                       "h5py": h5py.__version__, "numpy": np.__version__})
