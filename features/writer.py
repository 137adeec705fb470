"""Writing the finished cache file: the shards streamed into ``<split>.h5``, marked complete last, renamed into place.

While extraction runs, each shard of rows goes to its own small ``.npz`` file (features.shards). When every
shard is there, they are streamed into ``<split>.h5.tmp`` in a forked child (see ``_write_isolated``), which
is marked complete and renamed to ``<split>.h5``. So ``<split>.h5`` exists only when complete. A file holds
one dataset per layer, under the layer's own name (any name the backbone gives it), and ``features``, a
soft link to its main layer. The schema is documented in README.md.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from features.atomic import write_atomic
from features.attrs import FORMAT_VERSION, INODE_CTIME, NOT_LAYERS, SHA256, STAMPS, held_layers, read_attrs
from features.errors import CacheDamaged, CacheIncomplete, CacheUnwritable, NoRows, describe_error
from features.locking import lock_shared_with_child
from features.settings import CacheSettings
from features.shards import discard, discard_trash, done_shards, parts_digest, parts_folder, read_shard, shard_file

ROW_CHUNK = 256  # rows per HDF5 chunk: 4 MiB of float32 fc7
STR = h5py.string_dtype("utf-8")


def split_file(out: Path, split: str) -> Path:
    return Path(out) / f"{split}.h5"


@dataclass(frozen=True)
class SplitRows:
    """What the file says about its rows and classes, besides the features themselves."""

    paths: list[str]  # every indexed image of the split, by dataset position
    labels: list[int]  # by dataset position
    wnids: list[str]
    names: list[str]
    attrs: dict  # recorded as they are (weights spec, versions, ...)
    skipped_before: list[dict] = field(default_factory=list)  # left out before extraction, listed with the shards' skips
    # (len(paths), 4) int64 by dataset position: each image's size, mtime_ns, inode and ctime_ns, as stat-ed before
    # it was read ((len(paths), 2): size and mtime only, no ``identity`` group; None: neither)
    stamps: np.ndarray | None = None


@dataclass(frozen=True)
class Assembly:
    """How one split's shards become its file."""

    out: Path
    split: str
    settings: CacheSettings
    num_shards: int
    layers: dict[str, int]  # {layer: dim} the shards hold
    layer_order: tuple[str, ...]  # every layer of the finished file (the shards' and the kept ones), as stored
    main: str  # the layer ``features`` links to and ``layer``/``feature_dim`` describe
    compression: str | None = None
    keep: Path | None = None  # a complete file with equal settings: its other layers are copied bit for bit
    reuse: Path | None = None  # the file being updated (incremental): the shards' reused rows are copied from it


def assemble(job: Assembly, rows: SplitRows) -> dict:
    """Stream the shards into ``<split>.h5`` (complete) and drop the parts. Returns the file's attributes."""
    bad = [name for name in job.layer_order if name in NOT_LAYERS or "/" in name or not name]
    if bad or set(job.layers) - set(job.layer_order) or job.main not in job.layer_order:
        raise ValueError(f"bad layer names {bad or job.layer_order} (main {job.main!r})")
    parts = parts_folder(job.out, job.split)
    digest = parts_digest(parts)
    shards, order, skipped, digests = _gather_shards(parts, digest, job.num_shards, job.split)
    if len(order) == 0:
        raise NoRows(f"cannot assemble {job.split}: every image was skipped, no rows are left")
    kept = _kept_layers(job, [rows.paths[p] for p in order])
    if job.reuse is not None and not set(job.layers) <= set(held_layers(read_attrs(job.reuse) or {"layers": "[]"})):
        raise CacheIncomplete(f"cannot assemble {job.split}: {job.reuse} lacks layers of the rows it is to give")
    dims = {**job.layers, **{name: dim for name, (_, dim) in kept.items()}}
    missing = [name for name in job.layer_order if name not in dims]
    if missing:
        raise CacheIncomplete(f"cannot assemble {job.split}: no rows of {', '.join(missing)} in the shards or {job.keep}")
    if not job.compression:
        need = len(order) * (sum(dims.values()) * np.dtype(job.settings.dtype).itemsize + 256) + 2**20
        _check_space(Path(job.out), need)
    record = _record(job, rows, dims, num_rows=len(order), skipped=rows.skipped_before + skipped)
    identity = digests and rows.stamps is not None and rows.stamps.shape[1] == 4  # else rows match on size, mtime
    if not identity:
        record.pop("files_identity", None)  # what a file records is what a later run can check against
    fill = _filler(job, rows, shards, digest, kept, record, identity)
    write_atomic(split_file(job.out, job.split), write=lambda tmp: _write_isolated(tmp, fill))
    discard(parts)
    discard_trash(parts)
    return record


def _gather_shards(parts: Path, digest: str | None, num_shards: int,
                   split: str) -> tuple[list[Path], np.ndarray, list, bool]:
    """(the shard files in order, the dataset position of each row, the images the shards skipped, whether every
    shard gives each of its rows a content digest)."""
    missing = sorted(set(range(num_shards)) - done_shards(parts))
    if digest is None or missing:
        raise CacheIncomplete(f"cannot assemble {split}: shards {missing[:5]} are missing in {parts}")
    shards = [shard_file(parts, i, digest) for i in range(num_shards)]
    positions, skipped, digests = [], [], True
    for path in shards:
        shard = read_shard(path, digest, layers=False)  # the rows are read once, by the writer
        positions.append(np.sort(np.concatenate([shard["positions"], shard["reused_positions"]])))
        skipped += shard["skipped"]
        digests &= shard["sha256"] is not None and shard["reused_sha256"] is not None
    order = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    return shards, order, skipped, digests


def _kept_layers(job: Assembly, paths_in_order: list[str]) -> dict[str, tuple[str, int]]:
    """{layer: (its dataset in ``job.keep``, dim)} for the layers copied from the file being extended."""
    if job.keep is None:
        return {}
    keep_attrs = read_attrs(job.keep) or {}
    kept = {}
    with h5py.File(job.keep, "r") as old:
        if list(old["paths"].asstr()[:]) != paths_in_order:
            raise CacheDamaged(f"{job.keep} holds other rows than the images extracted now")
        for name in held_layers(keep_attrs):
            if name not in job.layers:
                source = name if name in old else "features"
                kept[name] = (source, int(old[source].shape[1]))
    return kept


def _record(job: Assembly, rows: SplitRows, dims: dict[str, int], *, num_rows: int, skipped: list) -> dict:
    record = {**rows.attrs, **asdict(job.settings), "layer": job.main, "layers": json.dumps(list(job.layer_order)),
              "feature_dim": dims[job.main], "format_version": FORMAT_VERSION, "split": job.split,
              "num_rows": num_rows, "num_classes": len(rows.wnids), "num_skipped": len(skipped),
              "skipped": json.dumps(skipped), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return {key: value for key, value in record.items() if value is not None}


def _filler(job: Assembly, rows: SplitRows, shards: list[Path], digest: str, kept: dict, record: dict,
            identity: bool):
    """The function that writes the whole file into an open h5py.File (run in the isolated child). ``identity``:
    the rows' inodes, ctimes and content digests are recorded (the ``identity`` group)."""
    labels = np.asarray(rows.labels)
    num_rows = record["num_rows"]

    def fill(f: h5py.File) -> None:
        kwargs = {"compression": job.compression} if job.compression else {}
        datasets = {name: f.create_dataset(name, shape=(num_rows, dim), dtype=job.settings.dtype,
                                           chunks=(max(1, min(ROW_CHUNK, num_rows)), dim), **kwargs)
                    for name, dim in job.layers.items()}
        out_labels = f.create_dataset("labels", shape=(num_rows,), dtype=np.int64)
        out_paths = f.create_dataset("paths", shape=(num_rows,), dtype=STR)
        out_stamps = f.create_dataset(STAMPS, shape=(num_rows, 2), dtype=np.int64) if rows.stamps is not None else None
        out_inodes = f.create_dataset(INODE_CTIME, shape=(num_rows, 2), dtype=np.int64) if identity else None
        out_sha = f.create_dataset(SHA256, shape=(num_rows, 32), dtype=np.uint8) if identity else None
        f.create_dataset("class_wnids", data=np.array(rows.wnids, dtype=object), dtype=STR)
        f.create_dataset("class_names", data=np.array(rows.names, dtype=object), dtype=STR)
        row = 0
        with h5py.File(job.reuse, "r") if job.reuse is not None else nullcontext() as old:
            for path in shards:
                positions, layers, sha = _shard_rows(read_shard(path, digest), old)
                n = len(positions)
                for name, dataset in datasets.items():
                    dataset[row:row + n] = layers[name]
                out_labels[row:row + n] = labels[positions]
                out_paths[row:row + n] = np.array([rows.paths[p] for p in positions], dtype=object)
                if out_stamps is not None:
                    out_stamps[row:row + n] = rows.stamps[positions, :2]
                if out_sha is not None:
                    out_inodes[row:row + n] = rows.stamps[positions, 2:]
                    out_sha[row:row + n] = sha
                row += n
        if kept:
            with h5py.File(job.keep, "r") as old:
                for name, (source, _) in kept.items():
                    old.copy(old[source], f, name=name)  # raw bytes, chunks and compression as they were
        f["features"] = h5py.SoftLink(f"/{job.main}")  # today's readers of ``features`` keep working
        for key, value in record.items():
            f.attrs[key] = value
        f.attrs["complete"] = True  # written last: only a fully written file says so

    return fill


def _shard_rows(shard: dict, old: h5py.File | None) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
    """(dataset positions in order, {layer: rows}, (n, 32) content digests or None) of one shard: its computed
    rows merged by position with the rows it reuses from the file being updated (``old``), copied bit for bit."""
    reused = shard["reused_positions"]
    if not len(reused):
        return shard["positions"], shard["layers"], shard["sha256"]
    positions = np.concatenate([shard["positions"], reused])
    order = np.argsort(positions, kind="stable")
    layers = {}
    for name, computed in shard["layers"].items():
        source = old[name] if name in old else old["features"]  # a file from before layers: fc7 as ``features``
        layers[name] = np.concatenate([computed, read_rows(source, shard["reused_rows"])])[order]
    has_sha = shard["sha256"] is not None and shard["reused_sha256"] is not None
    sha = np.concatenate([shard["sha256"], shard["reused_sha256"]])[order] if has_sha else None
    return positions[order], layers, sha


def read_rows(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """``dataset[rows]`` for any row indices: one contiguous read where they are close together (the usual
    case: kept rows keep their order), else a read of the distinct rows in increasing order."""
    if not len(rows):
        return np.zeros((0, *dataset.shape[1:]), dataset.dtype)
    low, high = int(rows.min()), int(rows.max()) + 1
    if high - low <= 2 * len(rows) + ROW_CHUNK:
        return dataset[low:high][rows - low]
    distinct, inverse = np.unique(rows, return_inverse=True)
    return dataset[distinct][inverse]


def _write_isolated(path: Path, fill: Callable[[h5py.File], None]) -> None:
    """Write the HDF5 file ``path`` with ``fill`` in a forked child, and report its failure in one line.

    After a failed HDF5 write (a full disk), closing the file or even exiting the process segfaults
    (h5py 3.16, HDF5 2.0: measured). The child leaves by ``os._exit``, before any of that runs; the parent
    keeps a sound HDF5 library and turns the child's error into a CacheError. The child keeps the writer
    lock until it exits, so a rerun after the parent's kill -9 cannot write the same file beside it.
    """
    read_end, write_end = os.pipe()
    with lock_shared_with_child():
        pid = os.fork()
    if pid == 0:  # the child: write, and never return into the caller's code
        code = 1
        try:
            os.close(read_end)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)  # HDF5's complaints while it unwinds a failed write: the pipe carries the reason
            f = h5py.File(path, "w")
            fill(f)
            f.close()
            code = 0
        except BaseException as err:  # noqa: BLE001 - everything is reported to the parent
            try:
                os.write(write_end, describe_error(err).encode()[:2000])
            except BaseException:  # noqa: BLE001
                pass
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        reason = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        path.unlink(missing_ok=True)
        reason = reason or (f"the writer died of signal {-code}" if code < 0 else "the writer failed")
        raise CacheUnwritable(f"cannot write {path}: {reason}")


def _check_space(folder: Path, num_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < num_bytes:
        raise CacheUnwritable(f"{folder} has {free / 2**20:.0f} MiB free, but the cache file needs about "
                              f"{num_bytes / 2**20:.0f} MiB")


def rewrite_class_names(path: Path, names: list[str], full_names: list[str]) -> None:
    """Replace a complete file's class names in place (same classes, same order): names never change features.

    Only the small ``class_names`` dataset and the ``class_full_names`` attribute are written; a kill midway
    leaves old or new names, which the next run compares and rewrites again.
    """
    with h5py.File(path, "r+") as f:
        if len(f["class_names"]) != len(names):
            raise ValueError(f"{path} has {len(f['class_names'])} classes, not {len(names)}")
        f["class_names"][...] = np.array(names, dtype=object)
        f.attrs["class_full_names"] = "\n".join(full_names)
