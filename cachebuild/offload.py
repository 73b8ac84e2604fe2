"""Offload: run a model larger than the device's free memory with its weights in host memory, streamed in.

A 24B text encoder (Flux.2's Mistral Small 3.1, about 48 GB in bf16) or Qwen2.5-VL-7B (about 16 GB) does not fit
a 12-24 GB card. Rather than fail, such a model stays in host memory and each transformer block's weights are
copied to the device just before the block runs and dropped right after (accelerate's ``AlignDevicesHook``).
The arithmetic is the same as with the whole model on the device, so the outputs are the same (bit for bit on
one device: the same kernels see the same weights) and offloading is not part of any fingerprint.

What it costs: every forward copies every weight across the bus once (about 2 s for 48 GB at 25 GB/s on PCIe 4
x16), so small batches are slow; device memory holds one block's weights plus the activations instead of the
whole model; host memory must hold the model at the compute dtype.

``--offload auto`` (the default) streams only when the model cannot fit: its weights at the compute dtype
(counted from the safetensors headers) plus an activation margin exceed what the CUDA device has free. CPU and
MPS memory is the host's, so there is nothing to gain there and ``auto`` never streams; ``always`` streams
anyway (on the CPU the "device" copies are host copies, which exercises the same hooks in tests).
"""

from __future__ import annotations

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


def needed_bytes(files: Iterable[Path], dtype: torch.dtype) -> int:
    """Device bytes a model needs resident: its weights at ``dtype`` plus the activation margin."""
    weights = weight_bytes(files, dtype)
    return weights + max(ACTIVATION_MARGIN_BYTES, int(weights * ACTIVATION_MARGIN_FRACTION))


def weight_bytes(files: Iterable[Path], dtype: torch.dtype) -> int:
    """The weights of ``files`` at ``dtype``: element counts from the safetensors headers (8 bytes of length and a
    JSON header, no tensor read), so fp32 files run in bf16 count half their size; other formats count their
    file size."""
    itemsize = torch.empty((), dtype=dtype).element_size()
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
            total += elements * (itemsize if floating else _SAFETENSORS_ITEMSIZE.get(entry["dtype"], 1))
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
    """Keep ``model`` (loaded on the CPU) in host memory and copy its weights to ``device`` one block at a time.

    The unit streamed is the model's transformer block (transformers' ``_no_split_modules``: ``T5Block``,
    ``CLIPEncoderLayer``, ``Qwen3DecoderLayer``, ``MistralDecoderLayer``, ...): one copy of a few hundred MB per
    block keeps the bus busy with large transfers, while per-``Linear`` hooks would issue seven or more small
    copies per block, and the whole model at once (``cpu_offload_with_hook``) needs the room we do not have.
    Modules outside the blocks (embeddings, final norm) stream as modules of their own. Buffers (rotary
    frequencies, position ids) are small and stay on the device.
    """
    from accelerate import cpu_offload

    blocks = sorted(getattr(model, "_no_split_modules", None) or [])
    cpu_offload(model, execution_device=device, offload_buffers=False, preload_module_classes=blocks)
    model._cachebuild_streamed = True  # read by is_streamed
    return model


def is_streamed(model) -> bool:
    return bool(getattr(model, "_cachebuild_streamed", False))


def return_to_host(model) -> None:
    """After a forward that raised half way (out of memory), drop the device copies of the weights of the blocks
    that had loaded them: their hooks' post-forward never ran, so the copies would stay and the split retry would
    have less room. A no-op for a model that is not streamed."""
    if not is_streamed(model):
        return
    from accelerate.hooks import AlignDevicesHook, SequentialHook
    from accelerate.utils import named_module_tensors, set_module_tensor_to_device

    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in hook.hooks if isinstance(hook, SequentialHook) else [hook]:
            if not isinstance(h, AlignDevicesHook) or not h.offload:
                continue
            tensors = named_module_tensors(
                module, include_buffers=h.offload_buffers, recurse=h.place_submodules, remove_non_persistent=True
            )
            for name, tensor in list(tensors):
                if tensor.device.type != "meta":
                    set_module_tensor_to_device(module, name, "meta")
