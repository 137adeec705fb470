"""torchvision's ImageFolder layouts: finding them, and indexing them. Torch-free; reads no image.

    ROOT/train/<class>/*.jpg + ROOT/val/<class>/*.jpg    "imagefolder-splits" (ROOT/test/ is not used)
    ROOT/<class>/*.jpg                                   "imagefolder": val held out by holdout.in_val

Classes are the sorted folder names (of train/ in the first layout), and class names are the folder names.
Images may sit in sub-folders of a class folder, as ImageFolder allows. In the second layout an image is in
val when ``in_val(its path relative to ROOT, val_fraction)``: a hash of the path (of the burst, for frames
collected from the webcam), so adding or removing other images never moves it between train and val.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.common.config import check_val_fraction
from pipeline.common.errors import UserError
from pipeline.common.names import VAL_FRACTION
from pipeline.datasets.holdout import in_val
from pipeline.datasets.indexing import (IMAGEFOLDER, IMAGEFOLDER_SPLITS, SPLITS, Dataset, Split, examples, is_image,
                                      is_unread_image, is_utf8, list_images, log_index, scan, shown, subfolders,
                                      suffix)

log = logging.getLogger(__name__)

EXPECTED = ("Tiny ImageNet (wnids.txt, train/, val/), ImageFolder with splits (ROOT/train/<class>/ and "
            "ROOT/val/<class>/), or one ImageFolder (ROOT/<class>/, val held out with --val-fraction)")
UNUSED_FOLDERS = ("test",)  # beside train/ and val/: not used (unlabelled in Tiny ImageNet, often in others)
MIN_CLASS_IMAGES = 2  # one ImageFolder: one image to train on, one that can be held out


def class_name_problem(name: str, *, in_split: bool = False) -> str | None:
    """Why a folder called ``name`` cannot be a class, or None: the one rule for class folder names, which the
    layouts apply to the folders they find and ``--collect`` to a class before it makes the folder.

    ``in_split``: the folder sits in ROOT/train/ or ROOT/val/, where a class may be called train or val."""
    if name.startswith("."):
        return "it starts with '.', and a hidden folder is not read as a class"
    if is_image(name) or is_unread_image(name):
        return "it is named like an image file, not like a class"
    if not is_utf8(name):
        return "it is not valid UTF-8, which the cache cannot record"
    if name in SPLITS and not in_split:
        return f"{name}/ beside class folders is read as a split folder, not a class (the dataset is then ambiguous)"
    return None


def detect_layout(root: Path) -> str:
    """IMAGEFOLDER_SPLITS or IMAGEFOLDER for the folder ``root`` (one without wnids.txt); else one line
    saying what was found and what is expected."""
    folders = subfolders(root)
    images = [e.name for e in scan(root) if e.is_file() and (is_image(e.name) or is_unread_image(e.name))]
    if not folders:
        found = f"{len(images)} images but no class folders" if images else "no images and no folders"
        raise UserError(f"{root} holds {found}; expected {EXPECTED}. Put each class's images in {root}/<class>/ "
                        "(the folder's name is the class name)")
    if "train" in folders or "val" in folders:
        others = [f for f in folders if f not in (*SPLITS, *UNUSED_FOLDERS)]
        if "train" in folders and "val" in folders and not others:
            return IMAGEFOLDER_SPLITS
        found = ", ".join(f"{f}/" for f in folders[:6]) + (", ..." if len(folders) > 6 else "")
        raise UserError(f"{root} is ambiguous: it holds {found}; expected either train/ and val/ (each with "
                        "<class>/ folders) and nothing else, or class folders only (rename a class named train "
                        "or val)")
    return IMAGEFOLDER


def find_image_folder(path: Path) -> tuple[Path, str]:
    """(root, layout) of the ImageFolder dataset at ``path``, or in its one sub-folder (the top folder a zip
    unpacks to), checked as detect_layout checks it."""
    for _ in range(2):
        entries = [e for e in scan(path) if not e.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in SPLITS:
            inner = path / entries[0].name
            if not any(e.is_file() and (is_image(e.name) or is_unread_image(e.name)) for e in scan(inner)):
                path = inner  # a folder holding only the dataset's folder (not a single class's images)
                continue
        break
    return path, detect_layout(path)


def index_image_folder(root: Path, layout: str, val_fraction: float = VAL_FRACTION) -> Dataset:
    """Index an ImageFolder dataset (``layout`` from detect_layout); reads no image."""
    root = Path(root)
    ignored: list[str] = []
    if layout == IMAGEFOLDER_SPLITS:
        classes = class_folders(root, "train")
        val_classes = class_folders(root, "val")
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise UserError(f"{root / 'val'} has class folders that {root / 'train'} lacks: {examples(unknown)}; "
                            "add them to train/ or remove them from val/")
        label_of = {name: i for i, name in enumerate(classes)}
        splits = {"train": _index_classes(root, "train", classes, label_of, ignored, minimum=1),
                  "val": _index_classes(root, "val", [c for c in classes if c in val_classes], label_of, ignored,
                                        minimum=1)}
        _warn_missing(splits, classes, f"have no folder in {root / 'val'}")
    else:
        check_val_fraction(val_fraction)
        classes = class_folders(root, "")
        label_of = {name: i for i, name in enumerate(classes)}
        every = _index_classes(root, "", classes, label_of, ignored, minimum=MIN_CLASS_IMAGES)
        splits = {"train": Split(), "val": Split()}
        for path, label in zip(every.paths, every.labels):
            split = splits["val" if in_val(path, val_fraction) else "train"]
            split.paths.append(path)
            split.labels.append(label)
        for item in every.excluded:
            splits["val" if in_val(item["path"], val_fraction) else "train"].excluded.append(item)
        for name, split in splits.items():
            if not split.paths:
                raise UserError(f"--val-fraction {val_fraction} puts none of the {len(every)} images of {root} in "
                                f"{name}; {'raise' if name == 'val' else 'lower'} it, or add images")
        _warn_missing(splits, classes, f"get no val image from --val-fraction {val_fraction}")
    log_index(ignored)
    return Dataset(root=root, wnids=classes, names=list(classes), full_names=list(classes), splits=splits,
                   ignored=ignored, layout=layout)


def class_folders(root: Path, rel: str) -> list[str]:
    """The sorted class folder names in ``root/rel``; images, class-like files or folders that cannot be a
    class (class_name_problem) beside them are errors."""
    folder = root / rel if rel else root
    names, stray_images, stray_files, misnamed = [], [], [], []
    for entry in scan(folder):
        name = entry.name
        if name.startswith("."):
            continue  # hidden: .DS_Store, .git, ...
        if entry.is_dir():
            problem = class_name_problem(name, in_split=bool(rel))
            (misnamed if problem else names).append((name, problem) if problem else name)
        elif is_image(name) or is_unread_image(name):
            stray_images.append(name)
        elif not suffix(name):
            stray_files.append(name)  # named like a class, but a file (anything with a suffix is ignored)
    if stray_images:
        raise UserError(f"{folder} holds {len(stray_images)} images beside its class folders "
                        f"({examples(stray_images)}); move each into {folder}/<class>/")
    if stray_files:
        raise UserError(f"{folder / stray_files[0]} is a file, not a class folder ({len(stray_files)} such files); "
                        "a class is a folder of images: remove or rename it")
    if misnamed:
        name, problem = misnamed[0]
        raise UserError(f"{folder / shown(name)} cannot be a class folder: {problem} ({len(misnamed)} such "
                        "folders); rename it to the class's name")
    if not names:
        raise UserError(f"{folder} has no class folders; expected {folder}/<class>/ holding each class's images")
    return names


def _index_classes(root: Path, parent: str, classes: list[str], label_of: dict[str, int], ignored: list[str], *,
                   minimum: int) -> Split:
    """The images of ``root/parent/<class>`` (and its sub-folders) for each class, in class order."""
    split = Split()
    for name in classes:
        rel = f"{parent}/{name}" if parent else name
        excluded_before = len(split.excluded)
        images = _walk(root, rel, ignored, split.excluded)
        if len(images) < minimum:
            unread = len(split.excluded) - excluded_before
            found = f"{len(images)} image{'s' if len(images) != 1 else ''}"
            if unread:
                found += f" the decoder reads (and {unread} it cannot, such as {split.excluded[-1]['path']!r})"
            if not images and not unread:
                raise UserError(f"class folder {root / rel} holds no images; add at least {minimum} or remove the folder")
            need = (f"a class needs at least {minimum}, one to train on and one to hold out for val"
                    if minimum > 1 else "a class needs at least 1")
            raise UserError(f"class folder {root / rel} holds {found}; {need}: add images or remove the folder")
        split.paths += images
        split.labels += [label_of[name]] * len(images)
    return split


def _walk(root: Path, rel: str, ignored: list[str], excluded: list[dict], seen: dict | None = None) -> list[str]:
    """Images in ``root/rel`` and its sub-folders (hidden ones aside), files of a folder before its sub-folders.

    Symlinked folders are followed, and each real folder is listed once: ``seen`` maps the (device, inode) of
    the folders listed so far to their path. A link back to one of them (to the class folder, or above it: a
    symlink loop; or a second link to a folder already listed) is a log line and is not followed."""
    if seen is None:
        seen = {}
    seen[_real_folder(root / rel)] = rel
    folders = tuple(subfolders(root / rel))
    images = list_images(root, rel, ignored, excluded, keep_folders=folders)
    for folder in folders:
        sub = f"{rel}/{folder}"
        listed = seen.get(_real_folder(root / sub))
        if listed is None and not _is_above(root / sub, root / rel):
            images += _walk(root, sub, ignored, excluded, seen)
        elif listed is None or sub.startswith(f"{listed}/"):  # its target holds the link: every pass finds it again
            log.warning("symlink loop: %s -> %s, a folder that holds the link; not followed (its images are listed "
                        "once)", root / sub, os.path.realpath(root / sub))
        else:
            log.warning("%s links to %s, a folder already listed; not followed (its images are listed once)",
                        root / sub, root / listed)
    return images


def _real_folder(path: Path) -> tuple[int, int]:
    """(device, inode) of the folder ``path`` names, through any links."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err}); check the drive and permissions, then rerun") from None
    return info.st_dev, info.st_ino


def _is_above(link: Path, folder: Path) -> bool:
    """Whether the folder ``link`` leads to holds ``folder`` (the dataset root, or any folder above a class)."""
    return Path(os.path.realpath(folder)).is_relative_to(os.path.realpath(link))


def _warn_missing(splits: dict[str, Split], classes: list[str], why: str) -> None:
    """A warning listing the classes with no val image (and, worse, no train image)."""
    for split_name, reason in (("val", why), ("train", "get no train image (all are held out for val)")):
        present = set(splits[split_name].labels)
        missing = [name for i, name in enumerate(classes) if i not in present]
        if missing:
            log.warning("%d of %d classes %s: %s", len(missing), len(classes), reason, examples(missing))
