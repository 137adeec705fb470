"""The dataset behind --data: its layout found, and indexed. Tiny ImageNet's layout is read here; the
ImageFolder layouts in pipeline.datasets.layouts; the indexed model in pipeline.datasets.indexing.

Tiny ImageNet (below the folder holding ``wnids.txt``); the source folder is only read:

    wnids.txt, words.txt
    train/<wnid>/images/*.JPEG          (or train/<wnid>/*.JPEG)
    val/images/*.JPEG + val/val_annotations.txt
    val/<wnid>/images/*.JPEG            (or val/<wnid>/*.JPEG: val already arranged by class)
    test/images/*.JPEG                  (unlabelled: not used)
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.common.errors import UserError
from pipeline.common.names import VAL_FRACTION
from pipeline.datasets.indexing import (IMAGEFOLDER, IMAGEFOLDER_SPLITS, LAYOUTS, SPLITS, TINY_IMAGENET, Dataset,
                                      Split, examples, list_images, log_index, read_lines, shown, subfolders)
from pipeline.datasets.layouts import detect_layout, find_image_folder, index_image_folder
from pipeline.datasets.packs import PACK, index_pack, is_pack

__all__ = ["IMAGEFOLDER", "IMAGEFOLDER_SPLITS", "LAYOUTS", "SPLITS", "TINY_IMAGENET", "Dataset", "Split",
           "arrange_val", "find_root", "index_dataset", "layout_of",
           "read_class_names", "read_lines", "shown"]

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------
# Finding the layout


def find_root(path: Path) -> Path:
    """The dataset folder at ``path`` (as an absolute path): the folder itself if it holds wnids.txt, else its
    single sub-folder that does; else an ImageFolder dataset there (or in its one sub-folder, as a zip
    unpacks). Anything else is one line saying what was found and what is expected."""
    path = Path(path).resolve()
    if (path / "wnids.txt").is_file() or is_pack(path):
        return path
    candidates = sorted(p.parent for p in path.glob("*/wnids.txt"))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise UserError(f"{path} holds several datasets ({', '.join(map(str, candidates))}); pass one of them with --data")
    return find_image_folder(path)[0]


def layout_of(root: Path) -> str:
    """The layout of the dataset folder ``root`` (found by find_root): one of LAYOUTS."""
    if is_pack(root):
        return PACK
    return TINY_IMAGENET if (Path(root) / "wnids.txt").is_file() else detect_layout(Path(root))


def index_dataset(root: Path, val_fraction: float = VAL_FRACTION) -> Dataset:
    """Index the dataset at ``root`` (found by find_root) in its layout. Reads no image.

    ``val_fraction``: the one ImageFolder layout only; the share of each class held out for val, by a hash
    of each path (pipeline.datasets.holdout). A pack (pipeline.datasets.packs) keeps the split made when packing."""
    root = Path(root)
    layout = layout_of(root)
    if layout == PACK:
        return index_pack(root)
    if layout != TINY_IMAGENET:
        return index_image_folder(root, layout, val_fraction)
    return index_tiny_imagenet(root)


# ---------------------------------------------------------------------------------------------
# Tiny ImageNet


def _class_images(root: Path, rel: str, ignored: list[str], excluded: list[dict]) -> list[str]:
    """Images of one class folder: <class>/images/*.JPEG, or <class>/*.JPEG (relative to ``root``)."""
    images = list_images(root, rel, ignored, excluded)
    if (root / rel / "images").is_dir():
        images += list_images(root, f"{rel}/images", ignored, excluded)
    return images


def _warn_empty(folder: Path, empty: list[str]) -> None:
    if empty:
        log.warning("%d class folders under %s hold no images: %s", len(empty), folder, examples(empty))


def read_class_names(root: Path, wnids: list[str]) -> tuple[list[str], list[str]]:
    """(short names, full names) for each wnid from words.txt."""
    words_path = root / "words.txt"
    if not words_path.is_file():
        log.warning("%s is missing; class names fall back to the wnids", words_path)
        return list(wnids), list(wnids)
    wanted = set(wnids)
    words = {}
    for line in read_lines(words_path):
        wnid, _, entry = line.partition("\t")
        if wnid in wanted:
            words[wnid] = entry.strip()
    missing = [w for w in wnids if w not in words]
    if missing:
        log.warning("words.txt has no entry for %s; those classes are named by their wnid", examples(missing))
    full = [words.get(w, w) for w in wnids]
    return [name.split(",")[0].strip() for name in full], full


def _add_class_folders(split: Split, root: Path, split_name: str, wnids: list[str], label_of: dict[str, int],
                       ignored: list[str]) -> None:
    """Append the images of ``root/split_name/<wnid>`` for each wnid, in order; warn about empty folders."""
    empty = []
    for wnid in wnids:
        images = _class_images(root, f"{split_name}/{wnid}", ignored, split.excluded)
        empty += [] if images else [wnid]
        split.paths += images
        split.labels += [label_of[wnid]] * len(images)
    _warn_empty(root / split_name, empty)


def index_tiny_imagenet(root: Path) -> Dataset:
    """Read and check the Tiny ImageNet layout under ``root`` (the folder with wnids.txt). Reads no image."""
    root = Path(root)
    if not (root / "wnids.txt").is_file():
        raise UserError(f"{root / 'wnids.txt'} not found; pass the Tiny ImageNet folder that holds it")
    wnids = sorted({line.strip() for line in read_lines(root / "wnids.txt")})
    if not wnids:
        raise UserError(f"{root / 'wnids.txt'} lists no classes")
    names, full_names = read_class_names(root, wnids)
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    ignored: list[str] = []

    # train
    train_dir = root / "train"
    if not train_dir.is_dir():
        what = "is not a folder" if train_dir.exists() else "not found"
        raise UserError(f"{train_dir} {what}; the dataset needs train/<wnid>/images/")
    folders = subfolders(train_dir)
    unlisted = sorted(set(folders) - set(wnids))
    missing = sorted(set(wnids) - set(folders))
    if unlisted or missing:
        parts = []
        if unlisted:
            parts.append(f"folders not in wnids.txt: {examples(unlisted)}")
        if missing:
            parts.append(f"wnids with no folder: {examples(missing)}")
        raise UserError(f"{train_dir} disagrees with wnids.txt ({'; '.join(parts)}); fix the folders or wnids.txt")
    train = Split()
    _add_class_folders(train, root, "train", wnids, label_of, ignored)

    splits = {"train": train, "val": _index_val(root, wnids, label_of, ignored)}
    for split_name, split in splits.items():
        if not split.paths:
            raise UserError(f"{root / split_name} holds no images")
    log_index(ignored)
    return Dataset(root=root, wnids=wnids, names=names, full_names=full_names, splits=splits, ignored=ignored)


def _index_val(root: Path, wnids: list[str], label_of: dict[str, int], ignored: list[str]) -> Split:
    val_dir = root / "val"
    annotations = val_dir / "val_annotations.txt"
    images_dir = val_dir / "images"
    val = Split()
    if not val_dir.is_dir():
        what = "is not a folder" if val_dir.exists() else "not found"
        raise UserError(f"{val_dir} {what}; the dataset needs val/images/ with val/val_annotations.txt")
    if images_dir.exists() and not images_dir.is_dir():
        raise UserError(f"{images_dir} is a file, not a folder; restore the val/images/ folder of the dataset")
    if annotations.is_file() and images_dir.is_dir():
        # the official layout: the annotation file is the truth
        wnid_of: dict[str, str] = {}
        unknown = []
        for line in read_lines(annotations):
            fields = line.split("\t")
            if len(fields) < 2:
                raise UserError(f"{annotations}: malformed line {line!r}; expected file<TAB>wnid<TAB>box")
            filename, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in label_of:
                unknown.append(f"{filename}:{wnid}")
            wnid_of[filename] = wnid
        on_disk = {path.rsplit("/", 1)[1] for path in list_images(root, "val/images", ignored, val.excluded)}
        missing_files = sorted(set(wnid_of) - on_disk)
        unannotated = sorted(on_disk - set(wnid_of))
        problems = []
        if unknown:
            problems.append(f"{len(unknown)} annotations name an unknown wnid ({examples(unknown)})")
        if missing_files:
            problems.append(f"{len(missing_files)} annotated files are missing ({examples(missing_files)})")
        if unannotated:
            problems.append(f"{len(unannotated)} images have no annotation ({examples(unannotated)})")
        if problems:
            raise UserError(f"{annotations} disagrees with {images_dir}: {'; '.join(problems)}")
        for filename in sorted(wnid_of, key=lambda f: (label_of[wnid_of[f]], f)):
            val.paths.append(f"val/images/{filename}")
            val.labels.append(label_of[wnid_of[filename]])
        return val
    # val already arranged into class folders
    folders = [f for f in subfolders(val_dir) if f != "images"]
    unknown = sorted(set(folders) - set(wnids))
    if unknown:
        raise UserError(f"{val_dir} has class folders not in wnids.txt: {examples(unknown)}; fix the folders or wnids.txt")
    if not folders:
        if annotations.is_file():  # the annotations are there, the images folder is not
            raise UserError(f"{images_dir} not found and {val_dir} has no class folders; restore val/images/")
        raise UserError(f"{annotations} not found and {val_dir} has no class folders; restore val_annotations.txt")
    _add_class_folders(val, root, "val", [wnid for wnid in wnids if wnid in folders], label_of, ignored)
    return val


def arrange_val(dataset: Dataset) -> int:
    """Arrange val into val/<wnid>/images/ as the old script did, but without moving anything.

    Each image gets a hard link (a copy where links are not possible) under its class folder;
    val/images and the annotations stay as they are. Idempotent, and safe to interrupt: each link
    appears atomically under its final name. Returns how many links were made.
    """
    if dataset.layout == PACK:
        raise UserError(f"--arrange-val: {dataset.root} is a pack, whose val needs no arranging; drop --arrange-val")
    made = 0
    for rel, label in zip(dataset.splits["val"].paths, dataset.splits["val"].labels):
        source = dataset.root / rel
        target = dataset.root / "val" / dataset.wnids[label] / "images" / source.name
        if source.parent != dataset.root / "val" / "images":
            continue  # already in a class folder (val/<wnid>/ or val/<wnid>/images/): a link would index it twice
        if target.exists() and target.stat().st_size == source.stat().st_size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            import shutil
            shutil.copy2(source, tmp)
        os.replace(tmp, target)
        made += 1
    return made
