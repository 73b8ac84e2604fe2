"""What a cache holds, for ``cachebuild status``: read-only, from the manifest and file sizes."""

from __future__ import annotations

from pathlib import Path

from cachebuild.cache.manifest import FAILED, Manifest


def store_status(manifest: Manifest, store: str) -> dict:
    """Counts, failures with reasons, shards, bytes on disk, buckets and fingerprint for one store."""
    shards = manifest.shards(store)
    folder = manifest.root / store
    on_disk = sum((folder / s["name"]).stat().st_size for s in shards if (folder / s["name"]).exists())
    return {
        "items": manifest.counts(store),
        "failures": [{"key": r.key, "path": r.path, "reason": r.reason} for r in manifest.items(store, FAILED)],
        "shards": len(shards),
        "bytes": on_disk,
        "buckets": manifest.bucket_counts(store),
        "fingerprint": manifest.fingerprint(store) or {},
    }


def cache_status(out: Path) -> dict:
    """The status of every store in the cache at ``out``; latents at the top level.

    Raises:
        CacheError: ``out`` holds no manifest.
    """
    with Manifest.open(out, read_only=True) as m:
        status = store_status(m, "latents")
        status["cache"] = str(out)
        if m.fingerprint("textenc") is not None:
            status["textenc"] = store_status(m, "textenc")
            status["textenc"]["unique"] = m.distinct_done("textenc", "text_id")  # embeddings stored
    return status
