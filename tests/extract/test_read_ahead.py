"""The CPU data path's reader threads (pipeline.extract.extractor.read_ahead): batches in order, errors reach
the caller, and stopping early reads no further than the batches already asked for."""
from __future__ import annotations

import threading
import time

import pytest

from pipeline.extract.extractor import read_ahead


class Batches:
    """A reader of ``count`` batches that records which it read, in which thread; ``fail_at`` raises there."""

    def __init__(self, count: int, fail_at: int | None = None, delay: float = 0.0):
        self.count, self.fail_at, self.delay = count, fail_at, delay
        self.read: list[int] = []
        self.threads: set[str] = set()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        time.sleep(self.delay * (i % 3))  # uneven: a later batch can finish before an earlier one
        self.threads.add(threading.current_thread().name)
        self.read.append(i)
        if i == self.fail_at:
            raise RuntimeError(f"batch {i} broke")
        return {"batch": i}


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_batches_come_in_order_whatever_finishes_first(threads):
    reader = Batches(20, delay=0.002)
    assert [item["batch"] for item in read_ahead(reader, threads)] == list(range(20))
    assert sorted(reader.read) == list(range(20))  # each read once
    if threads == 0:
        assert reader.threads == {threading.current_thread().name}
    else:
        assert all(name.startswith("extract-read") for name in reader.threads)


def test_an_error_in_a_reader_thread_reaches_the_caller_at_its_batch():
    reader = Batches(10, fail_at=4)
    got = []
    with pytest.raises(RuntimeError, match="batch 4 broke"):
        for item in read_ahead(reader, threads=2):
            got.append(item["batch"])
    assert got == [0, 1, 2, 3]  # everything before it, nothing after it


def test_stopping_early_reads_only_what_was_asked_for_and_ahead_and_leaves_no_thread():
    reader = Batches(100, delay=0.001)
    batches = read_ahead(reader, threads=1, ahead=2)
    assert [next(batches)["batch"] for _ in range(5)] == [0, 1, 2, 3, 4]
    batches.close()  # what the extractor's loop does when it stops (an error, a skip under --strict)
    assert len(reader.read) <= 5 + 2  # the five used and at most two read ahead
    assert not [t for t in threading.enumerate() if t.name.startswith("extract-read")]
