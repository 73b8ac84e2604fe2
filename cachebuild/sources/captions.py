"""Scan for captions: a folder of caption files, or a metadata file (diffusers ImageFolder convention).

Item keys match the image keys of ``cachebuild latents`` (path relative to the root, without extension),
so a trainer joins latents and text by key. Each caption's fingerprint is a hash of its text, so touching a
file re-encodes nothing and editing one caption re-encodes that caption alone.

Rules, documented in docs/format.md:
  * text is decoded as UTF-8 (a BOM is dropped) and stripped of surrounding whitespace; text that starts
    with a UTF-16 byte-order mark is decoded as UTF-16, since the mark says which it is;
  * an empty caption is encoded as the empty string (the unconditional caption trainers use for dropout);
  * text that is not valid UTF-8, or holds NUL bytes (UTF-16 without a mark), fails with a reason; so does a
    metadata row with no file name or text;
  * a metadata row whose file name is unusable (absolute, a '..' part), that is not valid JSON or has the wrong
    number of CSV fields has no key: it fails as ``<metadata file name>:<line>``;
  * only the first ``--caption-max-bytes`` of a caption are read (of a metadata text, kept) and encoded; a longer
    one is cut there at a character boundary and reported; one over ``CAPTION_FILE_LIMIT_BYTES`` fails, its size
    and the limit named, and is never read. So reading, hashing and tokenizing a caption cost the same whatever
    its size.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import logging
import posixpath
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from cachebuild.config import CAPTION_FILE_LIMIT_BYTES, CAPTION_MAX_BYTES
from cachebuild.errors import ConfigError
from cachebuild.keys import fs_path, path_text
from cachebuild.sources.scan import ScanResult, SourceFile, scan_files
from cachebuild.storage import is_url

log = logging.getLogger(__name__)

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
_DRIVE = re.compile(r"^[A-Za-z]:")  # a Windows absolute path, C:/...


@dataclass(frozen=True)
class CaptionScan:
    scan: ScanResult  # one SourceFile per key; the fingerprint hashes the text
    texts: dict[str, str]  # key -> caption text, for keys that could be read
    bad: dict[str, str]  # key -> why the caption cannot be used
    cut: list[str] = field(default_factory=list)  # keys whose caption was longer than --caption-max-bytes


def scan_captions(
    source: Path, caption_ext: str = ".txt", column: str = "text", max_bytes: int = CAPTION_MAX_BYTES
) -> CaptionScan:
    """Read every caption under ``source`` (a folder, or a metadata .jsonl/.csv file), each up to ``max_bytes``.

    A folder holding ``metadata.jsonl`` or ``metadata.csv`` at its root is read through that file.

    Example:
        >>> scan_captions(Path("./dataset")).texts["sub/img001"]
        'a photo of a cat'
    """
    if source.is_dir():
        meta = next((source / n for n in METADATA_NAMES if (source / n).is_file()), None)
        if meta is None:
            found = _scan_caption_files(source, caption_ext.lower(), max_bytes)
        else:
            found = _scan_metadata(meta, column, max_bytes)
    else:
        found = _scan_metadata(source, column, max_bytes)
    if found.cut:
        log.warning(
            "%d caption(s) are longer than --caption-max-bytes %d (e.g. %s): the first %d bytes of each are encoded",
            len(found.cut), max_bytes, found.cut[0], max_bytes,
        )  # fmt: skip
    return found


def caption_limit_fingerprint(cfg) -> dict:
    """``{"caption_max_bytes": n}`` where it is not the default: it changes the text of captions longer than it,
    and caches built before the option (which the default reads the same way) still match."""
    return {} if cfg.caption_max_bytes == CAPTION_MAX_BYTES else {"caption_max_bytes": cfg.caption_max_bytes}


def text_id(text: str) -> str:
    """The dedup identity of a caption within one store (whose fingerprint fixes the encoders)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _scan_caption_files(root: Path, ext: str, max_bytes: int) -> CaptionScan:
    listing = scan_files(root, frozenset({ext}))
    files, texts, bad, cut = [], {}, {}, []
    for f in listing.files:
        if f.reason:  # not a regular file, a dangling link...: never opened
            files.append(f)
            continue
        if f.size > CAPTION_FILE_LIMIT_BYTES:  # never read: its size alone says it is no caption
            files.append(replace(f, reason=f"caption file {f.path} {_too_large(f.size)}"))
            continue
        try:  # one byte more than max_bytes tells a cut caption from one of exactly max_bytes
            data = _read_head(root / fs_path(f.path), max_bytes + 1)
        except OSError as exc:
            files.append(
                replace(f, reason=f"caption file {f.path} cannot be read ({exc.strerror or exc}); fix its permissions")
            )
            continue
        longer = len(data) > max_bytes
        data = data[:max_bytes]
        # the hash of what is encoded, and the size: an edit past the prefix re-encodes nothing new (same text id)
        files.append(SourceFile(f.key, f.path, f.size, 0, hashlib.sha256(data).hexdigest()))
        text, reason = decode_text(data, complete=not longer)
        if reason is None:
            texts[f.key] = text.strip()
            if longer:
                cut.append(f.key)
        else:
            bad[f.key] = f"caption {reason}"
    return CaptionScan(ScanResult(files, listing.clashes, listing.unlisted), texts, bad, cut)


def _read_head(path, size: int) -> bytes:
    """The first ``size`` bytes of a local file, or of an object at a URL (one ranged request)."""
    if is_url(path):
        return path.fs.cat_file(path.path, start=0, end=size)
    with open(path, "rb") as fh:
        return fh.read(size)


def decode_text(data: bytes, complete: bool = True) -> tuple[str, str | None]:
    """(text, None), or ("", why it cannot be read and the fix). ``complete=False``: ``data`` is a prefix, whose
    last character may be cut in the middle; that partial character is dropped."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = _decode(data, "utf-16", complete)  # the mark says which byte order
        except UnicodeDecodeError:
            return "", "is damaged UTF-16; re-save it as UTF-8"
        if "\0" not in text:
            return text, None
    if b"\0" in data:
        return "", "has NUL bytes: it looks like UTF-16 without a byte-order mark; re-save it as UTF-8"
    try:
        return _decode(data, "utf-8-sig", complete), None
    except UnicodeDecodeError as exc:
        return "", f"is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); re-save it as UTF-8"


def _decode(data: bytes, encoding: str, complete: bool) -> str:
    return codecs.getincrementaldecoder(encoding)("strict").decode(data, final=complete)


def _too_large(size: int) -> str:
    return (
        f"is {size / 2**20:.1f} MiB ({size} bytes), over the {CAPTION_FILE_LIMIT_BYTES // 2**20} MiB limit of a "
        "caption; it is not a caption: check the file, or remove it"
    )


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _cut_text(text: str, max_bytes: int) -> tuple[str, bool]:
    """``text`` cut to at most ``max_bytes`` of UTF-8 at a character boundary, and whether it was cut."""
    if len(text) * 4 <= max_bytes:  # no character takes more than 4 bytes: it fits, without encoding it
        return text, False
    head = text[: max_bytes + 1].encode("utf-8", "surrogatepass")  # a character is at least one byte
    if len(head) <= max_bytes:
        return text, False
    return head[:max_bytes].decode("utf-8", "ignore"), True


def _scan_metadata(path: Path, column: str, max_bytes: int) -> CaptionScan:
    files: dict[str, SourceFile] = {}
    texts, bad, clashes, cut = {}, {}, {}, []
    for line, row, problem in _read_rows(path):
        rel, problem = (None, problem) if problem else _relative_name(row, path.name, line)
        if rel is None:  # no usable key: the row fails under its line
            key = f"{path.name}:{line}"
            files[key] = SourceFile(key, key, 0, 0, None, problem)
            continue
        key = posixpath.splitext(rel)[0]
        text = row.get(column)
        digest = hashlib.sha256(json.dumps(text).encode()).hexdigest()
        if key in files:
            clashes.setdefault(key, [files[key].path]).append(rel)
            continue
        files[key] = SourceFile(key, rel, len(str(text)), 0, digest)
        if not isinstance(text, str):
            bad[key] = f"{path.name} line {line} has no {column!r} text; add it or pass --caption-column"
        elif _utf8_size(text) > CAPTION_FILE_LIMIT_BYTES:  # in memory with its metadata file; never tokenized
            bad[key] = f"{path.name} line {line}: the caption {_too_large(_utf8_size(text))}"
        else:
            text, longer = _cut_text(text, max_bytes)
            texts[key] = text.strip()
            if longer:
                cut.append(key)
    ordered = [files[k] for k in sorted(files)]
    return CaptionScan(ScanResult(ordered, clashes), texts, bad, cut)


def _relative_name(row: dict, source: str, line: int) -> tuple[str | None, str | None]:
    """(the row's file name as a stored relative path, None), or (None, why it has no usable one)."""
    name = row.get("file_name")
    where = f"{source} line {line}"
    if not isinstance(name, str) or not name.strip():
        return None, f"{where} has no file_name; fix or remove the row"
    raw = name.strip().replace("\\", "/")
    if raw.startswith("/") or _DRIVE.match(raw):
        return None, f"{where}: file_name {name!r} is absolute; make it relative to the folder of {source}"
    if ".." in raw.split("/"):
        return None, f"{where}: file_name {name!r} leads out of the folder of {source} ('..'); name a file inside it"
    try:
        return path_text(posixpath.normpath(raw)), None
    except UnicodeEncodeError:  # a lone surrogate written as a JSON escape: no file can have that name
        return None, f"{where}: file_name {name!r} is not valid text; fix the row"


def _read_rows(path: Path) -> list[tuple[int, dict | None, str | None]]:
    """(line number, row, None), or (line number, None, why the row cannot be used) for a line that is not
    a JSON object or a CSV row with the wrong number of fields.

    Raises:
        ConfigError: the file cannot be read or is not text.
    """
    try:
        text, reason = decode_text(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror or exc}); fix its permissions") from None
    if reason is not None:
        raise ConfigError(f"{path} {reason}")
    return _csv_rows(path.name, text) if path.suffix.lower() == ".csv" else _jsonl_rows(path.name, text)


def _jsonl_rows(name: str, text: str) -> list[tuple[int, dict | None, str | None]]:
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append((i, None, f"{name} line {i} is not valid JSON ({exc.msg}); fix or remove the line"))
            continue
        if not isinstance(row, dict):
            rows.append((i, None, f'{name} line {i} is not a JSON object; write it as {{"file_name": ..., ...}}'))
            continue
        rows.append((i, row, None))
    return rows


def _csv_rows(name: str, text: str) -> list[tuple[int, dict | None, str | None]]:
    reader = csv.reader(text.splitlines(keepends=True))  # ends kept: a quoted field may hold a line break
    header = next(reader, [])
    rows, end = [], reader.line_num
    for fields in reader:
        start, end = end + 1, reader.line_num  # a quoted field may span lines: report where the row starts
        if not fields:
            continue
        if len(fields) != len(header):
            why = f"has {len(fields)} fields, the header {len(header)}; quote fields that hold commas, or fix the row"
            rows.append((start, None, f"{name} line {start} {why}"))
            continue
        rows.append((start, dict(zip(header, fields, strict=True)), None))
    return rows
