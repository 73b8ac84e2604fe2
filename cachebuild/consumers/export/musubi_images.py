"""musubi-tuner's rules for an image item, shared by the musubi exports (:mod:`.musubi`, :mod:`.musubi_wan`): the file
names it gives an image's caches, and why an item cannot be handed to it (its name, its EXIF orientation, the
bucket musubi recomputes from the size in the name, the centre crop it takes, one file per stem)."""

from __future__ import annotations

import os
from pathlib import Path

from cachebuild.config import ExifMode
from cachebuild.consumers.export.files import stored_image_problem
from cachebuild.consumers.reader import CacheReader
from cachebuild.errors import ConfigError
from cachebuild.images.musubi_buckets import musubi_bucket, musubi_buckets

FORMAT_VERSION = "1.0.1"  # musubi-tuner's cache format_version


def musubi_latent_name(path: str, original_size: tuple[int, int], arch: str) -> str:
    """``<stem>_<W:04d>x<H:04d>_<arch>.safetensors``: the latent cache musubi names after image ``path``."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{stem}_{original_size[0]:04d}x{original_size[1]:04d}_{arch}.safetensors"


def musubi_text_name(path: str, arch: str) -> str:
    """``<stem>_<arch>_te.safetensors``: the text-encoder cache musubi names after image ``path``."""
    return f"{os.path.splitext(os.path.basename(path))[0]}_{arch}_te.safetensors"


def image_refusal(reader, key, rel, images: Path, rule: tuple, stems: dict[str, str]) -> str | None:
    """Why this item cannot be handed to musubi, or None."""
    info = reader.info(key)
    original, bucket = tuple(info["original_size"]), tuple(info["bucket"])
    if rel is None:
        return "no source path recorded"
    stem = os.path.splitext(os.path.basename(rel))[0]
    if stem in stems:
        return f"same file stem as {stems[stem]}: musubi's flat cache folder holds one file per stem"
    stems[stem] = key
    why = _image_problem(images / rel, original, ExifMode.recorded(reader.fingerprint))
    if why:
        return why
    resolution, no_upscale, buckets = rule
    want = musubi_bucket(original, resolution, no_upscale, buckets)
    if want != bucket:
        return (
            f"encoded at bucket {bucket[0]}x{bucket[1]}, musubi recomputes {want[0]}x{want[1]} for a "
            f"{original[0]}x{original[1]} image; rebuild the latents with --buckets musubi"
        )
    if info.get("crop") is not None and tuple(info["crop"]) != centre_crop(original, bucket):
        return "random crop: musubi crops at the centre; rebuild without --random-crop"
    return None


def centre_crop(original: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """(left, top) of musubi's centre crop (``resize_image_to_bucket``)."""
    if original == bucket:
        return 0, 0
    scale = max(bucket[0] / original[0], bucket[1] / original[1])
    w, h = int(original[0] * scale + 0.5), int(original[1] * scale + 0.5)
    return (w - bucket[0]) // 2, (h - bucket[1]) // 2


def _image_problem(image: Path, original: tuple[int, int], exif: ExifMode = ExifMode.APPLY) -> str | None:
    """Why musubi's own caching run would not keep a file made for this image, or None. musubi reads the size
    and pixels as stored (``Image.open``, no EXIF transpose): a rotated image fits only an ``--exif ignore`` cache."""
    if not image.is_file():
        return f"image {image} not found: its size and EXIF orientation cannot be checked"
    return stored_image_problem(
        image,
        original,
        exif,
        "EXIF-rotated image: musubi reads the pixels unrotated, so its caching run would name and encode it "
        "differently (and delete this file as not in the dataset); rebuild the latents with --exif ignore to "
        "export it",
    )


def image_root(reader: CacheReader, images) -> Path:
    if images is None:
        from cachebuild.consumers.preview import _recorded_dataset

        found = _recorded_dataset(reader.root)
        if found is None:
            raise ConfigError(
                "the image folder the cache was built from is gone; pass --images DIR (musubi export reads each "
                "image's size and EXIF orientation as musubi will)"
            )
        return found
    if not Path(images).is_dir():
        raise ConfigError(f"--images {images} is not a folder; pass the folder the cache was built from")
    return Path(images)


def bucket_rule(fingerprint: dict) -> tuple[tuple[int, int], bool, list[tuple[int, int]]]:
    b = fingerprint.get("buckets", {})
    resolution = tuple(b.get("resolution", (1024, 1024)))
    return resolution, bool(b.get("no_upscale")), musubi_buckets(resolution)
