"""engines.writer: the writer thread keeps order, surfaces its errors in the device loop, and drops the open
shard when the loop fails."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from cachebuild.engines import writer as writer_mod
from cachebuild.engines.writer import WriterThread


class FakeSink:
    def __init__(self):
        self.items, self.flushed, self.thread = [], False, None

    def __enter__(self):
        self.thread = threading.current_thread()
        return self

    def __exit__(self, exc_type, *_):
        self.flushed = exc_type is None


def test_work_is_handled_in_order_in_one_thread_and_flushed_at_close():
    sink = FakeSink()
    with WriterThread(lambda: sink, lambda s, w: s.items.append((w, threading.current_thread()))) as writer:
        for i in range(20):
            writer.put(i)
    assert [w for w, _ in sink.items] == list(range(20))
    assert {t for _, t in sink.items} == {sink.thread} and sink.thread is not threading.main_thread()
    assert sink.flushed


def test_an_error_in_the_writer_surfaces_at_the_next_put_and_nothing_more_is_written(monkeypatch):
    monkeypatch.setattr(writer_mod, "PUT_POLL_SECONDS", 0.01)
    sink = FakeSink()

    def handle(s, w):
        if w == 3:
            raise OSError(28, "No space left on device")
        s.items.append(w)

    writer = WriterThread(lambda: sink, handle)
    with pytest.raises(OSError, match="No space"):
        for i in range(1000):  # bounded: the error shows within a few puts
            writer.put(i)
            time.sleep(0.005)
    writer.abort()
    assert sink.items == [0, 1, 2] and not sink.flushed  # the open shard is dropped, never committed


def test_a_failing_device_loop_drops_the_open_shard():
    sink = FakeSink()
    with contextlib.suppress(RuntimeError), WriterThread(lambda: sink, lambda s, w: s.items.append(w)) as writer:
        writer.put(1)
        raise RuntimeError("the device loop failed")
    assert not sink.flushed


def test_a_slow_disk_does_not_block_put_until_the_queue_is_full():
    release = threading.Event()
    sink = FakeSink()
    writer = WriterThread(lambda: sink, lambda s, w: release.wait(10))
    start = time.monotonic()
    for i in range(writer_mod.WRITE_QUEUE_BATCHES):  # one in the writer's hands, the rest queued
        writer.put(i)
    assert time.monotonic() - start < 1.0
    release.set()
    writer.close()
