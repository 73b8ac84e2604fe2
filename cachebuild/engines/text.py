"""Text encoders on one device for a whole run, and the device loop over chunks of captions.

Every engine runs text the same way: a device (this process's, a device process's, a Ray actor's) opens an
``EncoderSet`` once, which reads each encoder's weights from disk once, and ``drive_text`` runs every chunk of
captions it is handed through them. The number of loads does not depend on the number of chunks.

Where the encoders live between their turns is decided once, when the set opens:

* **together** (the CPU and MPS, whose memory is the host's; a CUDA device whose free memory holds every encoder
  plus one activation margin): all on the device for the whole run. Each batch goes through every encoder and
  straight on to the shard, so no output is held back. In bf16 Flux's T5-XXL and CLIP-L take about 10 GB, SD3's
  three encoders about 11 GB, HiDream's four about 28 GB: a 16 GB, 16 GB and 40 GB card.
* **turns** (a CUDA device that cannot hold them all): each encoder is kept in host memory, page-locked where the
  host has room (``offload.PIN_HOST_SHARE``, as for streamed weights), and copied to the device for its turn over
  one chunk of captions, then dropped there. Device memory stays at the largest encoder plus one batch. The
  chunk's outputs of every encoder but the last wait in host memory (``--chunk-mb``); the last one's go straight
  to the shard.
* A model streamed block by block (``--offload``) lives in host memory either way.

Why these and not a reload per chunk or a spill, measured on a CPU with ``benchmarks/bench_textenc.py`` (T5 at
T5-XXL's width): reading weights from disk and building the model ran at 0.3-0.6 GiB/s here, a copy of the same
weights already in host memory at about 1 GiB/s (a page-locked host-to-device copy runs at about 25 GB/s on PCIe
4). At real sizes T5-XXL's 9.5 GB take tens of seconds from disk against about 0.4 s (page-locked) to 1 s
(pageable) from host memory, for a chunk (512 Flux captions at the default 2 GiB) that keeps an H100 busy for
several seconds: a reload per chunk made the run several times longer, a turn costs a few per cent of it, and
together nothing. Spilling the earlier encoders' outputs to a temporary store so that each encoder runs once over
the whole set would save those copies, but it commits nothing until the last encoder runs (a kill loses every
earlier pass), needs a run-wide record of the captions in flight to stay deduplicated, and writes and reads
13-37 % of the output again for SD3 and SDXL. Host memory holds the family's encoders (HiDream's 28 GB in
turns) and one chunk, neither of which grows with the number of captions.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from cachebuild.config import Offload
from cachebuild.encode import GuardedForward, free_device_memory
from cachebuild.engines.base import Encoded
from cachebuild.engines.device import HostOutputs
from cachebuild.families.text import EncoderSpec, choose_offload, encoder_forward, load_encoder
from cachebuild.hub import weight_files
from cachebuild.offload import (
    ACTIVATION_MARGIN_BYTES,
    ACTIVATION_MARGIN_FRACTION,
    PIN_HOST_SHARE,
    fp32_modules,
    free_bytes,
    stream_from_host,
    weight_bytes,
)

log = logging.getLogger(__name__)

PAD_MULTIPLE = 64  # masked (T5) inputs are padded to a multiple of this, not to max length: with the mask the
# outputs at real tokens do not depend on the padding, and most captions are far shorter than 512 tokens
GUARD_COUNTS = ("oom_splits", "upcasts", "fp32_conversions")  # what a GuardedForward counts, summed over turns


@dataclass
class TextItem:
    """One distinct caption on its way to a device: its tokens for every encoder and the items that share it."""

    key: str  # its first item key: the engines track the work they hand out by it
    tid: str  # text id: the hash of the caption, the name its tensors are stored under
    text: str
    keys: list[str]  # every pending item with this caption
    tokens: dict[str, tuple[np.ndarray, np.ndarray]]  # encoder name -> ((L,) int32 ids, (L,) bool mask)
    truncated: tuple[str, ...]  # encoders whose max length cut the caption
    pad: tuple[int, ...] = ()  # padded lengths of its masked encoders: a batch never mixes two
    nbytes: int = 0  # its stored outputs, every encoder's

    def real(self, name: str) -> int:
        """Real tokens (special tokens included) of the caption for encoder ``name``."""
        return int(self.tokens[name][1].sum())


@dataclass
class EncoderSet:
    """The encoders of one device for a run, each read from disk once (see the module docstring).

    Example:
        >>> with EncoderSet(specs, torch.device("cuda")) as encoders:
        ...     drive_text(encoders, chunks, put, step, batch_size=16, out_dtype=torch.float16)
    """

    specs: list[EncoderSpec]
    device: torch.device
    offload: Offload = Offload.NEVER
    together: bool | None = None  # None: decided from the device's free memory
    loads: int = 0  # weights read from disk
    streamed: list[str] = field(default_factory=list)  # encoders streamed from host memory block by block
    pinned: bool = False  # turns: whether the host copies are page-locked

    def __post_init__(self) -> None:
        streams = {s.name: choose_offload(s, self.device, self.offload) for s in self.specs}
        held = [s for s in self.specs if not streams[s.name]]
        if self.together is None:
            self.together = _fit_together(held, self.device)
        self.pinned = not self.together and _may_pin(held, self.device)
        if not self.together:
            log.info("the text encoders do not fit %s together: each takes its turn from host memory", self.device)
        self._host: dict[str, list] = {}  # turns: name -> (host copy, where the model holds it) per weight
        self._models: dict[str, torch.nn.Module] = {}
        self._guards: dict[str, GuardedForward] = {}  # of the encoders on the device now (under turns: in its turn)
        self._counts = dict.fromkeys(GUARD_COUNTS, 0)  # of the guards of turns already over
        cpu = torch.device("cpu")
        for spec in self.specs:
            if streams[spec.name]:
                model = stream_from_host(load_encoder(spec, cpu), self.device)
                self.streamed.append(spec.name)
            elif self.together:
                model = load_encoder(spec, self.device)
            else:
                model = load_encoder(spec, cpu)
                self._host[spec.name] = _host_copies(model, self.pinned)
            self.loads += 1
            self._models[spec.name] = model
            if spec.name not in self._host:
                self._guards[spec.name] = self._guard(spec)

    @property
    def oom_splits(self) -> int:
        return self._count("oom_splits")

    @property
    def upcasts(self) -> int:
        return self._count("upcasts")

    @property
    def fp32_conversions(self) -> int:
        return self._count("fp32_conversions")

    @contextlib.contextmanager
    def turn(self, spec: EncoderSpec) -> Iterator[None]:
        """``spec``'s encoder on the device for the block (a copy from host memory under turns), gone after it."""
        copies = self._host.get(spec.name)
        if copies is None:  # on the device for the run, or streamed
            yield
            return
        for host, places in copies:
            on_device = host.to(self.device, non_blocking=True)  # from page-locked memory: asynchronous
            if isinstance(host, torch.nn.Parameter):
                on_device = torch.nn.Parameter(on_device, requires_grad=False)
            for table, name in places:
                table[name] = on_device
        self._guards[spec.name] = self._guard(spec)  # its fp32 redo knows this turn's tensors, and dies with them
        try:
            yield
        finally:
            guard = self._guards.pop(spec.name)
            for name in GUARD_COUNTS:
                self._counts[name] += getattr(guard, name, 0)
            for host, places in copies:
                for table, name in places:
                    table[name] = host  # the device copy is dropped; the host copy was never changed
            # no gc or cache flush here (a gc pass takes a second in a process holding a model): the copy's blocks
            # go back to the caching allocator, where the next encoder's weights take them

    def encode(self, spec: EncoderSpec, items: list[TextItem], out_dtype: torch.dtype) -> list[dict | str]:
        """One batch through one encoder: per item its outputs at ``out_dtype`` on the host, or a failure reason."""
        width = padded_length(spec, max(i.real(spec.name) for i in items)) if spec.trim else spec.max_length
        ids = torch.from_numpy(np.stack([i.tokens[spec.name][0][:width] for i in items])).long()  # (B, width)
        mask = torch.from_numpy(np.stack([i.tokens[spec.name][1][:width] for i in items])).long()
        results = self._guards[spec.name]((ids, mask))
        return [r if isinstance(r, str) else {k: v.to(out_dtype) for k, v in r.items()} for r in results]

    def close(self) -> None:
        """Drop every model (host and device)."""
        for guard in self._guards.values():
            for name in GUARD_COUNTS:
                self._counts[name] += getattr(guard, name, 0)
        self._guards.clear()
        self._models.clear()
        self._host.clear()
        free_device_memory(self.device)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """Every encoder's parameters (what a ``keep.ModelKeeper`` counts a kept set by)."""
        for model in self._models.values():
            yield from model.parameters()

    def _guard(self, spec: EncoderSpec) -> GuardedForward:
        model = self._models[spec.name]
        forward = encoder_forward(model, spec, self.device)
        return GuardedForward(model, self.device, spec.dtype.torch, forward, spec.name)

    def _count(self, name: str) -> int:
        return self._counts[name] + sum(getattr(g, name, 0) for g in self._guards.values())

    def __enter__(self) -> EncoderSet:
        return self

    def __exit__(self, *_) -> None:
        self.close()


Step = Callable[[list[TextItem], bool], None]  # (items, done): items went through one more encoder; done: the last


def drive_text(
    encoders: EncoderSet,
    chunks: Iterable[list[TextItem]],
    put: Callable[[Encoded], None],
    step: Step,
    batch_size: int,
    out_dtype: torch.dtype,
) -> None:
    """Run each chunk through every encoder and hand each batch's outputs to ``put`` (the writer).

    Batches never cross a chunk or mix padded lengths (``batches``), so they are the same whatever engine runs
    them. Together: batch by batch through every encoder. Turns: each encoder in its turn over the whole chunk;
    the outputs of all but the last wait for it.
    """
    specs = encoders.specs
    for chunk in chunks:
        spans = list(batches([i.pad for i in chunk], 0, len(chunk), batch_size))
        if encoders.together:
            for b, e in spans:
                outputs: list[dict | str] = [{} for _ in range(e - b)]
                for spec in specs:
                    _merge(outputs, encoders.encode(spec, chunk[b:e], out_dtype))
                    if spec is not specs[-1]:
                        step(chunk[b:e], False)
                put(Encoded(chunk[b:e], HostOutputs(outputs, None), []))
                step(chunk[b:e], True)
            continue
        held: list[dict | str] = [{} for _ in chunk]
        for spec in specs[:-1]:
            with encoders.turn(spec):
                for b, e in spans:
                    held[b:e] = _merge(held[b:e], encoders.encode(spec, chunk[b:e], out_dtype))
                    step(chunk[b:e], False)
        with encoders.turn(specs[-1]):
            for b, e in spans:
                outputs = _merge(held[b:e], encoders.encode(specs[-1], chunk[b:e], out_dtype))
                held[b:e] = [{}] * (e - b)  # the writer has them now
                put(Encoded(chunk[b:e], HostOutputs(outputs, None), []))
                step(chunk[b:e], True)


def batches(pads: list[tuple], lo: int, hi: int, size: int) -> Iterator[tuple[int, int]]:
    """[b, e) ranges of at most ``size`` inside [lo, hi) that never mix padded lengths."""
    b = lo
    while b < hi:
        e = b + 1
        while e < hi and e - b < size and pads[e] == pads[b]:
            e += 1
        yield b, e
        b = e


def padded_length(spec: EncoderSpec, tokens: int) -> int:
    """Masked encoders run at the caption's length (and the rows kept past it) rounded up to PAD_MULTIPLE, not
    at max length; a caption with no tokens (HunyuanVideo 1.5's ByT5 without quoted text) at PAD_MULTIPLE; a
    left-padded encoder at max length, where the pipeline puts the real tokens."""
    if spec.left_pad:
        return spec.max_length
    return min(spec.max_length, -(-max(1, tokens + spec.extra_rows) // PAD_MULTIPLE) * PAD_MULTIPLE)


def _merge(outputs: list[dict | str], results: list[dict | str]) -> list[dict | str]:
    """Each item's outputs so far joined with one more encoder's; a failure stays the item's result."""
    for j, res in enumerate(results):
        if isinstance(outputs[j], dict):
            outputs[j] = res if isinstance(res, str) else outputs[j] | res
    return outputs


def _fit_together(specs: list[EncoderSpec], device: torch.device) -> bool:
    """Whether ``specs``' weights at their compute dtypes and one activation margin fit the device's free memory
    (always on the CPU and MPS: their memory is the host's, so there is nothing to move)."""
    if device.type != "cuda" or len(specs) < 2:
        return True
    weights = [_weights(s) for s in specs]
    margin = max(ACTIVATION_MARGIN_BYTES, int(max(weights) * ACTIVATION_MARGIN_FRACTION))
    return sum(weights) + margin <= (free_bytes(device) or 0)


def _may_pin(specs: list[EncoderSpec], device: torch.device) -> bool:
    """Page-locked host copies under turns, where they take at most ``PIN_HOST_SHARE`` of the available memory
    (page-locked memory cannot be swapped; pageable weights copy at about half speed)."""
    if device.type != "cuda" or not specs:
        return False
    import psutil

    return sum(_weights(s) for s in specs) <= PIN_HOST_SHARE * psutil.virtual_memory().available


def _weights(spec: EncoderSpec) -> int:
    """The encoder's weight bytes as loaded (its modules kept in fp32 counted at fp32)."""
    dtype = spec.dtype.torch
    return weight_bytes(weight_files(spec.folder), dtype, fp32_modules(spec.cls, dtype))


def _host_copies(model: torch.nn.Module, pin: bool) -> list[tuple[torch.Tensor, list[tuple[dict, str]]]]:
    """Every parameter and buffer of ``model`` as (its host copy, every (module table, name) that holds it: tied
    weights sit in two), the model now holding the copies: page-locked, or a private copy of the weights (not
    pages of the weight files that the loader may have mapped, which the kernel could drop and read again)."""
    found: dict[int, tuple[torch.Tensor, list[tuple[dict, str]]]] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None:
                    found.setdefault(id(t), (t, []))[1].append((table, name))
    for t, _ in found.values():
        t.data = t.data.pin_memory() if pin else t.data.clone()
    return list(found.values())
