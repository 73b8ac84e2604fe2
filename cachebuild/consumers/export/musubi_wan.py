"""musubi-tuner's Wan caches (``--arch wan``): text-to-video and image-to-video, Wan 2.1 and 2.2 A14B.

As musubi-tuner v0.3.4 writes and reads them (``wan_cache_latents.py``, ``dataset/cache_io.py``,
``dataset/image_video_dataset.py``):

  a clip: ``<video stem>_<start:05d>-<frames:03d>_<W:04d>x<H:04d>_wan.safetensors``, W x H the clip's bucket (its
    video caching resizes the frames to the bucket before it takes their size); at training its ``VideoDataset``
    parses start, frames and size back from the name and recomputes the bucket from that size;
    ``latents_<F'>x<h>x<w>_bfloat16`` (16, F', h, w): the posterior mode, ``(z - mean) / std`` per channel (its
    WanVAE normalises), in the VAE's bfloat16; image-to-video: ``latents_image_<F'>x<h>x<w>_bfloat16`` (20, F', h, w):
    the mask (4) and the latents of the first frame followed by grey frames (16), Wan's ``y``; Wan 2.1:
    ``clip_bfloat16`` (257, 1280) float16 (its writer names it with the latents' dtype); metadata ``architecture``
    "wan", ``width``, ``height``, ``format_version`` "1.0.1", ``frame_count``;
  a still image (a cache of images only): ``<stem>_<W:04d>x<H:04d>_wan.safetensors`` at the image's own size,
    ``latents_1x<h>x<w>_bfloat16``, no ``frame_count``; refused in a cache with clips, whose folder musubi's video
    dataset reads (it parses every file name there as a clip's);
  text, one file per video: ``<video stem>_wan_te.safetensors``, ``varlen_t5_bfloat16`` (T, 4096): UMT5's real
    rows; metadata ``architecture``, ``caption1``, ``format_version``.

What is exported where musubi's own caching would differ: the CLIP embeddings are the diffusers pipeline's
(``CLIPImageProcessor``: shortest side to 224, centre 224 crop) where musubi's ``CLIPModel.visual`` stretches the
whole frame to 224 x 224 (bicubic): the same for square buckets up to resampling, another view of the frame for the
others (a warning says so); its trainer feeds whichever it reads. Conditions from ``--control`` images are exported
with a warning (musubi conditions each clip on its first frame); ``--last-frame`` caches are refused (its Wan caching
writes first-frame conditions only, which its trainer reads as such).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from cachebuild.cache.manifest import Manifest
from cachebuild.consumers.export.files import Progress, safetensors_bytes, same_safetensors, write_checked
from cachebuild.consumers.export.kohya import ExportSummary
from cachebuild.consumers.export.musubi_images import (
    FORMAT_VERSION,
    bucket_rule,
    centre_crop,
    image_refusal,
    image_root,
    musubi_latent_name,
)
from cachebuild.consumers.reader import CacheReader, open_cache
from cachebuild.errors import ConfigError
from cachebuild.images.musubi_buckets import musubi_bucket
from cachebuild.keys import fs_path, split_clip_key
from cachebuild.video.probe import HEADER_META

ARCH, FULL = "wan", "wan"  # musubi's ARCHITECTURE_WAN and ARCHITECTURE_WAN_FULL
CHANNELS = 16  # Wan 2.1 / 2.2 A14B's VAE; TI2V-5B's 48 have no musubi architecture
LATENT_DTYPE = torch.bfloat16  # wan_cache_latents' --vae_dtype default: latents and y are cast to it
CLIP_DTYPE = torch.float16  # its CLIP output, cast to fp16 before it is saved
TEXT_DTYPE = torch.bfloat16  # its UMT5 runs and is saved in bf16 (wan_i2v_14B's t5_dtype)


def export_musubi_wan(cache, to, overwrite: bool = False, images=None, progress: Progress | None = None):
    """Write a Wan cache as musubi-tuner's Wan cache files into the folder ``to``; see the module's docstring.

    Raises:
        ConfigError: not a 16-channel Wan cache, or conditions musubi reads otherwise (--last-frame).
    """
    start = time.monotonic()
    reader = open_cache(cache, text=False)
    warnings = _check(reader)
    root = Path(to)
    root.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary(ARCH, str(root))
    summary.warnings += warnings
    text = _text_reader(cache, reader, summary)
    keys = reader.keys()
    clips = any(split_clip_key(k) for k in keys)
    stills = None if clips else (image_root(reader, images), bucket_rule(reader.fingerprint))
    sources = reader.source_paths()
    paths = {key: fs_path(rel) for key, rel in sources.items()} if stills else {}
    rotated = {} if stills else _rotations(reader, set(sources.values()))
    stems: dict[str, str] = {}
    texts: set[str] = set()
    for done, key in enumerate(keys, 1):
        if stills:
            reason = image_refusal(reader, key, paths.get(key), stills[0], stills[1], stems)
        else:
            reason = _clip_refusal(reader, key, stems) or _rotated(rotated.get(sources.get(key, ""), 0))
        if reason:
            summary.skipped.append({"key": key, "reason": reason})
        else:
            _export_item(reader, text, key, paths.get(key), (root, overwrite), summary, texts)
        if progress:
            progress(done, len(keys))
    summary.seconds = time.monotonic() - start
    return summary


def wan_latent_tensors(reader: CacheReader, key: str) -> dict[str, torch.Tensor]:
    """``{key name: tensor}`` of one item's musubi latent file, from what ``WanImageToVideoPipeline`` computes."""
    from cachebuild.families import i2v, wan

    rec = reader.record(key)
    stored = reader.tensors(key)
    rec["latents"] = stored["mean"] if "mean" in stored else stored["latents"]  # the mode, never a fresh draw
    vae = reader.fingerprint.get("vae", {})
    inputs = wan.pipeline_inputs(rec, vae) | i2v.condition_inputs(rec, vae)
    z = inputs["latents"].to(LATENT_DTYPE)  # (16, F', h, w), normalised
    dims, dtype = "x".join(map(str, z.shape[1:])), str(LATENT_DTYPE).split(".")[-1]
    out = {f"latents_{dims}_{dtype}": z.contiguous()}
    if "condition" in inputs:
        out[f"latents_image_{dims}_{dtype}"] = inputs["condition"].to(LATENT_DTYPE).contiguous()  # (20, F', h, w)
    if "image_embeds" in inputs:
        out[f"clip_{dtype}"] = inputs["image_embeds"].to(CLIP_DTYPE).contiguous()  # (257, 1280)
    return out


def wan_latent_name(key: str, info: dict, path: str | None = None) -> str:
    """The latent file musubi names for a clip (its bucket's size) or a still image at ``path`` (its own size)."""
    span = split_clip_key(key)
    if span is None:
        return musubi_latent_name(path or key, tuple(info["original_size"]), ARCH)
    video, start, frames = span
    w, h = info["bucket"]
    return f"{os.path.basename(video)}_{start:05d}-{frames:03d}_{w:04d}x{h:04d}_{ARCH}.safetensors"


def _export_item(reader, text, key, path, where: tuple[Path, bool], s, texts: set[str]) -> None:
    root, overwrite = where
    info = reader.info(key)
    span = split_clip_key(key)
    meta = {"architecture": FULL, "width": "", "height": "", "format_version": FORMAT_VERSION}
    w, h = info["bucket"] if span else info["original_size"]
    meta |= {"width": str(w), "height": str(h)} | ({"frame_count": str(span[2])} if span else {})
    _write(root / wan_latent_name(key, info, path), wan_latent_tensors(reader, key), meta, root, overwrite, s)
    if text is None:
        return
    video = text.text_key(key)
    if video in texts:  # one text file per video: its clips share it
        return
    texts.add(video)
    if key not in text:
        s.skipped.append({"key": key, "reason": "no caption in the text cache: latents written, musubi skips them"})
        return
    rec = text.record(key)
    embeds = rec["umt5"][rec["umt5_mask"].bool()].to(TEXT_DTYPE)  # (T, 4096): the real rows
    meta = {"architecture": FULL, "caption1": text.caption(key) or "", "format_version": FORMAT_VERSION}
    name = f"{os.path.splitext(os.path.basename(path))[0] if path else os.path.basename(video)}_{ARCH}_te.safetensors"
    _write(root / name, {f"varlen_t5_{str(TEXT_DTYPE).split('.')[-1]}": embeds.contiguous()}, meta, root, overwrite, s)


def _write(target: Path, tensors: dict, meta: dict, root: Path, overwrite: bool, s: ExportSummary) -> None:
    data = safetensors_bytes(tensors, meta)
    write_checked(target, data, root, overwrite, s, lambda old: same_safetensors(old, tensors, meta))


def _clip_refusal(reader: CacheReader, key: str, stems: dict[str, str]) -> str | None:
    """Why this clip cannot be handed to musubi's video dataset, or None."""
    span = split_clip_key(key)
    if span is None:
        return (
            "a still image in a cache of clips: musubi's video dataset parses every file in its folder as a clip's; "
            "build the images as a cache of their own to export them"
        )
    stem = os.path.basename(span[0])
    if stems.setdefault(stem, span[0]) != span[0]:
        return f"same file stem as {stems[stem]}: musubi's flat cache folder holds one video per stem"
    info = reader.info(key)
    original, bucket = tuple(info["original_size"]), tuple(info["bucket"])
    resolution = tuple(reader.fingerprint.get("buckets", {}).get("resolution", (1024, 1024)))
    want = musubi_bucket(original, resolution)  # its video caching always buckets, never keeps the size
    if want != bucket:
        return (
            f"encoded at bucket {bucket[0]}x{bucket[1]}, musubi's video caching picks {want[0]}x{want[1]} for a "
            f"{original[0]}x{original[1]} video; rebuild the latents with --buckets musubi (no --bucket-no-upscale)"
        )
    if tuple(info.get("crop", (0, 0))) != centre_crop(original, bucket):
        return "random crop: musubi crops at the centre; rebuild without --random-crop"
    return None


def _rotations(reader: CacheReader, videos: set[str]) -> dict[str, int]:
    """{video path: degrees its display matrix turns it} from the headers the manifest remembers."""
    with Manifest.open(reader.root, read_only=True) as m:
        entries = {path: (m.get_meta(HEADER_META + path) or {}).get("header") or {} for path in videos}
    return {path: int(entry.get("rotation", 0)) for path, entry in entries.items()}


def _rotated(degrees: int) -> str | None:
    if not degrees:
        return None
    return (
        f"the video is shown rotated ({degrees} degrees): musubi decodes its frames unrotated, so its own caching "
        "would cut other buckets and pixels; rotate the file itself to export it"
    )


def _check(reader: CacheReader) -> list[str]:
    """Refuse what musubi's Wan trainer cannot read as this cache means it; the warnings on what it reads."""
    vae = reader.fingerprint.get("vae", {})
    if vae.get("class") != "AutoencoderKLWan" or vae.get("latent_channels") != CHANNELS:
        raise ConfigError(
            f"--arch wan needs latents of Wan 2.1 / 2.2 A14B's 16-channel AutoencoderKLWan; this cache has "
            f"{vae.get('class')} with {vae.get('latent_channels')} channels (musubi-tuner has no Wan 2.2 TI2V-5B)"
        )
    condition = (reader.control_fingerprint or {}).get("condition", {})
    if condition.get("last_frame"):
        raise ConfigError(
            "this cache conditions on each clip's last frame too (--last-frame); musubi's Wan caching and trainer "
            "take the first frame only: rebuild the latents without --last-frame to export them"
        )
    warnings = []
    fp = reader.fingerprint
    if fp.get("buckets", {}).get("rule") != "musubi":
        warnings.append("built with kohya's bucket rule: items whose bucket musubi would pick otherwise are refused")
    if fp.get("latents") == "sample":
        warnings.append("this cache holds posterior samples; musubi's own caching stores the mode (--latents mean)")
    if fp.get("flip"):
        warnings.append("flipped latents are not exported: musubi has no flip augmentation in its cache")
    if condition.get("image") == "control":
        warnings.append(
            "conditions from --control images: musubi's own caching conditions each clip on its first frame"
        )
    if "image_encoder" in (reader.control_fingerprint or {}):
        warnings.append(
            "clip embeddings are the diffusers pipeline's (CLIPImageProcessor: shortest side 224, centre 224 crop); "
            "musubi's own caching stretches the whole frame to 224 x 224, another view of non-square frames"
        )
    return warnings


def _text_reader(cache, reader: CacheReader, s: ExportSummary) -> CacheReader | None:
    family = (reader.text_fingerprint or {}).get("family")
    if family is None:
        s.warnings.append(
            "no text outputs in the cache: only latents written; musubi trains a clip only with its video's _wan_te "
            "file (build them with cachebuild textenc, or musubi's own text caching)"
        )
        return None
    if family != "wan":
        s.warnings.append(f"text outputs of {family} not exported: wan takes Wan's UMT5")
        return None
    return open_cache(cache, text=True)
