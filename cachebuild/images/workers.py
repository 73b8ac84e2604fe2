"""Decode processes: a spawned pool whose workers die with their parent, and a one-off process for a retry.

Workers are spawned (never forked) so they never inherit a CUDA context. Each one is tied to the process
that started it, so a SIGKILL or Ctrl-C of a run never leaves decoders behind:

* on Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the worker when the *thread* that
  started it exits. ``ProcessPoolExecutor`` with the spawn context starts workers inside ``submit``, so
  that is the thread consuming the batches, which outlives its pool;
* everywhere, a daemon thread that polls ``os.getppid()`` and exits when the parent is gone (on POSIX an
  orphan is re-parented, so its parent id changes). This covers macOS, the start-up race (a parent that
  died before ``prctl`` ran) and a pool used from a thread that ends early.

Windows has neither re-parenting nor ``prctl``; there the workers end only when their task queue closes.
The multiprocessing resource tracker holds a pipe shared with the workers and exits once they are gone.

Signals are the parent's business. A terminal's Ctrl-C sends SIGINT to the whole foreground process group: a
child ignores it (``die_with_parent``), so none prints a ``KeyboardInterrupt`` traceback, and the parent, which
turns it into one line and an exit code, kills its children on its way out (``kill_pool``). A child is started
with SIGINT blocked (``children_quiet``), so one that arrives while it starts up (imports take a second) stays
pending and is then dropped, rather than raised in a Python that has not reached its initializer yet. SIGTERM
(systemd and SLURM send it to every process of a job) keeps its default action in a child: it ends quietly,
with no Python code run, and ``ProcessPoolExecutor`` relies on it to stop the workers of a broken pool.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

PARENT_POLL_SECONDS = 0.5  # how often a worker checks that its parent is alive: an orphan decodes at most
# this long after the run died, and one getppid() call per poll costs nothing
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class _QuietPool(ProcessPoolExecutor):
    """A pool whose workers start with SIGINT blocked (it starts them inside ``submit``)."""

    def submit(self, fn, /, *args, **kwargs):
        with children_quiet():
            return super().submit(fn, *args, **kwargs)


def start_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` spawned decode processes that exit when this process dies and leave signals to it."""
    ctx = multiprocessing.get_context("spawn")
    return _QuietPool(workers, mp_context=ctx, initializer=die_with_parent, initargs=(os.getpid(),))


def kill_pool(pool: ProcessPoolExecutor) -> None:
    """Stop ``pool`` at once: its workers are killed, not waited for (one may be stuck in a read), and reaped."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):  # no public way before Python 3.14
        with contextlib.suppress(Exception):
            proc.kill()
    pool.shutdown(wait=True, cancel_futures=True)  # the pool sees its workers gone and joins them: no zombie


@contextlib.contextmanager
def children_quiet():
    """Block SIGINT in this thread while it starts children, which inherit the mask: a Ctrl-C that reaches a
    child before ``die_with_parent`` ignores it stays pending there and is dropped. This process does not lose
    it: the kernel hands it to another thread, or here once the block ends."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no process groups to signal
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def run_alone(fn: Callable, *args: Any) -> tuple[Any, int | None]:
    """``fn(*args)`` in a fresh spawned process: ``(result, None)``, or ``(None, exitcode)`` when it died.

    The exit code is negative for a signal (-9: SIGKILL, -11: SIGSEGV), as ``multiprocessing`` gives it.
    """
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_alone_main, args=(send, os.getpid(), fn, args), daemon=True)
    with children_quiet():
        proc.start()
    send.close()  # the child now holds the only write end: its death reads as EOFError below
    try:
        return receive.recv(), None
    except EOFError:
        proc.join()
        return None, proc.exitcode
    finally:
        receive.close()
        if proc.is_alive():  # done sending and exiting, or we were interrupted: never leave it behind
            proc.kill()
        proc.join()


def describe_exit(exitcode: int | None) -> str:
    """``signal 9 (SIGKILL)`` or ``exit code 1``, for a reason a person reads."""
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {-exitcode} ({signal.Signals(-exitcode).name})"
        return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this process as soon as ``parent_pid`` is gone, and leave Ctrl-C to it (see the
    module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # started by children_quiet: a pending one is dropped, being ignored
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if sys.platform != "win32":
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)  # the run is gone: nobody will read what this worker decodes


def _alone_main(send, parent_pid: int, fn: Callable, args: tuple) -> None:
    die_with_parent(parent_pid)
    send.send(fn(*args))
    send.close()
