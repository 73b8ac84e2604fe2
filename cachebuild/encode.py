"""Encode: one batch on the device, outputs moved off it at once, with the two guards every run needs.

* Out of memory (CUDA's or MPS's, whatever the error names it: the allocator, a kernel launch, cuBLAS or cuDNN
  workspaces): the batch is split in half and each half retried, down to a single image; an image that does
  not fit alone fails with the reason, and the run goes on.
* Non-finite output (the original SDXL VAE overflows in fp16): the affected images are encoded again in
  fp32; if still non-finite, or if the fp32 weights do not fit, they fail. Nothing non-finite is ever
  returned. Whether an item is finite is read from the device once per batch (one flag per item in one
  transfer), not once per item. After a redo every parameter and buffer is back in its own dtype: modules a
  loader keeps in fp32 (transformers' ``_keep_in_fp32_modules``, T5's ``wo`` in fp16) and fp32 buffers
  (rotary ``inv_freq``) stay fp32, the rest returns to the run's dtype.

A small model (every VAE) keeps its fp32 weights once a redo has made them, so later redos swap pointers
instead of converting the weights per batch; each item still runs in the run's dtype first, so what an item
stores never depends on what came before it (promise 6). The VAE config's ``force_upcast`` is not read:
diffusers honours it in the SDXL pipelines only, and ``AutoencoderKL`` sets it by default, so it would turn
every fp16 run of an SD 1.5 or Flux VAE into fp32.

Randomness never depends on the batch: ``sample`` draws its noise on the CPU from a generator seeded by
the item key, so a latent is the same whatever batch, worker count or interruption it went through.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable

import torch

from cachebuild.config import DType
from cachebuild.offload import return_to_host, streamer_of

log = logging.getLogger(__name__)

BF16_MIN_CAPABILITY = (8, 0)  # CUDA compute capability with bf16 in hardware (Ampere on); T4 (7.5) and V100 (7.0)
# only emulate it, slower than fp16, while torch.cuda.is_bf16_supported() still says yes
KEEP_FP32_MAX_BYTES = 1 << 30  # a model whose fp32 weights take at most this keeps them after its first redo (the
# SDXL VAE: 335 MB); a larger one (text encoders of billions of parameters) converts per redo and frees them after


def pick_device(requested: str | None) -> torch.device:
    """``requested`` or the best available: cuda, then mps, then cpu."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def use_device(device: torch.device) -> torch.device:
    """Make ``device`` the calling thread's current CUDA device (nothing elsewhere) and return it.

    CUDA work that names no device (pinned host memory, events, the runtime's first call in a thread) goes to
    the current device, GPU 0 unless set: without this a process for ``cuda:1`` also opens a context on GPU 0,
    some hundreds of MB there, and leaving a stream context switches back to GPU 0. The current device is per
    thread: every thread that touches CUDA calls this.
    """
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def resolve_dtype(dtype: DType, device: torch.device, wide_range: bool = False) -> DType:
    """DType.AUTO becomes bf16 on CUDA devices with bf16 in hardware (compute capability 8.0 on), fp16 on older
    CUDA devices (overflowing items are redone in fp32), and fp32 everywhere else.

    ``wide_range``: the model's activations pass fp16's 65504 as a rule, not by accident (the LLM text encoders'
    massive activations): on an older CUDA device fp16 would send nearly every item to the fp32 redo, whose
    weights (a 7B model: 28 GB) rarely fit, so such a model runs in bf16 there too, emulated and slower, as its
    pipeline computes it."""
    if dtype is not DType.AUTO:
        return dtype
    if device.type == "cuda":
        # the capability comes from the device's properties: no tensor is made, so no context opens on GPU 0
        native = torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY
        return DType.BF16 if native or wide_range else DType.FP16
    return DType.FP32


def free_device_memory(device: torch.device) -> None:
    """Give the caching allocator's free blocks back, so the next chunk starts from model-only memory;
    on the CPU, hand glibc's freed arenas back to the system for the same reason."""
    gc.collect()
    if device.type == "cuda":
        clear_cublas = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # cuBLAS keeps a workspace (up to
        if clear_cublas is not None:  # 32 MiB on Hopper) allocated per handle and stream; made again when needed
            clear_cublas()
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
    else:
        _malloc_trim()


def _malloc_trim() -> None:
    """glibc keeps freed blocks of varied sizes (one batch per bucket shape) in its arenas; trim returns them."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def device_memory_bytes(device: torch.device) -> int | None:
    """Bytes currently allocated on the device (None for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    if device.type == "mps":
        return torch.mps.current_allocated_memory()
    return None


class GuardedForward:
    """Runs batches through a module with the out-of-memory split and the non-finite fp32 redo.

    ``forward(inputs, dtype)`` takes a tuple of tensors whose first dimension is the batch and returns one
    output per item (a tensor or a dict of tensors, float32, on the CPU or still on the device: the forward
    decides). Calling the guard returns, per item, that output or a failure reason (a str).
    """

    def __init__(
        self,
        module,
        device: torch.device,
        dtype: torch.dtype,
        forward: Callable,
        what: str,
        alone: Callable | None = None,
    ):
        self.module, self.device, self.dtype, self.forward, self.what = module, device, dtype, forward, what
        self.alone = alone  # alone(inputs) -> the reason an item that runs out of memory by itself fails with (a
        # video clip: the memory it needs); None: the generic one
        self.oom_splits = 0  # how often a batch was split after an out-of-memory error
        self.upcasts = 0  # how many items needed the fp32 redo
        self.fp32_conversions = 0  # how often the weights were converted to fp32 for a redo (once, where kept)
        self._fp32: Fp32Weights | None = None  # made at the first redo, from the module as the run uses it

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> list:
        return self._run(inputs, self.dtype)

    def _run(self, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> list:
        n = len(inputs[0])
        try:
            results = self.forward(inputs, dtype)
        except RuntimeError as exc:  # torch's OutOfMemoryError is a RuntimeError, and so are MPS's and cuBLAS's
            if not is_out_of_memory(exc):
                raise
            results = None
        # Recover outside the except block: there the traceback keeps the failed attempt's tensors alive, so
        # the halves would run out of memory too. Leaving it drops them; free_device_memory returns them.
        if results is None:
            return_to_host(self.module)  # a streamed model's block that ran out of memory keeps no device copy
            return self._split(inputs, dtype, n)
        bad = [i for i, finite in enumerate(finite_flags(results)) if not finite]
        if bad and dtype != torch.float32:
            self.upcasts += len(bad)
            redo = self._in_fp32(tuple(t[bad] for t in inputs), len(bad))
            for i, r in zip(bad, redo, strict=True):
                results[i] = r
        elif bad:
            for i in bad:
                results[i] = f"the {self.what} produced non-finite values (NaN/Inf) even in fp32; check the input"
        return results

    def _split(self, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype, n: int) -> list:
        free_device_memory(self.device)
        if n == 1:
            if self.alone is not None:
                return [self.alone(inputs)]
            return [
                f"out of device memory even for this item alone in the {self.what}; lower --resolution, "
                "--max-bucket-reso or the max length, or use --dtype bf16"
            ]
        self.oom_splits += 1
        half = n // 2
        log.warning("out of memory at batch size %d; retrying as %d + %d", n, half, n - half)
        return self._run(tuple(t[:half] for t in inputs), dtype) + self._run(tuple(t[half:] for t in inputs), dtype)

    def _in_fp32(self, inputs: tuple[torch.Tensor, ...], n: int) -> list:
        """Run ``inputs`` with the module's weights in fp32, then put each tensor back in its own dtype.

        Converting needs room for an fp32 copy of every weight; on a small card that alone can run out of
        memory half way, so a failed conversion puts every tensor back (never a module of mixed dtypes) and
        fails the ``n`` items instead.
        """
        if self._fp32 is None:
            self._fp32 = Fp32Weights(self.module)
        weights = self._fp32
        try:
            made = weights.to_fp32()
        except RuntimeError as exc:
            weights.restore()
            if not is_out_of_memory(exc):
                raise
            made = None
        if made is None:  # outside the except block, for the same reason as in _run
            free_device_memory(self.device)
            return [
                f"the {self.what} produced non-finite values (NaN/Inf) in {_dtype_name(self.dtype)} and there "
                "was not enough device memory to redo it in fp32; use --dtype bf16 (or fp32)"
            ] * n
        self.fp32_conversions += made
        try:
            return self._run(inputs, torch.float32)
        finally:
            weights.restore()
            if not weights.keep:
                free_device_memory(self.device)


class Fp32Weights:
    """A module's half-precision parameters and buffers, switched to fp32 for a redo and back.

    Only fp16 and bf16 tensors move; fp32 ones (modules kept in fp32, rotary frequencies) are left alone, and
    ``restore`` puts every tensor back in the dtype it had when this was made. A small module (``keep``) holds
    both versions once the first redo has made the fp32 one, and switches by pointer; a large one converts each
    time (lossless both ways: fp16 and bf16 values are exact in fp32); a streamed one has its blocks copied to
    the device as fp32 while the redo runs (``offload.HostStream.upcast``).
    """

    def __init__(self, module):
        self.streamer = streamer_of(module) if module is not None else None  # a streamed model: its loads upcast
        self.params: list[torch.nn.Parameter] = []  # each shared (tied) parameter once
        self.buffers: list[tuple[torch.nn.Module, str]] = []
        seen: set[int] = set()
        for mod in module.modules() if module is not None and self.streamer is None else ():
            for p in mod._parameters.values():
                if p is not None and id(p) not in seen and p.dtype in _HALF:
                    seen.add(id(p))
                    self.params.append(p)
            self.buffers += [(mod, name) for name, b in mod._buffers.items() if b is not None and b.dtype in _HALF]
        self.dtypes = [p.dtype for p in self.params] + [mod._buffers[name].dtype for mod, name in self.buffers]
        elements = sum(p.numel() for p in self.params) + sum(m._buffers[n].numel() for m, n in self.buffers)
        self.keep = module is not None and self.streamer is None and elements * 4 <= KEEP_FP32_MAX_BYTES
        self._half: list[torch.Tensor] | None = None  # the run's tensors while the fp32 ones are in place
        self._full: list[torch.Tensor] | None = None  # the kept fp32 tensors

    def to_fp32(self) -> int:
        """Put fp32 tensors in place; returns 1 when it had to make them (a conversion), 0 when they were kept.
        Raises the out-of-memory error of a conversion that did not fit (call ``restore`` then)."""
        if self.streamer is not None:  # nothing resident to convert: each block's copy is made in fp32
            self.streamer.unload_all()  # a block copied ahead in the run's dtype is copied again
            self.streamer.upcast = True
            return 1
        count = len(self.dtypes)
        if self.keep:
            current = [self._get(i) for i in range(count)]
            made = self._full is None
            if made:
                with torch.no_grad():
                    self._full = [_to_dtype(t, torch.float32) for t in current]
            self._half = current
            self._set(self._full)
            return int(made and count > 0)
        with torch.no_grad():
            for i in range(count):  # one tensor at a time: each half copy goes as its fp32 one comes
                self._set_one(i, _to_dtype(self._get(i), torch.float32))
        return int(count > 0)

    def restore(self) -> None:
        """Every tensor back in its own dtype (also after a conversion that failed half way)."""
        if self.streamer is not None:
            self.streamer.unload_all()
            self.streamer.upcast = False
            return
        if self._half is not None:
            self._set(self._half)
            self._half = None
            return
        with torch.no_grad():
            for i, dtype in enumerate(self.dtypes):
                if self._get(i).dtype != dtype:
                    self._set_one(i, _to_dtype(self._get(i), dtype))

    def _get(self, i: int) -> torch.Tensor:
        if i < len(self.params):
            return self.params[i].data
        mod, name = self.buffers[i - len(self.params)]
        return mod._buffers[name]

    def _set(self, tensors: list[torch.Tensor]) -> None:
        for i, t in enumerate(tensors):
            self._set_one(i, t)

    def _set_one(self, i: int, t: torch.Tensor) -> None:
        if i < len(self.params):
            self.params[i].data = t
        else:
            mod, name = self.buffers[i - len(self.params)]
            mod._buffers[name] = t


def _to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One tensor converted (its own function so that tests can make a conversion run out of memory)."""
    return t.to(dtype)


_HALF = (torch.float16, torch.bfloat16)


def is_out_of_memory(exc: BaseException) -> bool:
    """An out-of-memory error from any device: ``torch.OutOfMemoryError`` (named ``torch.cuda.OutOfMemoryError``
    before torch 2.5, the same class since), or a RuntimeError (``torch.AcceleratorError`` among them) whose
    message says so: MPS's, a kernel launch's ``CUDA error: out of memory``, cuBLAS's or cuDNN's workspace."""
    if _OOM_TYPES and isinstance(exc, _OOM_TYPES):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OOM_MESSAGES)


_OOM_TYPES = tuple(
    {t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t}
)
_OOM_MESSAGES = (
    "MPS backend out of memory",
    "CUDA out of memory",  # the caching allocator's (torch.OutOfMemoryError; a plain RuntimeError before 1.13)
    "CUDA error: out of memory",  # cudaErrorMemoryAllocation from the runtime: a launch, a handle, a context
    "CUBLAS_STATUS_ALLOC_FAILED",  # cuBLAS could not allocate its workspace
    "CUDNN_STATUS_ALLOC_FAILED",  # nor cuDNN
    "HIP out of memory",  # ROCm's allocator
)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype).removeprefix("torch."))


def finite_flags(results: list) -> list[bool]:
    """Per item, whether every tensor of it is finite (failure reasons count as finite), read from the device
    in one transfer: one sync per batch, not one per item and tensor."""
    checks = [[torch.isfinite(t).all() for t in _tensors(out)] for out in results]  # 0-dim bools, not read yet
    flat = [c for item in checks for c in item]
    if not flat:
        return [True] * len(results)
    one_device = len({c.device for c in flat}) == 1  # else (outputs on several devices, not the hot path) one each
    values = iter(torch.stack(flat).tolist() if one_device else [bool(c) for c in flat])  # the one read
    return [all([next(values) for _ in item]) for item in checks]  # a list: every value of the item is taken


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, str):
        return []
    return list(out.values()) if isinstance(out, dict) else [out]
