"""Scan: list the source files under a dataset root and fingerprint each one.

Only ``stat`` is called here, so scanning 20,000 unchanged files takes a moment; reading image headers
is left to the planning stage, for the files that need work.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from cachebuild.cache.files import sha256_file
from cachebuild.cache.manifest import ScanResult, SourceFile
from cachebuild.errors import ConfigError
from cachebuild.keys import fs_path, path_text
from cachebuild.storage import is_url

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".avif", ".pgm", ".ppm"}
)
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi"})  # read by FFmpeg where the family is video
ANIMATION_EXTENSIONS = frozenset({".gif", ".webp"})  # clips where the family is video, when they hold several frames
_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device"))


def scan_files(
    root: Path, extensions: frozenset[str] = IMAGE_EXTENSIONS, content_hash: bool = False, exclude: Path | None = None
) -> ScanResult:
    """Find files with ``extensions`` under ``root``, recursively, skipping hidden files and folders.

    Symbolic links are followed (kohya's ``10_concept`` folders often are links); a folder reached a second
    time, through a link back to an ancestor or a second link, is not entered again. A file that cannot be
    used (not a regular file, a dangling link, not stat-able) is listed with a reason, so its item fails
    with it; a subfolder that cannot be listed is listed in ``unlisted`` and as a failed entry ``<folder>/``.

    Args:
        root: the dataset folder.
        extensions: lower-case suffixes with the dot.
        content_hash: also hash each file's bytes (slow on large sets; catches edits that keep the mtime).
        exclude: a folder never to enter (the cache itself, when it lives inside the dataset).

    Returns:
        The files, one per key, the keys that several files claim, and the folders that could not be listed.

    Raises:
        ConfigError: ``root`` itself cannot be listed.

    Example:
        >>> scan_files(Path("./dataset")).files[0].key
        'sub/img001'
    """
    if is_url(root):  # object storage: one listing, identities from the listing (sources.remote)
        from cachebuild.sources.remote import scan_url

        return scan_url(root, extensions, content_hash, exclude)
    if exclude is not None and is_url(exclude):  # a remote cache never lies inside a local dataset
        exclude = None
    root = root.resolve()
    by_key: dict[str, list[SourceFile]] = {}
    unlisted: dict[str, str] = {}  # folder -> why it could not be listed
    for rel_dir, entry in _walk(str(root), exclude, unlisted):
        if os.path.splitext(entry.name)[1].lower() in extensions:
            f = _source_file(entry.path, rel_dir + entry.name, content_hash)
            if f is not None:
                by_key.setdefault(f.key, []).append(f)
    for folder, reason in unlisted.items():  # a failed entry, so status and the run's exit code show it
        by_key[folder + "/"] = [SourceFile(folder + "/", folder + "/", 0, 0, None, reason)]
    files, clashes = [], {}
    for key in sorted(by_key):
        group = by_key[key]
        if len(group) > 1:
            clashes[key] = sorted(f.path for f in group)
        files.append(min(group, key=lambda f: f.path))
    return ScanResult(files, clashes, tuple(unlisted))


def _walk(root: str, exclude: Path | None, unlisted: dict[str, str]) -> Iterator[tuple[str, os.DirEntry]]:
    """(folder relative to ``root`` with a trailing '/', or '', and a non-folder entry in it), depth first
    in name order; hidden names are skipped, links followed, each real folder entered once."""
    seen = {_identity(root)}  # (st_dev, st_ino) of every folder entered: a link loop ends here
    exclude = exclude.resolve() if exclude is not None else None  # lexical where parts are missing
    if exclude is not None and exclude.exists():
        seen.add(_identity(str(exclude)))
    stack = [("", root)]
    while stack:
        rel_dir, folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if not rel_dir:
                raise ConfigError(f"cannot list the dataset folder {root}: {_why(exc)}") from None
            unlisted[path_text(rel_dir[:-1])] = f"cannot list {path_text(rel_dir)}: {_why(exc)}"
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if not _is_dir(entry):
                yield rel_dir, entry
                continue
            try:
                ident = _identity(entry.path)
            except OSError as exc:
                unlisted[path_text(rel_dir + entry.name)] = (
                    f"cannot open {path_text(rel_dir + entry.name)}/: {_why(exc)}"
                )
                continue
            if ident not in seen:
                seen.add(ident)
                subdirs.append((rel_dir + entry.name + "/", entry.path))
        stack.extend(reversed(subdirs))


def _source_file(path: str, rel_os: str, content_hash: bool) -> SourceFile | None:
    """The scan's record of one file, with a reason when it cannot be used; None if it vanished."""
    rel = path_text(rel_os)
    key = rel[: len(rel) - len(os.path.splitext(rel)[1])]
    if fs_path(rel) != rel_os:  # stored text would lead back to another name (docs/format.md, "Keys")
        return SourceFile(key, rel, 0, 0, None, "its name holds a literal '\\xNN' read back as a raw byte; rename it")
    try:
        st = os.stat(path)
        kind = next((name for test, name in _KINDS if test(st.st_mode)), None)
        if kind is not None:  # opening a FIFO or a device would block or read forever
            return SourceFile(
                key, rel, 0, 0, None, f"not a regular file ({kind}); remove it or replace it with a regular file"
            )
        digest = sha256_file(Path(path)) if content_hash else None
    except FileNotFoundError:
        if not os.path.islink(path):
            return None  # vanished between listing and stat: not part of this scan
        target = path_text(os.readlink(path))
        return SourceFile(key, rel, 0, 0, None, f"symbolic link to a missing file ({target}); fix or remove the link")
    except OSError as exc:
        return SourceFile(key, rel, 0, 0, None, f"cannot read {rel}: {_why(exc)}")
    return SourceFile(key, rel, st.st_size, st.st_mtime_ns, digest)


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links: a linked folder is a folder
    except OSError:
        return False  # not stat-able: treated as a file, which then fails with the reason


def _why(exc: OSError) -> str:
    """What went wrong and the fix, for a listing or stat error."""
    if isinstance(exc, PermissionError):
        return "permission denied; fix its permissions"
    return f"{(exc.strerror or str(exc)).lower()}; check the disk and the path"
