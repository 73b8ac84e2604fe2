"""Rebuild a damaged manifest from the shards: every shard describes its items, its store's fingerprint and
where its items came from, so the index of done items can be written again without encoding anything.

The damaged file is moved aside (``manifest.sqlite.damaged-<time>``), never deleted. What cannot come back:
failed items (they are in no shard, and are simply tried again) and text items that pointed at a caption
another item had already stored (they are found again by the next ``textenc`` run, without encoding).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from cachebuild.cache.files import sha256_file, shard_index
from cachebuild.cache.manifest import DONE, LATENTS, MANIFEST_NAME, STORES, TEXTENC, Manifest, acquire_writer_lock
from cachebuild.cache.shards import ShardFile
from cachebuild.errors import CacheError

log = logging.getLogger(__name__)

TEXT_ONLY_FIELDS = ("text", "keys")  # in a text shard's entry metadata, not in each item's manifest row


@dataclass
class RebuildSummary:
    """What :func:`rebuild_manifest` restored; ``skipped`` are shard files it could not use, with why."""

    cache: str
    moved_to: str | None = None  # where the damaged manifest went
    items: dict[str, int] = field(default_factory=dict)  # done items restored per store
    shards: dict[str, int] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # [{"shard", "reason"}]


def rebuild_manifest(root: Path) -> RebuildSummary:
    """Write a new manifest for the cache at ``root`` from its shard files.

    Raises:
        CacheError: ``root`` holds no shards to rebuild from, or a build is writing to it.

    Example:
        >>> rebuild_manifest(Path("./cache")).items
        {'latents': 20000, 'textenc': 20000}
    """
    summary = RebuildSummary(str(root))
    if not any((root / store).is_dir() for store in STORES):
        raise CacheError(f"{root} holds no latents/ or textenc/ folder of shards; check the path")
    lock = acquire_writer_lock(root)
    try:
        summary.moved_to = _move_aside(root)
        with Manifest.open(root) as manifest:
            for store in STORES:
                if (root / store).is_dir():
                    _rebuild_store(manifest, store, summary)
    finally:
        lock.release()
    return summary


def _move_aside(root: Path) -> str | None:
    path = root / MANIFEST_NAME
    if not path.exists():
        return None
    aside = path.with_name(f"{MANIFEST_NAME}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):  # the log belongs to the damaged file; it must not meet the new one
        side = Path(str(path) + suffix)
        if side.exists():
            os.replace(side, Path(str(aside) + suffix))
    return str(aside)


def _rebuild_store(manifest: Manifest, store: str, summary: RebuildSummary) -> None:
    folder = manifest.root / store
    names = sorted((e.name for e in os.scandir(folder) if shard_index(e.name) is not None), key=shard_index)
    described = []
    for name in names:
        try:
            with ShardFile.open(folder / name) as shard:
                header, entries = shard.describe()
            described.append(
                (name, json.loads(header["fingerprint"]), json.loads(header.get("sources", "{}")), entries)
            )
        except Exception as exc:  # per-shard boundary: an unreadable file is reported and left where it is
            summary.skipped.append({"shard": f"{store}/{name}", "reason": f"{type(exc).__name__}: {exc}"})
    if not described:
        return
    fingerprint = described[-1][1]  # the newest shard's; older builds' leftovers are not mixed in
    rows: dict[str, tuple] = {}  # key -> (shard, bucket, info, path, source_fp); newer shards win
    used: dict[str, int] = {}
    for name, fp, sources, entries in described:
        if fp != fingerprint:
            summary.skipped.append({"shard": f"{store}/{name}", "reason": "made with other settings (an older build)"})
            continue
        for key, info, bucket in _item_rows(store, entries):
            path, source_fp = sources.get(key, [None, None])
            rows[key] = (name, bucket, info, path, source_fp)
        used[name] = len(entries)
    _write_store(manifest, store, fingerprint, rows, {n: used[n] for n in used})
    summary.items[store], summary.shards[store] = len(rows), len(used)


def _item_rows(store: str, entries: dict[str, dict]):
    """(key, manifest info, bucket) for each item a shard holds."""
    for entry, meta in entries.items():
        if store == TEXTENC:
            info = {k: v for k, v in meta.items() if k not in TEXT_ONLY_FIELDS}
            for key in meta.get("keys", []):
                yield key, info, None
        else:
            shape = [*meta["bucket"], *([meta["frames"]] if "frames" in meta else [])]  # a clip's is WxHxF
            yield entry, meta, "x".join(map(str, shape))


def _write_store(manifest: Manifest, store: str, fingerprint: dict, rows: dict, shards: dict[str, int]) -> None:
    now = time.time()
    live = {r[0] for r in rows.values()}
    with manifest.transaction() as c:
        for name in sorted(live):
            path = manifest.root / store / name
            c.execute(
                "INSERT INTO shards VALUES (?,?,?,?,?,?)",
                (store, name, shards[name], path.stat().st_size, sha256_file(path), now),
            )
        c.executemany(
            "INSERT INTO items (store, key, path, source_fp, status, shard, bucket, info, updated) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            [
                (store, key, path, fp, DONE, shard, bucket, json.dumps(info, sort_keys=True), now)
                for key, (shard, bucket, info, path, fp) in sorted(rows.items())
            ],
        )
        manifest.set_fingerprint(store, fingerprint, c)
        top = max((shard_index(n) for n in shards), default=-1)
        c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"next_shard:{store}", str(top + 1)))
    if store == LATENTS:
        log.info("restored %d latent items; the dataset folder is recorded again by the next build", len(rows))
