"""Scan a dataset at a URL (``s3://bucket/images/``, ``gs://``, ``hf://datasets/...``): one listing, no reads.

A remote file's identity is its size plus a number derived from its ETag (a content checksum on S3 and GCS;
a re-upload of the same bytes keeps it), or from its modification time where the backend gives no ETag. It
lands in the manifest's ``mtime_ns`` column, so ``same_source`` compares it as it compares local files.
"""

from __future__ import annotations

import hashlib
import posixpath
from datetime import datetime

from cachebuild.cache.files import HASH_CHUNK_BYTES
from cachebuild.cache.manifest import ScanResult, SourceFile
from cachebuild.errors import ConfigError
from cachebuild.storage import UrlPath

_ETAG_FIELDS = ("ETag", "etag", "md5Hash", "crc32c", "blob_id", "sha", "checksum")
_TIME_FIELDS = ("LastModified", "last_modified", "mtime", "updated", "modified", "created", "timeCreated")


def scan_url(root: UrlPath, extensions: frozenset[str], content_hash: bool, exclude=None) -> ScanResult:
    """The files with ``extensions`` under ``root``, recursively, hidden names skipped, by key.

    Raises:
        ConfigError: ``root`` cannot be listed (missing bucket, no credentials, unreachable endpoint).
    """
    fs, base = root.fs, root.path.rstrip("/")
    same_store = isinstance(exclude, UrlPath) and exclude.protocol == root.protocol
    skip = exclude.path.rstrip("/") + "/" if same_store else None  # a cache inside the dataset is not data
    try:
        fs.invalidate_cache(base)  # a listing cached earlier in this process may be stale
        found = fs.find(base, detail=True)
    except Exception as exc:  # network, credentials, a missing bucket: nothing can be done without the listing
        raise ConfigError(
            f"cannot list the dataset {root} ({type(exc).__name__}: {exc}); check the URL, the credentials and "
            "the endpoint in the environment (AWS_ENDPOINT_URL, AWS_PROFILE, ... for s3://)"
        ) from None
    by_key: dict[str, list[SourceFile]] = {}
    for name, info in sorted(found.items()):
        if info.get("type", "file") != "file" or not name.startswith(base + "/"):
            continue
        if skip is not None and name.startswith(skip):
            continue
        rel = name[len(base) + 1 :]
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        stem, ext = posixpath.splitext(rel)
        if ext.lower() not in extensions:
            continue
        digest = _sha256(fs, name) if content_hash else None
        by_key.setdefault(stem, []).append(SourceFile(stem, rel, int(info.get("size") or 0), identity(info), digest))
    files, clashes = [], {}
    for key in sorted(by_key):
        group = by_key[key]
        if len(group) > 1:
            clashes[key] = sorted(f.path for f in group)
        files.append(min(group, key=lambda f: f.path))
    return ScanResult(files, clashes)


def identity(info: dict) -> int:
    """A stable 63-bit number for one version of a remote object: from its ETag, else its modification time."""
    for field in _ETAG_FIELDS:
        value = info.get(field)
        if value:
            return int(hashlib.sha256(str(value).strip('"').encode()).hexdigest()[:15], 16)
    for field in _TIME_FIELDS:
        value = info.get(field)
        if isinstance(value, datetime):
            return int(value.timestamp() * 1e9)
        if isinstance(value, (int, float)):
            return int(value * 1e9) if value < 1e11 else int(value)  # seconds or already nanoseconds
        if isinstance(value, str):
            try:
                return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
            except ValueError:
                continue
    return 0  # no version field at all: size alone tells changes apart (add --hash for content)


def _sha256(fs, name: str) -> str:
    h = hashlib.sha256()
    with fs.open(name, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()
