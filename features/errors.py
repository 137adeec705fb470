"""The cache's one exception type, and how an I/O failure reads in a few words."""
from __future__ import annotations

import os
import re


class CacheError(Exception):
    """A cache that is missing, partial, foreign or locked: the entry scripts print it as one line."""


def describe_error(err: BaseException) -> str:
    """A write or read failure in a few words: the errno's text ("No space left on device") when known."""
    number = getattr(err, "errno", None)
    found = re.search(r"errno = (\d+)", str(err))  # HDF5 names the system error inside its message
    if found:
        number = int(found.group(1))
    if number:
        return os.strerror(number)
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
