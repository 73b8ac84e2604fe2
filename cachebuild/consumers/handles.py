"""Shard handles for a reader: each shard opened once per process, and checked against its manifest record first.

Damage a reader does not look for reaches training silently: a shard overwritten in place (same size) gives NaN
latents, one cut short an error that names neither the shard nor the fix. So the first time a process opens a
shard, its size and SHA-256 are compared with what the manifest recorded when the shard was committed
(``open_cache(..., checksums=False)`` skips it). A check that passed is remembered in the user cache folder
(``$XDG_CACHE_HOME/cachebuild/verified/``, one small file per cache) by the file's identity (device, inode, size,
modification time) and the recorded digest, so DataLoader workers, later epochs and later runs do not hash an
unchanged file again, while a file rewritten since (a new modification time) or copied elsewhere is hashed again.
Decay that keeps the modification time (bit rot) is ``cachebuild verify``'s to find.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import OrderedDict
from pathlib import Path

from cachebuild.cache.files import sha256_file
from cachebuild.cache.shards import ShardFile
from cachebuild.errors import CacheError

MAX_OPEN_SHARDS = 64  # shard handles kept open per process: bounds file descriptors on caches of many shards
VERIFIED_DIR = "verified"  # under the user cache folder (cache.remote.user_cache_dir)


class ShardDamaged(CacheError):
    """A shard's file differs from the manifest's record of it; the message says how (the reader adds where)."""


class ShardChecks:
    """The manifest's record of one store's shards (``{name: (bytes, sha256)}``), and which files passed."""

    def __init__(self, records: dict[str, tuple[int, str]], memo: Path | None):
        self.records, self.memo = records, memo
        self._passed: set[str] | None = None  # identities that passed, read from ``memo`` on first use

    def check(self, path: Path, name: str) -> None:
        """Raise ``ShardDamaged`` unless ``path`` has the size and SHA-256 recorded for ``name``."""
        record = self.records.get(name)
        if record is None:  # not in the index this reader opened: the reader reports what it finds
            return
        size, digest = record
        st = os.stat(path)
        if st.st_size != size:
            raise ShardDamaged(f"it is {st.st_size} bytes, the manifest recorded {size} (truncated or overwritten)")
        identity = f"{digest} {st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns}"
        if identity in self._remembered():
            return
        if sha256_file(path) != digest:
            raise ShardDamaged("its SHA-256 differs from the manifest's record (the file was altered or corrupted)")
        self._remember(identity)

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_passed": None}  # a DataLoader worker reads the memo afresh

    def _remembered(self) -> set[str]:
        if self._passed is None:
            self._passed = set()
            if self.memo is not None:
                with contextlib.suppress(OSError):
                    self._passed = set(self.memo.read_text(encoding="utf-8").splitlines())
        return self._passed

    def _remember(self, identity: str) -> None:
        self._remembered().add(identity)
        if self.memo is None:
            return
        with contextlib.suppress(OSError):  # no writable user cache folder: checked once per process instead
            self.memo.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.memo, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:  # one short append: whole, even with DataLoader workers appending at once
                os.write(fd, (identity + "\n").encode())
            finally:
                os.close(fd)


def memo_path(root: Path) -> Path:
    """The file that remembers which shards of the cache at ``root`` passed their check."""
    from cachebuild.cache.remote import user_cache_dir

    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return user_cache_dir() / VERIFIED_DIR / f"{key}.txt"


class ShardFileHandles:
    """Open shard files of one store for the current process, least recently used closed first."""

    def __init__(self, folder: Path, fetch=None, checks: ShardChecks | None = None):
        self.folder = folder
        self.fetch = fetch  # name -> local path, downloading it first (a cache at a URL); None: in ``folder``
        self.checks = checks  # None: shards are opened unchecked
        self._pid = os.getpid()
        self._open: OrderedDict[str, ShardFile] = OrderedDict()

    def get(self, name: str) -> ShardFile:
        """The open shard ``name``, checked on its first open in this process.

        Raises:
            ShardDamaged: it differs from the manifest's record.
            CacheError: it is missing.
        """
        if self._pid != os.getpid():  # forked: the parent's handles are not ours to use
            self._pid, self._open = os.getpid(), OrderedDict()
        shard = self._open.get(name)
        if shard is None:
            path = self.folder / name if self.fetch is None else self.fetch(name)
            if self.checks is not None and path.is_file():  # a missing file is ShardFile.open's to report
                self.checks.check(path, name)
            shard = ShardFile.open(path)
            self._open[name] = shard
            if len(self._open) > MAX_OPEN_SHARDS:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(name)
        return shard

    def fresh(self) -> ShardFileHandles:
        """The same store with no handle open (for another process)."""
        return ShardFileHandles(self.folder, self.fetch, self.checks)
