"""Preparation: find the dataset (a folder, the official zip, or a download), index it, decode every image once.

The source is only read: a zip is unpacked next to itself (or under data/; see pipeline.data.unpack), a download
goes to data/.
"""
from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

from pipeline.data import unpack
from pipeline.datasets.dataset import (IMAGEFOLDER, Dataset, arrange_val, find_root,
                                     index_dataset)
from pipeline.common.errors import UserError
from pipeline.common.config import ExtractConfig, check_val_fraction
from pipeline.common.names import DEFAULT_DATA, TINY_IMAGENET_MD5, TINY_IMAGENET_URL

log = logging.getLogger(__name__)


def resolve_data(data: str | os.PathLike | None, *, download: bool = False, url: str = TINY_IMAGENET_URL,
                 md5: str | None = TINY_IMAGENET_MD5, progress: bool | None = None) -> Path:
    """Turn ``--data`` (a folder or the official zip, whatever its name) into the dataset folder (the one
    that holds ``wnids.txt``, or an ImageFolder's root: pipeline.datasets.dataset.find_root)."""
    if data:
        check_recordable(Path(data))  # before anything is unpacked or downloaded
    if download:
        return check_recordable(download_dataset(Path(data) if data else DEFAULT_DATA.parent, url=url, md5=md5,
                                                 progress=progress))
    return check_recordable(_resolve_local(data, progress))


def check_recordable(root: Path) -> Path:
    """The dataset folder, when the cache can record it: its path must be UTF-8 text (HDF5 stores text so)."""
    try:
        str(root.resolve()).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"the dataset folder {os.fsencode(root)!r} has a name that is not UTF-8, which the cache "
                        "cannot record; rename it (or move the dataset to a UTF-8 path) and pass that with --data") from None
    return root


def _resolve_local(data: str | os.PathLike | None, progress: bool | None) -> Path:
    path = Path(data) if data else DEFAULT_DATA
    if not path.exists():
        if data is None and DEFAULT_DATA.with_suffix(".zip").is_file():
            path = DEFAULT_DATA.with_suffix(".zip")
        else:
            raise UserError(f"dataset not found: {path}; pass --data FOLDER_OR_ZIP, or --download to fetch Tiny ImageNet")
    if path.is_file():
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            raise UserError(f"cannot read {path} ({err.strerror or err}); check the drive and permissions, then rerun") from None
        if not zipfile.is_zipfile(path):  # by content: .ZIP, .zip.1 (wget) and no suffix are zips too
            raise UserError(f"{path} is a file but not a zip (or an incomplete download); "
                            "pass the dataset folder or its zip")
        path = unpack_zip(path, progress=progress)
    return find_root(path)


def unpack_zip(zip_path: Path, *, progress: bool | None = None) -> Path:
    """Unpack a Tiny ImageNet zip once, next to itself (or under data/ when that folder is read-only)."""
    return unpack.unpack_zip(zip_path, fallback=DEFAULT_DATA.parent, progress=progress)


def download_dataset(folder: Path, *, url: str = TINY_IMAGENET_URL, md5: str | None = TINY_IMAGENET_MD5,
                     progress: bool | None = None) -> Path:
    """Fetch the zip into ``folder`` (with a progress bar), check its md5, unpack it.

    The download goes to a hidden ``.<name>.download-<pid>`` file, renamed once its md5 is right, so a file
    under the final name is complete; one that is there with another md5 is not ours and is never deleted.
    """
    from torchvision.datasets.utils import check_integrity, download_url

    folder.mkdir(parents=True, exist_ok=True)
    filename = os.path.basename(url.split("?")[0]) or "tiny-imagenet-200.zip"
    zip_path = folder / filename
    unpack.remove_stale(folder, filename)  # downloads that were killed midway
    if zip_path.exists():
        if not check_integrity(str(zip_path), md5):
            raise UserError(f"{zip_path} is already there but its md5 is not {md5} (an interrupted download of an older "
                            "version, or another file); move or delete it and rerun, or pass it with --data")
        return find_root(unpack_zip(zip_path, progress=progress))
    part = folder / f".{filename}.download-{os.getpid()}"
    try:
        download_url(url, str(folder), filename=part.name, md5=None)
    except Exception as err:  # urllib raises many types; all mean the same to the user
        part.unlink(missing_ok=True)
        raise UserError(f"download of {url} failed ({err}); check the address, or put the zip somewhere and pass --data ZIP") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if not check_integrity(str(part), md5):
        part.unlink(missing_ok=True)
        raise UserError(f"download of {url} has the wrong md5 (expected {md5}); the bad file was removed, try again or use --url for a mirror")
    os.replace(part, zip_path)
    return find_root(unpack_zip(zip_path, progress=progress))


def prepare_dataset(config: ExtractConfig, *, min_side: int | None = None) -> dict:
    """--prepare-only: find, index and (``config.arrange_val``) arrange the dataset ``config`` names, decode every
    image once, apply the skip policy (``config.strict``), and return the summary.

    ``min_side``: decode a large JPEG reduced, as extraction will (images.decode_floor): the check then skips
    what extraction would skip, and a 12 MP photo costs a fraction of a full decode."""
    from pipeline.datasets.images import Skipped, enforce_skip_policy, verify_images  # imports torch

    val_fraction, progress, strict = config.val_fraction, config.progress, config.strict
    check_val_fraction(val_fraction)  # before anything is unpacked or downloaded
    root = resolve_data(config.data, download=config.download, url=config.url, md5=config.md5, progress=progress)
    dataset = index_dataset(root, val_fraction)
    if config.arrange_val:
        log.info("arranged val: %d new links under %s/val/<wnid>/images", arrange_val(dataset), dataset.root)
    # images the index could not take (a name that is not UTF-8) are skips too, listed first
    skipped = {name: [Skipped(**item) for item in split.excluded]
               + verify_images(dataset.root, split.paths, progress=progress, min_side=min_side,
                               read=dataset.read_bytes if dataset.source is not None else None)
               for name, split in dataset.splits.items()}
    enforce_skip_policy([s for found in skipped.values() for s in found], strict=strict)
    summary = prepare_summary(dataset, skipped, val_fraction)
    for name, split in summary["splits"].items():  # extraction could store nothing for this split
        if split["indexed"] and not split["images"]:
            raise UserError(f"{name} has no decodable images: all {split['indexed']} in {dataset.root} were skipped "
                            f"(first: {summary_first_skip(summary, name)}); replace them and rerun")
    return summary


def summary_first_skip(summary: dict, split: str) -> str:
    first = next((s for s in summary["skipped"] if s["path"].startswith(f"{split}/")), None)
    return f"{first['path']}: {first['reason']}" if first else "none listed"


def prepare_summary(dataset: Dataset, skipped: dict[str, list], val_fraction: float | None = None) -> dict:
    """The --prepare-only summary (its JSON shape is read by other tools: keep these keys)."""
    splits = {}
    for name, split in dataset.splits.items():
        bad_paths = {s.path for s in skipped.get(name, [])}
        counts = [0] * dataset.num_classes
        for path, label in zip(split.paths, split.labels):
            counts[label] += path not in bad_paths
        bad = len(bad_paths & set(split.paths))
        splits[name] = {"images": len(split) - bad, "indexed": len(split), "skipped": len(skipped.get(name, [])),
                        "per_class_min": min(counts), "per_class_max": max(counts)}
    layout = {"layout": dataset.layout}
    if dataset.layout == IMAGEFOLDER and val_fraction is not None:
        layout["val_fraction"] = val_fraction  # val is held out by a hash of each path (pipeline.datasets.holdout)
    return {"root": str(dataset.root), **layout, "num_classes": dataset.num_classes, "splits": splits,
            "skipped": [s.to_dict() for name in dataset.splits for s in skipped.get(name, [])],
            "ignored_files": len(dataset.ignored),
            "classes": [{"wnid": w, "name": n} for w, n in zip(dataset.wnids, dataset.names)]}
