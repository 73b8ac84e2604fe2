"""cachebuild: VAE-latent and text-encoder caches for diffusion training, readable by any trainer.

``from cachebuild import open_cache`` is the reading API (see :mod:`cachebuild.consumers.reader`). Names are imported
on first use, so ``import cachebuild`` and ``cachebuild --help`` do not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cachebuild.consumers.reader import BucketBatchSampler, CacheReader, open_cache

__all__ = ["BucketBatchSampler", "CacheReader", "open_cache"]

_LAZY = {
    "open_cache": "cachebuild.consumers.reader",
    "CacheReader": "cachebuild.consumers.reader",
    "BucketBatchSampler": "cachebuild.consumers.sampler",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cachebuild' has no attribute {name!r}")
