"""What the page sends to be stored: checked names, files recognised by their content, zips unpacked within limits,
and files written whole under a new name only. Torch-free.

No name from the page is used as a path before it passes ``check_file_name`` (one plain file name of an image) or
the class name check (``pipeline.app.project``). A file is written as ``--collect`` writes a frame: under a hidden
partial name opened with O_EXCL, flushed to disk, then hard-linked to a final name that must not exist.
"""
from __future__ import annotations

import io
import os
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.common.errors import UserError
from pipeline.common.names import IMAGE_SUFFIXES

MAX_UPLOAD_BYTES = 256 * 2**20  # one upload (an image, or a zip of them)
MAX_UNPACKED_BYTES = 1024 * 2**20  # what one zip may unpack to, by its headers (and no more is read)
MAX_ZIP_MEMBERS = 20_000  # entries in one zip
MAX_PIXELS = 50_000_000  # an image larger than this (width x height) is refused: a decompression bomb
MAX_FRAME_BYTES = 16 * 2**20  # one captured webcam frame (a JPEG)
SIGNATURES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"GIF87a", ".gif"), (b"GIF89a", ".gif"))
KINDS = "JPEG, PNG, WebP, GIF or a zip of them"


class AppError(UserError):
    """A refusal the page shows: one line, and the HTTP status it is answered with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def image_suffix(data: bytes) -> str | None:
    """The suffix of the image kind ``data`` starts like (by its bytes, never its name), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for magic, suffix in SIGNATURES if data.startswith(magic)), None)


def is_zip(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def check_image(data: bytes, what: str) -> str:
    """The suffix to store ``data`` under: a whole image of a kind the dataset reads, of a sane size; else AppError."""
    from PIL import Image

    suffix = image_suffix(data)
    if suffix is None:
        raise AppError(f"{what} is not an image (recognised by content: {KINDS})", 415)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise AppError(f"{what} is {image.width}x{image.height}: over {MAX_PIXELS:,} pixels; shrink it", 413)
            image.verify()  # the whole file: a truncated or damaged image is refused here
    except AppError:
        raise
    except Exception as err:  # Pillow's many kinds of "not a valid image"
        raise AppError(f"{what} is a damaged {suffix[1:].upper()} ({type(err).__name__}); nothing was stored", 415) from None
    return suffix


def check_file_name(name: str) -> str:
    """``name`` from the page as one of a class's image files: a plain, visible file name with an image suffix."""
    if (not name or "/" in name or "\\" in name or "\x00" in name or name.startswith(".")
            or Path(name).suffix.lower() not in IMAGE_SUFFIXES or len(name.encode("utf-8", "replace")) > 255):
        raise AppError(f"{name[:60]!r} is not an image file name of this project", 404)
    return name


def safe_stem(filename: str) -> str:
    """A file name's stem reduced to letters, digits, '-', '_' and '.' (at most 80), never hidden or empty."""
    stem = PurePosixPath(filename.replace("\\", "/")).stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:80]
    return stem or "upload"


def write_new(folder: Path, stem: str, suffix: str, data: bytes) -> Path:
    """Write ``data`` whole as ``folder/stem+suffix`` (or ``stem-N+suffix`` if taken); never replaces a file."""
    for n in range(10_000):
        final = folder / f"{stem}{'' if n == 0 else f'-{n}'}{suffix}"
        if os.path.lexists(final):
            continue
        partial = folder / f".{final.name}.{os.getpid()}.upload.partial"
        try:
            with open(partial, "xb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.link(partial, final)  # fails if final exists: a file appeared since the check, try the next name
        except FileExistsError:
            continue
        finally:
            if os.path.lexists(partial):
                os.unlink(partial)
        return final
    raise AppError(f"no free name for {stem}{suffix} in {folder.name}", 409)


def move_new(source: Path, folder: Path) -> Path:
    """Move ``source`` into ``folder`` under its own name (or name-N if taken), never replacing a file."""
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = source.stem, source.suffix
    for n in range(10_000):
        final = folder / f"{stem}{'' if n == 0 else f'-{n}'}{suffix}"
        try:
            os.link(source, final)
        except FileExistsError:
            continue
        os.unlink(source)
        return final
    raise AppError(f"no free name for {source.name} in {folder}", 409)


@dataclass
class Unpacked:
    """A zip's images (name, suffix, bytes), and each entry left out with why."""

    images: list[tuple[str, str, bytes]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _check_members(archive: zipfile.ZipFile, what: str) -> list[zipfile.ZipInfo]:
    """Refuse the whole zip (before anything is read) when an entry escapes its folder or the sizes are too large."""
    members = archive.infolist()
    if len(members) > MAX_ZIP_MEMBERS:
        raise AppError(f"{what} holds {len(members):,} entries, over the {MAX_ZIP_MEMBERS:,} allowed; split it", 413)
    for info in members:
        path = PurePosixPath(info.filename.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", info.filename):
            raise AppError(f"{what} is refused: its entry {info.filename[:80]!r} escapes its folder; nothing was "
                           "stored", 400)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise AppError(f"{what} is refused: its entry {info.filename[:80]!r} is a symbolic link; nothing was "
                           "stored", 400)
    total = sum(info.file_size for info in members)
    if total > MAX_UNPACKED_BYTES:
        raise AppError(f"{what} unpacks to {total / 2**20:,.0f} MiB, over the {MAX_UNPACKED_BYTES // 2**20} MiB "
                       "allowed; nothing was stored. Upload it in parts", 413)
    return members


def unpack_zip(data: bytes, what: str) -> Unpacked:
    """The images in the zip ``data`` (each recognised by content), all checked before any is stored."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as err:
        raise AppError(f"{what} is not a readable zip ({err}); nothing was stored", 400) from None
    out = Unpacked()
    with archive:
        for info in _check_members(archive, what):
            if info.is_dir():
                continue
            base = PurePosixPath(info.filename.replace("\\", "/")).name
            if base.startswith(".") or info.filename.startswith("__MACOSX/"):
                out.skipped.append(f"{info.filename} (hidden or a macOS resource file)")
                continue
            try:
                content = archive.read(info)  # at most its header's size: the total was checked above
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError) as err:
                raise AppError(f"{what}: its entry {info.filename[:80]!r} cannot be read ({err}); nothing was "
                               "stored", 400) from None
            try:
                suffix = check_image(content, info.filename)
            except AppError as err:
                out.skipped.append(f"{info.filename} ({str(err).split(' is ', 1)[-1]})")
                continue
            out.images.append((safe_stem(base), suffix, content))
    return out
