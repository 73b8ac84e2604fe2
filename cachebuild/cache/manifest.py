"""Commit and resume: the SQLite manifest at ``<out>/manifest.sqlite`` is the truth about a cache.

A shard's item rows are committed in one transaction, after the shard file is durable, so the manifest
never names a shard that is not complete on disk. A crash between the rename and the commit leaves an
unreferenced shard file inside the run's claim on shard names (``cache.claims``), which the next run deletes
before it starts (its items are still pending).

Several stores share one manifest (``latents``, ``textenc``): every table is keyed by store.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cachebuild.cache.files import ShardInfo, files_sha256, sha256_file, shard_index
from cachebuild.errors import CacheError, StorageError, storage_error
from cachebuild.keys import path_text

MANIFEST_NAME = "manifest.sqlite"
LOCK_NAME, LOCK_OWNER_NAME = ".lock", ".lock.owner"  # the writer lock, and who holds it (pid), for the message
REBUILD_HINT = "rebuild it from the shards with: cachebuild rebuild-manifest {root}"
SCHEMA_VERSION = 1

PENDING, DONE, FAILED = "pending", "done", "failed"
LATENTS, TEXTENC = "latents", "textenc"  # store names: folders under the cache root, keys in every table
CONTROL = "control"  # FLUX.1 Kontext's condition images' latents, by the latents' keys (jobs.control)
STORES = (LATENTS, TEXTENC, CONTROL)

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
    reason: str | None = None  # why this file cannot be used (a FIFO, a dangling link...): the item fails

    @property
    def fingerprint(self) -> str:
        """Changes when the file changes: size and mtime, plus the content hash when one was taken."""
        base = f"{self.size}:{self.mtime_ns}"
        return f"{base}:{self.sha256}" if self.sha256 else base


@dataclass(frozen=True)
class ScanResult:
    files: list[SourceFile]  # one per key, sorted by key; those with a reason fail
    clashes: dict[str, list[str]]  # key -> the relative paths that share it; these items fail
    unlisted: tuple[str, ...] = ()  # folders that could not be listed: the items under them are kept as they are

    def covers(self, key: str) -> bool:
        """Whether ``key`` lies under a folder this scan could not see into (so its absence says nothing)."""
        return under_folders(key, self.unlisted)


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
        self._lock = None  # the writer lock (a filelock.FileLock) while held
        self.read_only = False
        self.remote = None  # a cache.remote.RemoteOutput when the shards live at a URL (cache.remote.open_output)

    @classmethod
    def open(cls, root: Path, create: bool = True, read_only: bool = False) -> Manifest:
        """Open (or with ``create`` make) the manifest in ``root``; ``read_only`` never writes to it.

        A read-only open works on read-only storage too (a finished cache copied to a read-only disk).

        Raises:
            CacheError: no manifest there, a damaged one (the message gives the rebuild command), or a newer schema.
            StorageError: the folder cannot be created or written (read-only, not a folder, disk full).
        """
        path = root / MANIFEST_NAME
        if not path.exists() and (not create or read_only):
            raise CacheError(f"{root} is not a cachebuild cache (no {MANIFEST_NAME}); check the path")
        with _sqlite_errors(root):
            conn = _connect_read_only(path) if read_only else _connect_writer(root, path)
            try:
                found = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if found is None and not read_only:
                    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            except BaseException:
                conn.close()
                raise
        if found is not None and int(found[0]) > SCHEMA_VERSION:
            conn.close()
            raise CacheError(f"{path} was written by a newer cachebuild (schema {found[0]}); upgrade cachebuild")
        manifest = cls(root, conn)
        manifest.read_only = read_only
        return manifest

    def lock(self) -> None:
        """Take the cache's writer lock, or fail naming the holder; released on close.

        ``filelock`` gives the same exclusive, crash-released lock on Linux, macOS and Windows.
        """
        self._lock = acquire_writer_lock(self.root)

    def close(self) -> None:
        """Close; a writer first folds the write-ahead log into the database file, so that a copy of a finished
        cache is one self-contained file that opens on read-only storage."""
        if not self.read_only:
            with contextlib.suppress(sqlite3.Error):  # a reader elsewhere may hold the log; then it stays
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with _sqlite_errors(self.root):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have ended the transaction already
                    self.conn.execute("ROLLBACK")
                raise
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                raise

    def next_shard_index(self, store: str) -> int:
        """The lowest shard index never committed in ``store``: shard names are never reused, not even after
        ``--rebuild``, so a reader opened before a rebuild cannot mistake a new shard for an old one."""
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (f"next_shard:{store}",)).fetchone()
        names = [s["name"] for s in self.shards(store)]
        used = [i for i in map(shard_index, names) if i is not None]
        return max([int(json.loads(row[0])) if row else 0, max(used, default=-1) + 1])

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
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    def set_meta_many(self, values: dict[str, dict], prefix: str | None = None, keep: Iterable[str] = ()) -> None:
        """Write several meta values in one transaction; with ``prefix``, also forget every key under it that is
        neither written now nor in ``keep`` (what the latents job remembers per video file)."""
        with self.transaction() as c:
            c.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [(k, json.dumps(v, sort_keys=True)) for k, v in values.items()],
            )
            if prefix is not None:
                kept = json.dumps([*values, *keep])
                c.execute(
                    "DELETE FROM meta WHERE substr(key, 1, ?) = ? AND key NOT IN (SELECT value FROM json_each(?))",
                    (len(prefix), prefix, kept),
                )

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
        unlisted: tuple[str, ...] = (),
    ) -> SyncResult:
        """Make the index match a scan, in one transaction with the fingerprint.

        New keys become pending; keys whose source changed become pending again; keys whose file is gone
        leave the index, except under the ``unlisted`` folders the scan could not see into; with
        ``retry_failed`` failed items become pending. Clashing keys, and files the scan gave a reason, fail.
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
                if clash or f.reason:
                    reason = f.reason
                    if clash:
                        reason = f"several files share the key {f.key!r}: {', '.join(clash)}; rename all but one"
                    # no source fingerprint: once the cause is fixed the item counts as changed
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
                if under_folders(key, unlisted):  # its folder could not be listed: not evidence that the file is gone
                    continue
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

    def keys(self, store: str, status: str) -> list[str]:
        """The keys of one status, sorted: the key alone, without parsing every item's info."""
        cur = self.conn.execute("SELECT key FROM items WHERE store=? AND status=? ORDER BY key", (store, status))
        return [k for (k,) in cur]

    def sources(self, store: str, keys: list[str]) -> dict[str, list]:
        """``{key: [path, source fingerprint]}``: what a shard records about where its items came from."""
        out: dict[str, list] = {}
        for start in range(0, len(keys), 500):  # SQLite bounds the number of parameters of one statement
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            cur = self.conn.execute(
                f"SELECT key, path, source_fp FROM items WHERE store=? AND key IN ({marks})", (store, *chunk)
            )
            out |= {k: [p, fp] for k, p, fp in cur}
        return out

    def statuses(self, store: str, keys: list[str]) -> dict[str, tuple[str, str | None, float]]:
        """``{key: (status, reason, updated)}`` for those of ``keys`` the store holds (``updated``: the time.time()
        of the row's last change), so a caller can tell what happened to a few items without reading them all."""
        out: dict[str, tuple[str, str | None, float]] = {}
        for start in range(0, len(keys), 500):  # SQLite bounds the number of parameters of one statement
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            cur = self.conn.execute(
                f"SELECT key, status, reason, updated FROM items WHERE store=? AND key IN ({marks})", (store, *chunk)
            )
            out |= {k: (s, r, u) for k, s, r, u in cur}
        return out

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
                # a reason may quote a name with undecodable bytes; SQLite stores text only
                [(FAILED, path_text(reason), now, store, key) for key, reason in failures],
            )

    def commit_shard(self, store: str, shard: ShardInfo, rows: list[tuple[str, str | None, dict]]) -> None:
        """Register a durable shard and mark its items done, atomically. ``rows`` is (key, bucket, info)."""
        now = time.time()
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO shards VALUES (?,?,?,?,?,?)",
                (store, shard.name, len(shard.keys), shard.bytes, shard.sha256, now),
            )
            index = shard_index(shard.name)
            if index is not None:  # never hand this name out again (see next_shard_index)
                c.execute(
                    "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                    "value = MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                    (f"next_shard:{store}", str(index + 1)),
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

    def done_since(self, store: str, since: float) -> int:
        """Items made done at or after Unix time ``since`` (what a run committed, counted after it stopped)."""
        row = self.conn.execute(
            "SELECT COUNT(*) FROM items WHERE store=? AND status=? AND updated>=?", (store, DONE, since)
        ).fetchone()
        return row[0]

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

        def remembered(f: Path) -> str:
            digest = self.remembered_hash(f)
            if digest is None:
                digest = sha256_file(f)
                self.remember_hash(f, digest)
            return digest

        return files_sha256(files, remembered)

    def remember_hash(self, path: Path, sha256: str) -> None:
        st = path.stat()
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO file_hashes VALUES (?,?,?,?)",
                (str(path.resolve()), st.st_size, st.st_mtime_ns, sha256),
            )


def under_folders(key: str, folders: Iterable[str]) -> bool:
    """Whether ``key`` lies inside one of ``folders`` (relative, '/'-separated, no trailing '/')."""
    return any(key.startswith(folder + "/") for folder in folders)


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


def acquire_writer_lock(root: Path):
    """The cache's writer lock (a held ``filelock.FileLock``), or a CacheError naming the holder.

    ``filelock`` gives the same exclusive lock, released by the OS when its holder dies, on Linux, macOS and
    Windows.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(root / LOCK_NAME, timeout=0, thread_local=False)
    owner = root / LOCK_OWNER_NAME
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = owner.read_text(encoding="utf-8").strip()
        except OSError:
            holder = ""
        raise CacheError(
            f"another cachebuild run ({holder or 'another process'}) is writing to {root}; wait for it or use "
            "another --out"
        ) from None
    except OSError as exc:
        raise (storage_error(exc) or exc) from exc
    owner.write_text(f"pid {os.getpid()}", encoding="utf-8")
    return lock


def _connect_writer(root: Path, path: Path) -> sqlite3.Connection:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise (storage_error(exc) or exc) from exc
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a committed shard stays committed through power loss
        conn.executescript(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """Read-only, and on read-only storage ``immutable``: SQLite then creates no side files (-wal, -shm),
    which it cannot where the folder is not writable. Writers fold the log into the file when they close, so
    an immutable reader of a finished cache sees everything."""
    uri = path.resolve().as_uri() + "?mode=ro"
    if os.access(path.parent, os.W_OK):
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30)
            conn.execute("SELECT 1 FROM meta LIMIT 1")
            return conn
        except sqlite3.OperationalError:
            conn.close()  # side files cannot be made after all (permissions): fall back to immutable
    return sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None, timeout=30)


@contextlib.contextmanager
def _sqlite_errors(root: Path) -> Iterator[None]:
    """SQLite's environmental errors as one clear line: disk full, read-only, damaged."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        text = str(exc).lower()
        where = root / MANIFEST_NAME
        if "full" in text:
            raise StorageError(
                f"{where}: no space left on the device; committed shards are kept: free some space (or pass another "
                "--out) and run the same command again to continue where it stopped"
            ) from exc
        if "readonly" in text or "read-only" in text:
            raise StorageError(f"{where}: the cache folder is read-only; pass an --out on a writable disk") from exc
        if any(w in text for w in ("malformed", "not a database", "corrupt", "no such table")):
            raise CacheError(f"the manifest {where} is damaged ({exc}); {REBUILD_HINT.format(root=root)}") from exc
        raise
