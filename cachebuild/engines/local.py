"""The local engine: decode in worker processes of this machine, encode on one device in this process.

An engine decides *where* a job's stages run; the stages themselves are the job's (``engines.base``). The
engine decodes the batches a bounded number ahead (``images.load.iter_batches``: ``workers +
PREFETCH_BATCHES`` in flight) and drives the device so that it never waits for the host:

* the next batch is staged (pinned, copied on a side stream, in a staging thread) while the current one
  encodes; the device is read once per batch (whether each item's outputs are finite);
* outputs leave by non-blocking copies, and everything after them (casts, checks, shards, hashing, fsync,
  the manifest commit) happens in the writer thread (``engines.writer``), behind a bounded queue;
* no cache flush on the way: cached device blocks are given back only past the memory budget (plus a
  margin, counted as ``allocator_trims``), after a batch-size search and at the end of the run, when nothing
  holds the model any more: nothing of a run stays on the device.

The batches are read in this process, so a planner may use the manifest; the writer commits through its
own connection, so the manifest keeps one writer of shards. A decode worker that dies (OOM killer, codec
crash) costs at most its batch: the pool is restarted and only a file that kills its decoder again fails,
as a failed item; the workers die with this process.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from cachebuild.engines.base import Encoded, Run, Stages, StageTimes, merge_summary, timed
from cachebuild.images.load import LoadedBatch, iter_batches
from cachebuild.images.plan import ItemPlan

BatchFn = Callable[[LoadedBatch], None]  # encode one decoded batch and hand its outputs to the store
AUTO_BATCH_META = "auto_batch:{store}"  # manifest meta key of the batch sizes --batch-size auto found


@dataclass(frozen=True)
class LocalEngine:
    """One device, decode workers on this machine.

    Example:
        >>> LocalEngine(workers=2, max_pixels=178_956_970).run(batches, stages, run)
    """

    workers: int  # decode processes; 0 decodes in this process
    max_pixels: int  # decompression-bomb limit handed to the decoder
    device: str | None = None  # None: the best available (encode.pick_device)

    def plan_batch_size(self, batch_size: int | None) -> int:
        """The batch the planner makes: ``batch_size``, or under auto (None) the largest the device may take,
        which the device loop then cuts to the size found for each shape."""
        return batch_size or planning_batch([self.device])

    def run(self, batches: Iterable[list[ItemPlan]], stages: Stages | BatchFn, run: Run | None = None) -> None:
        """Decode, encode and write ``batches``; with a plain function instead of stages, call it with each
        decoded batch, in order (what a job without a device needs).

        ``batches`` is consumed lazily, a bounded number ahead of the device (a generator that plans as it
        goes keeps planning memory bounded too); it is iterated in this process, so it may use the manifest.
        """
        if run is None:
            for loaded in iter_batches(batches, self.workers, self.max_pixels):
                stages(loaded)
            return
        from cachebuild.encode import free_device_memory, pick_device, use_device
        from cachebuild.engines.device import prefer_expandable_segments

        prefer_expandable_segments()
        device = use_device(pick_device(self.device))
        known = run.manifest.get_meta(AUTO_BATCH_META.format(store=stages.store))
        sizer, budget = open_sizer(device, run, stages.sizing_key, known, _meta_recorder(run.manifest, stages.store))
        encoder = stages.open_encoder(device)
        run.summary.model_loaded = True
        sizer.peak = encoder.peak  # used only where device memory is measured (a budget is known)
        part = type(run.summary)(run.summary.store, run.summary.out)  # the writer thread's own counts
        run.live.append(part)
        try:
            writer = WriterThreadFor(stages, run.manifest.root, part, run.times, run.manifest.remote, device)
            with writer:
                decoded = iter_batches(sized(batches, sizer, device), self.workers, self.max_pixels)
                drive_device(decoded, encoder, device, writer.put, run, budget)
        finally:
            run.live.remove(part)
            merge_summary(run.summary, part)
            add_encoder_counts(run.summary, encoder)
            sizer.peak = None  # its bound method holds the encoder, and with it the model: let go before the trim
            del encoder
            free_device_memory(device)  # nothing of the model is left on the device when the run returns


def planning_batch(devices: list[str | None]) -> int:
    """The planner's batch under ``--batch-size auto``: the search's ceiling where a device will search, the
    fixed CPU size where none will."""
    from cachebuild.encode import pick_device
    from cachebuild.engines.batchsize import AUTO_BATCH_MAX, CPU_AUTO_BATCH

    return AUTO_BATCH_MAX if any(pick_device(d).type == "cuda" for d in devices) else CPU_AUTO_BATCH


def add_encoder_counts(summary, encoder) -> None:
    """The encoder's guard counts into ``summary``."""
    summary.oom_splits += encoder.oom_splits
    summary.fp32_redos += encoder.upcasts
    summary.fp32_conversions += getattr(encoder, "fp32_conversions", 0)


def drive_device(
    decoded: Iterator[LoadedBatch], encoder, device, put: Callable[[Encoded], None], run: Run, budget: int | None
) -> None:
    """The device loop: stage batch i + 1 (in the staging thread), encode batch i, queue its outputs' way to
    the host, hand it on. The device is read once per batch (the encoder's finite flags); nothing else here
    waits for it."""
    from cachebuild.encode import device_memory_bytes
    from cachebuild.engines.device import DeviceStreams, HostOutputs, Stager, trim_if_over

    streams, times = DeviceStreams(device), run.times
    with Stager(streams) as stager:
        ahead = _submit(stager, timed(times, "decode", decoded))
        while ahead is not None:
            start = time.perf_counter()
            loaded, staged = ahead.result()  # normally staged already, while the previous batch encoded
            if times:
                times.add("copy_in", start)
            ahead = _submit(stager, timed(times, "decode", decoded))  # pinned and copied while this one encodes
            outputs = HostOutputs([], None)
            if staged is not None:
                start = time.perf_counter()
                raw = encoder.encode_raw(staged.wait())
                start = times.add("encode", start) if times else start
                outputs = streams.to_host(raw)
                del raw
                if times:
                    times.add("copy_out", start)
            start = time.perf_counter()
            put(Encoded(loaded.items, outputs, loaded.failures, loaded.alpha))  # alpha masks never visit the device
            if times:
                times.add("write_wait", start)
                times.images += len(loaded.items)
            if trim_if_over(device, budget):
                run.summary.allocator_trims += 1
            run.report(len(loaded.items) + len(loaded.failures), device_memory_bytes(device), ())


def _submit(stager, loaded: LoadedBatch | None):
    return None if loaded is None else stager.submit(loaded)


def sized(batches: Iterable[list[ItemPlan]], sizer, device) -> Iterator[list[ItemPlan]]:
    """The planner's bucket batches cut to the device's batch size for their shape (searched on first sight
    under ``--batch-size auto``); the cached blocks a search leaves are given back at once."""
    from cachebuild.encode import free_device_memory
    from cachebuild.engines.batchsize import rechunk

    for batch in batches:
        before = sizer.searches
        size = sizer.size(batch[0].bucket)
        if sizer.searches != before:
            free_device_memory(device)
        yield from rechunk(batch, size)


def open_sizer(device, run: Run, key: str, known: dict | None, remember: Callable[[str, dict], None]):
    """The run's BatchSizer for ``device`` and the device-memory budget in bytes (None where memory is not
    measured); the caller sets ``sizer.peak`` to the encoder's once the model is loaded (CUDA only)."""
    import torch

    from cachebuild.engines.batchsize import BatchSizer, default_budget

    budget = None
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = run.vram_budget if run.vram_budget is not None else default_budget(free, total)
    label = (torch.cuda.get_device_name(device) if device.type == "cuda" else device.type) + f"|{key}"
    return BatchSizer(run.batch_size, label=label, budget=budget, known=known, remember=remember), budget


def _meta_recorder(manifest, store: str) -> Callable[[str, dict], None]:
    key = AUTO_BATCH_META.format(store=store)

    def remember(name: str, value: dict) -> None:
        manifest.set_meta(key, (manifest.get_meta(key) or {}) | {name: value})

    return remember


class WriterThreadFor:
    """The writer thread of a one-device run: its own manifest connection, its own ShardSink."""

    def __init__(self, stages: Stages, root, summary, times: StageTimes | None = None, remote=None, device=None):
        from cachebuild.engines.writer import WriterThread

        def write(sink, encoded: Encoded) -> None:
            start = time.perf_counter()
            stages.write(sink, encoded)
            if times:
                times.add("write", start)

        self._thread = WriterThread(lambda: _local_sink(stages, root, summary, remote), write, device)

    def put(self, encoded: Encoded) -> None:
        self._thread.put(encoded)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._thread.__exit__(*exc)


@contextlib.contextmanager
def _local_sink(stages: Stages, root, summary, remote=None):
    """The writer thread's sink on its own manifest connection; a remote output (``cache.remote``) uploads each
    shard before its commit and publishes snapshots from this connection while the thread runs."""
    from cachebuild.cache.manifest import Manifest
    from cachebuild.cache.store import ShardSink

    with (
        Manifest.open(root, create=False) as manifest,
        remote.publishing_from(manifest) if remote is not None else contextlib.nullcontext(),
        ShardSink(manifest, stages.store, stages.fmt, stages.shard_bytes, stages.header, summary) as sink,
    ):
        yield sink
