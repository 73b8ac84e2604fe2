"""Device mechanics shared by every engine: pixels in, outputs out, without the device waiting on the host.

* In: a decoded batch is copied into pinned (page-locked) host memory and from there to the device on a
  side stream, both in a staging thread (``Stager``), while the previous batch still encodes on the main
  stream; the encoder's stream waits for the copy's event, not the host. Pageable memory would make the copy
  synchronous whatever ``non_blocking`` says.
* Out: each output is copied into a pinned host buffer on a second side stream; the host waits for that
  copy's event only when it needs the values (in the writer thread), never the device loop.
* Memory: no cache flush per batch or bucket; the allocator's cached blocks are given back only when the
  reserved memory crosses the run's budget by a margin (``trim_if_over``) and when a run ends. Outputs leave
  the pinned buffers they were copied into as soon as they have landed (``HostOutputs.ready``).

On the CPU every step is the plain, synchronous thing: the same calls, no streams, no pinning.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cachebuild.encode import free_device_memory

ALLOC_CONF = "expandable_segments:True"  # CUDA allocator setting: segments grow in place, so batches of many
# bucket shapes reuse one region instead of leaving a cached block per shape (what empty_cache once cleaned)
ALLOC_CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # the current name, and the one before it
NEW_ALLOC_CONF_TORCH = (2, 11)  # torch that reads the allocator settings from PYTORCH_ALLOC_CONF: 2.9 and 2.10
# warn that the old name is deprecated, but 2.9's CUDA allocator ignored expandable_segments given by the new one
# (pytorch/pytorch#183387, seen working again in 2.11), so before 2.11 the old name is the one that works
TRIM_MARGIN_SHARE = 0.05  # the allocator may hold this share of the budget past it before cached blocks are given
TRIM_MARGIN_MIN_BYTES = 256 << 20  # back (at least this much): a batch sized close to the budget leaves the
# reserved memory a little over it (rounding, one cached block per shape), and trimming then (gc, empty_cache, a
# device sync) would happen after nearly every batch while giving back almost nothing


def prefer_expandable_segments() -> None:
    """Ask for ``ALLOC_CONF`` in the variable the installed torch reads, unless the user set either variable, and
    only before CUDA starts (later it is ignored)."""
    if any(name in os.environ for name in ALLOC_CONF_VARIABLES) or torch.cuda.is_initialized():
        return
    os.environ[alloc_conf_variable(torch.__version__)] = ALLOC_CONF


def alloc_conf_variable(version: str) -> str:
    """The allocator-settings variable to set for torch ``version`` ("2.11.0+cu128" -> PYTORCH_ALLOC_CONF)."""
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    return ALLOC_CONF_VARIABLES[0] if parts >= NEW_ALLOC_CONF_TORCH else ALLOC_CONF_VARIABLES[1]


@dataclass
class Staged:
    """A batch on its way to the device: ``pixels`` may still be copying until ``wait`` returns on the
    encoder's stream."""

    pixels: torch.Tensor  # (B, H, W, 3) uint8, on the device (or the CPU tensor itself on the CPU)
    event: torch.cuda.Event | None  # recorded on the copy stream after the copy; None on the CPU

    def wait(self) -> torch.Tensor:
        """The pixels, safe to use on the current stream (the stream waits for the copy, the host does not)."""
        if self.event is not None:
            torch.cuda.current_stream(self.pixels.device).wait_event(self.event)
            self.pixels.record_stream(torch.cuda.current_stream(self.pixels.device))
        return self.pixels


@dataclass
class HostOutputs:
    """Outputs copied (or being copied) off the device; ``ready`` blocks until the copies have landed."""

    values: list  # per item: {name: host tensor} or a failure reason (str)
    event: torch.cuda.Event | None  # None once the values are ready (and on the CPU)

    def ready(self) -> list:
        """The values, in pageable host memory: the pinned buffers they landed in go back to the host allocator
        for the next batches rather than living as long as the shard that keeps these tensors."""
        if self.event is not None:
            self.event.synchronize()
            self.values = [_pageable(v) for v in self.values]
            self.event = None
        return self.values


def _pageable(value):
    if isinstance(value, str):
        return value
    return {name: torch.empty(t.shape, dtype=t.dtype).copy_(t) for name, t in value.items()}


class DeviceStreams:
    """The two side streams of one CUDA device (none on the CPU), and the staging and copy-out through them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.copy_in = torch.cuda.Stream(device) if self.cuda else None
        self.copy_out = torch.cuda.Stream(device) if self.cuda else None

    def stage(self, pixels: np.ndarray) -> Staged:
        """Start moving (B, H, W, 3) uint8 host pixels to the device: pinned, then copied on the side stream
        (the host does not wait for the copy). The staging thread (``Stager``) calls it, off the device loop."""
        host = torch.from_numpy(pixels)
        if not self.cuda:
            return Staged(host, None)
        host = host.pin_memory()  # one host copy into page-locked memory: the DMA engine reads it directly
        with torch.cuda.stream(self.copy_in):
            on_device = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_in)
        return Staged(on_device, event)

    def to_host(self, values: list) -> HostOutputs:
        """Copy each item's ``{name: device tensor}`` into pinned host buffers on the copy-out stream, after
        the work queued so far; failure reasons pass through."""
        if not self.cuda:
            return HostOutputs(values, None)
        self.copy_out.wait_stream(torch.cuda.current_stream(self.device))
        out = []
        with torch.cuda.stream(self.copy_out):
            for value in values:
                if isinstance(value, str):
                    out.append(value)
                    continue
                host = {}
                for name, t in value.items():
                    buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    buf.copy_(t, non_blocking=True)
                    t.record_stream(self.copy_out)  # the caching allocator keeps t until this copy is done
                    host[name] = buf
                out.append(host)
            event = torch.cuda.Event()
            event.record(self.copy_out)
        return HostOutputs(out, event)


def reserved_bytes(device: torch.device) -> int | None:
    """Device memory the allocator holds (in use or cached); None on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_reserved(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    return None


def trim_if_over(device: torch.device, budget: int | None, trim: Callable = free_device_memory) -> bool:
    """Give cached blocks back when the allocator holds more than ``budget`` bytes plus the margin
    (``TRIM_MARGIN_SHARE``); True when it did."""
    held = reserved_bytes(device)
    if budget is None or held is None:
        return False
    if held <= budget + max(TRIM_MARGIN_MIN_BYTES, int(TRIM_MARGIN_SHARE * budget)):
        return False
    trim(device)
    return True


class Stager:
    """Stages decoded batches for the device in a thread of its own (CUDA), so that pinning a batch (a host copy
    of all its pixels) and queuing its copy happen while the previous batch encodes, not on the device loop
    between two batches. On the CPU it stages at once, in the caller's thread.

    Example:
        >>> with Stager(DeviceStreams(device)) as stager:
        ...     future = stager.submit(loaded)  # later: loaded, staged = future.result()
    """

    def __init__(self, streams: DeviceStreams):
        from concurrent.futures import ThreadPoolExecutor

        from cachebuild.encode import use_device

        self.streams = streams
        self._pool = None
        if streams.cuda:  # the thread's CUDA calls (pinned memory, the copy) go to the loop's device
            init = {"initializer": use_device, "initargs": (streams.device,)}
            # one thread: batches stage in order, one ahead of the encoder (the loop submits the next batch before it
            # encodes the current one), so page-locked memory holds at most two batches of pixels
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cachebuild-stage", **init)

    def submit(self, loaded):
        """A future of ``(loaded, Staged or None)``: None where every image of the batch failed to decode."""
        from concurrent.futures import Future

        if self._pool is not None:
            return self._pool.submit(self._stage, loaded)
        done: Future = Future()
        done.set_result(self._stage(loaded))
        return done

    def _stage(self, loaded):
        return loaded, (self.streams.stage(loaded.pixels) if loaded.pixels is not None else None)

    def __enter__(self) -> Stager:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
