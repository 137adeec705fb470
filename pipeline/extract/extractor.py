"""Stage one: run the frozen backbone once over train and val and store its layers in the HDF5 cache.

The backbone comes from pipeline.backbones (``open_backbone``): torchvision's graph cut at the named nodes, each
reduced to a vector (models.backbones.LayerFeatures), AlexNet's pool5, fc6 and fc7 among them.

Data path (pipeline.extract.reading): whole batches of JPEGs are read, hashed and decoded ahead of the backbone,
on the CPU by threads of this process that also resize and crop them as uint8 (read_ahead), on CUDA by
DataLoader worker processes; the main process normalises on the device, runs the backbone in channels_last
with its weights cast once to the compute precision (one pass fills every requested layer), and writes
one shard file per ``shard_size`` rows, or per shard of a pack (features.cache), on a writer thread beside the
loop (pipeline.extract.writing). Under torchrun, on one node or
several, each rank takes every world_size-th shard; rank 0 assembles the shards into ``train.h5`` / ``val.h5``.

An image that cannot be read (an I/O error, permission denied, a vanished drive) stops the run with one
line naming it; only content that does not decode is a listed skip. The shard it belongs to is not
written, so a rerun after the fault is fixed reads it again.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from features import cache
from pipeline.backbones.precision import AUTO, place_backbone
from pipeline.common.config import ExtractConfig
from pipeline.datasets.dataset import Dataset, arrange_val, index_dataset
from pipeline.common.errors import UserError
from pipeline.common.hardware import available_memory, default_workers
from pipeline.datasets.images import Skipped, enforce_skip_policy
from pipeline.datasets.jpeg import decode_floor
from pipeline.common.preprocess import Preprocess
from pipeline.extract.assembly import assemble_split as _assemble  # the name tests patch to kill the assembly
from pipeline.extract.devices import HostCopy, start_distributed, warm_up
from pipeline.extract.freshness import dataset_changed, dataset_stamps, refresh_class_names, split_settings
from pipeline.extract.incremental import Plan, Reuse, plan_reuse, plan_split
from pipeline.extract.loading import default_batch_size, load_for, preprocess_of, settle
from pipeline.extract.reading import BatchReader, read_ahead, resize_in_workers
from pipeline.extract.writing import ShardWriter
from pipeline.extract.precision_choice import complete_attrs, decide_precision, keep_record, split_precision
from pipeline.extract.results import ExtractResult, SplitResult

__all__ = ["BatchReader", "ExtractResult", "SplitResult", "device_detail", "extract", "read_ahead", "resize_in_workers"]

log = logging.getLogger(__name__)


def _shards(dataset: Dataset, split: str, shard_size: int) -> list[range]:
    """The resumable units of ``split``: ``shard_size`` rows each; for a pack, its shards (a rank takes whole ones)."""
    if dataset.source is not None:
        ends = np.cumsum(dataset.source.shard_rows(split)).tolist()
        return [range(start, stop) for start, stop in zip([0, *ends[:-1]], ends)]
    num_rows = len(dataset.splits[split].paths)
    return [range(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]


@dataclass(frozen=True)
class Run:
    """What every split of one extraction shares: the settings, the backbone, and where this process stands."""

    config: ExtractConfig
    preprocess: Preprocess
    backbone: torch.nn.Module  # the backbone's module (forward_layers), placed on the device
    device: torch.device
    batch_size: int
    workers: int
    weights_spec: str
    rank: int = 0
    world: int = 1
    precision_record: dict | None = None  # --precision auto: its choice and measurements (recorded in the cache)
    dims: dict = None  # {layer: width} of every layer the backbone computes
    record: dict = None  # what the cache records of the backbone (pipeline.backbones.Backbone.record)


def extract(config: ExtractConfig, locate: Callable[[], Path], dataset: Dataset | None = None) -> ExtractResult:
    """Fill ``config.out`` with train.h5 and val.h5.

    ``locate``: finds (unpacks, downloads) the dataset folder; called on rank 0 only. ``dataset``: already
    indexed (saves indexing twice).
    """
    config = settle(config)
    preprocess = preprocess_of(config)
    rank, world, device = start_distributed(config.device)  # under torchrun: one GPU per rank, NCCL or gloo
    batch_size = config.batch_size or default_batch_size(config.backbone, device)
    workers = config.workers if config.workers is not None else default_workers(device.type)
    _check_batch_memory(preprocess, batch_size)
    dataset = _dataset(config, locate, dataset, rank, world)
    stamps = {split: dataset_stamps(dataset, split) for split in config.splits}
    opened = load_for(replace(config, layers=_layers_to_plan(config, dataset, stamps)))
    backbone, weights_spec, fingerprint = opened.module, opened.weights, opened.fingerprint
    out = Path(config.out)
    result = ExtractResult(out=out, dataset=dataset.root, weights_spec=weights_spec, weights_fingerprint=fingerprint,
                           device=str(device), batch_size=batch_size, world_size=world)
    auto = config.precision == AUTO  # precision hook: reused from the cache, or measured (pipeline.extract.precision_choice)
    config, record = decide_precision(config, dataset, backbone, preprocess, device, batch_size, rank, world)
    settings = {split: split_settings(dataset, split, replace(config, precision=split_precision(config, auto, split)),
                                      fingerprint, preprocess, stamps[split]) for split in config.splits}
    if world == 1 and not config.overwrite and _all_up_to_date(config, dataset, settings, result):
        return result  # the full check reads only: no lock when nothing is to be written
    lock = cache.exclusive_writer(out) if rank == 0 else nullcontext()
    try:
        with lock:
            if world > 1:
                dist.barrier()  # nobody writes before rank 0 holds the lock
            backbone = place_backbone(backbone, device, config.precision)
            warm_up(backbone, preprocess, device, batch_size)  # CUDA start-up before the timed loop
            run = Run(config, preprocess, backbone, device, batch_size, workers, weights_spec, rank, world,
                      precision_record=record, dims=opened.dims, record=opened.record())
            # every split is planned before any is written: a refused update leaves both files as they were
            plans = {split: _plan(run, dataset, split, settings[split], stamps[split]) for split in config.splits}
            for split in config.splits:
                result.splits[split] = _extract_split(run, dataset, split, settings[split], stamps[split], *plans[split])
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return result


def _dataset(config: ExtractConfig, locate: Callable[[], Path], dataset: Dataset | None, rank: int,
             world: int) -> Dataset:
    """The indexed dataset: rank 0 alone downloads or unpacks it; the other ranks learn the folder from it."""
    if dataset is not None and not (config.download or config.arrange_val or world > 1):
        return dataset
    root = locate() if rank == 0 else None
    if rank == 0 and config.arrange_val:
        log.info("arranged val: %d new links under %s/val/<wnid>/images", arrange_val(index_dataset(root)), root)
    if world > 1:
        shared = [str(root) if root else None]
        dist.broadcast_object_list(shared, src=0)
        root = Path(shared[0])
    return index_dataset(root, config.val_fraction)


def _all_up_to_date(config: ExtractConfig, dataset: Dataset, settings: dict, result: ExtractResult) -> bool:
    """Whether every split's file is complete with these settings and layers (then ``result`` says so)."""
    plans = {}
    for split in config.splits:
        plan = plan_split(cache.split_file(config.out, split), settings[split], config.layers, False)
        if plan.kept is None or plan.layers:
            return False
        plans[split] = (plan.kept, plan.layers)
    refresh_class_names(Path(config.out), {cache.split_file(config.out, s): a for s, (a, _) in plans.items()}, dataset)
    for split, (attrs, _) in plans.items():
        result.splits[split] = SplitResult(split, cache.split_file(config.out, split), attrs["num_rows"],
                                           json.loads(attrs["skipped"]), up_to_date=True)
    return True


def _layers_to_plan(config: ExtractConfig, dataset: Dataset, stamps: dict) -> tuple[str, ...]:
    """The requested layers, and those held by a complete file whose dataset changed: new rows of an incremental
    update cover every layer of the file they join."""
    if config.overwrite:
        return config.layers
    held = []
    for split in config.splits:
        attrs = complete_attrs(config, split)
        if attrs is not None and dataset_changed(attrs, split_settings(dataset, split, config, None, stamps=stamps[split])):
            held += cache.held_layers(attrs)
    return tuple(dict.fromkeys([*config.layers, *held]))


def _check_batch_memory(preprocess: Preprocess, batch_size: int) -> None:
    """A batch of resized float images must fit in memory: a huge --image-size or --batch-size is one line."""
    side = preprocess.resize_size
    need = batch_size * 3 * side * side * 4 * 3  # the resized uint8 + float copies and the first conv's input
    available = available_memory()
    if available is not None and need > available:
        raise UserError(f"a batch of {batch_size} images at {side} px needs about {need / 2**30:.1f} GiB, more than "
                        f"the {available / 2**30:.1f} GiB available; lower --image-size/--resize-size or --batch-size")


def device_detail(device: torch.device) -> dict:
    """What, besides the settings, decides the last bits of the features: the GPU model and cuDNN, or the
    CPU's vector instructions; and torch. Resumed shards must come from the same."""
    if device.type == "cuda":
        return {"gpu": torch.cuda.get_device_name(device), "cudnn": torch.backends.cudnn.version(),
                "torch": torch.__version__}
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def _plan(run: Run, dataset: Dataset, split: str, settings: cache.CacheSettings,
          stamps: np.ndarray) -> tuple[Plan, Reuse | None]:
    """What ``split``'s extraction does (pipeline.extract.incremental), and the rows an update reuses."""
    config = run.config
    final = cache.split_file(config.out, split)
    plan = plan_split(final, settings, config.layers, config.overwrite)
    if not plan.update:
        return plan, None
    return plan, plan_reuse(final, plan.update, config.layers, dataset.root, dataset.splits[split].paths, stamps,
                            run.world, source=dataset.source)


def _extract_split(run: Run, dataset: Dataset, split: str, settings: cache.CacheSettings,
                   stamps: np.ndarray, plan: Plan, reuse: Reuse | None) -> SplitResult:
    """One split: up to date, or its missing layers, or its new and changed images (an incremental update, see
    pipeline.extract.incremental) computed shard by shard and assembled into its file."""
    config, paths = run.config, dataset.splits[split].paths
    final = cache.split_file(config.out, split)
    kept, layers = plan.kept, plan.layers
    if kept is not None and not layers:
        if run.rank == 0:
            refresh_class_names(Path(config.out), {final: kept}, dataset, locked=True)
        return SplitResult(split, final, kept["num_rows"], json.loads(kept["skipped"]), up_to_date=True)
    if kept is not None and run.rank == 0:
        log.info("%s: adding %s to %s (its %s stay as they are)", split, ", ".join(layers), final,
                 ", ".join(cache.held_layers(kept)))
    if dataset.splits[split].excluded:  # names the cache cannot store: skipped and listed, or an error with --strict
        enforce_skip_policy([Skipped(**item) for item in dataset.splits[split].excluded], strict=config.strict)
    shards = _shards(dataset, split, config.shard_size)
    parts = _start_parts(run, split, settings, layers, num_rows=len(shards) and shards[-1].stop,
                         shard_rows=[len(r) for r in shards] if dataset.source is not None else None,
                         replace_old=plan.replace_old, reuse=reuse.identity(plan.update) if reuse else None)
    start = time.perf_counter()
    computed = _compute_shards(run, dataset, split, parts, shards, layers, reuse)
    seconds = time.perf_counter() - start
    if run.world > 1:
        dist.barrier()  # every rank's shards are on disk
    if run.rank != 0:
        return SplitResult(split, final, computed, assembled=False, seconds=round(seconds, 2), computed=computed)
    record = _assemble(run, dataset, split, settings, len(shards), layers, kept, reuse, stamps)
    return SplitResult(split, final, record["num_rows"], json.loads(record["skipped"]), seconds=round(seconds, 2),
                       images_per_s=round(computed / seconds, 1) if computed and seconds > 0 else None,
                       computed=computed, reused=reuse.reused if reuse else None,
                       dropped=reuse.dropped if reuse else None, extracted=reuse.extracted if reuse else None)


def _start_parts(run: Run, split: str, settings: cache.CacheSettings, layers: tuple[str, ...], *, num_rows: int,
                 shard_rows: list[int] | None, replace_old: bool, reuse: dict | None = None) -> Path:
    """The parts folder for this split's shards, made (or kept, to resume) on rank 0. ``reuse``: the identity
    of the file an incremental update takes rows from (its shards are tied to it). Every other rank checks that
    it sees the folder: --out must be one filesystem that every node shares."""
    out, final = Path(run.config.out), cache.split_file(run.config.out, split)
    parts = cache.parts_folder(out, split)
    if run.world > 1:
        dist.barrier()  # every rank has read the old file before rank 0 removes it
    if run.rank == 0:
        if replace_old and final.exists():  # --overwrite: the old file and any partial work are replaced
            final.unlink()
            cache.discard(parts)
        # shards from another batch size, device, set of layers or update would not match: they are discarded
        layout = {"reuse": reuse} if reuse is not None else {}
        if shard_rows is not None:  # a pack's own shards, not --shard-size
            layout["shard_rows"] = shard_rows
        cache.start_parts(parts, settings, batch_size=run.batch_size, shard_size=run.config.shard_size,
                          num_rows=num_rows, device=run.device.type,
                          device_detail=device_detail(run.device), layers=list(layers), **layout)
        keep_record(parts, run.precision_record)  # precision hook: a resumed run reuses auto's choice
    if run.world > 1:
        dist.barrier()
        if run.rank != 0 and not (parts / "settings.json").is_file():
            raise UserError(f"rank {run.rank} does not see {parts}, which rank 0 made: --out {out} must be on one "
                            "filesystem that every node shares (a network drive mounted at the same path)")
    return parts


def _compute_shards(run: Run, dataset: Dataset, split: str, parts: Path, shards: list[range],
                    layers: tuple[str, ...], reuse: Reuse | None = None) -> int:
    """Compute this rank's unfinished shards and write each as it fills. Returns the images this run read.

    ``reuse``: an incremental update, where only the positions it does not reuse are read; a shard whose rows
    are all reused is written at once, referencing them."""
    config, paths = run.config, dataset.splits[split].paths
    work = [reuse.to_compute(shard) if reuse else np.arange(shard.start, shard.stop) for shard in shards]
    done = cache.done_shards(parts)
    mine = [i for i in range(len(shards)) if i % run.world == run.rank and i not in done]
    batches = [(i, work[i][b:b + run.batch_size]) for i in mine for b in range(0, len(work[i]), run.batch_size)]
    in_workers = resize_in_workers(run.device)
    # on the CPU the normalised batch is written into the same buffers each time (the forward is done with it
    # before the next batch): no fresh 38 MB per batch to fault in
    normalize = functools.partial(run.preprocess.normalize, reuse={}) if in_workers else run.preprocess
    forward = _Forward(run, layers, normalize, reuse, shards)
    for i in mine:
        if not len(work[i]):
            forward.write(parts, i, forward.empty())
    reader = BatchReader(dataset.root, paths, batches, run.preprocess if in_workers else None,
                         min_side=decode_floor(run.preprocess),
                         read=dataset.read_bytes if dataset.source is not None else None)
    if run.device.type == "cpu":  # threads beside the backbone's; on CUDA worker processes feed the GPU
        loader = read_ahead(reader, run.workers)
    else:
        loader = DataLoader(reader, batch_size=None, shuffle=False, num_workers=run.workers, pin_memory=True,
                            persistent_workers=False)
    bar = tqdm(total=sum(map(len, work)), initial=sum(len(work[i]) for i in done), desc=f"extract {split}", unit="img",
               dynamic_ncols=True, disable=not config.progress or run.rank != 0, smoothing=0.1)
    pending: dict[int, dict] = {}  # shard -> rows gathered so far
    processed = 0
    with torch.inference_mode(), ShardWriter(forward.write) as writer:  # finished shards written beside the loop
        for item in loader:
            if item["read_error"]:  # nothing of this shard is written: the rerun reads it again
                error = item["read_error"]
                if error.get("line"):  # a damaged pack shard
                    raise UserError(error["line"])
                raise UserError(f"cannot read {dataset.root / error['path']}: {error['reason']}; fix the drive or the "
                                "file's permissions and rerun (finished shards are kept; this one is read again)")
            shard = item["shard"]
            acc = pending.setdefault(shard, forward.empty())
            forward.add(item, acc)
            processed += item["count"]
            if acc["seen"] == len(work[shard]):
                writer.submit(parts, shard, pending.pop(shard))
                if run.world > 1:  # rank 0 shows everyone's progress: count the finished shards on disk
                    bar.n = sum(len(work[i]) for i in cache.done_shards(parts))
                    bar.refresh()
            if run.world == 1:
                bar.update(item["count"])
    bar.close()
    return processed


class _Forward:
    """The backbone pass over one loaded batch, and a finished shard's rows written to its file."""

    def __init__(self, run: Run, layers: tuple[str, ...], normalize: Callable, reuse: Reuse | None = None,
                 shards: list[range] = ()):
        self.run, self.layers, self.normalize, self.reuse, self.shards = run, layers, normalize, reuse, shards
        self.storage = getattr(torch, run.config.dtype)

    def empty(self) -> dict:
        """A shard's rows before any batch: none yet."""
        return {"features": {layer: [] for layer in self.layers}, "positions": [], "sha256": [], "skipped": [],
                "seen": 0}

    def add(self, item: dict, acc: dict) -> None:
        """Run one batch (its skips listed, or an error with --strict) and keep its rows in ``acc``."""
        if item["skipped"]:
            enforce_skip_policy([Skipped(**s) for s in item["skipped"]], strict=self.run.config.strict)
        if item["images"] is not None:
            images = item["images"]
            if isinstance(images, list):
                images = [im.to(self.run.device, non_blocking=True) for im in images]
            else:
                images = images.to(self.run.device, non_blocking=True)
            backbone = self.run.backbone
            x = self.normalize(images, backbone.dtype)
            outputs = backbone.forward_layers(x, self.layers)  # {layer: (B, dim)}, one pass
            for layer, rows in outputs.items():
                acc["features"][layer].append(HostCopy(rows.to(self.storage)))  # on CUDA: pinned, without waiting
        acc["positions"].append(item["positions"])
        acc["sha256"].append(item["sha256"])
        acc["skipped"] += item["skipped"]
        acc["seen"] += item["count"]

    def write(self, parts: Path, shard: int, acc: dict) -> None:
        features = {layer: np.concatenate([copy.numpy() for copy in rows]) if rows
                    else np.zeros((0, self.run.dims[layer]), self.run.config.dtype)
                    for layer, rows in acc["features"].items()}
        positions = np.concatenate(acc["positions"]) if acc["positions"] else np.zeros(0, np.int64)
        sha256 = np.concatenate(acc["sha256"]) if acc["sha256"] else np.zeros((0, 32), np.uint8)
        reused = self.reuse.reused_in(self.shards[shard]) if self.reuse is not None else None
        cache.write_shard(parts, shard, features, positions, acc["skipped"], reused, sha256=sha256)
