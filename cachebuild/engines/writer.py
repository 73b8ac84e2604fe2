"""The writer thread: everything after the device, so a slow disk never stalls it.

A job's host work on encoded batches (waiting for the device-to-host copies, casts, NaN checks) and the
store's (serialisation, hashing, write, fsync, the manifest commit) run in one thread behind a bounded queue.
The thread opens its own sink, and with it its own manifest connection (SQLite connections belong to the
thread that opened them). An error there stops the thread; the device loop sees it at its next ``put`` or
at ``close`` and raises it, so a full disk is the same one clear line it always was. Items queued but not
committed stay pending: a rerun encodes them, as after any crash.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

WRITE_QUEUE_BATCHES = 4  # encoded batches waiting for the writer: absorbs a slow fsync or a shard rotation
# without stalling the device, while host memory holds at most this many batches of outputs
PUT_POLL_SECONDS = 0.5  # how often a blocked ``put`` looks for a writer that died

_STOP = object()
_ABORT = object()  # after what is queued: leave without committing the open shard


class WriterThread:
    """Runs ``handle(sink, work)`` for each ``put`` work, in order, in a thread that owns ``open_sink()``.

    Example:
        >>> with WriterThread(lambda: ShardSink(...), write_batch) as writer:
        ...     writer.put(encoded)
    """

    def __init__(
        self, open_sink: Callable[[], AbstractContextManager], handle: Callable[[Any, Any], None], device=None
    ):
        self._open_sink, self._handle = open_sink, handle
        self._device = device  # a CUDA device the thread waits on (the copies off it): its current device
        self._queue: queue.Queue = queue.Queue(WRITE_QUEUE_BATCHES)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="cachebuild-writer", daemon=True)
        self._thread.start()

    def put(self, work: Any) -> None:
        """Queue ``work``; blocks while the queue is full. Raises the writer's error, if it has one."""
        while True:
            self.raise_error()
            with contextlib.suppress(queue.Full):
                self._queue.put(work, timeout=PUT_POLL_SECONDS)
                return

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Write everything queued, commit the open shard and stop; raises the writer's error."""
        self.put(_STOP)
        self._thread.join()
        self.raise_error()

    def abort(self) -> None:
        """The loop failed: write what is already queued (encoded batches, as a loop without a writer thread
        would have written them before failing), then stop without committing the open shard (its items stay
        pending)."""
        if self._thread.is_alive():
            with contextlib.suppress(Exception):  # the writer's own error: the loop's error is the one raised
                self.put(_ABORT)
        self._thread.join()

    def __enter__(self) -> WriterThread:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _main(self) -> None:
        try:
            if self._device is not None and self._device.type == "cuda":  # else GPU 0 would get a context
                from cachebuild.encode import use_device

                use_device(self._device)
            with self._open_sink() as sink:
                while True:
                    work = self._queue.get()
                    if work is _ABORT:
                        raise _Aborted
                    if work is _STOP:
                        break
                    self._handle(sink, work)
        except _Aborted:
            pass
        except BaseException as exc:  # handed to the device loop, which raises it
            self._error = exc
            self._drain()

    def _drain(self) -> None:
        """Empty the queue after an error, so a ``put`` blocked on a full queue wakes up and sees it."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()


class _Aborted(Exception):
    """Leave the sink's context with an exception: the open shard is dropped, not committed."""
