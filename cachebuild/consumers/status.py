"""What a cache holds, for ``cachebuild status``: read-only, from the manifest and file sizes."""

from __future__ import annotations

from pathlib import Path

from cachebuild.cache.manifest import FAILED, Manifest
from cachebuild.storage import UrlPath, is_url


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
    if is_url(out):
        return _remote_status(out)
    with Manifest.open(out, read_only=True) as m:
        status = store_status(m, "latents")
        status["cache"] = str(out)
        if m.fingerprint("textenc") is not None:
            status["textenc"] = store_status(m, "textenc")
            status["textenc"]["unique"] = m.distinct_done("textenc", "text_id")  # embeddings stored
        if m.fingerprint("control") is not None:  # condition images (latents --control), an I2V model's conditions
            status["control"] = store_status(m, "control")
    return status


def _remote_status(out) -> dict:
    """The status of a cache at a URL, from its published manifest snapshot; bytes as the store lists them."""
    from cachebuild.cache.remote import mirror_snapshot, remote_bytes

    url = out if isinstance(out, UrlPath) else UrlPath(str(out))
    root = mirror_snapshot(url)
    status = cache_status(root)
    status["cache"] = str(url)
    with Manifest.open(root, read_only=True) as m:
        for store, part in (
            ("latents", status),
            ("textenc", status.get("textenc")),
            ("control", status.get("control")),
        ):
            if part is not None:
                part["bytes"] = remote_bytes(url, store, {s["name"] for s in m.shards(store)})
    return status
