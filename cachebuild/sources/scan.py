"""Scan: list the source files under a dataset root and fingerprint each one.

Only ``stat`` is called here, so scanning 20,000 unchanged files takes a moment; reading image headers
is left to the planning stage, for the files that need work.
"""

from __future__ import annotations

import os
from pathlib import Path

from cachebuild.cache.files import sha256_file
from cachebuild.cache.manifest import ScanResult, SourceFile

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".avif", ".pgm", ".ppm"}
)


def scan_files(
    root: Path, extensions: frozenset[str] = IMAGE_EXTENSIONS, content_hash: bool = False, exclude: Path | None = None
) -> ScanResult:
    """Find files with ``extensions`` under ``root``, recursively, skipping hidden files and folders.

    Args:
        root: the dataset folder.
        extensions: lower-case suffixes with the dot.
        content_hash: also hash each file's bytes (slow on large sets; catches edits that keep the mtime).
        exclude: a folder never to enter (the cache itself, when it lives inside the dataset).

    Returns:
        The files, one per key, and the keys that several files claim.

    Example:
        >>> scan_files(Path("./dataset")).files[0].key
        'sub/img001'
    """
    root = root.resolve()
    exclude = exclude.resolve() if exclude else None
    by_key: dict[str, list[SourceFile]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and here / d != exclude)
        for name in filenames:
            suffix = os.path.splitext(name)[1].lower()
            if name.startswith(".") or suffix not in extensions:
                continue
            full = here / name
            try:
                st = full.stat()
            except OSError:  # vanished or unreadable between listing and stat: not part of this scan
                continue
            rel = full.relative_to(root).as_posix()
            key = rel[: len(rel) - len(suffix)]
            digest = sha256_file(full) if content_hash else None
            by_key.setdefault(key, []).append(SourceFile(key, rel, st.st_size, st.st_mtime_ns, digest))
    files, clashes = [], {}
    for key in sorted(by_key):
        group = by_key[key]
        if len(group) > 1:
            clashes[key] = sorted(f.path for f in group)
        files.append(min(group, key=lambda f: f.path))
    return ScanResult(files, clashes)
