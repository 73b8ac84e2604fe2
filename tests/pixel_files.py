"""Image files whose pixels depend on how they are read: transparency that hides colour, a palette with a
transparent entry, a non-identity ICC profile, CMYK. Noise, so a wrong reading changes every latent."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms


def swapped_profile() -> bytes:
    """An RGB ICC profile that is not sRGB: LittleCMS's sRGB with the red and blue primaries swapped, so
    converting to sRGB swaps red and blue (a conversion no reader can mistake for the identity)."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    tags = {}
    for i in range(int.from_bytes(data[128:132], "big")):  # the tag table: signature, offset, size
        entry = 132 + 12 * i
        tags[bytes(data[entry : entry + 4])] = entry
    red, blue = tags[b"rXYZ"], tags[b"bXYZ"]
    data[red + 4 : red + 8], data[blue + 4 : blue + 8] = data[blue + 4 : blue + 8], data[red + 4 : red + 8]
    data[84:100] = bytes(16)  # no profile ID: it hashed the old bytes
    ImageCms.ImageCmsProfile(io.BytesIO(bytes(data)))  # LittleCMS reads it
    return bytes(data)


def noise(size: tuple[int, int], channels: int, seed: int) -> np.ndarray:
    w, h = size
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def write_rgba(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """RGBA noise whose alpha is 0 on the left third, 128 on the middle one, 255 on the right: the transparent
    pixels hold colour, which compositing hides and convert("RGB") keeps."""
    arr = noise(size, 4, seed)
    w = size[0]
    arr[:, : w // 3, 3], arr[:, w // 3 : 2 * w // 3, 3], arr[:, 2 * w // 3 :, 3] = 0, 128, 255
    Image.fromarray(arr, "RGBA").save(path)
    return path


def write_palette_transparent(path: Path, size: tuple[int, int], seed: int = 1) -> Path:
    """A palette PNG of noise colours whose entries 0..63 are transparent (a tRNS chunk), the rest opaque."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8), "P")
    img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    img.save(path, transparency=bytes([0] * 64 + [255] * 192))
    return path


def write_icc_tagged(path: Path, size: tuple[int, int], seed: int = 2) -> Path:
    """RGB noise carrying :func:`swapped_profile`, as a PNG (lossless: both readers see the same values)."""
    Image.fromarray(noise(size, 3, seed), "RGB").save(path, icc_profile=swapped_profile())
    return path


def write_cmyk(path: Path, size: tuple[int, int], seed: int = 3) -> Path:
    """A CMYK JPEG of noise (Pillow writes the Adobe marker, so it reads back CMYK)."""
    Image.fromarray(noise(size, 4, seed), "CMYK").save(path, quality=95)
    return path
