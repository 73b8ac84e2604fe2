"""Encode: one batch on the device, outputs moved off it at once, with the two guards every run needs.

* Out of memory: the batch is split in half and each half retried, down to a single image; an image that
  does not fit alone fails with the reason, and the run goes on.
* Non-finite output (the original SDXL VAE overflows in fp16): the affected images are encoded again in
  fp32; if still non-finite they fail. Nothing non-finite is ever returned.

Randomness never depends on the batch: ``sample`` draws its noise on the CPU from a generator seeded by
the item key, so a latent is the same whatever batch, worker count or interruption it went through.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cachebuild.config import DType, LatentsMode
from cachebuild.families.vae import VaeFamily
from cachebuild.images.plan import item_seed

log = logging.getLogger(__name__)


@dataclass
class EncodedItem:
    """What one image encodes to, on the CPU in float32. Shapes are (C, H/f, W/f)."""

    tensors: dict[str, torch.Tensor] | None  # None when the item failed
    reason: str | None = None
    upcast: bool = False  # True when fp32 was needed after a non-finite result


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
    output per item (a tensor or a dict of tensors, float32 on the CPU). Calling the guard returns, per
    item, that output or a failure reason (a str).
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
        except torch.cuda.OutOfMemoryError:  # the same class as torch.OutOfMemoryError
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
        bad = [i for i, out in enumerate(results) if not _all_finite(out)]
        if bad and dtype != torch.float32:
            self.upcasts += len(bad)
            redo = self._in_fp32(lambda: self._run(tuple(t[bad] for t in inputs), torch.float32))
            for i, r in zip(bad, redo, strict=True):
                results[i] = r
        elif bad:
            for i in bad:
                results[i] = f"the {self.what} produced non-finite values (NaN/Inf) even in fp32; check the input"
        return results

    def _in_fp32(self, fn: Callable[[], list]) -> list:
        """Run ``fn`` with the module temporarily in fp32, then put it back in the run's dtype."""
        self.module.to(torch.float32)
        try:
            return fn()
        finally:
            self.module.to(self.dtype)
            free_device_memory(self.device)


def _all_finite(out) -> bool:
    tensors = out.values() if isinstance(out, dict) else [out]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class VaeEncoder:
    """Turns bucket-sized uint8 pixel batches into latents, with the OOM and non-finite guards.

    Example:
        >>> enc = VaeEncoder(vae, family, torch.device("cpu"), DType.FP32, LatentsMode.MEAN, flip=False, seed=0)
        >>> out = enc.encode(["a", "b"], torch.zeros(2, 512, 512, 3, dtype=torch.uint8))
        >>> out[0].tensors["latents"].shape
        torch.Size([4, 64, 64])
    """

    def __init__(
        self, vae, family: VaeFamily, device: torch.device, dtype: DType, mode: LatentsMode, flip: bool, seed: int
    ):
        self.vae = vae
        self.family = family
        self.device = device
        self.dtype = dtype.torch
        self.mode = mode
        self.flip = flip
        self.seed = seed
        self.guard = GuardedForward(vae, device, self.dtype, lambda inputs, dt: list(self._raw(inputs[0], dt)), "VAE")

    @property
    def oom_splits(self) -> int:
        return self.guard.oom_splits

    @property
    def upcasts(self) -> int:
        return self.guard.upcasts

    def encode(self, keys: list[str], pixels: torch.Tensor) -> list[EncodedItem]:
        """Encode a batch of (B, H, W, 3) uint8 pixels; one result per key, in order."""
        raw = self.guard((pixels,))  # per image: (2C or C, h, w) float32, or a failure reason
        if self.flip:
            raw_flipped = self.guard((pixels.flip(2),))
        results = []
        for i, key in enumerate(keys):
            parts = {"": raw[i]} | ({"_flipped": raw_flipped[i]} if self.flip else {})
            reasons = [r for r in parts.values() if isinstance(r, str)]
            if reasons:
                results.append(EncodedItem(None, reasons[0]))
                continue
            tensors: dict[str, torch.Tensor] = {}
            for suffix, moments in parts.items():
                tensors |= self._finish(key, suffix, moments)
            results.append(EncodedItem(tensors))
        return results

    def _finish(self, key: str, suffix: str, moments: torch.Tensor) -> dict[str, torch.Tensor]:
        """Moments (mean ++ logvar along C, or plain latents) -> the stored tensors for this mode."""
        if not self.family.has_posterior:
            return {f"latents{suffix}": moments}
        mean, logvar = moments.chunk(2, dim=0)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the clamp diffusers' posterior applies
        if self.mode is LatentsMode.MEAN:
            return {f"latents{suffix}": mean}
        if self.mode is LatentsMode.MOMENTS:
            return {f"mean{suffix}": mean, f"std{suffix}": std}
        gen = torch.Generator().manual_seed(item_seed(self.seed, key, f"sample{suffix}"))
        noise = torch.randn(mean.shape, generator=gen, dtype=torch.float32)
        return {f"latents{suffix}": mean + std * noise}

    def _raw(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 2C, H/f, W/f) float32 on the CPU (moments, or latents for Tiny)."""
        with torch.inference_mode():
            x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
            x = x.to(dtype).div_(127.5).sub_(1.0)  # [0, 255] -> [-1, 1]
            enc = self.vae.encode(x)
            out = enc.latent_dist.parameters if self.family.has_posterior else enc.latents
            result = out.float().cpu()
            del x, enc, out
        return result
