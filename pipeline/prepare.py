"""Preparation: find the dataset (a folder, the official zip, or a download), index it, decode every image once.

The source is only read: a zip is unpacked next to itself (or under data/), a download goes to data/.
"""
from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

from pipeline.dataset import TinyImageNet, arrange_val, find_root, index_dataset
from pipeline.errors import UserError
from pipeline.names import DEFAULT_DATA, TINY_IMAGENET_MD5, TINY_IMAGENET_URL

log = logging.getLogger(__name__)


def resolve_data(data: str | os.PathLike | None, *, download: bool = False,
                 url: str = TINY_IMAGENET_URL, md5: str | None = TINY_IMAGENET_MD5) -> Path:
    """Turn ``--data`` (a folder or the official zip) into the folder that holds ``wnids.txt``."""
    if download:
        return download_dataset(Path(data) if data else DEFAULT_DATA.parent, url=url, md5=md5)
    path = Path(data) if data else DEFAULT_DATA
    if not path.exists():
        if data is None and DEFAULT_DATA.with_suffix(".zip").is_file():
            path = DEFAULT_DATA.with_suffix(".zip")
        else:
            raise UserError(f"dataset not found: {path}; pass --data FOLDER_OR_ZIP, or --download to fetch Tiny ImageNet")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise UserError(f"{path} is a file but not a zip; pass the Tiny ImageNet folder or its zip")
        path = unpack_zip(path)
    return find_root(path)


def _writable(folder: Path) -> bool:
    # root passes os.access everywhere, so also respect a folder whose mode has no write bits at all
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def unpack_zip(zip_path: Path) -> Path:
    """Unpack a Tiny ImageNet zip once, next to itself (or under data/ when that folder is read-only)."""
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
    if not any(n == "wnids.txt" or n.endswith("/wnids.txt") for n in names):
        raise UserError(f"{zip_path} is not a Tiny ImageNet zip: it has no wnids.txt; pass the official tiny-imagenet-200.zip")
    parent = zip_path.parent if _writable(zip_path.parent) else DEFAULT_DATA.parent
    target = parent / zip_path.stem
    done = target / ".unpacked"
    if done.is_file():
        return target
    from torchvision.datasets.utils import extract_archive  # here: importing torchvision takes seconds

    if parent != zip_path.parent:
        log.info("%s is read-only; unpacking into %s instead", zip_path.parent, target)
    tmp = parent / f".{zip_path.stem}.unpacking-{os.getpid()}"
    log.info("unpacking %s into %s", zip_path, target)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        extract_archive(str(zip_path), str(tmp))
        (tmp / ".unpacked").write_text(f"{zip_path.resolve()}\n")
        if target.exists():  # an earlier unpack that was interrupted before its marker
            import shutil
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def download_dataset(folder: Path, *, url: str = TINY_IMAGENET_URL, md5: str | None = TINY_IMAGENET_MD5) -> Path:
    """Fetch the zip into ``folder`` (with a progress bar), check its md5, unpack it."""
    from torchvision.datasets.utils import check_integrity, download_url

    folder.mkdir(parents=True, exist_ok=True)
    filename = os.path.basename(url.split("?")[0]) or "tiny-imagenet-200.zip"
    zip_path = folder / filename
    if not check_integrity(str(zip_path), md5):
        if zip_path.exists():
            zip_path.unlink()
        try:
            download_url(url, str(folder), filename=filename, md5=None)
        except Exception as err:  # urllib raises many types; all mean the same to the user
            zip_path.unlink(missing_ok=True)
            raise UserError(f"download of {url} failed ({err}); check the address, or put the zip somewhere and pass --data ZIP") from None
        if not check_integrity(str(zip_path), md5):
            zip_path.unlink(missing_ok=True)
            raise UserError(f"download of {url} has the wrong md5 (expected {md5}); the bad file was removed, try again or use --url for a mirror")
    return find_root(unpack_zip(zip_path))


def prepare_dataset(data: str | os.PathLike | None, *, download: bool = False, url: str = TINY_IMAGENET_URL,
                    md5: str | None = TINY_IMAGENET_MD5, arrange: bool = False, strict: bool = False,
                    progress: bool = True) -> dict:
    """--prepare-only: find, index and (optionally) arrange the dataset, decode every image once,
    apply the skip policy, and return the summary."""
    from pipeline.images import enforce_skip_policy, verify_images  # imports torch

    dataset = index_dataset(resolve_data(data, download=download, url=url, md5=md5))
    if arrange:
        log.info("arranged val: %d new links under %s/val/<wnid>/images", arrange_val(dataset), dataset.root)
    skipped = {name: verify_images(dataset.root, split.paths, progress=progress) for name, split in dataset.splits.items()}
    enforce_skip_policy([s for found in skipped.values() for s in found], strict=strict)
    return prepare_summary(dataset, skipped)


def prepare_summary(dataset: TinyImageNet, skipped: dict[str, list]) -> dict:
    """The --prepare-only summary (its JSON shape is read by other tools: keep these keys)."""
    splits = {}
    for name, split in dataset.splits.items():
        bad_paths = {s.path for s in skipped.get(name, [])}
        counts = [0] * dataset.num_classes
        for path, label in zip(split.paths, split.labels):
            counts[label] += path not in bad_paths
        bad = len(bad_paths)
        splits[name] = {"images": len(split) - bad, "indexed": len(split), "skipped": bad,
                        "per_class_min": min(counts), "per_class_max": max(counts)}
    return {"root": str(dataset.root), "num_classes": dataset.num_classes, "splits": splits,
            "skipped": [s.to_dict() for name in dataset.splits for s in skipped.get(name, [])],
            "ignored_files": len(dataset.ignored),
            "classes": [{"wnid": w, "name": n} for w, n in zip(dataset.wnids, dataset.names)]}
