"""Tiny ImageNet layout: read wnids, words and the splits, index every labelled image, arrange val by class.

The source folder is only read. Supported layouts (below the folder holding ``wnids.txt``):

    wnids.txt, words.txt
    train/<wnid>/images/*.JPEG          (or train/<wnid>/*.JPEG)
    val/images/*.JPEG + val/val_annotations.txt
    val/<wnid>/images/*.JPEG            (or val/<wnid>/*.JPEG: val already arranged by class)
    test/images/*.JPEG                  (unlabelled: not used)
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.common.errors import UserError
from pipeline.common.names import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
MAX_EXAMPLES = 3  # how many offending names an error message quotes


@dataclass
class Split:
    """The labelled images of one split, in a fixed order (class, then file name)."""

    paths: list[str] = field(default_factory=list)  # relative to the dataset root, with '/'
    labels: list[int] = field(default_factory=list)
    # images that cannot be indexed (a file name that is not UTF-8), as [{"path", "reason"}]: skips, listed
    excluded: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class TinyImageNet:
    """An indexed dataset. A label is a class's position in the sorted ``wnids``."""

    root: Path
    wnids: list[str]
    names: list[str]  # short names: the first synonym in words.txt ("goldfish")
    full_names: list[str]  # the whole words.txt entry
    splits: dict[str, Split]
    ignored: list[str] = field(default_factory=list)  # stray files that are not images

    @property
    def num_classes(self) -> int:
        return len(self.wnids)

    def signature(self, split: str) -> str:
        """sha256 over the class order and one split's (path, label) list: what a cache was made from."""
        digest = hashlib.sha256()
        digest.update("\n".join(self.wnids).encode())
        for path, label in zip(self.splits[split].paths, self.splits[split].labels):
            digest.update(f"\n{path}\t{label}".encode())
        return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading the layout


def find_root(path: Path) -> Path:
    """The folder itself if it holds wnids.txt, else its single sub-folder that does (as an absolute path)."""
    path = Path(path).resolve()
    if (path / "wnids.txt").is_file():
        return path
    candidates = sorted(p.parent for p in path.glob("*/wnids.txt"))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise UserError(f"{path} holds several datasets ({', '.join(map(str, candidates))}); pass one of them with --data")
    raise UserError(f"{path} is not Tiny ImageNet: no wnids.txt in it or in a sub-folder; pass the folder that holds wnids.txt")




def read_lines(path: Path) -> list[str]:
    """Non-blank lines without their line ending or trailing blanks; CRLF, a missing final newline and a
    byte-order mark all work."""
    try:
        with open(path, encoding="utf-8-sig", newline=None) as f:
            return [line.rstrip() for line in f if line.strip()]
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err}); check the drive and permissions, then rerun") from None


def shown(name: str) -> str:
    """A path or name as text that can always be printed and stored: bytes that are not UTF-8 as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # os.scandir hands undecodable bytes over as lone surrogates
    except UnicodeEncodeError:
        return False
    return True


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and not name.startswith(".")


def _scan(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as err:
        raise UserError(f"cannot list {folder} ({err.strerror or err}); check the drive and permissions, then rerun") from None


def _list_images(root: Path, rel: str, ignored: list[str], excluded: list[dict]) -> list[str]:
    """Image files in the folder ``root/rel``, sorted, as paths relative to ``root`` (strings: pathlib would
    cost more than the listing on 110,000 files). Anything else (.DS_Store, *_boxes.txt, ...) is noted as
    ignored, an image whose name is not UTF-8 (it cannot be stored in the cache) as excluded."""
    images = []
    for entry in _scan(root / rel):
        name, path = entry.name, f"{rel}/{entry.name}"
        if entry.is_file() and _is_image(name):
            if _is_utf8(name):
                images.append(path)
            else:
                excluded.append({"path": shown(path), "reason": f"file name {os.fsencode(name)!r} is not valid "
                                 "UTF-8 and cannot be stored in the cache; rename the file to use it"})
        elif entry.is_symlink() and _is_image(name) and not entry.is_dir():
            # a link whose target is gone (a vanished drive): a read failure, never a silent omission
            raise UserError(f"cannot read {root / path} (a link to {os.readlink(root / path)}, which does not "
                            "exist); reconnect the drive or fix the link, then rerun")
        elif not (name == "images" and entry.is_dir()):
            ignored.append(path)
    return images


def _class_images(root: Path, rel: str, ignored: list[str], excluded: list[dict]) -> list[str]:
    """Images of one class folder: <class>/images/*.JPEG, or <class>/*.JPEG (relative to ``root``)."""
    images = _list_images(root, rel, ignored, excluded)
    if (root / rel / "images").is_dir():
        images += _list_images(root, f"{rel}/images", ignored, excluded)
    return images


def _subfolders(folder: Path) -> list[str]:
    return [e.name for e in _scan(folder) if e.is_dir() and not e.name.startswith(".")]


def _examples(items) -> str:
    """The first few names, each as repr: two names that differ only in invisible characters look different."""
    items = [repr(item) for item in items]
    more = f", ... ({len(items)} in all)" if len(items) > MAX_EXAMPLES else ""
    return ", ".join(items[:MAX_EXAMPLES]) + more


def _warn_empty(folder: Path, empty: list[str]) -> None:
    if empty:
        log.warning("%d class folders under %s hold no images: %s", len(empty), folder, _examples(empty))


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
        log.warning("words.txt has no entry for %s; those classes are named by their wnid", _examples(missing))
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


def index_dataset(root: Path) -> TinyImageNet:
    """Read and check the layout under ``root`` (the folder with wnids.txt). Reads no image."""
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
    folders = _subfolders(train_dir)
    unlisted = sorted(set(folders) - set(wnids))
    missing = sorted(set(wnids) - set(folders))
    if unlisted or missing:
        parts = []
        if unlisted:
            parts.append(f"folders not in wnids.txt: {_examples(unlisted)}")
        if missing:
            parts.append(f"wnids with no folder: {_examples(missing)}")
        raise UserError(f"{train_dir} disagrees with wnids.txt ({'; '.join(parts)}); fix the folders or wnids.txt")
    train = Split()
    _add_class_folders(train, root, "train", wnids, label_of, ignored)

    splits = {"train": train, "val": _index_val(root, wnids, label_of, ignored)}
    for split_name, split in splits.items():
        if not split.paths:
            raise UserError(f"{root / split_name} holds no images")
    if ignored:
        log.info("ignored %d files that are not images (first: %s)", len(ignored), _examples(ignored))
    for split in splits.values():
        for item in split.excluded:
            log.warning("skipping %s: %s", item["path"], item["reason"])
    return TinyImageNet(root=root, wnids=wnids, names=names, full_names=full_names, splits=splits, ignored=ignored)


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
        on_disk = {path.rsplit("/", 1)[1] for path in _list_images(root, "val/images", ignored, val.excluded)}
        missing_files = sorted(set(wnid_of) - on_disk)
        unannotated = sorted(on_disk - set(wnid_of))
        problems = []
        if unknown:
            problems.append(f"{len(unknown)} annotations name an unknown wnid ({_examples(unknown)})")
        if missing_files:
            problems.append(f"{len(missing_files)} annotated files are missing ({_examples(missing_files)})")
        if unannotated:
            problems.append(f"{len(unannotated)} images have no annotation ({_examples(unannotated)})")
        if problems:
            raise UserError(f"{annotations} disagrees with {images_dir}: {'; '.join(problems)}")
        for filename in sorted(wnid_of, key=lambda f: (label_of[wnid_of[f]], f)):
            val.paths.append(f"val/images/{filename}")
            val.labels.append(label_of[wnid_of[filename]])
        return val
    # val already arranged into class folders
    folders = [f for f in _subfolders(val_dir) if f != "images"]
    unknown = sorted(set(folders) - set(wnids))
    if unknown:
        raise UserError(f"{val_dir} has class folders not in wnids.txt: {_examples(unknown)}; fix the folders or wnids.txt")
    if not folders:
        if annotations.is_file():  # the annotations are there, the images folder is not
            raise UserError(f"{images_dir} not found and {val_dir} has no class folders; restore val/images/")
        raise UserError(f"{annotations} not found and {val_dir} has no class folders; restore val_annotations.txt")
    _add_class_folders(val, root, "val", [wnid for wnid in wnids if wnid in folders], label_of, ignored)
    return val


def arrange_val(dataset: TinyImageNet) -> int:
    """Arrange val into val/<wnid>/images/ as the old script did, but without moving anything.

    Each image gets a hard link (a copy where links are not possible) under its class folder;
    val/images and the annotations stay as they are. Idempotent, and safe to interrupt: each link
    appears atomically under its final name. Returns how many links were made.
    """
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
