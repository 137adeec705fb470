"""Stage one: run the frozen AlexNet once over train and val and store its layers in the HDF5 cache.

Data path: DataLoader workers read and decode whole batches of JPEGs (and on the CPU also resize and
crop them, as uint8); the main process normalises on the device, runs the backbone in channels_last
with its weights cast once to the compute precision (one pass fills every requested layer), and writes
one shard file per ``shard_size`` rows (features.cache). Under torchrun each rank takes every
world_size-th shard; rank 0 assembles the shards into ``train.h5`` / ``val.h5``.

An image that cannot be read (an I/O error, permission denied, a vanished drive) stops the run with one
line naming it; only content that does not decode is a listed skip. The shard it belongs to is not
written, so a rerun after the fault is fixed reads it again.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from features import cache
from features.errors import describe_error
from models import LAYER_DIMS, MIN_IMAGE_SIZE
from pipeline.common.backbone import (HostCopy, load_backbone, place_backbone, resolve_precision, start_distributed,
                               warm_up)
from pipeline.common.config import ExtractConfig
from pipeline.common.dataset import TinyImageNet, arrange_val, index_dataset
from pipeline.common.errors import UserError
from pipeline.extract.freshness import log_up_to_date, split_settings
from pipeline.common.hardware import available_memory, default_workers, log_precision_hint
from pipeline.common.images import ImageDecodeError, Skipped, enforce_skip_policy, read_rgb, stack_or_list
from pipeline.common.preprocess import Preprocess
from pipeline.common.weights import weights_stamp

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
            except ImageDecodeError as err:  # bad content: a listed skip
                skipped.append(Skipped(self.paths[position], str(err)).to_dict())
            except OSError as err:  # a read failure stops the run; returned as data, so no worker traceback
                return {"shard": shard, "read_error": {"path": self.paths[position], "reason": describe_error(err)}}
        if not images:
            batch = None
        elif self.preprocess is not None:  # CPU extraction: resize and crop here, off the main process
            batch = self.preprocess.resize_crop(images)
        else:
            batch = stack_or_list(images)  # (B, 3, H, W) uint8, or mixed sizes resized on the device one by one
        return {"shard": shard, "positions": np.asarray(kept, dtype=np.int64), "images": batch,
                "skipped": skipped, "count": len(positions), "read_error": None}


def resize_in_workers(device: torch.device) -> bool:
    """Where the uint8 resize and crop run: in the CPU workers for CPU extraction; on the GPU otherwise,
    so the workers only decode and small 64x64 images cross the bus."""
    return device.type == "cpu"


def _shards(num_rows: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]


def extract(config: ExtractConfig, locate: Callable[[], Path], dataset: TinyImageNet | None = None) -> ExtractResult:
    """Fill ``config.out`` with train.h5 and val.h5.

    ``locate``: finds (unpacks, downloads) the dataset folder; called on rank 0 only. ``dataset``: already
    indexed (saves indexing twice).
    """
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
    _check_batch_memory(config, batch_size)

    if dataset is None or config.download or config.arrange_val or world > 1:
        # rank 0 alone downloads or unpacks; the others learn the folder from it
        root = locate() if rank == 0 else None
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
    settings = {split: split_settings(dataset, split, config, fingerprint) for split in config.splits}
    if world == 1 and not config.overwrite:  # the full check reads only: no lock when nothing is to be written
        plans = {split: _plan(cache.split_file(out, split), settings[split], config.layers, False)
                 for split in config.splits}
        if all(attrs is not None and not todo for attrs, todo in plans.values()):
            for split, (attrs, _) in plans.items():
                result.splits[split] = SplitResult(split, cache.split_file(out, split), attrs["num_rows"],
                                                   json.loads(attrs["skipped"]), up_to_date=True)
            return result
    lock = cache.exclusive_writer(out) if rank == 0 else nullcontext()
    try:
        with lock:
            if world > 1:
                dist.barrier()  # nobody writes before rank 0 holds the lock
            backbone = place_backbone(backbone, device, config.precision)
            warm_up(backbone, config.preprocess, device, batch_size)  # CUDA start-up before the timed loop
            for split in config.splits:
                result.splits[split] = _extract_split(
                    dataset, split, settings[split], config, backbone=backbone, device=device, batch_size=batch_size,
                    workers=workers, weights_spec=weights_spec, rank=rank, world=world)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return result


def _check_batch_memory(config: ExtractConfig, batch_size: int) -> None:
    """A batch of resized float images must fit in memory: a huge --image-size or --batch-size is one line."""
    side = config.preprocess.resize_size
    need = batch_size * 3 * side * side * 4 * 3  # the resized uint8 + float copies and the first conv's input
    available = available_memory()
    if available is not None and need > available:
        raise UserError(f"a batch of {batch_size} images at {side} px needs about {need / 2**30:.1f} GiB, more than "
                        f"the {available / 2**30:.1f} GiB available; lower --image-size/--resize-size (AlexNet uses "
                        "224/256) or --batch-size")


def _plan(path: Path, settings: cache.CacheSettings, layers: tuple[str, ...],
          overwrite: bool) -> tuple[dict | None, tuple[str, ...]]:
    """(attributes of the complete file at ``path`` to build on, or None; the layers to compute).

    Nothing to compute: up to date. A file with equal settings that lacks layers gains them; any other
    file is an error, unless ``overwrite`` (which always re-extracts every requested layer).
    """
    attrs = cache.read_attrs(path)
    if attrs is None:
        return None, layers
    existing = cache.CacheSettings.from_attrs(attrs) if attrs.get("complete") else None
    if existing == settings and not overwrite:
        held = cache.held_layers(attrs)
        return attrs, tuple(layer for layer in layers if layer not in held)
    if not overwrite:
        changed = ", ".join(existing.differences(settings)) if existing else "it is incomplete"
        why = ""
        if existing and changed == "files_signature":
            why = (" (made before image sizes and times were recorded)" if existing.files_signature is None
                   else " (an image changed since: its size or modification time)")
        raise UserError(f"{path} was extracted with other settings ({changed}){why}; "
                        "pass --overwrite to replace it, or another --out")
    return None, layers


def device_detail(device: torch.device) -> dict:
    """What, besides the settings, decides the last bits of the features: the GPU model and cuDNN, or the
    CPU's vector instructions; and torch. Resumed shards must come from the same."""
    if device.type == "cuda":
        return {"gpu": torch.cuda.get_device_name(device), "cudnn": torch.backends.cudnn.version(),
                "torch": torch.__version__}
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def _extract_split(dataset: TinyImageNet, split: str, settings: cache.CacheSettings, config: ExtractConfig, *,
                   backbone, device: torch.device, batch_size: int, workers: int, weights_spec: str,
                   rank: int, world: int) -> SplitResult:
    out = Path(config.out)
    final = cache.split_file(out, split)
    kept, layers = _plan(final, settings, config.layers, config.overwrite)
    if kept is not None and not layers:
        return SplitResult(split, final, kept["num_rows"], json.loads(kept["skipped"]), up_to_date=True)
    if kept is not None and rank == 0:
        log.info("%s: adding %s to %s (its %s stay as they are)", split, ", ".join(layers), final,
                 ", ".join(cache.held_layers(kept)))

    if dataset.splits[split].excluded:  # names the cache cannot store: skipped and listed, or an error with --strict
        enforce_skip_policy([Skipped(**item) for item in dataset.splits[split].excluded], strict=config.strict)
    paths, labels = dataset.splits[split].paths, dataset.splits[split].labels
    parts = cache.parts_folder(out, split)
    shards = _shards(len(paths), config.shard_size)
    if world > 1:
        dist.barrier()  # every rank has read the old file before rank 0 removes it
    if rank == 0:
        if kept is None and final.exists():  # --overwrite: the old file and any partial work are replaced
            final.unlink()
            cache.discard(parts)
        # shards from another batch size, device or set of layers would not match: they are discarded
        cache.start_parts(parts, settings, batch_size=batch_size, shard_size=config.shard_size, num_rows=len(paths),
                          device=device.type, device_detail=device_detail(device), layers=list(layers))
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
            if item["read_error"]:  # nothing of this shard is written: the rerun reads it again
                error = item["read_error"]
                raise UserError(f"cannot read {dataset.root / error['path']}: {error['reason']}; fix the drive or the "
                                "file's permissions and rerun (finished shards are kept; this one is read again)")
            acc = pending.setdefault(shard, {"features": {layer: [] for layer in layers}, "positions": [],
                                             "skipped": [], "seen": 0})
            if item["skipped"]:
                enforce_skip_policy([Skipped(**s) for s in item["skipped"]], strict=config.strict)
            if item["images"] is not None:
                images = item["images"]
                if isinstance(images, list):
                    images = [im.to(device, non_blocking=True) for im in images]
                else:
                    images = images.to(device, non_blocking=True)
                preprocess = config.preprocess.normalize if in_workers else config.preprocess
                outputs = backbone.forward_layers(preprocess(images, backbone.dtype), layers)  # {layer: (B, dim)}
                for layer, rows in outputs.items():
                    acc["features"][layer].append(HostCopy(rows.to(storage)))  # on CUDA: pinned, without waiting
            acc["positions"].append(item["positions"])
            acc["skipped"] += item["skipped"]
            acc["seen"] += item["count"]
            processed += item["count"]
            if acc["seen"] == len(shards[shard]):
                features = {layer: np.concatenate([copy.numpy() for copy in rows]) if rows
                            else np.zeros((0, LAYER_DIMS[layer]), config.dtype) for layer, rows in acc["features"].items()}
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
        layers={layer: LAYER_DIMS[layer] for layer in layers}, keep=final if kept is not None else None,
        skipped_before=dataset.splits[split].excluded,
        attrs={"weights_spec": weights_spec, "weights_stamp": weights_stamp(weights_spec), "batch_size": batch_size,
               "shard_size": config.shard_size, "dataset_root": str(dataset.root), "versions": _versions(),
               "class_full_names": "\n".join(dataset.full_names), "world_size": world})
    return SplitResult(split, final, record["num_rows"], json.loads(record["skipped"]), seconds=round(seconds, 2),
                       images_per_s=round(processed / seconds, 1) if seconds > 0 else None)


def _versions() -> str:
    import h5py
    import torchvision
    return json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__,
                       "h5py": h5py.__version__, "numpy": np.__version__})
