"""The device process of ``engines.devices``: one model on one device, the one-device loop, a writer thread
that writes shards and has the parent commit them.

It reads batches from its pipe until a drain (encode what it holds, commit its open shard, then wait for
more) or the end; it sends back ``("encoded", n, device bytes)`` after each batch, ``("commit", shard info,
rows)`` for each durable shard, ``("fail", [(key, reason)])``, ``("meta", key, value)`` for a batch size
found, and ``("done", stats)`` or ``("error", pickled exception)`` last. It dies with its parent.
"""

from __future__ import annotations

import contextlib
import pickle
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection

from cachebuild.cache.files import ShardInfo
from cachebuild.cache.store import RunSummary, ShardSink
from cachebuild.engines.base import Run, Stages
from cachebuild.images.plan import ItemPlan
from cachebuild.images.workers import die_with_parent

DRAIN = "drain"  # from the parent: nothing more for now; encode what you hold and commit your open shard
DEVICE_COUNTS = ("oom_splits", "fp32_redos", "fp32_conversions", "allocator_trims")  # RunSummary counts a device
# process adds up and sends with ("done", stats)


@dataclass
class DeviceSpec:
    """What a device process needs to run its share."""

    index: int
    device: str
    stages: Stages
    workers: int
    max_pixels: int
    threads: int  # torch threads on a CPU device: the cores shared out between the CPU devices
    batch_size: int | None
    vram_budget: int | None
    known: dict  # batch sizes found by earlier runs
    first_index: int  # shard stripes: first_index, first_index + index_step, ...
    index_step: int
    root: str


def device_main(conn: Connection, parent_pid: int, spec: DeviceSpec) -> None:
    die_with_parent(parent_pid)
    lock = threading.Lock()

    def send(msg) -> None:
        with lock:
            conn.send(msg)

    try:
        stats = _encode_share(conn, send, spec)
        send(("done", stats))
    except BaseException as exc:  # reported to the parent, which raises it as its own
        with contextlib.suppress(Exception):
            send(("error", _pickle_error(exc)))
        raise SystemExit(1) from None
    finally:
        conn.close()


def _encode_share(conn: Connection, send, spec: DeviceSpec) -> dict:
    import torch

    from cachebuild.encode import free_device_memory, use_device
    from cachebuild.engines.device import prefer_expandable_segments
    from cachebuild.engines.local import add_encoder_counts, drive_device, open_sizer, sized
    from cachebuild.engines.writer import WriterThread
    from cachebuild.images.load import iter_batches

    prefer_expandable_segments()  # before anything starts CUDA
    device = use_device(torch.device(spec.device))  # first: a process for cuda:1 opens no context on GPU 0
    if device.type == "cpu":
        torch.set_num_threads(spec.threads)
    summary = RunSummary(spec.stages.store, spec.root)
    run = Run(None, summary, spec.batch_size, spec.vram_budget)
    run.report = lambda n, memory, _: send(("encoded", n, memory))
    sizer, budget = open_sizer(device, run, spec.stages.sizing_key, spec.known, lambda k, v: send(("meta", k, v)))
    encoder = spec.stages.open_encoder(device)
    sizer.peak = encoder.peak  # used only where device memory is measured

    def handle(sink, work) -> None:
        if work is DRAIN:
            sink.flush()
        else:
            spec.stages.write(sink, work)

    more = True

    def tasks() -> Iterator[list[ItemPlan]]:
        """Batches up to the next drain (or the end): the decode look-ahead then empties."""
        nonlocal more
        while (msg := conn.recv()) != DRAIN:
            if msg is None:
                more = False
                return
            yield msg

    with WriterThread(lambda: _remote_sink(spec, summary, send), handle, device) as writer:
        while more:
            decoded = iter_batches(sized(tasks(), sizer, device), spec.workers, spec.max_pixels)
            drive_device(decoded, encoder, device, writer.put, run, budget)
            writer.put(DRAIN)  # after every batch of this stretch: the open shard is committed
    add_encoder_counts(summary, encoder)
    stats = {name: getattr(summary, name) for name in DEVICE_COUNTS}
    sizer.peak = None  # it holds the encoder through its bound method
    del encoder
    free_device_memory(device)
    return stats


class _RemoteSink(ShardSink):
    """A device process's sink: writes shards itself, has the parent commit them and record failures."""

    def __init__(self, send, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._send = send

    def commit(self, info: ShardInfo, rows: list) -> None:
        self._send(("commit", info, rows))

    def fail(self, failures: list[tuple[str, str]]) -> None:
        if failures:
            self._send(("fail", failures))


@contextlib.contextmanager
def _remote_sink(spec: DeviceSpec, summary: RunSummary, send):
    from pathlib import Path

    from cachebuild.cache.manifest import Manifest

    stages = spec.stages
    with (
        Manifest.open(Path(spec.root), read_only=True) as manifest,
        _RemoteSink(
            send, manifest, stages.store, stages.fmt, stages.shard_bytes, stages.header, summary,
            first_index=spec.first_index, index_step=spec.index_step,
        ) as sink,
    ):  # fmt: skip
        yield sink


def _pickle_error(exc: BaseException) -> bytes:
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:
        return f"{type(exc).__name__}: {exc}".encode()
