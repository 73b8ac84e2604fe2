"""Durable files: write to a temporary name, flush, fsync, rename, fsync the folder; hash; name shards.

The lowest piece of the cache room: no torch, no SQLite. The manifest, both shard writers and ``verify``
build on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

HASH_CHUNK_BYTES = 8 * 1024 * 1024  # read size while hashing shards and weights; large reads, bounded memory
SHARD_DIGITS = 5  # shard-00000 .. shard-99999; zero-padded so names sort in write order
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class ShardInfo:
    """A shard made durable: what the manifest records about it."""

    name: str  # file name inside the store folder
    keys: tuple[str, ...]
    bytes: int
    sha256: str


def own_storage(t):
    """``t`` as a contiguous tensor owning exactly its bytes: a view into a batch's output would keep the
    whole batch alive in host memory until the shard is written."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def shard_name(index: int, suffix: str) -> str:
    return f"shard-{index:0{SHARD_DIGITS}d}{suffix}"


def shard_index(name: str) -> int | None:
    """The index in a shard file name, or None for a file that is not a shard."""
    stem = name.split(".", 1)[0]
    if not stem.startswith("shard-"):
        return None
    digits = stem[len("shard-") :]
    return int(digits) if digits.isdigit() else None


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, fsync it, rename it into place, fsync the folder."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a half-written file helps nobody (and fills the disk further)
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def commit_bytes(path: Path, keys: tuple[str, ...], data: bytes) -> ShardInfo:
    """Make a serialized shard durable at ``path`` and describe it for the manifest."""
    write_durably(path, data)
    return ShardInfo(path.name, keys, len(data), hashlib.sha256(data).hexdigest())


def files_sha256(files, digest=None) -> str:
    """One hash for a set of files (a model's weights, a tokenizer folder's files): a single file's SHA-256, or
    the SHA-256 of the files' hex digests joined in order. ``digest(path)`` gives a file's SHA-256
    (:func:`sha256_file` by default; the manifest passes one that remembers)."""
    parts = [(digest or sha256_file)(f) for f in files]
    return parts[0] if len(parts) == 1 else hashlib.sha256("".join(parts).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in ``HASH_CHUNK_BYTES`` pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()
