"""Which shard files a build may delete: only those it can prove a run of this manifest wrote and never committed.

A shard file that the manifest does not name is either a leftover of an interrupted run of this cache (renamed
into place, then the process died before the commit) or something the manifest knows nothing about: the shards
of a manifest that was removed or never copied, another cache's, a user's. Only the first may go. The proof is
a *claim*: before a run writes anything, it records in the manifest the range of shard indices it will hand out,
from the first index past every committed shard and every shard file lying in the folder, open-ended while it
runs (``meta`` key ``claims:<store>``, a JSON list of ``[first, end]`` with ``end`` null while open). A run that
ends normally closes its range; a run that was killed leaves it open, and the next run deletes the uncommitted
files inside it and then closes it where its own range starts. A file outside every claim is kept and listed.

Without a manifest there are no claims, so nothing can be proven: a build refuses to start on a cache folder
that holds shards but no manifest (``refuse_lost_manifest``), rather than take them for leftovers.
"""

from __future__ import annotations

import os
from pathlib import Path

from cachebuild.cache.files import TMP_SUFFIX, shard_index
from cachebuild.cache.manifest import MANIFEST_NAME, REBUILD_HINT, STORES, Manifest
from cachebuild.errors import CacheError

CLAIMS_META = "claims:{store}"


def open_claim(manifest: Manifest, store: str, first: int) -> None:
    """Record that this run hands out shard indices from ``first`` on; a range a killed run left open ends here."""
    ranges = [[lo, first if hi is None else hi] for lo, hi in _claims(manifest, store)]
    _save(manifest, store, ranges + [[first, None]])


def close_claim(manifest: Manifest, store: str, end: int) -> None:
    """The run ended normally: its open range ends at ``end`` (past every index it handed out)."""
    ranges = _claims(manifest, store)
    if any(hi is None for _, hi in ranges):
        _save(manifest, store, [[lo, end if hi is None else hi] for lo, hi in ranges])


def claimed(manifest: Manifest, store: str):
    """A test ``name -> bool``: whether a run of this manifest handed out the shard name ``name``."""
    ranges = _claims(manifest, store)

    def test(name: str) -> bool:
        index = shard_index(name)
        return index is not None and any(lo <= index and (hi is None or index < hi) for lo, hi in ranges)

    return test


def refuse_lost_manifest(root: Path) -> None:
    """Refuse a build on a local folder whose shards have no manifest beside them.

    Raises:
        CacheError: naming the shard count and ``cachebuild rebuild-manifest``; nothing was touched.
    """
    if (root / MANIFEST_NAME).exists():
        return
    count = sum(len(shard_names(root / store)) for store in STORES)
    if count:
        raise CacheError(lost_manifest_message(str(root), count, REBUILD_HINT.format(root=root)))


def lost_manifest_message(where: str, count: int, fix: str) -> str:
    return (
        f"{where} holds {count} shard file(s) but no {MANIFEST_NAME} (removed, or not copied yet); refusing to "
        f"build there, which would take them for leftovers; restore the manifest, or {fix}"
    )


def shard_names(folder: Path) -> list[str]:
    """Complete shard files (not ``.tmp``) in ``folder``; none where it does not exist."""
    try:
        with os.scandir(folder) as it:
            return [e.name for e in it if not e.name.endswith(TMP_SUFFIX) and shard_index(e.name) is not None]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _claims(manifest: Manifest, store: str) -> list[list]:
    return [list(r) for r in manifest.get_meta(CLAIMS_META.format(store=store)) or []]


def _save(manifest: Manifest, store: str, ranges: list[list]) -> None:
    """Merge touching ranges and drop empty ones, so a cache's claims stay a few entries long."""
    merged: list[list] = []
    for lo, hi in sorted((r for r in ranges if r[1] is None or r[1] > r[0]), key=lambda r: r[0]):
        if merged and merged[-1][1] is not None and lo <= merged[-1][1]:
            merged[-1][1] = None if hi is None else max(hi, merged[-1][1])
        elif merged and merged[-1][1] is None:
            continue  # inside an open range already
        else:
            merged.append([lo, hi])
    manifest.set_meta(CLAIMS_META.format(store=store), merged)
