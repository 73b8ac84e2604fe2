"""Offload: run a model larger than the device's free memory with its weights in host memory, streamed in.

A 24B text encoder (Flux.2's Mistral Small 3.1, about 48 GB in bf16) or Qwen2.5-VL-7B (about 16 GB) does not fit
a 12-24 GB card. Rather than fail, such a model stays in host memory and each transformer block's weights are
copied to the device just before the block runs and dropped right after (``HostStream``). The arithmetic is the
same as with the whole model on the device, so the outputs are the same (bit for bit on one device: the same
kernels see the same weights) and offloading is not part of any fingerprint.

The copies overlap the compute: the weights sit in pinned (page-locked) host memory, where the copy engine reads
them without the host, and while block k runs, block k + 1 is copied on a side stream (the order is the one the
first forward took). Device memory holds two blocks' weights plus the activations instead of the whole model.

What it costs: every forward copies every weight across the bus once (about 2 s for 48 GB at 25 GB/s on PCIe 4
x16), hidden behind the compute where a block computes longer than its copy takes (large batches); host memory
holds the model at the compute dtype.

``--offload auto`` (the default) streams only when the model cannot fit: its weights at the compute dtype (those
of modules transformers keeps in fp32 at fp32; counted from the safetensors headers) plus an activation margin
exceed what the CUDA device has free. CPU and MPS memory is the host's, so there is nothing to gain there and
``auto`` never streams; ``always`` streams anyway (on the CPU the "device" copies are the host tensors
themselves, which exercises the same hooks in tests).
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from cachebuild.config import Offload

log = logging.getLogger(__name__)

ACTIVATION_MARGIN_BYTES = 1 << 30  # room kept free besides the weights: one batch's activations (a 512-token
# batch of 16 through a 5120-wide LLM layer is a few hundred MB), cuBLAS workspaces and allocator fragmentation.
ACTIVATION_MARGIN_FRACTION = 0.10  # ... or this share of the weights if larger: wider models have wider
# activations. A batch that still does not fit is split by encode.GuardedForward, so this only has to be close.
PIN_HOST_SHARE = 0.5  # the streamed weights are pinned when they take at most this share of the host's available
# memory: page-locked memory cannot be swapped, and pinning a 48 GB model on a 64 GB host would starve the rest
_SAFETENSORS_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1}


def should_offload(mode: Offload, device: torch.device, needed: int, free: int | None) -> bool:
    """Whether to stream the weights: ``always``; or ``auto`` on a device whose ``free`` bytes (None: not known,
    the CPU and MPS) are fewer than the ``needed`` bytes.

    Example:
        >>> should_offload(Offload.AUTO, torch.device("cuda"), needed=17 << 30, free=11 << 30)
        True
    """
    if mode is Offload.ALWAYS:
        return True
    if mode is Offload.NEVER or device.type != "cuda" or free is None:
        return False
    return needed > free


def needed_bytes(files: Iterable[Path], dtype: torch.dtype, keep_fp32: Iterable[str] = ()) -> int:
    """Device bytes a model needs resident: its weights at ``dtype`` (those of the modules named in ``keep_fp32``
    at fp32, see ``fp32_modules``) plus the activation margin."""
    weights = weight_bytes(files, dtype, keep_fp32)
    return weights + max(ACTIVATION_MARGIN_BYTES, int(weights * ACTIVATION_MARGIN_FRACTION))


def fp32_modules(cls_name: str, dtype: torch.dtype) -> tuple[str, ...]:
    """The modules a transformers class keeps in fp32 when loaded at ``dtype``: ``_keep_in_fp32_modules`` in
    fp16 (T5's ``wo``), ``_keep_in_fp32_modules_strict`` in fp16 and bf16."""
    import transformers

    cls = getattr(transformers, cls_name, None)
    keep: set[str] = set()
    if dtype == torch.float16:
        keep |= set(getattr(cls, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(cls, "_keep_in_fp32_modules_strict", None) or ())
    return tuple(sorted(keep))


def weight_bytes(files: Iterable[Path], dtype: torch.dtype, keep_fp32: Iterable[str] = ()) -> int:
    """The weights of ``files`` at ``dtype``: element counts from the safetensors headers (8 bytes of length and a
    JSON header, no tensor read), so fp32 files run in bf16 count half their size; tensors of the modules named in
    ``keep_fp32`` (a name component: ``wo`` matches ``encoder.block.0.layer.1.DenseReluDense.wo.weight``) count
    at fp32; other formats count their file size."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    keep = tuple(f".{name}." for name in keep_fp32)
    total = 0
    for path in files:
        if path.suffix != ".safetensors":
            total += path.stat().st_size
            continue
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            elements = 1
            for dim in entry["shape"]:
                elements *= dim
            floating = entry["dtype"] in ("F64", "F32", "F16", "BF16")  # loaded at the compute dtype
            size = (4 if any(k in f".{name}" for k in keep) else itemsize) if floating else None
            total += elements * (size or _SAFETENSORS_ITEMSIZE.get(entry["dtype"], 1))
    return total


def free_bytes(device: torch.device) -> int | None:
    """Bytes this process can still allocate on a CUDA device (None elsewhere): the driver's free memory plus
    the caching allocator's unused reserve, capped by ``torch.cuda.set_per_process_memory_fraction``."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    allocated = torch.cuda.memory_allocated(index)
    free += torch.cuda.memory_reserved(index) - allocated  # cached blocks are free to this process
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.6
    cap = int(total * get_fraction(index)) - allocated if get_fraction else free
    return max(0, min(free, cap))


def stream_from_host(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Keep ``model`` (loaded on the CPU) in host memory and copy its weights to ``device`` one block at a time,
    the next block while one computes (``HostStream``); returns the model, whose forward is unchanged."""
    model._cachebuild_streamed = HostStream(model, device)  # read by is_streamed, streamer_of
    return model


def is_streamed(model) -> bool:
    return streamer_of(model) is not None


def streamer_of(model) -> HostStream | None:
    return getattr(model, "_cachebuild_streamed", None)


def return_to_host(model) -> None:
    """After a forward that raised half way (out of memory), drop the device copies of the blocks that had loaded
    them (the one that failed and the one copied ahead): their hooks' post-forward never ran, so the copies would
    stay and the split retry would have less room. A no-op for a model that is not streamed."""
    streamer = streamer_of(model)
    if streamer is not None:
        streamer.unload_all()


class _Unit:
    """What loads at once: a transformer block's weights (its whole subtree), or another module's own."""

    def __init__(self, module: torch.nn.Module, slots: list[tuple[torch.nn.Module, str]]):
        self.module, self.slots = module, slots  # (owning module, parameter name)
        self.host: list[torch.Tensor] = []  # per slot: the weight in host memory (pinned where it may be)
        self.empty: list[torch.nn.Parameter] = []  # per slot: the meta placeholder it has while not loaded
        self.ready = None  # the copy stream's event after this unit's copies (CUDA)
        self.loaded = False


class HostStream:
    """Weights in host memory, copied to the device block by block with the next block copied ahead.

    The unit streamed is the model's transformer block (transformers' ``_no_split_modules``: ``T5Block``,
    ``CLIPEncoderLayer``, ``Qwen3DecoderLayer``, ``MistralDecoderLayer``, ...): one copy of a few hundred MB per
    block keeps the bus busy with large transfers. Modules outside the blocks with weights of their own
    (embeddings, final norm) stream as units of their own. Buffers (rotary frequencies, position ids) are small
    and stay on the device. A parameter is a meta placeholder while its unit is not loaded.

    ``upcast`` (the fp32 redo, ``encode.Fp32Weights``) loads the half-precision weights as fp32 copies: the host
    copy stays as it is.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device, self.upcast = device, False
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.units = _units(model, set(getattr(model, "_no_split_modules", None) or ()))
        self.order: list[_Unit] = []  # units in the order the first forward ran them
        self.ahead: _Unit | None = None  # the unit copied ahead of its turn
        host_bytes = sum(mod._parameters[n].nbytes for u in self.units for mod, n in u.slots)
        pin = self.cuda and host_bytes <= PIN_HOST_SHARE * _available_host_bytes()
        for unit in self.units:
            for i, (mod, name) in enumerate(unit.slots):
                weight = mod._parameters[name].data
                unit.host.append(weight.pin_memory() if pin else weight)
                unit.empty.append(torch.nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False))
                mod._parameters[name] = unit.empty[i]
            unit.module.register_forward_pre_hook(lambda _m, _a, unit=unit: self._enter(unit))
            unit.module.register_forward_hook(lambda _m, _a, _o, unit=unit: self._leave(unit))
        for mod in model.modules():
            for name, buf in mod._buffers.items():
                if buf is not None:
                    mod._buffers[name] = buf.to(device)

    def unload_all(self) -> None:
        for unit in self.units:
            self._unload(unit)
        self.ahead = None

    def loaded_units(self) -> int:
        return sum(unit.loaded for unit in self.units)

    def _enter(self, unit: _Unit) -> None:
        known = unit in self.order
        if not known:
            self.order.append(unit)
        if self.ahead is not None and self.ahead is not unit:  # copied ahead for nothing: the order changed
            self._unload(self.ahead)
        self.ahead = None
        self._load(unit)
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(unit.ready)
            for mod, name in unit.slots:  # the allocator reuses these blocks only after this stream's work
                mod._parameters[name].data.record_stream(current)
        if known:
            following = self.order.index(unit) + 1
            if following < len(self.order) and not self.order[following].loaded:
                self.ahead = self.order[following]
                self._load(self.ahead)

    def _leave(self, unit: _Unit) -> None:
        self._unload(unit)

    def _load(self, unit: _Unit) -> None:
        if unit.loaded:
            return
        with torch.cuda.stream(self.copy_stream) if self.cuda else contextlib.nullcontext():
            for (mod, name), host in zip(unit.slots, unit.host, strict=True):
                weight = host.to(self.device, non_blocking=True)
                if self.upcast and weight.dtype in (torch.float16, torch.bfloat16):
                    weight = weight.float()
                mod._parameters[name] = torch.nn.Parameter(weight, requires_grad=False)
            if self.cuda:
                unit.ready = torch.cuda.Event()
                unit.ready.record(self.copy_stream)
        unit.loaded = True

    def _unload(self, unit: _Unit) -> None:
        if not unit.loaded:
            return
        for (mod, name), empty in zip(unit.slots, unit.empty, strict=True):
            mod._parameters[name] = empty
        unit.loaded = False


def _units(model: torch.nn.Module, blocks: set[str]) -> list[_Unit]:
    """The model's units in module order: every module named in ``blocks`` whole, every other module's own
    parameters; each parameter slot in one unit."""
    units: list[_Unit] = []
    seen: set[int] = set()

    def walk(module: torch.nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if type(module).__name__ in blocks:
            slots = [(mod, name) for mod in module.modules() for name, p in mod._parameters.items() if p is not None]
            units.append(_Unit(module, slots))
            return
        own = [(module, name) for name, p in module._parameters.items() if p is not None]
        if own:
            units.append(_Unit(module, own))
        for child in module.children():
            walk(child)

    walk(model)
    return units


def _available_host_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available
