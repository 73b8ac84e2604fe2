"""What every export shares: write a file only when it differs, refuse to replace one without --overwrite."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from cachebuild.config import AlphaMode, ColorMode, ExifMode
from cachebuild.images.pixels import ALPHA_MODES, BEFORE_MODES, KEYED_MODES, recorded_pixels
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


class PixelCheck:
    """Exported items whose files this cache read otherwise than a trainer does (it reads ``convert("RGB")``):
    an ICC profile converted (``--color icc``) or transparency composited (``--alpha white|black``), as every
    cache built before those options did. Their latents are not the trainer's own; one warning names them."""

    def __init__(self, fingerprint: dict):
        self.pixels = recorded_pixels(fingerprint)
        self.keys: list[str] = []
        self.what: set[str] = set()

    def check(self, key: str, image: Path) -> None:
        """Look at ``image``'s header (only where the cache's rules differ from the trainer's)."""
        icc, alpha = self.pixels.color is ColorMode.ICC, self.pixels.alpha is not AlphaMode.DROP
        if not (icc or alpha):
            return
        from PIL import Image

        try:
            with Image.open(image) as img:
                has_icc = bool(img.info.get("icc_profile")) and img.mode in ("RGB", "RGBA", "CMYK")
                clear = img.mode in ALPHA_MODES or ("transparency" in img.info and img.mode in KEYED_MODES)
        except Exception:  # an unreadable header is refused by the size check, with its reason
            return
        found = [w for w, hit in (("an ICC profile", icc and has_icc), ("transparency", alpha and clear)) if hit]
        if found:
            self.keys.append(key)
            self.what.update(found)

    def warning(self, trainer: str) -> str | None:
        if not self.keys:
            return None
        p = self.pixels
        flags = ["--color icc"] if p.color is ColorMode.ICC else []
        flags += [f"--alpha {p.alpha.value}"] if p.alpha is not AlphaMode.DROP else []
        rules = " ".join(flags)
        if p == BEFORE_MODES:
            rules = f"{rules} (the rules of caches built before those options)"
        return (
            f"{len(self.keys)} exported item(s) have {' or '.join(sorted(self.what))} that this cache read with "
            f'{rules}, where {trainer} reads convert("RGB"), e.g. {self.keys[0]}: their latents differ from what '
            f"{trainer} would cache; rebuild the latents with --rebuild and without --color/--alpha to match it"
        )
