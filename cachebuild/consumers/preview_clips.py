"""Preview of a video cache: for each clip, its first, middle and last frame side by side, decoded from the cached
latents (right tile) beside the same frames decoded again from the source video (left tile)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cachebuild.cache.manifest import Manifest
from cachebuild.errors import ItemError
from cachebuild.keys import fs_path
from cachebuild.video.plan import plan_from_record
from cachebuild.video.probe import HEADER_META, VideoHeader

PLACEHOLDER = (96, 96, 96)  # a source strip with no source to show
MAX_PIXELS = 178_956_970  # decompression-bomb limit for re-reading sources, as for building


def shown_frames(frames: int) -> list[int]:
    """The frames a preview shows of a clip of ``frames`` frames: first, middle and last (fewer for short clips)."""
    return sorted({0, frames // 2, frames - 1})


def decoded_strip(vae, latents: torch.Tensor) -> Image.Image:
    """Raw (C, F', h, w) latents -> the decoded first, middle and last frames, side by side."""
    device = next(vae.parameters()).device
    with torch.inference_mode():
        x = vae.decode(latents[None].float().to(device)).sample[0]  # (3, F, H, W) in [-1, 1]
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    return _strip(pixels[shown_frames(len(pixels))])


def source_strip(cache: Path, key: str, info: dict, rel: str | None, dataset, clips: dict, exif, missing: list):
    """The same frames of the source, cut as the encoder saw them; a grey strip when they cannot be read."""
    n = len(shown_frames(info.get("frames", 1)))
    w, h = info["bucket"]
    if dataset is None or rel is None:
        return Image.new("RGB", (n * w, h), PLACEHOLDER)
    with Manifest.open(cache, read_only=True) as m:
        entry = m.get_meta(HEADER_META + rel) or {}
    header = VideoHeader.from_json(entry["header"]) if "header" in entry else None
    plan = plan_from_record(key, str(Path(dataset) / fs_path(rel)), info, header, clips, exif)
    try:
        frames = plan.decode(MAX_PIXELS)
    except (ItemError, OSError) as exc:
        missing.append({"key": key, "reason": str(exc)})
        return Image.new("RGB", (n * w, h), PLACEHOLDER)
    return _strip(frames[shown_frames(len(frames))])


def _strip(frames: np.ndarray) -> Image.Image:
    """(n, H, W, 3) uint8 -> one (H, n * W) image, frames left to right."""
    return Image.fromarray(np.concatenate(list(frames), axis=1), "RGB")
