"""Item keys and the seeds derived from them.

A key names one item in every store of a cache: the source path relative to the dataset root, without its
extension, '/'-separated (``sub/img001``). Everything random about an item (a random crop, a posterior
sample, an exported draw) is seeded from the run seed and the key, never from the batch, so an item's
tensors do not depend on batch size, worker count or interruptions.

Keys and stored paths are text, whatever bytes the file system gave: a name byte that is not UTF-8
(typical of Windows zip archives) is written as the four characters ``\\xNN`` (``path_text``), and
``fs_path`` turns that text back into the name to open (docs/format.md, "Keys").
"""

from __future__ import annotations

import hashlib
import os
import re

_ESCAPED_BYTE = re.compile(rb"\\x([89a-f][0-9a-f])")  # what backslashreplace writes for a byte >= 0x80


def item_seed(seed: int, key: str, purpose: str) -> int:
    """A 63-bit seed that depends only on the run seed, the item key and what it is for."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def path_text(name: str) -> str:
    """The stored text of a file name or relative path as ``os`` gives it (undecodable bytes arrive as
    surrogate escapes): those bytes become ``\\xNN``, everything else is kept.

    Example:
        >>> path_text(os.fsdecode(b"caf\\xe9.png"))
        'caf\\\\xe9.png'
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def fs_path(text: str) -> str:
    """The name to pass to ``open()`` for a stored path: the inverse of :func:`path_text`.

    ``\\xNN`` sequences become bytes again only when the result is not valid UTF-8, that is when
    ``path_text`` must have written them; otherwise the name really holds those characters. (The scan
    fails the rare name for which the two readings differ, so every stored path reads back exactly.)
    """
    if "\\x" not in text:
        return text
    raw = _ESCAPED_BYTE.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8"))
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return os.fsdecode(raw)
    return text


CLIP_SEPARATOR = "@"  # video key, then the clip's first frame and frame count: "walk/cam1@00016-033"
_CLIP_SUFFIX = re.compile(r"@(\d+)-(\d+)$")


def clip_key(video_key: str, start: int, frames: int) -> str:
    """The key of the clip of ``frames`` frames from frame ``start`` (counted after any --fps resampling) of the
    video whose key is ``video_key``; the numbers are zero-padded as musubi-tuner pads them in its file names.

    Example:
        >>> clip_key("walk/cam1", 16, 33)
        'walk/cam1@00016-033'
    """
    return f"{video_key}{CLIP_SEPARATOR}{start:05d}-{frames:03d}"


def split_clip_key(key: str) -> tuple[str, int, int] | None:
    """``(video key, start, frames)`` of a clip key, None for any other key (an image, a one-frame item)."""
    m = _CLIP_SUFFIX.search(key)
    return (key[: m.start()], int(m.group(1)), int(m.group(2))) if m else None
