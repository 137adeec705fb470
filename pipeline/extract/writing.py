"""Finished shards written by one thread beside the extraction's loop.

The main thread hands a finished shard over and goes on to the next batch, while the writer waits for the shard's
rows to land (on CUDA, their copies to pinned host memory), joins them and writes the shard file (np.savez: the
GIL is free while the bytes are checksummed and written). At most ``ahead`` shards wait, so the rows held stay
bounded. The first failure (a full disk) stops the writes after it, and the main thread raises it at the next
hand-over or at ``close``; a shard is never written with a hole in it, and the finished ones are kept.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class ShardWriter:
    """``submit(*args)`` runs ``write(*args)`` on the writer thread, in order; ``close()`` waits for them all."""

    def __init__(self, write: Callable[..., None], ahead: int = 2):
        self.write, self.ahead = write, ahead
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="extract-write")
        self.pending: deque[Future] = deque()
        self.failed = False

    def submit(self, *args) -> None:
        """Hand one shard over; first raise an earlier write's error, or wait while ``ahead`` shards are queued."""
        while self.pending and (self.pending[0].done() or len(self.pending) >= self.ahead):
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._write, *args))

    def _write(self, *args) -> None:
        if self.failed:  # an earlier write failed: its error is raised in the main thread; nothing after it is written
            return
        try:
            self.write(*args)
        except BaseException:
            self.failed = True
            raise

    def close(self) -> None:
        """Wait for every shard handed over; raise the first write's error."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        """Leaving on an error of the loop: the shards already handed over are finished work, written before it is
        raised (a rerun keeps them). Leaving normally: ``close``."""
        if kind is None:
            self.close()
        else:
            self.pool.shutdown(wait=True)
