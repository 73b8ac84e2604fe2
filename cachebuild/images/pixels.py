"""Pixels: which of a file's values the VAE sees, and its alpha channel kept as a loss mask. No torch in here.

By default a file is read the way the family's pipeline and the trainers read it: diffusers' ``load_image``,
sd-scripts' ``load_image`` and musubi-tuner's datasources all end in Pillow's ``convert("RGB")`` (after the EXIF
step, which ``--exif`` decides): an embedded ICC profile is not applied, and an alpha channel is dropped, leaving
the colour stored under it. Latents built that way are the ones those programs would encode themselves, so an
export hands a trainer exactly its own cache. ``--color icc`` (convert to sRGB) and ``--alpha white|black``
(composite) are there for datasets that need them; the fingerprint names them only when set.

Caches built before these options hold ICC-converted pixels composited over white (``BEFORE_MODES``); their
fingerprint says so by its ``loader_version``. A run that continues one keeps that behaviour and that fingerprint
unless an option says otherwise (then the fingerprints differ and the run refuses, as for any changed setting),
so no cache has to be rebuilt and none mixes the two.

``--alpha-mask`` keeps what sd-scripts caches for its ``--alpha_mask``: the alpha channel of the bucket-sized
image, (H, W), resized and cropped with the colours; all 255 for an image without one. It is stored as uint8, the
0..255 that sd-scripts divides by 255 into float32: exact, at a quarter of the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from cachebuild.config import AlphaMode, ColorMode

MODES_SINCE_LOADER = 2  # the images.load.LOADER_VERSION from which the default reads pixels as the trainers do
BEFORE_LOADER = 1  # the loader_version a cache built before the pixel modes records
BACKGROUNDS = {AlphaMode.WHITE: (255, 255, 255), AlphaMode.BLACK: (0, 0, 0)}  # what --alpha composites over
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")  # Pillow modes with an alpha band
KEYED_MODES = ("P", "L", "RGB", "1")  # modes whose transparency is a tRNS colour key or palette entry


@dataclass(frozen=True)
class Pixels:
    """How one item's file becomes the pixels the VAE sees; carried with each planned item to the decoders."""

    color: ColorMode = ColorMode.NONE
    alpha: AlphaMode = AlphaMode.DROP
    alpha_mask: bool = False  # decode also hands the alpha channel: (H, W, 4), alpha last


REFERENCE = Pixels()  # convert("RGB"), as the pipelines and trainers read files
BEFORE_MODES = Pixels(ColorMode.ICC, AlphaMode.WHITE)  # what every cache built before the modes holds


def run_pixels(
    color: ColorMode | None, alpha: AlphaMode | None, alpha_mask: bool, stored: dict | None
) -> tuple[Pixels, dict]:
    """A run's pixel rules, from its options (None: not set) and its cache's stored fingerprint (None: a new
    cache, or one being rebuilt), with the fields they put in the fingerprint.

    A cache from before the modes keeps its rules and its fingerprint where the options leave them so; where they
    ask for others, unset options take the defaults, as ``--rebuild`` would, and the fingerprints differ.

    Example:
        >>> pixels, fields = run_pixels(None, None, False, {"loader_version": 1})  # a cache from before the modes
        >>> pixels == BEFORE_MODES, fields
        (True, {'loader_version': 1})
    """
    if stored is not None and stored.get("loader_version", BEFORE_LOADER) < MODES_SINCE_LOADER:
        kept = Pixels(color or BEFORE_MODES.color, alpha or BEFORE_MODES.alpha, alpha_mask)
        if kept == BEFORE_MODES:  # the old behaviour, asked for or not: the fingerprint it recorded
            return kept, {"loader_version": stored["loader_version"]}
    pixels = Pixels(color or REFERENCE.color, alpha or REFERENCE.alpha, alpha_mask)
    return pixels, pixels_fingerprint(pixels)


def pixels_fingerprint(pixels: Pixels) -> dict:
    """The fingerprint's pixel fields: each only where it differs from the default, as ``exif`` is."""
    fp: dict = {}
    if pixels.color is not ColorMode.NONE:
        fp["color"] = pixels.color.value
    if pixels.alpha is not AlphaMode.DROP:
        fp["alpha"] = pixels.alpha.value
    if pixels.alpha_mask:
        fp["alpha_mask"] = True
    return fp


def recorded_pixels(fingerprint: dict | None) -> Pixels:
    """The rules a latents cache was built with, from its fingerprint (for the preview and the exports)."""
    fp = fingerprint or {}
    if fp.get("loader_version", MODES_SINCE_LOADER) < MODES_SINCE_LOADER:
        return BEFORE_MODES
    color, alpha = ColorMode(fp.get("color", "none")), AlphaMode(fp.get("alpha", "drop"))
    return Pixels(color, alpha, bool(fp.get("alpha_mask", False)))


def composite(img: Image.Image, alpha: AlphaMode) -> Image.Image:
    """Transparency (an alpha band, or a tRNS colour key or palette entry) composited over ``alpha``'s
    background, as RGB; an image without transparency is returned as it is."""
    if "transparency" in img.info and img.mode in KEYED_MODES:
        img = img.convert("RGBA")
    if img.mode not in ALPHA_MODES:
        return img
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*BACKGROUNDS[alpha], 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def alpha_channel(img: Image.Image) -> Image.Image:
    """The image's alpha as an "L" image, as sd-scripts' ``load_image(path, alpha=True)`` gets it through
    ``convert("RGBA")``: an alpha band, or a colour key's or palette entry's transparency; else opaque, 255."""
    if img.mode == "RGBA":
        return img.getchannel("A")
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        return img.convert("RGBA").getchannel("A")
    return Image.new("L", img.size, 255)
