"""One writer per cache folder: an flock on ``<out>/.lock``, which readers can also look at without waiting."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from features.errors import CacheBusy


_held_locks: set[int] = set()  # file descriptors of the writer locks this process holds
_shared_with_child = False  # True around a fork whose child writes the cache: it keeps the lock


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker), let go of the parent's writer lock.

    flock belongs to the open file description, which fork shares with the child: a worker that
    outlives a parent killed by kill -9 would keep the lock held (for seconds) and refuse the rerun.
    The child's descriptor is pointed at /dev/null instead; that does not unlock the parent's.
    """
    if not _held_locks or _shared_with_child:
        return
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        for fd in _held_locks:
            os.dup2(devnull, fd, inheritable=False)
    finally:
        os.close(devnull)
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextmanager
def lock_shared_with_child():
    """Forks inside this block keep the writer lock in the child: a child that writes the cache file holds
    the lock until it is done, even when its parent is killed first, so no rerun writes beside it."""
    global _shared_with_child
    _shared_with_child = True
    try:
        yield
    finally:
        _shared_with_child = False


@contextmanager
def hold_lock(out: Path, holder: str, busy):
    """Hold ``<out>/.lock`` (flock) as ``holder``; when another process holds it, raise ``busy(its holder text)``.

    flock is released by the kernel when the process dies, even by kill -9, so no stale lock is left
    (forked children, such as DataLoader workers, drop their inherited copy: see above).
    """
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise busy(lock.read().strip() or "another process") from None
        lock.seek(0)
        lock.truncate()
        lock.write(holder)
        lock.flush()
        _held_locks.add(lock.fileno())
        try:
            yield
        finally:
            _held_locks.discard(lock.fileno())
            lock.truncate(0)


def exclusive_writer(out: Path):
    """Hold ``<out>/.lock`` for the whole extraction; a second writer gets a clear error."""
    return hold_lock(out, f"pid {os.getpid()}", lambda holder: CacheBusy(
        f"another extraction ({holder}) is writing to {out}"))


def writer_holding(out: Path) -> str | None:
    """Who holds ``<out>/.lock`` right now ("pid 123"), or None when no writer is at work in ``out``.

    The one "is a writer holding this?" check, for every reader. Only looks: a shared lock taken without
    blocking fails exactly while a writer holds its exclusive one, so a finished or killed writer never counts.
    """
    try:
        lock = open(Path(out) / ".lock", "r")
    except OSError:
        return None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock.read().strip() or "another process"
        except OSError:
            return None
        fcntl.flock(lock, fcntl.LOCK_UN)
        return None
