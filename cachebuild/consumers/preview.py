"""Preview: decode a sample of cached latents with the VAE decoder and lay each beside its source crop.

A person looking at the grid sees at once whether the cache is right: upright (EXIF applied, unless the cache
was built with ``--exif ignore``: then both tiles show the pixels as stored, unrotated), cropped where
expected, colours intact. Each cell is two tiles, left the source image cut exactly as the encoder saw it
(re-read through the same loader), right the decoded latents; tiles are fitted into ``tile`` x ``tile`` pixels.
A clip of a video cache shows its first, middle and last frame side by side in each tile (``preview_clips``).
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cachebuild.config import ExifMode, ModelSpec
from cachebuild.consumers.reader import open_cache
from cachebuild.errors import ConfigError, ItemError
from cachebuild.families.vae import family_of, load_vae
from cachebuild.hub import resolve_vae
from cachebuild.images.load import decode
from cachebuild.images.pixels import REFERENCE, Pixels, recorded_pixels
from cachebuild.images.plan import ItemPlan
from cachebuild.keys import fs_path

log = logging.getLogger(__name__)

TILE = 192  # pixels: each image is fitted into a square tile this size
PAD = 4  # pixels between tiles and around the grid
BACKGROUND = (32, 32, 32)  # dark grey, so white and black images both show their edges
PLACEHOLDER = (96, 96, 96)  # a source tile with no source to show (no --dataset, or the file is gone)
MAX_PIXELS = 178_956_970  # decompression-bomb limit for re-reading sources, as for building


@dataclass
class PreviewSummary:
    """What :func:`preview_cache` drew."""

    path: str
    keys: list[str]  # the items shown, in grid order (rows, left to right)
    size: tuple[int, int]  # (W, H) of the PNG
    missing_sources: list[dict] = field(default_factory=list)  # [{"key", "reason"}] drawn as placeholders


def grid_size(n: int, tile: int = TILE) -> tuple[int, int]:
    """(W, H) of the PNG for ``n`` items: a near-square grid of (source, decoded) tile pairs."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    return cols * (2 * tile + 3 * PAD) + PAD, rows * (tile + PAD) + PAD


def preview_cache(
    cache: str | os.PathLike,
    model: ModelSpec,
    out: str | os.PathLike,
    n: int = 16,
    seed: int = 0,
    dataset: str | os.PathLike | None = None,
    device: str | None = None,
    tile: int = TILE,
) -> PreviewSummary:
    """Decode ``n`` items picked with ``seed`` and write the grid to the PNG ``out``.

    Args:
        cache: the cache folder.
        model: the VAE, as for building (its decoder is used).
        out: the PNG file to write.
        n: how many items (fewer if the cache has fewer).
        seed: picks the items.
        dataset: the dataset folder, to show each source crop; None: the folder the cache was built from,
            when it still exists, else grey placeholders.
        device: torch device for decoding (default cpu: a handful of images needs no GPU).
        tile: tile size in pixels.

    Raises:
        ConfigError: ``n`` or ``tile`` not positive; the VAE does not fit the cache; ``out``'s folder is missing.

    Example:
        >>> preview_cache("./cache", ModelSpec(model="sdxl"), "preview.png", n=16, dataset="./dataset").size
        (1588, 788)
    """
    if n < 1 or tile < 8:
        raise ConfigError(f"-n must be at least 1 and the tile at least 8 px (got {n}, {tile})")
    out = Path(out)
    if not out.parent.is_dir():
        raise ConfigError(f"folder {out.parent} for the preview does not exist; create it or pick another -o")
    reader = open_cache(cache)
    keys = sorted(random.Random(seed).sample(reader.keys(), min(n, len(reader))))
    if not keys:
        raise ConfigError(f"{cache} has no done items to preview; see `cachebuild status {cache}`")
    if dataset is None:
        dataset = _recorded_dataset(Path(cache))
    vae, frames = _load_decoder(model, reader.fingerprint, torch.device(device or "cpu"))
    clips = reader.fingerprint.get("clips")  # a video cache: every item is a clip (an image one of one frame)
    summary = PreviewSummary(str(out), keys, grid_size(len(keys), tile))
    canvas = Image.new("RGB", summary.size, BACKGROUND)
    paths = reader.source_paths()
    exif = ExifMode.recorded(reader.fingerprint)  # read each source as the encoder did
    pixels = recorded_pixels(reader.fingerprint)
    for i, key in enumerate(keys):
        cols = math.ceil(math.sqrt(len(keys)))
        x, y = PAD + (i % cols) * (2 * tile + 3 * PAD), PAD + (i // cols) * (tile + PAD)
        if clips is not None:
            from cachebuild.consumers.preview_clips import decoded_strip, source_strip

            info, missing = reader.info(key), summary.missing_sources
            source = source_strip(Path(cache), key, info, paths.get(key), dataset, clips, exif, missing)
            decoded = decoded_strip(vae, reader[key]["latents"])
        else:
            source = _source_crop(key, reader.info(key), paths.get(key), dataset, summary, exif, pixels)
            decoded = _decode(vae, reader[key]["latents"], frames)
        _paste_fitted(canvas, source, x, y, tile)
        _paste_fitted(canvas, decoded, x + tile + PAD, y, tile)
    canvas.save(out, format="PNG")
    return summary


def _load_decoder(model: ModelSpec, fingerprint: dict, device: torch.device):
    resolved = resolve_vae(model)
    family = family_of(resolved, model.preset)
    cached = fingerprint.get("vae", {})
    mine = {"class": family.cls, "latent_channels": family.latent_channels, "downsample": family.downsample}
    differ = [k for k, v in mine.items() if cached.get(k) not in (None, v)]
    if differ:
        raise ConfigError(
            f"this VAE ({', '.join(f'{k} {mine[k]}' for k in differ)}) cannot decode this cache "
            f"({', '.join(f'{k} {cached[k]}' for k in differ)}); pass the VAE the cache was built with"
        )
    return load_vae(resolved, family, torch.float32, device), family.frames


def _decode(vae, latents: torch.Tensor, frames: bool = False) -> Image.Image:
    """Raw (C, h, w) latents -> the decoded RGB image; the decoder takes raw latents, unscaled (and, for Flux.2,
    unpatchified: the stored latents are). A 3D VAE decodes them as one frame, (1, C, 1, h, w)."""
    device = next(vae.parameters()).device
    z = latents[None].float().to(device)
    with torch.inference_mode():
        x = vae.decode(z[:, :, None] if frames else z).sample[0]  # (3, H, W) in [-1, 1]
        x = x[:, 0] if frames else x
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels, "RGB")


def _source_crop(
    key: str,
    info: dict,
    rel: str | None,
    dataset,
    summary: PreviewSummary,
    exif: ExifMode = ExifMode.APPLY,
    pixels: Pixels = REFERENCE,
) -> Image.Image:
    """The bucket-sized pixels the encoder saw, re-read through the loader; a placeholder when it cannot be."""
    w, h = info["bucket"]
    if dataset is None or rel is None:
        return Image.new("RGB", (w, h), PLACEHOLDER)
    path = Path(dataset) / fs_path(rel)  # the stored text names the file's real bytes
    original, resized, crop = tuple(info["original_size"]), tuple(info["resized"]), tuple(info["crop"])
    plan = ItemPlan(key, str(path), original, (w, h), resized, crop, exif, Pixels(pixels.color, pixels.alpha))
    try:
        return Image.fromarray(decode(plan, MAX_PIXELS), "RGB")
    except (ItemError, OSError) as exc:
        summary.missing_sources.append({"key": key, "reason": str(exc)})
        return Image.new("RGB", (w, h), PLACEHOLDER)


def _paste_fitted(canvas: Image.Image, img: Image.Image, x: int, y: int, tile: int) -> None:
    """Scale ``img`` to fit a tile (keeping its aspect) and paste it centred in the tile at (x, y)."""
    scale = tile / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    fitted = img.resize(size, Image.Resampling.LANCZOS)
    canvas.paste(fitted, (x + (tile - size[0]) // 2, y + (tile - size[1]) // 2))


def tile_array(img: Image.Image, tile: int) -> np.ndarray:
    """The tile :func:`preview_cache` draws for ``img``, as an array (for checking a preview)."""
    canvas = Image.new("RGB", (tile, tile), BACKGROUND)
    _paste_fitted(canvas, img, 0, 0, tile)
    return np.asarray(canvas)


def _recorded_dataset(cache: Path) -> Path | None:
    """The dataset folder the latents were built from, as the manifest recorded it, if it still exists."""
    from cachebuild.cache.manifest import Manifest

    with Manifest.open(cache, read_only=True) as m:
        source = m.get_meta("source:latents") or {}
    folder = Path(source["dataset"]) if "dataset" in source else None
    return folder if folder is not None and folder.is_dir() else None
