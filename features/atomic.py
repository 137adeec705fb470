"""The one way a file of ours appears: written under a temporary name beside it, then renamed into place.

A reader (or a rerun after a kill) sees the old file or the new one, never a half-written one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, data: str | bytes | None = None, *, write: Callable[[Path], None] | None = None,
                 suffix: str = ".tmp") -> Path:
    """Write ``data`` (text as UTF-8, or bytes), or call ``write(tmp)`` to fill the temporary file, then
    rename it to ``path``. On an error the temporary file is removed and the error raised; ``path`` is left
    as it was. (A kill leaves the temporary file: a rerun writes it afresh.)"""
    if (data is None) == (write is None):
        raise TypeError("pass data or write, not both")
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        if write is not None:
            write(tmp)
        elif isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    return path
