"""The Ray engine (``--engine ray``): decode in Ray CPU tasks, encode in one actor per GPU, commit here.

This process (the driver) plans from the manifest as every engine does, groups the planned batches into
shard tasks (about one shard of items each) and hands each encoder actor a bounded number of them. An actor
decodes its task's batches in Ray CPU tasks, a few batches ahead, runs the one-device loop of the local engine
(``engines.local.drive_device``) and writes exactly one shard under the name the driver gave the task, straight
into the output folder, and returns its name and items. The driver, the manifest's only writer, commits it.

Why tasks and actors, not Ray Data: a shard spans many batches, so the unit Ray retries must be the shard.
``map_batches`` retries single batches and treats a batch as done once an actor returned it, so a restarted
actor would lose the open shard of batches Ray Data already counts as finished; one shard per batch would make
shards of a few images. Here a task is a whole shard, stateless in the actor: when an actor's process dies,
Ray restarts it (``ACTOR_RESTARTS``) and runs its unfinished tasks again (``max_task_retries``), which write
the same shard name again; a decode task whose worker dies is retried by Ray, then decoded item by item, so
only a file that kills its decoder every time fails, as a failed item.

Shard names never clash: the driver reserves index blocks in the manifest before it hands them out, so a late
write of a previous, killed run lands past every index this run uses, and is an orphan that the next run's
clean-up (or ``verify --repair``) removes, as after a local crash. The driver holds only the plans of the tasks
in flight (``TASKS_AHEAD`` per actor) and one planning chunk: its memory does not grow with the dataset.

Workers read the images and write shards at the paths the driver sees, so on a real cluster the dataset and
the output folder live on storage every node mounts at the same path.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray

from cachebuild.cache.files import ShardInfo
from cachebuild.cache.store import (
    DeviceProgress,
    RunSummary,
    ShardSink,
    clean_after_crash,
    count_commit,
    first_free_shard_index,
    record_failures,
)
from cachebuild.engines.base import Run, Stages
from cachebuild.engines.local import AUTO_BATCH_META
from cachebuild.errors import CachebuildError, CacheError
from cachebuild.images.load import LoadedBatch, join_batches, load_batch
from cachebuild.images.plan import ItemPlan

log = logging.getLogger(__name__)

TASKS_AHEAD = 2  # shard tasks handed to an actor at a time: one encoding, one waiting, so the actor never
# waits for the driver, while a lost actor has at most two shards' worth of work to redo
FIRST_TASK_ITEMS = 1  # items of the first tasks (so one planned batch each), until a committed shard tells the
# bytes an item takes and tasks grow to a shard's worth
MAX_TASK_ITEMS = 4096  # items of a task at most: bounds the driver's plans in flight and the redo after a loss
RESERVE_SHARDS = 64  # shard indices reserved in the manifest at a time (one manifest write per block)
ACTOR_RESTARTS = 4  # times Ray restarts a dead encoder actor (and retries its unfinished tasks) before the run fails
DECODE_RETRIES = 2  # times Ray retries a decode task whose worker died, before its items are decoded one by one
DECODE_TASK_CPUS = 1  # Ray CPUs a decode task takes: one core decodes one batch
CPU_ACTOR_CPUS = 0.5  # Ray CPUs of the encoder actor where the cluster has no GPU: small, so decoding keeps cores
CPU_ACTOR_THREADS = 1  # torch threads of a CPU actor (the tensors of a CPU run depend on the thread count)
GPU_ACTOR_CPUS = 1  # Ray CPUs of a GPU actor: its device loop and writer thread
WAIT_SECONDS = 1.0  # how long the driver waits for a finished task before it looks again


@dataclass(frozen=True)
class RayEngine:
    """Decode tasks and one encoder actor per GPU of a Ray cluster (a CPU actor where there is no GPU).

    Example:
        >>> RayEngine("auto", max_pixels=178_956_970).run(batches, stages, run)
    """

    address: str | None  # "auto", "ray://host:10001", "host:6379"; None: start a local cluster
    max_pixels: int

    def plan_batch_size(self, batch_size: int | None) -> int:
        from cachebuild.engines.batchsize import AUTO_BATCH_MAX, CPU_AUTO_BATCH

        connect(self.address)
        return batch_size or (AUTO_BATCH_MAX if cluster_gpus() else CPU_AUTO_BATCH)

    def run(self, batches: Iterable[list[ItemPlan]], stages: Stages, run: Run) -> None:
        connect(self.address)
        run.summary.model_loaded = True
        driver = _Driver(self, stages, run)
        try:
            driver.run(batches)
        finally:
            driver.stop()
        clean_after_crash(run.manifest, stages.store, run.manifest.root / stages.store)  # retried tasks' leftovers


def connect(address: str | None) -> None:
    """Join the cluster at ``address``, or start a local one; once per process."""
    if ray.is_initialized():
        return
    kwargs: dict = {"address": address} if address else {"include_dashboard": False}
    try:
        ray.init(**kwargs, logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        raise CacheError(f"could not reach the Ray cluster at {address!r} ({exc}); check --ray-address") from None


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


@dataclass
class ShardTask:
    """One shard's worth of planned batches, and what the actor needs to write that shard."""

    index: int  # shard index the driver reserved for it: a retry writes the same name again
    batches: list[list[ItemPlan]]
    sources: dict[str, list]  # {key: [path, source fingerprint]} for the shard's header

    @property
    def items(self) -> int:
        return sum(len(b) for b in self.batches)


@dataclass
class TaskResult:
    info: ShardInfo | None  # None when no item of the task encoded
    rows: list  # (key, bucket, info) per item of the shard
    failures: list[tuple[str, str]]
    found: dict  # batch sizes found for new shapes: {label: value}
    oom_splits: int
    upcasts: int
    pid: int  # the actor's process


class EncoderActor:
    """One model on one device (the GPU Ray gave this actor, or the CPU); encodes shard tasks one at a time."""

    def __init__(self, stages: Stages, spec: dict):
        import torch

        from cachebuild.engines.device import prefer_expandable_segments
        from cachebuild.engines.local import open_sizer

        prefer_expandable_segments()
        self.device = torch.device("cuda" if spec["gpu"] else "cpu")
        if not spec["gpu"]:
            torch.set_num_threads(CPU_ACTOR_THREADS)
        self.stages, self.spec = stages, spec
        self.found: dict = {}
        self.run = Run(None, RunSummary(stages.store, spec["root"]), spec["batch_size"], spec["vram_budget"])
        self.sizer, self.budget = open_sizer(
            self.device, self.run, stages.sizing_key, spec["known"], lambda k, v: self.found.__setitem__(k, v)
        )
        self.encoder = stages.open_encoder(self.device)
        if self.device.type == "cuda":
            self.sizer.peak = self.encoder.peak

    def pid(self) -> int:
        return os.getpid()

    def encode(self, task: ShardTask) -> TaskResult:
        from cachebuild.engines.local import drive_device, sized
        from cachebuild.engines.writer import WriterThread

        stages, spec, before = self.stages, self.spec, (self.encoder.oom_splits, self.encoder.upcasts)
        view = _ManifestView(Path(spec["root"]), spec["fingerprint"], task.sources)
        sink = _TaskSink(view, stages.store, stages.fmt, stages.shard_bytes, stages.header, self.run.summary,
                         first_index=task.index)  # fmt: skip
        decoded = _decode_ahead(sized(task.batches, self.sizer, self.device), spec["decode_ahead"], spec["max_pixels"])
        with WriterThread(lambda: sink, stages.write) as writer:
            drive_device(decoded, self.encoder, self.device, writer.put, self.run, self.budget)
        found, self.found = self.found, {}
        oom, up = self.encoder.oom_splits - before[0], self.encoder.upcasts - before[1]
        return TaskResult(sink.info, sink.rows, sink.failures, found, oom, up, os.getpid())


class _TaskSink(ShardSink):
    """A task's sink: one shard (the task is sized to one), written here, committed by the driver."""

    info: ShardInfo | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list = []
        self.failures: list[tuple[str, str]] = []
        self._last = False

    def flush(self) -> None:
        if self._last:  # a rotation by size or age would need a second name: the task keeps one shard
            super().flush()

    def commit(self, info: ShardInfo, rows: list) -> None:
        self.info, self.rows = info, list(rows)

    def fail(self, failures: list[tuple[str, str]]) -> None:
        self.failures += failures

    def __exit__(self, exc_type, *rest) -> None:
        self._last = True
        super().__exit__(exc_type, *rest)


@dataclass
class _ManifestView:
    """What a shard sink reads from the manifest, carried to the actor (workers never open the SQLite file)."""

    root: Path
    fp: dict | None
    src: dict[str, list]
    remote = None  # shards land in a folder on every node (a URL --out is refused with --engine ray)

    def fingerprint(self, store: str) -> dict | None:
        return self.fp

    def sources(self, store: str, keys: list[str]) -> dict[str, list]:
        return {k: self.src[k] for k in keys if k in self.src}


def _decode(batch: list[ItemPlan], max_pixels: int) -> LoadedBatch:
    return load_batch(batch, max_pixels)


_decode_task = ray.remote(num_cpus=DECODE_TASK_CPUS, max_retries=DECODE_RETRIES)(_decode)
_decode_alone = ray.remote(num_cpus=DECODE_TASK_CPUS, max_retries=0)(_decode)


def _decode_ahead(batches: Iterable[list[ItemPlan]], ahead: int, max_pixels: int) -> Iterator[LoadedBatch]:
    """Decoded ``batches`` in order, with at most ``ahead`` decode tasks in flight."""
    pending: deque = deque()
    for batch in batches:
        pending.append((batch, _decode_task.remote(batch, max_pixels)))
        if len(pending) >= ahead:
            yield _take(*pending.popleft(), max_pixels)
    while pending:
        yield _take(*pending.popleft(), max_pixels)


def _take(batch: list[ItemPlan], ref, max_pixels: int) -> LoadedBatch:
    try:
        loaded = ray.get(ref)
    except ray.exceptions.RayError:  # its worker died DECODE_RETRIES + 1 times: find the file that kills it
        log.warning("a decode task died %d times; decoding its %d item(s) one by one", DECODE_RETRIES + 1, len(batch))
        loaded = _recover(batch, max_pixels)
    pixels = None if loaded.pixels is None else loaded.pixels.copy()  # the object store's copy is read-only
    return replace(loaded, pixels=pixels)


def _recover(batch: list[ItemPlan], max_pixels: int) -> LoadedBatch:
    parts, failures = [], []
    refs = [_decode_alone.remote([item], max_pixels) for item in batch]
    for item, ref in zip(batch, refs, strict=True):
        try:
            one = ray.get(ref)
        except ray.exceptions.RayError as exc:
            failures.append((item, f"the decoder crashed on this file ({type(exc).__name__}); check or remove it"))
            continue
        failures += one.failures
        parts.append(one)
    return join_batches(parts, failures)


@dataclass
class _Actor:
    """The driver's view of one encoder actor."""

    name: str
    handle: ray.actor.ActorHandle
    tasks: int = 0  # shard tasks handed to it and not yet returned
    processed: int = 0
    pid: int = 0
    started: float = field(default_factory=time.monotonic)

    def progress(self) -> DeviceProgress:
        return DeviceProgress(self.name, self.pid, self.processed, self.processed / (time.monotonic() - self.started))


class _Driver:
    """Groups planned batches into shard tasks, hands them out, commits what comes back."""

    def __init__(self, engine: RayEngine, stages: Stages, run: Run):
        self.stages, self.run_, self.manifest = stages, run, run.manifest
        self.actors: list[_Actor] = []
        self.in_flight: dict = {}  # object ref -> (actor, task)
        self.target = FIRST_TASK_ITEMS  # items per task, from the bytes an item takes once a shard is known
        store = stages.store
        self.next_index = first_free_shard_index(self.manifest, store)
        self.reserved = self.next_index
        gpus = cluster_gpus()
        cpus = int(ray.cluster_resources().get("CPU", 1))
        spec = {
            "gpu": gpus > 0,
            "root": str(self.manifest.root),
            "fingerprint": self.manifest.fingerprint(store),
            "batch_size": run.batch_size,
            "vram_budget": run.vram_budget,
            "known": self.manifest.get_meta(AUTO_BATCH_META.format(store=store)) or {},
            "max_pixels": engine.max_pixels,
            "decode_ahead": max(2, cpus // max(1, gpus)),  # one decode task per core of the actor's share
        }
        resources = {"num_gpus": 1, "num_cpus": GPU_ACTOR_CPUS} if gpus else {"num_cpus": CPU_ACTOR_CPUS}
        cls = ray.remote(EncoderActor).options(
            **resources, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS, max_concurrency=1
        )
        for k in range(max(1, gpus)):
            self.actors.append(_Actor(f"ray:{'gpu' if gpus else 'cpu'}#{k}", cls.remote(stages, spec)))

    def run(self, batches: Iterable[list[ItemPlan]]) -> None:
        tasks = self._tasks(iter(batches))
        exhausted = False
        while True:
            for actor in sorted(self.actors, key=lambda a: a.tasks):
                while not exhausted and actor.tasks < TASKS_AHEAD:
                    task = next(tasks, None)
                    if task is None:
                        exhausted = True
                        break
                    self.in_flight[actor.handle.encode.remote(task)] = (actor, task)
                    actor.tasks += 1
            if not self.in_flight:
                return
            done, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=WAIT_SECONDS)
            for ref in done:
                actor, task = self.in_flight.pop(ref)
                actor.tasks -= 1
                self._commit(actor, task, _get(ref))

    def stop(self) -> None:
        for actor in self.actors:
            ray.kill(actor.handle, no_restart=True)
        self.actors, self.in_flight = [], {}

    def _tasks(self, batches: Iterator[list[ItemPlan]]) -> Iterator[ShardTask]:
        group: list[list[ItemPlan]] = []
        for batch in batches:
            group.append(batch)
            if sum(len(b) for b in group) >= self.target:
                yield self._task(group)
                group = []
        if group:
            yield self._task(group)

    def _task(self, group: list[list[ItemPlan]]) -> ShardTask:
        if self.next_index >= self.reserved:  # reserved before use: a later run starts past every name handed out
            self.reserved = self.next_index + RESERVE_SHARDS
            self.manifest.set_meta(f"next_shard:{self.stages.store}", self.reserved)
        keys = [item.key for batch in group for item in batch]
        task = ShardTask(self.next_index, group, self.manifest.sources(self.stages.store, keys))
        self.next_index += 1
        return task

    def _commit(self, actor: _Actor, task: ShardTask, result: TaskResult) -> None:
        run, store = self.run_, self.stages.store
        if result.info is not None:
            run.manifest.commit_shard(store, result.info, result.rows)
            count_commit(run.summary, result.info, result.rows)
            per_item = result.info.bytes / max(1, len(result.rows))
            self.target = max(1, min(MAX_TASK_ITEMS, int(self.stages.shard_bytes / per_item)))
        record_failures(run.manifest, store, run.summary, result.failures)
        if result.found:
            meta_key = AUTO_BATCH_META.format(store=store)
            run.manifest.set_meta(meta_key, (run.manifest.get_meta(meta_key) or {}) | result.found)
        run.summary.oom_splits += result.oom_splits
        run.summary.fp32_redos += result.upcasts
        finished = len(result.rows) + len(result.failures)
        actor.processed += finished
        actor.pid = result.pid
        run.report(finished, None, tuple(a.progress() for a in self.actors))


def _get(ref) -> TaskResult:
    """A task's result; its own error (a full disk, a bad model) as the one clear line it would be locally."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, CachebuildError):
            raise exc.cause from None
        raise CacheError(f"an encoder task failed: {exc.cause!r}; committed shards are kept: run again") from None
    except ray.exceptions.RayActorError as exc:
        raise CacheError(
            f"an encoder actor died {ACTOR_RESTARTS + 1} times ({type(exc).__name__}); committed shards are kept: "
            "run the same command again to continue"
        ) from None
