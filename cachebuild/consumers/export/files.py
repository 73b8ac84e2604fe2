"""What every export shares: write a file only when it differs, refuse to replace one without --overwrite."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from cachebuild.config import ExifMode
from cachebuild.keys import path_text

Progress = Callable[[int, int], None]  # (items done, items in all), called once per item


def write_checked(
    target: Path, data: bytes, root: Path, overwrite: bool, summary, same: Callable[[bytes], bool]
) -> bool:
    """Write ``data`` to ``target``: skipped when it holds the same contents already (``same`` decides for files
    that differ in bytes only), refused and listed in ``summary.conflicts`` when it differs and ``overwrite`` is
    off. Written through a temporary name and a rename, so a trainer never reads half a file."""
    if target.exists():
        existing = target.read_bytes()
        if existing == data or same(existing):
            summary.unchanged += 1
            return False
        if not overwrite:
            summary.conflicts.append(path_text(str(target.relative_to(root.resolve()))))
            return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".cachebuild-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    summary.written += 1
    return True


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def same_safetensors(existing: bytes, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """Whether safetensors bytes hold exactly ``tensors`` (names, dtypes, values) and ``metadata``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        got = load(existing)
        header_len = int.from_bytes(existing[:8], "little")
        import json

        meta = json.loads(existing[8 : 8 + header_len]).get("__metadata__", {})
    except (SafetensorError, ValueError, OSError):
        return False
    if meta != metadata or sorted(got) != sorted(tensors):
        return False
    return all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in tensors.items())


def stored_image_problem(image: Path, original: tuple[int, int], exif: ExifMode, rotated: str) -> str | None:
    """Why a trainer that reads an image as stored (its size and pixels, never the EXIF orientation) would not
    match what the cache holds for it, or None; ``rotated`` is the reason given for a rotated image in a cache
    built upright (``--exif apply``)."""
    from PIL import Image

    try:
        with Image.open(image) as img:
            size, orientation = img.size, img.getexif().get(0x0112, 1)
    except Exception as exc:  # per-item boundary: an unreadable image is refused with its reason
        return f"cannot read the image header: {exc}"
    if orientation not in (None, 1) and exif is ExifMode.APPLY:
        return rotated
    if size != original:
        return f"image is {size[0]}x{size[1]} now, {original[0]}x{original[1]} when cached; rebuild the cache"
    return None
