"""Item keys and the seeds derived from them.

A key names one item in every store of a cache: the source path relative to the dataset root, without its
extension, '/'-separated (``sub/img001``). Everything random about an item (a random crop, a posterior
sample, an exported draw) is seeded from the run seed and the key, never from the batch, so an item's
tensors do not depend on batch size, worker count or interruptions.
"""

from __future__ import annotations

import hashlib


def item_seed(seed: int, key: str, purpose: str) -> int:
    """A 63-bit seed that depends only on the run seed, the item key and what it is for."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
