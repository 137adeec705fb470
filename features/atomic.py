"""The one way a file of ours appears: written under a temporary name beside it, then renamed into place.

A reader (or a rerun after a kill) sees the old file or the new one, never a half-written one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, data: str | bytes | None = None, *, write: Callable[[Path], None] | None = None,
                 suffix: str = ".tmp", durable: bool = False) -> Path:
    """Write ``data`` (text as UTF-8, or bytes), or call ``write(tmp)`` to fill the temporary file, then
    rename it to ``path``. On an error the temporary file is removed and the error raised; ``path`` is left
    as it was. (A kill leaves the temporary file: a rerun writes it afresh.)

    ``durable``: flush the temporary file to the disk before the rename (for files a later step trusts,
    such as a checkpoint or a run's manifest), so a power cut cannot leave a renamed but empty file.
    """
    if (data is None) == (write is None):
        raise TypeError("pass data or write, not both")
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        if write is not None:
            write(tmp)
            if durable:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    return path


def sync_folder(folder: Path) -> None:
    """Flush the folder's new names to disk (where the platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
