"""Formats past Pillow's own: decoders that are optional extras, and floating-point pixels.

* HEIC/HEIF (phone photos) decode through ``pillow-heif`` (``pip install 'cachebuild[heif]'``), AVIF through
  Pillow itself from 11.3 on or else ``pillow-avif-plugin`` (``cachebuild[avif]``), JPEG XL through
  ``pillow-jxl-plugin``. A plugin is registered with Pillow in each process the first time a file of its kind
  is opened; where it is not installed, the item fails with the line that installs it.
* Floating-point pixels (mode ``F``: 32-bit float TIFF, PFM) are scaled by their range: 0..1, the usual range
  of float images, to 0..255; whole numbers in 0..255 (8-bit values stored as floats) stay as they are. Any
  other range (HDR past 1, signed or scientific data) and non-finite pixels fail with the range: no mapping of
  it to 8 bits is the obvious one, and clipping, what Pillow's own conversion does, turns 0..1 images black.
"""

from __future__ import annotations

import functools
import importlib
import os

import numpy as np
from PIL import Image, features

from cachebuild.errors import ItemError

PLUGIN_OF = {".heic": "heif", ".heif": "heif", ".hif": "heif", ".avif": "avif", ".avifs": "avif", ".jxl": "jxl"}
_INSTALL = {
    "heif": "HEIC/HEIF images need pillow-heif: pip install 'cachebuild[heif]'",
    "avif": "this Pillow cannot read AVIF: pip install -U 'pillow>=11.3', or pip install 'cachebuild[avif]'",
    "jxl": "JPEG XL images need pillow-jxl-plugin: pip install pillow-jxl-plugin",
}


def require_decoder(path: str) -> None:
    """Make sure Pillow can open ``path``'s format where it needs a plugin (registered on first use).

    Raises:
        ItemError: the plugin is not installed; the reason is the line that installs it.
    """
    kind = PLUGIN_OF.get(os.path.splitext(path)[1].lower())
    if kind is not None and not plugin_ready(kind):
        raise ItemError(_INSTALL[kind])


@functools.cache
def plugin_ready(kind: str) -> bool:
    """Whether Pillow reads ``kind`` ("heif", "avif", "jxl") in this process, registering its plugin if needed."""
    if kind == "avif" and features.check("avif"):
        return True
    try:
        if kind == "heif":
            importlib.import_module("pillow_heif").register_heif_opener()
        else:  # these register their format with Pillow when imported
            importlib.import_module("pillow_avif" if kind == "avif" else "pillow_jxl")
    except ImportError:
        return False
    return True


def float_to_l(img: Image.Image) -> Image.Image:
    """A mode ``F`` image as 8-bit greyscale (``L``), scaled by its range (see the module docstring).

    Raises:
        ItemError: non-finite pixels, or a range that is neither 0..1 nor 0..255.
    """
    arr = np.asarray(img, dtype=np.float64)  # (H, W)
    if not np.isfinite(arr).all():
        raise ItemError("floating-point image holds NaN or infinite pixels; re-export it as 8 or 16 bits")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        arr = arr * 255.0
    elif lo < 0.0 or hi > 255.0 or not np.array_equal(arr, np.rint(arr)):
        raise ItemError(
            f"floating-point pixels range from {lo:g} to {hi:g}, neither 0..1 nor whole numbers in 0..255 (HDR or "
            "measurement data?); convert the image to 8 or 16 bits with the mapping it needs"
        )
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
