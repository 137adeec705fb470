"""The cache's exception types, and how an I/O failure reads in a few words.

``features/`` says what is wrong; what to do about it depends on the command, so the kind of a CacheError
(its class) is what ``pipeline/`` turns into advice (``pipeline.cli``).
"""
from __future__ import annotations

import os
import re


class CacheError(Exception):
    """A cache that is missing, partial, foreign or locked: the entry scripts print it as one line."""


class CacheMissing(CacheError):
    """No cache file where one was expected."""


class CacheIncomplete(CacheError):
    """An extraction into it was interrupted (missing shards, no complete flag): finishing it repairs it."""


class CacheDamaged(CacheError):
    """A file that is not a well-formed cache (a field of the wrong type or range, shapes that disagree)."""


class CacheBusy(CacheError):
    """Another process is writing the cache right now."""


class CacheUnwritable(CacheError):
    """A write failed (a full disk, permissions); the finished shards are kept."""


class NoRows(CacheError):
    """Every image of the split was skipped: there is nothing to store."""


class LayerMissing(CacheError):
    """The file is a sound cache but does not hold the requested layer."""

    def __init__(self, message: str, layer: str):
        super().__init__(message)
        self.layer = layer


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
