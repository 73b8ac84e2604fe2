"""Device mechanics shared by every engine: pixels in, outputs out, without the device waiting on the host.

* In: a decoded batch is copied into pinned (page-locked) host memory and from there to the device on a
  side stream, while the previous batch still encodes on the main stream; the encoder's stream waits for
  the copy's event, not the host. Pageable memory would make the copy synchronous whatever ``non_blocking``
  says.
* Out: each output is copied into a pinned host buffer on a second side stream; the host waits for that
  copy's event only when it needs the values (in the writer thread), never the device loop.
* Memory: no cache flush per batch or bucket; the allocator's cached blocks are given back only when the
  reserved memory crosses the run's budget (``trim_if_over``) and when a run ends.

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


def prefer_expandable_segments() -> None:
    """Ask for ``ALLOC_CONF`` unless the user set the allocator up, and only before CUDA starts (later it is
    ignored)."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and not torch.cuda.is_initialized():
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF


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
    event: torch.cuda.Event | None

    def ready(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.values


class DeviceStreams:
    """The two side streams of one CUDA device (none on the CPU), and the staging and copy-out through them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.copy_in = torch.cuda.Stream(device) if self.cuda else None
        self.copy_out = torch.cuda.Stream(device) if self.cuda else None

    def stage(self, pixels: np.ndarray) -> Staged:
        """Start moving (B, H, W, 3) uint8 host pixels to the device; returns at once on CUDA."""
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
    """Give cached blocks back when the allocator holds more than ``budget`` bytes; True when it did."""
    held = reserved_bytes(device)
    if budget is None or held is None or held <= budget:
        return False
    trim(device)
    return True
