"""Encode: one batch on the device, outputs moved off it at once, with the two guards every run needs.

* Out of memory (CUDA's or MPS's): the batch is split in half and each half retried, down to a single
  image; an image that does not fit alone fails with the reason, and the run goes on.
* Non-finite output (the original SDXL VAE overflows in fp16): the affected images are encoded again in
  fp32; if still non-finite, or if the fp32 weights do not fit, they fail. Nothing non-finite is ever
  returned, and the module is always left whole in the run's dtype.

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
from cachebuild.offload import return_to_host

log = logging.getLogger(__name__)


def pick_device(requested: str | None) -> torch.device:
    """``requested`` or the best available: cuda, then mps, then cpu."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: DType, device: torch.device) -> DType:
    """DType.AUTO becomes bf16 on CUDA devices with bf16 support and fp32 everywhere else."""
    if dtype is not DType.AUTO:
        return dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return DType.BF16
    return DType.FP32


def free_device_memory(device: torch.device) -> None:
    """Give the caching allocator's free blocks back, so the next chunk starts from model-only memory;
    on the CPU, hand glibc's freed arenas back to the system for the same reason."""
    gc.collect()
    if device.type == "cuda":
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

    def __init__(self, module, device: torch.device, dtype: torch.dtype, forward: Callable, what: str):
        self.module, self.device, self.dtype, self.forward, self.what = module, device, dtype, forward, what
        self.oom_splits = 0  # how often a batch was split after an out-of-memory error
        self.upcasts = 0  # how many items needed the fp32 redo

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> list:
        return self._run(inputs, self.dtype)

    def _run(self, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> list:
        n = len(inputs[0])
        try:
            results = self.forward(inputs, dtype)
        except RuntimeError as exc:  # torch's OutOfMemoryError is a RuntimeError, and so is MPS's
            if not is_out_of_memory(exc):
                raise
            results = None
        # Recover outside the except block: there the traceback keeps the failed attempt's tensors alive, so
        # the halves would run out of memory too. Leaving it drops them; free_device_memory returns them.
        if results is None:
            return_to_host(self.module)  # a streamed model's block that ran out of memory keeps no device copy
            return self._split(inputs, dtype, n)
        bad = [i for i, out in enumerate(results) if not _all_finite(out)]
        if bad and dtype != torch.float32:
            self.upcasts += len(bad)
            redo = self._in_fp32(lambda: self._run(tuple(t[bad] for t in inputs), torch.float32), len(bad))
            for i, r in zip(bad, redo, strict=True):
                results[i] = r
        elif bad:
            for i in bad:
                results[i] = f"the {self.what} produced non-finite values (NaN/Inf) even in fp32; check the input"
        return results

    def _split(self, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype, n: int) -> list:
        free_device_memory(self.device)
        if n == 1:
            return [
                f"out of device memory even for this item alone in the {self.what}; lower --resolution, "
                "--max-bucket-reso or the max length, or use --dtype bf16"
            ]
        self.oom_splits += 1
        half = n // 2
        log.warning("out of memory at batch size %d; retrying as %d + %d", n, half, n - half)
        return self._run(tuple(t[:half] for t in inputs), dtype) + self._run(tuple(t[half:] for t in inputs), dtype)

    def _in_fp32(self, fn: Callable[[], list], n: int) -> list:
        """Run ``fn`` with the module temporarily in fp32, then put it back in the run's dtype.

        Converting needs room for an fp32 copy of every weight; on a small card that alone can run out of
        memory half way, so a failed conversion puts the module back in the run's dtype (never a module of
        mixed dtypes) and fails the ``n`` items instead.
        """
        try:
            self.module.to(torch.float32)
            converted = True
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                self.module.to(self.dtype)
                raise
            converted = False
        if not converted:  # outside the except block, for the same reason as in _run
            self.module.to(self.dtype)
            free_device_memory(self.device)
            return [
                f"the {self.what} produced non-finite values (NaN/Inf) in {_dtype_name(self.dtype)} and there "
                "was not enough device memory to redo it in fp32; use --dtype bf16 (or fp32)"
            ] * n
        try:
            return fn()
        finally:
            self.module.to(self.dtype)
            free_device_memory(self.device)


def is_out_of_memory(exc: BaseException) -> bool:
    """An out-of-memory error from any device: ``torch.OutOfMemoryError`` (named ``torch.cuda.OutOfMemoryError``
    before torch 2.5, the same class since), or the plain RuntimeError that MPS and torch before 1.13 raise."""
    if _OOM_TYPES and isinstance(exc, _OOM_TYPES):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OOM_MESSAGES)


_OOM_TYPES = tuple(
    {t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t}
)
_OOM_MESSAGES = ("MPS backend out of memory", "CUDA out of memory")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype).removeprefix("torch."))


def _all_finite(out) -> bool:
    tensors = out.values() if isinstance(out, dict) else [out]
    return all(bool(torch.isfinite(t).all()) for t in tensors)
