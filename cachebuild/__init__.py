"""cachebuild: VAE-latent and text-encoder caches for diffusion training, readable by any trainer.

The public API, importable from the package itself:

* reading: ``open_cache`` (a :class:`CacheReader`), ``BucketBatchSampler``;
* building: ``build_latents(LatentsConfig(...))``, ``build_textenc(TextencConfig(...))`` and their config
  classes (``ModelSpec``, ``BucketConfig``, ``DType``, ``LatentsMode``, ``CropMode``, ``StoreFormat``,
  ``TextFamily``);
* checking: ``cache_status``, ``verify_cache``; exporting: ``export_kohya``.

Names are imported on first use, so ``import cachebuild`` and ``cachebuild --help`` import no torch, and
``open_cache`` imports it only when a tensor is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cachebuild.config import (
        BucketConfig,
        CropMode,
        DType,
        LatentsConfig,
        LatentsMode,
        ModelSpec,
        StoreFormat,
        TextencConfig,
        TextFamily,
    )
    from cachebuild.consumers.export.kohya import export_kohya
    from cachebuild.consumers.reader import CacheReader, open_cache
    from cachebuild.consumers.sampler import BucketBatchSampler
    from cachebuild.consumers.status import cache_status
    from cachebuild.consumers.verify import verify_cache
    from cachebuild.jobs.latents import build_latents
    from cachebuild.jobs.textenc import build_textenc

_LAZY = {
    "open_cache": "cachebuild.consumers.reader",
    "CacheReader": "cachebuild.consumers.reader",
    "BucketBatchSampler": "cachebuild.consumers.sampler",
    "cache_status": "cachebuild.consumers.status",
    "verify_cache": "cachebuild.consumers.verify",
    "export_kohya": "cachebuild.consumers.export.kohya",
    "build_latents": "cachebuild.jobs.latents",
    "build_textenc": "cachebuild.jobs.textenc",
    **dict.fromkeys(
        (
            "BucketConfig",
            "CropMode",
            "DType",
            "LatentsConfig",
            "LatentsMode",
            "ModelSpec",
            "StoreFormat",
            "TextencConfig",
            "TextFamily",
        ),
        "cachebuild.config",
    ),
}

__all__ = [
    "BucketBatchSampler",
    "BucketConfig",
    "CacheReader",
    "CropMode",
    "DType",
    "LatentsConfig",
    "LatentsMode",
    "ModelSpec",
    "StoreFormat",
    "TextFamily",
    "TextencConfig",
    "build_latents",
    "build_textenc",
    "cache_status",
    "export_kohya",
    "open_cache",
    "verify_cache",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cachebuild' has no attribute {name!r}")
