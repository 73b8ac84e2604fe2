"""The engine seam: what a job hands an engine, and what every engine does with it.

A job (``jobs.latents``) describes its work as stages, plain functions an engine composes:

* decode: ``images.load.load_batch`` (the same for every image job), run in decode worker processes;
* encode: ``DeviceEncoder.encode_raw``, pixels on the device to outputs still on the device;
* write: ``Stages.write(sink, encoded)``, in the writer thread: outputs on the host to shard entries
  (casts, NaN checks, metadata) and failures.

An engine decides where they run: ``LocalEngine`` (one device of this machine), ``DevicesEngine`` (every
listed device, one encoder process each). ``Stages`` is picklable, so an engine can hand it to another
process, which opens its own encoder on its own device. Whatever the engine, the manifest has one writer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

    from cachebuild.cache.manifest import Manifest
    from cachebuild.cache.store import DeviceProgress, RunSummary, ShardSink
    from cachebuild.engines.device import HostOutputs
    from cachebuild.images.plan import ItemPlan


class DeviceEncoder(Protocol):
    """A model loaded on one device."""

    oom_splits: int
    upcasts: int
    # fp32_conversions: int, where the encoder has a guard that counts them (engines read it with getattr)

    def encode_raw(self, pixels: torch.Tensor) -> list:
        """(B, H, W, 3) uint8 pixels on the device -> per item ``{name: device tensor}`` or a failure reason."""

    def peak(self, n: int, bucket: tuple[int, int]) -> int | None:
        """Peak device bytes of encoding ``n`` images of ``bucket`` (W, H); None when out of memory, or on a
        device whose memory is not measured (then ``--batch-size auto`` takes a fixed size)."""


class Stages(Protocol):
    """What a job hands an engine; picklable."""

    store: str  # the manifest store the items belong to
    fmt: str  # shard format
    shard_bytes: int
    header: dict  # every shard's header

    sizing_key: str  # what besides the device and shape decides memory per batch (compute dtype, flip)

    def open_encoder(self, device: torch.device) -> DeviceEncoder:
        """Load the model on ``device``."""

    def write(self, sink: ShardSink, encoded: Encoded) -> None:
        """Host work on one encoded batch: its entries go to ``sink.add``, its failures to ``sink.fail``."""


@dataclass
class Encoded:
    """One batch after the device: what the writer thread receives."""

    items: list[ItemPlan]  # items that decoded, in order
    outputs: HostOutputs  # per item of ``items``: host tensors (once ``ready()``) or a failure reason
    failures: list[tuple[ItemPlan, str]]  # items that failed to decode
    alpha: np.ndarray | None = None  # (B, H, W) uint8 per item of ``items``: its alpha channel, with --alpha-mask


@dataclass
class Run:
    """What an engine needs from the job's run besides the batches and the stages."""

    manifest: Manifest  # the run's manifest connection, in this thread
    summary: RunSummary  # the engine adds its counts (encoded, shards, failures, OOM splits)
    batch_size: int | None  # None: auto (engines.batchsize)
    vram_budget: int | None  # bytes; None: free memory at start less the margin
    report: Callable[[int, int | None, tuple[DeviceProgress, ...]], None] = lambda n, mem, devs: None
    # after each batch: items finished, device bytes in use (None: not measured), per-device progress
    times: StageTimes | None = None  # filled when given (benchmarks)
    live: list[RunSummary] = field(default_factory=list)  # sink summaries not yet merged into ``summary``
    # (the writer thread's), so progress can count their failures as they happen

    def failed_so_far(self) -> int:
        return self.summary.failed_now + sum(s.failed_now for s in self.live)


class Engine(Protocol):
    def run(self, batches: Iterable[list[ItemPlan]], stages: Stages, run: Run) -> None:
        """Decode, encode and write every batch; returns when every item is committed or failed."""


@dataclass
class StageTimes:
    """Seconds the device loop spent in each stage, and the writer in its own thread (benchmarks)."""

    decode: float = 0.0  # waiting for decoded batches
    copy_in: float = 0.0  # waiting for the staging thread (pinning, queuing the copy) to hand the batch over
    encode: float = 0.0  # the encoder call (on a GPU: until its outputs are known to be finite)
    copy_out: float = 0.0  # queuing the device-to-host copies
    write: float = 0.0  # in the writer thread: waiting for copies, casts, checks, shards, commits
    write_wait: float = 0.0  # the device loop blocked on a full writer queue
    images: int = 0

    def add(self, name: str, start: float) -> float:
        now = time.perf_counter()
        setattr(self, name, getattr(self, name) + now - start)
        return now


def timed(times: StageTimes | None, name: str, it: Iterator):
    """``next(it)`` (None at the end) with the wait added to ``times.<name>``."""
    start = time.perf_counter()
    value = next(it, None)
    if times is not None:
        times.add(name, start)
    return value


def merge_summary(into: RunSummary, part: RunSummary) -> None:
    """Add the counts of a sink's own summary (the writer thread's, a device process's) into the run's."""
    counts = ("encoded", "failed_now", "shards_written", "bytes_written", "oom_splits", "fp32_redos")
    for name in (*counts, "fp32_conversions", "allocator_trims"):
        setattr(into, name, getattr(into, name) + getattr(part, name))
    into.failures += part.failures
