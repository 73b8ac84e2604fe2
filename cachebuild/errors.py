"""One exception hierarchy for cachebuild.

Configuration and environment problems raise a :class:`CachebuildError` subclass and stop the run
before any work; the CLI turns them into a message and exit code 2. Problems with a single input item
never raise out of the pipeline: they become a ``failed`` manifest row with a reason (see
:class:`ItemError`, used only inside the per-item boundary).
"""

from __future__ import annotations

import errno


class CachebuildError(Exception):
    """Base class for errors that stop a run. The message always says how to fix it."""


class ConfigError(CachebuildError):
    """An invalid option or combination of options."""


class ModelLoadError(CachebuildError):
    """The model could not be found or loaded from the given source."""


class FingerprintMismatch(CachebuildError):
    """The cache at ``--out`` was built with settings that change the bytes written."""

    def __init__(self, store: str, out: str, differences: list[tuple[str, object, object]]):
        self.store = store
        self.differences = differences
        lines = [f"  {name}: cache has {old!r}, this run asks for {new!r}" for name, old, new in differences]
        super().__init__(
            f"the {store} cache in {out} was built with different settings:\n"
            + "\n".join(lines)
            + "\nUse another --out for a cache with the new settings, or pass --rebuild to discard the"
            " existing entries and encode everything again."
        )


class CacheError(CachebuildError):
    """The cache folder is missing, damaged or of an unknown version."""


class ItemError(Exception):
    """A single input item cannot be cached; the message is the reason recorded in the manifest."""


class StorageError(CachebuildError):
    """The disk refused: full, read-only, not a folder, no permission. Committed shards are never lost."""


# errno -> what it means for the user and what to do; anything else from the OS is a bug and keeps its traceback
_STORAGE_ERRNOS = {
    errno.ENOSPC: (
        "no space left on the device",
        "committed shards are kept: free some space (or pass another --out) and run the same command again to "
        "continue where it stopped",
    ),
    errno.EDQUOT: (
        "disk quota exceeded",
        "committed shards are kept: free some space or raise the quota, then run the same command again",
    ),
    errno.EROFS: ("read-only file system", "pass an --out on a writable disk"),
    errno.EACCES: ("permission denied", "fix the folder's permissions or pass another --out"),
    errno.EPERM: ("operation not permitted", "fix the folder's permissions or pass another --out"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "pass an --out whose parents are folders"),
}


def storage_error(exc: OSError) -> StorageError | None:
    """One clear line for an environmental OSError (disk full, read-only, ...); None for anything else.

    Example:
        >>> str(storage_error(OSError(errno.EROFS, "Read-only file system", "/mnt/cache/latents")))
        '/mnt/cache/latents: read-only file system; pass an --out on a writable disk'
    """
    known = _STORAGE_ERRNOS.get(exc.errno) if isinstance(exc.errno, int) else None
    if known is None:
        return None
    what, fix = known
    where = exc.filename if exc.filename is not None else "the cache"
    return StorageError(f"{where}: {what}; {fix}")
