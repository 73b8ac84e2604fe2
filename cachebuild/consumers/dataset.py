"""The torch Dataset over a cache's records; imported when :meth:`CacheReader.dataset` is called, so opening
a cache costs no torch import."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cachebuild.errors import ConfigError

if TYPE_CHECKING:
    from cachebuild.consumers.reader import CacheReader


class LatentDataset(torch.utils.data.Dataset):
    """Records as tensors, ready for the default collate: ``original_size``, ``crop``, ``bucket`` (and a FLUX.1
    Kontext pair's ``control_size``) become int64 tensors of shape (2,), so a batch has them as (B, 2); ``key``
    stays a string."""

    def __init__(self, cache: CacheReader, scale: bool, dtype: torch.dtype, t5_max_length: int | None = None):
        self.cache, self.scale, self.dtype, self.t5_max_length = cache, scale, dtype, t5_max_length
        vae = cache.fingerprint.get("vae", {})
        if scale and ("latents_mean" in vae or "bn_running_mean" in vae):
            raise ConfigError(
                f"{vae.get('class')} latents are normalised per channel, not by scaling_factor; read them with "
                "cache.pipeline_inputs(key, family=...) (or dataset(scale=False) and normalise them yourself)"
            )
        self._keys = cache.keys()

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> dict:
        rec = self.cache.record(self._keys[index], self.t5_max_length)
        for name, value in rec.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                rec[name] = value.to(self.dtype)
        for name in ("latents", "latents_flipped", "control_latents"):
            if name in rec and self.scale:
                rec[name] = (rec[name] - self.cache.shift_factor) * self.cache.scaling_factor  # raw -> scaled
        for name in ("original_size", "crop", "bucket", "control_size"):
            if name in rec:
                rec[name] = torch.tensor(rec[name], dtype=torch.long)
        return rec
