"""The shard writer beside the extraction's loop: in order, bounded, and a failure stops it and is raised."""
from __future__ import annotations

import errno
import threading

import pytest

from pipeline.extract.writing import ShardWriter


def test_shards_are_written_in_order_off_the_main_thread_and_close_waits_for_them():
    written, gate = [], threading.Event()

    def write(shard):
        gate.wait(5)
        written.append((shard, threading.current_thread().name))

    writer = ShardWriter(write, ahead=3)
    for shard in range(3):
        writer.submit(shard)  # returns at once: nothing is written while the gate is shut
    assert written == []
    gate.set()
    writer.close()
    assert [s for s, _ in written] == [0, 1, 2] and {t for _, t in written} == {"extract-write_0"}


def test_at_most_ahead_shards_wait_so_the_rows_held_stay_bounded():
    gate, started = threading.Event(), []
    writer = ShardWriter(lambda shard: (started.append(shard), gate.wait(5)), ahead=2)
    writer.submit(0)
    writer.submit(1)
    blocked = threading.Thread(target=writer.submit, args=(2,))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # the third waits for the first to be written
    gate.set()
    blocked.join(5)
    writer.close()
    assert started == [0, 1, 2]


def test_a_failed_write_stops_the_later_ones_and_is_raised_in_the_main_thread():
    written = []

    def write(shard):
        if shard == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(shard)

    writer = ShardWriter(write, ahead=4)
    for shard in range(4):
        writer.submit(shard)
    with pytest.raises(OSError, match="No space"):
        writer.close()
    assert written == [0]  # shard 1 failed: 2 and 3, handed over before it was noticed, are not written


def test_leaving_on_an_error_of_the_loop_still_writes_the_finished_shards():
    written = []
    with pytest.raises(KeyError):
        with ShardWriter(lambda shard: written.append(shard)) as writer:
            writer.submit(0)
            raise KeyError("a read error in the loop")
    assert written == [0]  # finished work: a rerun keeps it
