"""Commit and resume: the SQLite manifest at ``<out>/manifest.sqlite`` is the truth about a cache.

A shard's item rows are committed in one transaction, after the shard file is durable, so the manifest
never names a shard that is not complete on disk. A crash between the rename and the commit leaves an
unreferenced shard file, which the next run deletes before it starts (its items are still pending).

Several stores share one manifest (``latents``, ``textenc``): every table is keyed by store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cachebuild.cache.files import ShardInfo, sha256_file
from cachebuild.errors import CacheError

MANIFEST_NAME = "manifest.sqlite"
SCHEMA_VERSION = 1

PENDING, DONE, FAILED = "pending", "done", "failed"
LATENTS, TEXTENC = "latents", "textenc"  # store names: folders under the cache root, keys in every table
STORES = (LATENTS, TEXTENC)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    store TEXT NOT NULL,
    key TEXT NOT NULL,
    path TEXT,               -- source file relative to the dataset root
    source_fp TEXT,          -- size:mtime_ns[:sha256] of the source when it was planned
    status TEXT NOT NULL,    -- pending | done | failed
    reason TEXT,             -- why it failed, for a person to act on
    shard TEXT,              -- shard file holding its tensors (done only)
    bucket TEXT,             -- 'WxH' for latents
    info TEXT,               -- JSON: original size, crop, flip, ... (what the shard metadata also holds)
    updated REAL NOT NULL,
    PRIMARY KEY (store, key)
);
CREATE INDEX IF NOT EXISTS items_status ON items (store, status);
CREATE TABLE IF NOT EXISTS shards (
    store TEXT NOT NULL,
    name TEXT NOT NULL,
    items INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (store, name)
);
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class SourceFile:
    """One file found by the scan. ``key`` joins it to every cache entry made from it."""

    key: str  # path relative to the root, without extension, '/'-separated: "sub/img001"
    path: str  # path relative to the root, with extension
    size: int  # bytes
    mtime_ns: int
    sha256: str | None = None  # content hash, only with --hash

    @property
    def fingerprint(self) -> str:
        """Changes when the file changes: size and mtime, plus the content hash when one was taken."""
        base = f"{self.size}:{self.mtime_ns}"
        return f"{base}:{self.sha256}" if self.sha256 else base


@dataclass(frozen=True)
class ScanResult:
    files: list[SourceFile]  # one per key, sorted by key
    clashes: dict[str, list[str]]  # key -> the relative paths that share it; these items fail


@dataclass(frozen=True)
class SyncResult:
    """What a scan changed in the index."""

    new: int
    changed: int
    removed: int
    retried: int


@dataclass(frozen=True)
class ItemRow:
    key: str
    path: str | None
    status: str
    reason: str | None
    shard: str | None
    bucket: str | None
    info: dict


class Manifest:
    """The cache index. Open with :meth:`open`; use as a context manager to close it.

    Example:
        >>> with Manifest.open(Path("./cache")) as m:
        ...     m.counts("latents")
        {'done': 20000, 'failed': 3, 'pending': 0}
    """

    def __init__(self, root: Path, conn: sqlite3.Connection):
        self.root = root
        self.conn = conn
        self._lock_fd: int | None = None

    @classmethod
    def open(cls, root: Path, create: bool = True, read_only: bool = False) -> Manifest:
        """Open (or with ``create`` make) the manifest in ``root``; ``read_only`` never writes to it."""
        path = root / MANIFEST_NAME
        if not path.exists() and (not create or read_only):
            raise CacheError(f"{root} is not a cachebuild cache (no {MANIFEST_NAME}); check the path")
        if read_only:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=30)
        else:
            root.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a committed shard stays committed through power loss
            conn.executescript(_SCHEMA)
        try:
            found = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise CacheError(f"the manifest {path} cannot be read ({exc}); it may be damaged") from exc
        if found is None and not read_only:
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif found is not None and int(found[0]) > SCHEMA_VERSION:
            raise CacheError(f"{path} was written by a newer cachebuild (schema {found[0]}); upgrade cachebuild")
        return cls(root, conn)

    def lock(self) -> None:
        """Take the cache's writer lock, or fail naming the holder; released on close."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CacheError(
                f"another cachebuild run ({holder}) is writing to {self.root}; wait for it or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._lock_fd = fd

    def close(self) -> None:
        self.conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- fingerprints -------------------------------------------------------------------------------
    def fingerprint(self, store: str) -> dict | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (f"fingerprint:{store}",)).fetchone()
        return json.loads(row[0]) if row else None

    def set_fingerprint(self, store: str, fingerprint: dict, conn: sqlite3.Connection | None = None) -> None:
        (conn or self.conn).execute(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            (f"fingerprint:{store}", json.dumps(fingerprint, sort_keys=True)),
        )

    def get_meta(self, key: str) -> dict | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_meta(self, key: str, value: dict) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    def clear_store(self, store: str) -> list[str]:
        """Forget every item and shard of ``store`` (for --rebuild); returns the shard names to delete."""
        with self.transaction() as c:
            names = [r[0] for r in c.execute("SELECT name FROM shards WHERE store=?", (store,))]
            c.execute("DELETE FROM items WHERE store=?", (store,))
            c.execute("DELETE FROM shards WHERE store=?", (store,))
            c.execute("DELETE FROM meta WHERE key=?", (f"fingerprint:{store}",))
        return names

    # -- items ----------------------------------------------------------------------------------------
    def sync_items(
        self,
        store: str,
        files: list[SourceFile],
        clashes: dict[str, list[str]],
        retry_failed: bool,
        fingerprint: dict,
    ) -> SyncResult:
        """Make the index match a scan, in one transaction with the fingerprint.

        New keys become pending; keys whose source changed become pending again; keys whose file is gone
        leave the index; with ``retry_failed`` failed items become pending. Clashing keys fail.
        """
        now = time.time()
        new = changed = removed = retried = 0
        with self.transaction() as c:
            known = {
                r[0]: (r[1], r[2], r[3])
                for r in c.execute("SELECT key, source_fp, status, path FROM items WHERE store=?", (store,))
            }
            seen = set()
            for f in files:
                seen.add(f.key)
                clash = clashes.get(f.key)
                old = known.get(f.key)
                if clash:
                    reason = f"several files share the key {f.key!r}: {', '.join(clash)}; rename all but one"
                    # no source fingerprint: once the clash is resolved the item counts as changed
                    c.execute(
                        "INSERT OR REPLACE INTO items (store, key, path, source_fp, status, reason, updated) "
                        "VALUES (?,?,?,?,?,?,?)",
                        (store, f.key, f.path, None, FAILED, reason, now),
                    )
                    continue
                if old is None:
                    new += 1
                    c.execute(
                        "INSERT INTO items (store, key, path, source_fp, status, updated) VALUES (?,?,?,?,?,?)",
                        (store, f.key, f.path, f.fingerprint, PENDING, now),
                    )
                elif not same_source(old[0], f.fingerprint) or old[2] != f.path:
                    changed += 1
                    c.execute(
                        "UPDATE items SET path=?, source_fp=?, status=?, reason=NULL, shard=NULL, bucket=NULL, "
                        "info=NULL, updated=? WHERE store=? AND key=?",
                        (f.path, f.fingerprint, PENDING, now, store, f.key),
                    )
                else:
                    if old[0] != f.fingerprint:  # same source, now with a content hash: remember it
                        c.execute("UPDATE items SET source_fp=? WHERE store=? AND key=?", (f.fingerprint, store, f.key))
                    if retry_failed and old[1] == FAILED:
                        retried += 1
                        c.execute(
                            "UPDATE items SET status=?, reason=NULL, updated=? WHERE store=? AND key=?",
                            (PENDING, now, store, f.key),
                        )
            for key in known.keys() - seen:
                removed += 1
                c.execute("DELETE FROM items WHERE store=? AND key=?", (store, key))
            if self.fingerprint(store) != fingerprint:
                self.set_fingerprint(store, fingerprint, c)
        return SyncResult(new, changed, removed, retried)

    def items(self, store: str, status: str | None = None) -> list[ItemRow]:
        sql = "SELECT key, path, status, reason, shard, bucket, info FROM items WHERE store=?"
        args: tuple = (store,)
        if status:
            sql += " AND status=?"
            args += (status,)
        return [
            ItemRow(k, p, s, r, sh, b, json.loads(i) if i else {})
            for k, p, s, r, sh, b, i in self.conn.execute(sql + " ORDER BY key", args)
        ]

    def item_pages(self, store: str, status: str, page_size: int) -> Iterator[list[ItemRow]]:
        """The items of one status in key order, ``page_size`` rows at a time, so a caller holds one page of
        a million-item store. Each page starts after the previous page's last key, so items that change status
        behind the cursor (the caller committing what it read) neither repeat nor shift the pages."""
        sql = (
            "SELECT key, path, status, reason, shard, bucket, info FROM items "
            "WHERE store=? AND status=? AND key>? ORDER BY key LIMIT ?"
        )
        after = ""
        while True:
            page = [
                ItemRow(k, p, s, r, sh, b, json.loads(i) if i else {})
                for k, p, s, r, sh, b, i in self.conn.execute(sql, (store, status, after, page_size)).fetchall()
            ]
            if not page:
                return
            yield page
            after = page[-1].key

    def done_by_info(self, store: str, field: str, values: list[str]) -> dict[str, tuple[str, dict]]:
        """For each of ``values`` that a done item has as ``info.<field>``: (shard, info) of the first such item
        by key. Text stores use it to find captions already stored, one chunk of text ids at a time."""
        cur = self.conn.execute(
            "SELECT json_extract(info, ?) AS v, MIN(key), shard, info FROM items "
            "WHERE store=? AND status=? AND v IN (SELECT value FROM json_each(?)) GROUP BY v",
            (f"$.{field}", store, DONE, json.dumps(values)),
        )
        return {v: (shard, json.loads(info)) for v, _, shard, info in cur}

    def mark_failed(self, store: str, failures: Iterable[tuple[str, str]]) -> None:
        now = time.time()
        with self.transaction() as c:
            c.executemany(
                "UPDATE items SET status=?, reason=?, shard=NULL, updated=? WHERE store=? AND key=?",
                [(FAILED, reason, now, store, key) for key, reason in failures],
            )

    def commit_shard(self, store: str, shard: ShardInfo, rows: list[tuple[str, str | None, dict]]) -> None:
        """Register a durable shard and mark its items done, atomically. ``rows`` is (key, bucket, info)."""
        now = time.time()
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO shards VALUES (?,?,?,?,?,?)",
                (store, shard.name, len(shard.keys), shard.bytes, shard.sha256, now),
            )
            c.executemany(
                "UPDATE items SET status=?, reason=NULL, shard=?, bucket=?, info=?, updated=? WHERE store=? AND key=?",
                [
                    (DONE, shard.name, bucket, json.dumps(info, sort_keys=True), now, store, key)
                    for key, bucket, info in rows
                ],
            )

    def requeue_items(self, store: str, keys: Iterable[str]) -> int:
        """Mark items pending again and forget where their tensors were (a damaged or missing shard)."""
        now = time.time()
        rows = [(PENDING, now, store, key) for key in keys]
        with self.transaction() as c:
            c.executemany(
                "UPDATE items SET status=?, reason=NULL, shard=NULL, bucket=NULL, info=NULL, updated=? "
                "WHERE store=? AND key=?",
                rows,
            )
        return len(rows)

    def point_items(self, store: str, rows: list[tuple[str, str, dict]]) -> None:
        """Mark items done with tensors already committed in ``shard`` (dedup); ``rows`` is (key, shard, info)."""
        now = time.time()
        with self.transaction() as c:
            c.executemany(
                "UPDATE items SET status=?, reason=NULL, shard=?, info=?, updated=? WHERE store=? AND key=?",
                [(DONE, shard, json.dumps(info, sort_keys=True), now, store, key) for key, shard, info in rows],
            )

    # -- shards ---------------------------------------------------------------------------------------
    def shards(self, store: str) -> list[dict]:
        cur = self.conn.execute("SELECT name, items, bytes, sha256 FROM shards WHERE store=? ORDER BY name", (store,))
        return [{"name": n, "items": i, "bytes": b, "sha256": s} for n, i, b, s in cur]

    def drop_dead_shards(self, store: str) -> list[str]:
        """Forget shards no live item points at any more; returns their names so the files can go."""
        with self.transaction() as c:
            dead = [
                r[0]
                for r in c.execute(
                    "SELECT name FROM shards s WHERE store=? AND NOT EXISTS "
                    "(SELECT 1 FROM items i WHERE i.store=s.store AND i.shard=s.name)",
                    (store,),
                )
            ]
            c.executemany("DELETE FROM shards WHERE store=? AND name=?", [(store, n) for n in dead])
        return dead

    # -- summaries ------------------------------------------------------------------------------------
    def counts(self, store: str) -> dict[str, int]:
        counts = {PENDING: 0, DONE: 0, FAILED: 0}
        for status, n in self.conn.execute(
            "SELECT status, COUNT(*) FROM items WHERE store=? GROUP BY status", (store,)
        ):
            counts[status] = n
        return {k: counts[k] for k in (DONE, FAILED, PENDING)}

    def distinct_done(self, store: str, field: str) -> int:
        """How many distinct values of ``info.<field>`` done items have (stored embeddings, for text)."""
        row = self.conn.execute(
            "SELECT COUNT(DISTINCT json_extract(info, ?)) FROM items WHERE store=? AND status=?",
            (f"$.{field}", store, DONE),
        ).fetchone()
        return row[0]

    def bucket_counts(self, store: str) -> dict[str, int]:
        cur = self.conn.execute(
            "SELECT bucket, COUNT(*) FROM items WHERE store=? AND status=? AND bucket IS NOT NULL GROUP BY bucket",
            (store, DONE),
        )
        return dict(sorted(cur, key=lambda r: tuple(int(x) for x in r[0].split("x"))))

    # -- remembered file hashes (model weights), keyed by stat --------------------------------------
    def remembered_hash(self, path: Path) -> str | None:
        st = path.stat()
        row = self.conn.execute(
            "SELECT sha256 FROM file_hashes WHERE path=? AND size=? AND mtime_ns=?",
            (str(path.resolve()), st.st_size, st.st_mtime_ns),
        ).fetchone()
        return row[0] if row else None

    def files_sha256(self, files: tuple[Path, ...]) -> str:
        """One hash for model files (weights, tokenizers), each remembered by (path, size, mtime) so a re-run
        does not read gigabytes again."""
        parts = []
        for f in files:
            digest = self.remembered_hash(f)
            if digest is None:
                digest = sha256_file(f)
                self.remember_hash(f, digest)
            parts.append(digest)
        return parts[0] if len(parts) == 1 else hashlib.sha256("".join(parts).encode()).hexdigest()

    def remember_hash(self, path: Path, sha256: str) -> None:
        st = path.stat()
        self.conn.execute(
            "INSERT OR REPLACE INTO file_hashes VALUES (?,?,?,?)",
            (str(path.resolve()), st.st_size, st.st_mtime_ns, sha256),
        )


def same_source(old_fp: str | None, new_fp: str) -> bool:
    """Whether two source fingerprints name the same content.

    With content hashes on both sides, size and hash decide (a touched file is not re-encoded);
    otherwise size and mtime decide.
    """
    if old_fp is None:
        return False
    old, new = old_fp.split(":"), new_fp.split(":")
    if len(old) == 3 and len(new) == 3:
        return old[0] == new[0] and old[2] == new[2]
    return old[:2] == new[:2]
