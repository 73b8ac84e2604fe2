"""The several-device engine: one encoder process per device, one manifest writer (this process).

``--devices cuda:0,cuda:1`` (or ``all``, or ``cpu,cpu`` on a machine without GPUs, so tests run the same
code) starts one spawned process per device. Each loads the model on its device, gets its share of the
decode workers and runs the one-device loop (``engines.local.drive_device``) with its own writer thread,
which writes and fsyncs shards itself but commits nothing: it sends each durable shard's name and items
here, and this process, the manifest's one writer, commits them. Shard names never clash: device k of K
takes indices first + k, first + k + K, ... (``ShardSink``'s stripes), past every index in use.

This process plans, hands each device batches a bounded number ahead (``DEVICE_BATCHES_AHEAD``), so a fast
device takes more of them, and commits. A device process that dies (SIGKILL, a driver fault) loses only
what was not committed: its items go back to the queue and the run finishes on the other devices; a shard
file it wrote but never had committed is removed at the end. A kill of the whole run resumes as always:
nothing but committed shards count. The tensors do not depend on which device encoded an item (promise 6,
up to the devices' own kernel noise between different device models).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from cachebuild.cache.store import (
    DeviceProgress,
    clean_after_crash,
    count_commit,
    first_free_shard_index,
    record_failures,
)
from cachebuild.engines.base import Run, Stages
from cachebuild.engines.device_process import DRAIN, DeviceSpec, device_main
from cachebuild.engines.local import AUTO_BATCH_META, planning_batch
from cachebuild.errors import CacheError, ConfigError
from cachebuild.images.load import PREFETCH_BATCHES
from cachebuild.images.plan import ItemPlan, batch_by_bucket
from cachebuild.images.workers import describe_exit

log = logging.getLogger(__name__)

DEVICE_BATCHES_AHEAD = 2  # planned batches handed to a device beyond what its decode look-ahead holds
# (workers + PREFETCH_BATCHES): enough to keep it busy, few enough that a dead device gives back few
WAIT_SECONDS = 1.0  # how long the dispatcher sleeps without news before it looks at the processes again
EXIT_SECONDS = 60.0  # how long a finished device process may take to exit before it is killed


def parse_devices(text: str) -> tuple[str, ...]:
    """``cuda:0,cuda:1`` / ``cpu,cpu`` / ``all`` (every CUDA device; the CPU alone where there is none).

    Raises:
        ConfigError: an empty entry, or a device torch cannot name.
    """
    import torch

    if text.strip() == "all":
        count = torch.cuda.device_count()
        return tuple(f"cuda:{i}" for i in range(count)) if count else ("cpu",)
    names = tuple(p.strip() for p in text.split(","))
    for name in names:
        try:
            torch.device(name)
        except (RuntimeError, ValueError):
            raise ConfigError(f"--devices: {name!r} is not a device; use e.g. cuda:0,cuda:1, cpu,cpu or all") from None
    return names


@dataclass(frozen=True)
class DevicesEngine:
    """Several devices of this machine, one encoder process each.

    Example:
        >>> DevicesEngine(("cuda:0", "cuda:1"), workers=8, max_pixels=178_956_970).run(batches, stages, run)
    """

    devices: tuple[str, ...]
    workers: int  # decode processes in all, shared out between the devices
    max_pixels: int

    def plan_batch_size(self, batch_size: int | None) -> int:
        return batch_size or planning_batch(list(self.devices))

    def run(self, batches: Iterable[list[ItemPlan]], stages: Stages, run: Run) -> None:
        run.summary.model_loaded = True
        plan_batch = self.plan_batch_size(run.batch_size)
        dispatcher = _Dispatcher(self._start(stages, run), batches, plan_batch, stages, run)
        try:
            dispatcher.run()
        except BaseException:
            dispatcher.kill()  # as after a crash: what is not committed stays pending
            raise
        dispatcher.stop()
        clean_after_crash(run.manifest, stages.store, run.manifest.root / stages.store)  # dead devices' leftovers

    def _start(self, stages: Stages, run: Run) -> list[_Device]:
        ctx = multiprocessing.get_context("spawn")
        n = len(self.devices)
        first = first_free_shard_index(run.manifest, stages.store)
        known = run.manifest.get_meta(AUTO_BATCH_META.format(store=stages.store)) or {}
        cpus = sum(1 for d in self.devices if d.startswith("cpu"))
        threads = max(1, (os.cpu_count() or 1) // max(1, cpus))
        devices = []
        for k, name in enumerate(self.devices):
            spec = DeviceSpec(
                k, name, stages, self.workers // n + (k < self.workers % n), self.max_pixels, threads,
                run.batch_size, run.vram_budget, known, first + k, n, str(run.manifest.root),
            )  # fmt: skip
            ours, theirs = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=device_main, args=(theirs, os.getpid(), spec), name=f"cachebuild-{name}")
            proc.start()
            theirs.close()
            label = f"{name}#{k}" if self.devices.count(name) > 1 else name
            devices.append(_Device(label, proc, ours, spec.workers + PREFETCH_BATCHES + DEVICE_BATCHES_AHEAD))
        return devices


@dataclass
class _Device:
    """This process's view of one device process."""

    name: str
    proc: multiprocessing.Process
    conn: Connection
    ahead: int  # batches it may hold: its decode look-ahead needs them all before it encodes the first
    tasks: deque = field(default_factory=deque)  # [items not yet encoded] per batch handed out, in order
    outstanding: dict = field(default_factory=dict)  # key -> ItemPlan handed out and not yet committed or failed
    alive: bool = True
    finished: bool = False  # said goodbye: its exit is not a loss
    drained: bool = False  # told to drain since its last batch
    processed: int = 0
    started: float | None = None
    memory: int | None = None

    def send(self, msg) -> None:
        self.conn.send(msg)

    def progress(self) -> DeviceProgress:
        rate = self.processed / (time.monotonic() - self.started) if self.started else 0.0
        return DeviceProgress(self.name, self.proc.pid or 0, self.processed, rate, self.alive)


class _Dispatcher:
    """Hands batches to the device processes, commits what they send, and takes back a dead one's batches."""

    def __init__(self, devices: list[_Device], batches: Iterable, plan_batch: int, stages: Stages, run: Run):
        self.devices, self.source = devices, iter(batches)
        self.plan_batch, self.stages, self.run_ = plan_batch, stages, run
        self.pending: deque[list[ItemPlan]] = deque()  # taken back from a dead device: handed out first
        self.exhausted = False

    def run(self) -> None:
        while True:
            alive = [d for d in self.devices if d.alive]
            if not alive:
                raise CacheError(
                    "every device process died (see the log above); committed shards are kept: run the same "
                    "command again to continue, with fewer --devices if one keeps failing"
                )
            self._hand_out(alive)
            if self.exhausted and not self.pending and not any(d.tasks or d.outstanding for d in alive):
                return
            for d in alive:  # nothing left to hand out: each device finishes and commits what it holds
                if self.exhausted and not self.pending and not d.drained and (d.tasks or d.outstanding):
                    d.drained = self._send(d, DRAIN)
            self._receive([d for d in alive if d.alive])

    def stop(self) -> None:
        """Say goodbye to the devices (their writers commit nothing more) and wait for them to exit."""
        for d in self.devices:
            if d.alive:
                with contextlib.suppress(OSError):
                    d.send(None)
        deadline = time.monotonic() + EXIT_SECONDS
        for d in self.devices:
            while d.alive and time.monotonic() < deadline:
                self._receive([d])
            d.proc.join(max(0.0, deadline - time.monotonic()))
            if d.proc.is_alive():
                d.proc.kill()
                d.proc.join()
            d.conn.close()

    def kill(self) -> None:
        for d in self.devices:
            if d.proc.is_alive():
                d.proc.kill()
            d.proc.join()
            d.conn.close()

    def _hand_out(self, alive: list[_Device]) -> None:
        for d in sorted(alive, key=lambda d: len(d.tasks)):
            while len(d.tasks) < d.ahead:
                batch = self._next_batch()
                if batch is None:
                    return
                if not self._send(d, batch):  # it died since the last look: the batch goes to another
                    self.pending.appendleft(batch)
                    break
                d.tasks.append(len(batch))
                d.outstanding.update((i.key, i) for i in batch)
                d.drained = False

    def _send(self, d: _Device, msg) -> bool:
        """Send ``msg`` to ``d``; False when its process is gone (a kill can land between two looks at it), which
        then counts as its loss."""
        try:
            d.send(msg)
        except OSError:  # BrokenPipeError, ConnectionResetError
            self._lost(d)
            return False
        return True

    def _next_batch(self) -> list[ItemPlan] | None:
        if self.pending:
            return self.pending.popleft()
        if self.exhausted:
            return None
        batch = next(self.source, None)
        self.exhausted = batch is None
        return batch

    def _receive(self, devices: list[_Device]) -> None:
        by_conn = {d.conn: d for d in devices}
        by_sentinel = {d.proc.sentinel: d for d in devices}
        for ready in wait([*by_conn, *by_sentinel], timeout=WAIT_SECONDS):
            d = by_conn.get(ready) or by_sentinel[ready]
            try:
                while d.alive and d.conn.poll():
                    self._handle(d, d.conn.recv())
            except (EOFError, OSError):
                self._lost(d)
            if ready in by_sentinel and d.alive:
                self._lost(d)

    def _handle(self, d: _Device, msg) -> None:
        kind, *args = msg
        run, store = self.run_, self.stages.store
        if kind == "encoded":
            n, d.memory = args
            d.started = d.started or time.monotonic()
            d.processed += n
            while n and d.tasks:
                take = min(n, d.tasks[0])
                d.tasks[0] -= take
                n -= take
                if not d.tasks[0]:
                    d.tasks.popleft()
            memory = max((x.memory for x in self.devices if x.memory is not None), default=None)
            run.report(args[0], memory, tuple(x.progress() for x in self.devices))
        elif kind == "commit":
            info, rows = args
            run.manifest.commit_shard(store, info, rows)
            count_commit(run.summary, info, rows)
            for key, _, _ in rows:
                d.outstanding.pop(key, None)
        elif kind == "fail":
            record_failures(run.manifest, store, run.summary, args[0])
            for key, _ in args[0]:
                d.outstanding.pop(key, None)
        elif kind == "meta":
            meta_key = AUTO_BATCH_META.format(store=store)
            run.manifest.set_meta(meta_key, (run.manifest.get_meta(meta_key) or {}) | {args[0]: args[1]})
        elif kind == "done":
            for name, count in args[0].items():  # engines.device_process.DEVICE_COUNTS
                setattr(run.summary, name, getattr(run.summary, name) + count)
            d.finished = True
        elif kind == "error":
            raise _unpickle_error(args[0])

    def _lost(self, d: _Device) -> None:
        """``d`` is gone: its items not committed go back to the queue (unless it had said goodbye)."""
        d.alive = False
        d.proc.join(5)
        if d.finished and not d.outstanding:
            return
        items = list(d.outstanding.values())
        log.warning(
            "the encoder process of %s died (%s); its %d uncommitted item(s) go to the other devices",
            d.name, describe_exit(d.proc.exitcode), len(items),
        )  # fmt: skip
        self.pending.extendleft(reversed(list(batch_by_bucket(items, self.plan_batch))))
        counted = len(items) - sum(d.tasks)  # encoded (and counted as finished) but never committed
        d.processed -= counted
        self.run_.report(-counted, None, tuple(x.progress() for x in self.devices))
        d.tasks.clear()
        d.outstanding.clear()


def _unpickle_error(data: bytes) -> BaseException:
    try:
        return pickle.loads(data)
    except Exception:  # an exception class that does not round-trip: its text is what matters
        return CacheError(data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data))
