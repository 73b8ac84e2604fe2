"""Reads that may never return: a file on a stalled network or FUSE mount, or one held by a kernel lease, blocks
``open()`` and ``read()`` in the kernel, where no thread can be cancelled. So such reads run in daemon threads and
the caller waits for each at most ``--read-timeout`` seconds: past it the item fails with the reason and the thread
is left to its read (a replacement takes its place; being a daemon it never holds the process's exit), and the
caller's wait, in short slices, stays open to Ctrl-C whatever a read is doing. Header reads while planning use
``TimedReads``; a decode worker reads each file's bytes with ``read_within`` before decoding them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from cachebuild.errors import ItemError, StorageError

WAIT_SLICE_SECONDS = 0.2  # a waiting caller looks at the clock (and takes signals) this often
MAX_STUCK_READS = 16  # reads past their limit still blocked at once before the run stops: one stuck file fails
# alone, while a storage that stopped answering ends the run in one line instead of a timeout per file for hours


class ReadTimedOut(ItemError):
    """A read took longer than ``--read-timeout``; the message is the item's reason."""


def timeout_reason(timeout: float) -> str:
    return (
        f"reading the file took longer than --read-timeout {timeout:g} s (a stalled network mount, or a file locked "
        "by another program?); check it, then run again with --retry-failed, or raise --read-timeout"
    )


class TimedReads:
    """``threads`` daemon threads that run ``fn(item)`` for many items, each given ``timeout`` seconds from when a
    thread starts it.

    Example:
        >>> reads = TimedReads(8, timeout=60.0)
        >>> reads.map(read_header, paths)  # a value, or the exception (ReadTimedOut past the limit), per path
    """

    def __init__(self, threads: int, timeout: float):
        self.timeout = timeout
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stuck = 0  # abandoned reads still blocked
        self._threads = threads
        for _ in range(threads):
            self._spawn()

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], what: Callable[[Any], str] = str) -> list:
        """``fn(item)`` or the exception it raised, in order; ``ReadTimedOut`` (named by ``what(item)``) where it
        took too long.

        Raises:
            StorageError: ``MAX_STUCK_READS`` reads are blocked past their limit at once.
        """
        tasks = [_Task(fn, item) for item in items]
        for task in tasks:
            self._tasks.put(task)
        return [self._wait(task, what) for task in tasks]

    def close(self) -> None:
        """Let the idle threads end; a thread stuck in a read ends when (if ever) the read returns."""
        for _ in range(self._threads):
            self._tasks.put(None)

    def __enter__(self) -> TimedReads:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _wait(self, task: _Task, what: Callable[[Any], str]) -> Any:
        while not task.done.wait(WAIT_SLICE_SECONDS):
            with self._lock:
                if task.done.is_set() or task.started is None or time.monotonic() - task.started <= self.timeout:
                    continue
                task.abandoned = True
                self._stuck += 1
                stuck = self._stuck
            if stuck >= MAX_STUCK_READS:
                raise StorageError(
                    f"{stuck} file reads are blocked past --read-timeout {self.timeout:g} s at once (e.g. "
                    f"{what(task.item)}): the dataset's storage is not answering; check the mount, then run the "
                    "same command again"
                )
            self._spawn()  # the stuck thread's place
            return ReadTimedOut(timeout_reason(self.timeout))
        return task.error if task.error is not None else task.value

    def _spawn(self) -> None:
        threading.Thread(target=self._work, name="cachebuild-read", daemon=True).start()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            with self._lock:
                task.started = time.monotonic()
            try:
                task.value = task.fn(task.item)
            except Exception as exc:  # handed to the caller, whose per-item boundary decides
                task.error = exc
            with self._lock:
                task.done.set()
                if task.abandoned:  # a replacement took this thread's place; its caller gave up long ago
                    self._stuck -= 1
                    return


class _Task:
    __slots__ = ("fn", "item", "value", "error", "started", "abandoned", "done")

    def __init__(self, fn: Callable[[Any], Any], item: Any):
        self.fn, self.item = fn, item
        self.value: Any = None
        self.error: Exception | None = None
        self.started: float | None = None  # time.monotonic() when a thread took it
        self.abandoned = False
        self.done = threading.Event()


def read_within(path: str, timeout: float) -> bytes:
    """Every byte of the local file ``path``, read in a daemon thread given ``timeout`` seconds.

    Raises:
        ReadTimedOut: the read did not finish in time (the thread is left to it).
        OSError: as ``open`` and ``read`` raise it.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def read() -> None:
        try:
            with open(path, "rb") as fh:
                box["data"] = fh.read()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        done.set()

    threading.Thread(target=read, name="cachebuild-read", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not done.wait(min(WAIT_SLICE_SECONDS, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            raise ReadTimedOut(timeout_reason(timeout))
    if "error" in box:
        raise box["error"]
    return box["data"]
