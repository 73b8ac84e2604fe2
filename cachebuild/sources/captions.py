"""Scan for captions: a folder of caption files, or a metadata file (diffusers ImageFolder convention).

Item keys match the image keys of ``cachebuild latents`` (path relative to the root, without extension),
so a trainer joins latents and text by key. Each caption's fingerprint is a hash of its text, so touching a
file re-encodes nothing and editing one caption re-encodes that caption alone.

Rules, documented in docs/format.md:
  * text is decoded as UTF-8 (a BOM is dropped) and stripped of surrounding whitespace;
  * an empty caption is encoded as the empty string (the unconditional caption trainers use for dropout);
  * text that is not valid UTF-8 fails with a reason; so does a metadata row with no file name or text.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path

from cachebuild.sources.scan import ScanResult, SourceFile, scan_files

log = logging.getLogger(__name__)

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


@dataclass(frozen=True)
class CaptionScan:
    scan: ScanResult  # one SourceFile per key; the fingerprint hashes the text
    texts: dict[str, str]  # key -> caption text, for keys that could be read
    bad: dict[str, str]  # key -> why the caption cannot be used


def scan_captions(source: Path, caption_ext: str = ".txt", column: str = "text") -> CaptionScan:
    """Read every caption under ``source`` (a folder, or a metadata .jsonl/.csv file).

    A folder holding ``metadata.jsonl`` or ``metadata.csv`` at its root is read through that file.

    Example:
        >>> scan_captions(Path("./dataset")).texts["sub/img001"]
        'a photo of a cat'
    """
    if source.is_dir():
        meta = next((source / n for n in METADATA_NAMES if (source / n).is_file()), None)
        if meta is None:
            return _scan_caption_files(source, caption_ext.lower())
        source = meta
    return _scan_metadata(source, column)


def text_id(text: str) -> str:
    """The dedup identity of a caption within one store (whose fingerprint fixes the encoders)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _scan_caption_files(root: Path, ext: str) -> CaptionScan:
    listing = scan_files(root, frozenset({ext}))
    files, texts, bad = [], {}, {}
    for f in listing.files:
        try:
            data = (root / f.path).read_bytes()
        except OSError as exc:
            bad[f.key] = f"caption file cannot be read ({exc.strerror or exc}); check its permissions"
            files.append(f)
            continue
        files.append(SourceFile(f.key, f.path, f.size, 0, hashlib.sha256(data).hexdigest()))
        try:
            texts[f.key] = data.decode("utf-8-sig").strip()
        except UnicodeDecodeError as exc:
            bad[f.key] = (
                f"caption is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); re-save it as UTF-8"
            )
    return CaptionScan(ScanResult(files, listing.clashes), texts, bad)


def _scan_metadata(path: Path, column: str) -> CaptionScan:
    rows = _read_rows(path)
    files: dict[str, SourceFile] = {}
    texts, bad, clashes = {}, {}, {}
    for line, row in rows:
        name = row.get("file_name") if isinstance(row, dict) else None
        if not isinstance(name, str) or not name.strip():
            key = f"{path.name}#{line}"
            bad[key] = f"{path.name} line {line} has no file_name; fix or remove the row"
            files[key] = SourceFile(key, key, 0, 0, "-")
            continue
        rel = posixpath.normpath(name.strip().replace("\\", "/"))
        key = posixpath.splitext(rel)[0]
        text = row.get(column)
        digest = hashlib.sha256(json.dumps(text).encode()).hexdigest()
        if key in files:
            clashes.setdefault(key, [files[key].path]).append(rel)
            continue
        files[key] = SourceFile(key, rel, len(str(text)), 0, digest)
        if not isinstance(text, str):
            bad[key] = f"{path.name} line {line} has no {column!r} text; add it or pass --caption-column"
        else:
            texts[key] = text.strip()
    ordered = [files[k] for k in sorted(files)]
    return CaptionScan(ScanResult(ordered, clashes), texts, bad)


def _read_rows(path: Path) -> list[tuple[int, object]]:
    """(line number, row) pairs; a JSON line that does not parse becomes a row of its own that fails."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        return [(i + 2, row) for i, row in enumerate(csv.DictReader(text.splitlines()))]
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON; it is reported as a failed item", path.name, i)
            rows.append((i, None))
    return rows
