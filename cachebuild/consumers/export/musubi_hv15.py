"""musubi-tuner's HunyuanVideo 1.5 cache (``--arch hv15``): a video cache's clips and their videos' text, in the files
musubi-tuner v0.3.4 writes (``hv_1_5_cache_latents.py``, ``hv_1_5_cache_text_encoder_outputs.py``,
``dataset/cache_io.py``) and reads (``VideoDataset.prepare_for_training``, ``BucketBatchManager``,
``hv_1_5_train_network.py``).

  latents ``<name>_<start:05d>-<frames:03d>_<W:04d>x<H:04d>_hv15.safetensors``: ``name`` the video's file name without
    its extension, W x H the clip's bucket (musubi resizes a video's frames to the bucket before it names the file);
    ``latents_<F'>x<h>x<w>_float16`` (32, F', h, w): the posterior mode, raw: its trainer multiplies by 1.03682
    (``scale_shift_latents``) and concatenates the 33 zero condition channels of text-to-video itself; metadata
    ``architecture`` "hunyuan_video_1_5", ``width``, ``height`` (the bucket), ``format_version`` "1.0.1",
    ``frame_count`` (F).
  text ``<name>_hv15_te.safetensors``, one per video (every clip of a video reads it): ``varlen_vl_embed_bfloat16``
    (T, 3584) and ``varlen_byt5_embed_bfloat16`` (T2, 1472), the real rows only (T2 = 0 when nothing is quoted): the
    trainer pads a batch to its longest and masks the rest (``pad_varlen``); metadata ``architecture``,
    ``caption1``, ``format_version``.

  image-to-video (a cache of ``hunyuanvideo-1.5-i2v``, :mod:`cachebuild.families.hunyuanvideo15_i2v`), in the
    latents file: ``latents_image_<F'>x<h>x<w>_float32`` (33, F', h, w): the first frame's posterior mode at latent
    frame 0, **unscaled** (``hv_1_5_cache_latents`` saves it "in VAE latent space directly" and its trainer
    concatenates it to the noisy latents as it is; the diffusers pipeline and musubi's own sampler scale it by
    1.03682), zeros at the other frames, and the mask channel, 1 at frame 0; ``siglip_float16`` (729, 1152): SigLIP's
    last hidden state of the condition image (the pipeline's ``image_encoder``; musubi's caching takes the one its
    ``--image_encoder`` names).

musubi's loader splits a latent file's name on "_": W x H from the second-last token, start and frame count from the
third-last, the video's name from the rest (so a name may hold "_"); it recomputes the bucket from W x H with its
``BucketSelector`` (steps of 16) and pairs the text file by name, skipping a clip without one.

What is exported, and where musubi's own caching differs: the text is what the diffusers pipeline encodes
(``HunyuanVideo15Pipeline.encode_prompt``: its system message, whose lines its source joins with spaces, through the
tokenizer's chat template, 1000 tokens after the template's 108; ByT5 over up to 256 bytes of the quoted text, a
repeated quote once). musubi's own text caching writes its own template (the same system prompt with line breaks),
up to 1024 tokens, and ByT5 up to 128: the same tensors' roles and widths, other values. Refused, because its
trainer would read them otherwise: another VAE class, latent channel count or scaling factor than the one its
trainer assumes (32, 1.03682); clips whose bucket its ``BucketSelector`` recomputes otherwise (a kohya-rule cache),
randomly cropped clips (it crops at the centre), clips of a video shown rotated (it decodes frames unrotated, so its
own caching would cut other buckets), two videos of one name (one flat folder), and stills (musubi reads images from
an image dataset, named by their own size: not exported here).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from cachebuild.cache.manifest import Manifest
from cachebuild.consumers.export.files import Progress, safetensors_bytes, same_safetensors, write_checked
from cachebuild.consumers.export.kohya import ExportSummary
from cachebuild.consumers.export.musubi_images import FORMAT_VERSION, centre_crop
from cachebuild.consumers.reader import CacheReader, open_cache
from cachebuild.errors import ConfigError
from cachebuild.images.musubi_buckets import musubi_bucket, musubi_buckets
from cachebuild.keys import fs_path, split_clip_key
from cachebuild.video.probe import HEADER_META

ARCH, FULL_NAME = "hv15", "hunyuan_video_1_5"  # ARCHITECTURE_HUNYUAN_VIDEO_1_5(_FULL)
VAE_CLASS = "AutoencoderKLHunyuanVideo15"
CHANNELS, SCALING = 32, 1.03682  # hunyuan_video_1_5_vae.VAE_LATENT_CHANNELS and VAE_SCALING_FACTOR, which its
# trainer assumes whatever the cache holds
LATENT_DTYPE = torch.float16  # what hv_1_5_cache_latents writes (its --vae_dtype default)
BYT5_MUSUBI = 128  # musubi's BYT5_MAX_LENGTH: quoted text past it is cut there by its own caching
TEXT_FAMILY = "hunyuanvideo-1.5"


def export_hv15(
    cache: str | os.PathLike, to: str | os.PathLike, overwrite: bool = False, progress: Progress | None = None
) -> ExportSummary:
    """Write a HunyuanVideo 1.5 clip cache as musubi-tuner's hv15 cache files into the folder ``to``.

    Raises:
        ConfigError: the cache's latents are not HunyuanVideo 1.5's as musubi's trainer reads them.

    Example:
        >>> export_hv15("./cache", "./musubi_cache").written
        1280
    """
    start = time.monotonic()
    reader = open_cache(cache, text=False)
    check_hv15_cache(reader.fingerprint)
    root = Path(to)
    root.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary(ARCH, str(root))
    text = _text_reader(cache, reader, summary)
    summary.warnings += _setting_warnings(reader.fingerprint) + _condition_warnings(reader)
    names, refused = _video_names(reader)
    written_text: set[str] = set()
    long_quotes = 0
    keys = reader.keys()
    for done, key in enumerate(keys, 1):
        reason = refused.get(key) or _refusal(reader, key)
        if reason:
            summary.skipped.append({"key": key, "reason": reason})
        else:
            _write_latents(reader, key, names[key], root, overwrite, summary)
            if text is not None and names[key] not in written_text:
                written_text.add(names[key])
                long_quotes += _write_text(text, key, names[key], root, overwrite, summary)
        if progress:
            progress(done, len(keys))
    if long_quotes:
        summary.warnings.append(
            f"{long_quotes} video(s) quote more than {BYT5_MUSUBI} ByT5 tokens of text: exported at the pipeline's "
            f"length (256), which musubi's own caching cuts to {BYT5_MUSUBI}"
        )
    summary.seconds = time.monotonic() - start
    return summary


def check_hv15_cache(fingerprint: dict) -> None:
    """Refuse latents musubi's hv15 trainer would read as something else.

    Raises:
        ConfigError: another VAE class, channel count or scaling factor than the trainer's; no clips.
    """
    vae = fingerprint.get("vae", {})
    if vae.get("class") != VAE_CLASS:
        raise ConfigError(f"--arch hv15 needs latents of {VAE_CLASS}; this cache has {vae.get('class')}")
    if vae.get("latent_channels") != CHANNELS or abs(float(vae.get("scaling_factor", 0)) - SCALING) > 1e-6:
        raise ConfigError(
            f"musubi's hv15 trainer reads {CHANNELS}-channel latents and scales them by {SCALING}; this cache's VAE "
            f"has {vae.get('latent_channels')} channels and scales by {vae.get('scaling_factor')}: export it only "
            "from HunyuanVideo 1.5's own VAE"
        )
    if "clips" not in fingerprint:
        raise ConfigError("this cache holds no clips; build it with cachebuild latents --frames ...")


def hv15_latent_name(name: str, start: int, frames: int, bucket: tuple[int, int]) -> str:
    """``<name>_<start:05d>-<frames:03d>_<W:04d>x<H:04d>_hv15.safetensors`` of a clip."""
    return f"{name}_{start:05d}-{frames:03d}_{bucket[0]:04d}x{bucket[1]:04d}_{ARCH}.safetensors"


def hv15_text_name(name: str) -> str:
    """``<name>_hv15_te.safetensors``: the text file of every clip of the video ``name``."""
    return f"{name}_{ARCH}_te.safetensors"


def hv15_latent_tensors(reader: CacheReader, key: str) -> dict[str, torch.Tensor]:
    """``{latents_<F'>x<h>x<w>_float16: (32, F', h, w)}``: the clip's posterior mode, raw (never a fresh draw of a
    moments cache: its mean)."""
    stored = reader.tensors(key)
    z = (stored["mean"] if "mean" in stored else stored["latents"]).to(LATENT_DTYPE).contiguous()
    frames, h, w = z.shape[1:]
    return {f"latents_{frames}x{h}x{w}_{_dtype_name(z.dtype)}": z}


def hv15_condition_tensors(reader: CacheReader, key: str) -> dict[str, torch.Tensor]:
    """The image-to-video parts of a clip's latents file (none for a text-to-video cache): ``latents_image``
    (33, F', h, w) float32 and ``siglip`` (729, 1152) float16, as ``hv_1_5_cache_latents --i2v`` writes them."""
    rec = reader.record(key)
    if rec.get("condition_kind") != "hunyuanvideo-1.5-i2v":
        return {}
    z = rec["condition_latents"].float()  # (32, 1, h, w): the raw mode, as musubi saves it
    frames = rec["latents"].shape[1]
    image = torch.zeros(z.shape[0] + 1, frames, *z.shape[2:], dtype=torch.float32)
    image[: z.shape[0], 0] = z[:, 0]
    image[z.shape[0], 0] = 1.0  # the mask channel: latent frame 0 is given
    out = {f"latents_image_{frames}x{z.shape[2]}x{z.shape[3]}_float32": image}
    if "image_embeds" in rec:
        out["siglip_float16"] = rec["image_embeds"][0].to(torch.float16).contiguous()
    return out


def hv15_text_tensors(text: CacheReader, key: str) -> dict[str, torch.Tensor]:
    """``varlen_vl_embed_<dtype>`` (T, 3584) and ``varlen_byt5_embed_<dtype>`` (T2, 1472): the real rows of the
    item's video's text (zero rows of ByT5 when the caption quotes nothing)."""
    stored = text.text_tensors(key)
    out = {}
    for name, role in (("qwen25vl", "vl_embed"), ("byt5", "byt5_embed")):
        rows = stored[name][stored[name + "_mask"].bool()].contiguous()
        out[f"varlen_{role}_{_dtype_name(rows.dtype)}"] = rows
    return out


def _write_latents(reader: CacheReader, key: str, name: str, root: Path, overwrite: bool, s: ExportSummary) -> None:
    info = reader.info(key)
    bucket = tuple(info["bucket"])
    meta = {"architecture": FULL_NAME, "width": str(bucket[0]), "height": str(bucket[1])}
    meta |= {"format_version": FORMAT_VERSION, "frame_count": str(info["frames"])}
    target = root / hv15_latent_name(name, info["start"], info["frames"], bucket)
    tensors = hv15_latent_tensors(reader, key) | hv15_condition_tensors(reader, key)
    _write(target, tensors, meta, root, overwrite, s)


def _write_text(text: CacheReader, key: str, name: str, root: Path, overwrite: bool, s: ExportSummary) -> int:
    """Write the video's text file; 1 when its quoted text is longer than musubi's own ByT5 length, else 0."""
    if key not in text:
        s.skipped.append({"key": key, "reason": "no caption in the text cache: latents written, musubi skips the clip"})
        return 0
    tensors = hv15_text_tensors(text, key)
    meta = {"architecture": FULL_NAME, "caption1": text.caption(key) or "", "format_version": FORMAT_VERSION}
    _write(root / hv15_text_name(name), tensors, meta, root, overwrite, s)
    return int(next(t for k, t in tensors.items() if "byt5" in k).shape[0] > BYT5_MUSUBI)


def _write(target: Path, tensors: dict, meta: dict, root: Path, overwrite: bool, s: ExportSummary) -> None:
    data = safetensors_bytes(tensors, meta)
    write_checked(target, data, root, overwrite, s, lambda old: same_safetensors(old, tensors, meta))


def _video_names(reader: CacheReader) -> tuple[dict[str, str], dict[str, str]]:
    """``({clip key: its video's name in musubi's files}, {key: why it cannot be exported})``: a still, a clip of a
    video shown rotated (its remembered header says), of a video whose name another took."""
    paths = reader.source_paths()
    owners: dict[str, str] = {}  # name -> the video path that took it
    rotations: dict[str, int] = {}
    names, refused = {}, {}
    with Manifest.open(reader.root, read_only=True) as m:
        for key in reader:
            span, path = split_clip_key(key), paths.get(key, "")
            if span is None:
                refused[key] = (
                    "a still image (one frame): musubi reads images from an image dataset, named by their own size; "
                    "--arch hv15 exports clips"
                )
                continue
            if path not in rotations:
                rotations[path] = int(((m.get_meta(HEADER_META + path) or {}).get("header") or {}).get("rotation", 0))
            name = os.path.splitext(os.path.basename(fs_path(path)))[0]
            owner = owners.setdefault(name, path)
            if owner != path:
                refused[key] = f"same video name as {owner}: musubi's flat cache folder holds one video per name"
            elif rotations[path]:
                refused[key] = (
                    f"the video is shown rotated ({rotations[path]} degrees): musubi decodes its frames unrotated, so "
                    "its own caching would cut other buckets; rotate the file itself to export it"
                )
            else:
                names[key] = name
    return names, refused


def _refusal(reader: CacheReader, key: str) -> str | None:
    """Why musubi's trainer would read this clip otherwise, or None."""
    info = reader.info(key)
    fp = reader.fingerprint.get("buckets", {})
    resolution, no_upscale = tuple(fp.get("resolution", (960, 544))), bool(fp.get("no_upscale"))
    bucket = tuple(info["bucket"])
    want = musubi_bucket(bucket, resolution, no_upscale, musubi_buckets(resolution))
    if want != bucket:
        return (
            f"encoded at bucket {bucket[0]}x{bucket[1]}, which musubi's trainer recomputes as {want[0]}x{want[1]} "
            "from the file's name; rebuild the latents with --buckets musubi"
        )
    if tuple(info.get("crop", (0, 0))) != centre_crop(tuple(info["original_size"]), bucket):
        return "random crop: musubi crops at the centre; rebuild without --random-crop"
    return None


def _text_reader(cache, reader: CacheReader, s: ExportSummary) -> CacheReader | None:
    family = (reader.text_fingerprint or {}).get("family")
    if family != TEXT_FAMILY:
        s.warnings.append(
            ("no text outputs in the cache" if family is None else f"text outputs of {family} not exported")
            + ": only latents written; musubi trains a clip only with its video's _hv15_te file (build them with "
            "cachebuild textenc --model hunyuanvideo-1.5, or musubi's own text caching)"
        )
        return None
    s.warnings.append(
        "text as the diffusers pipeline encodes it (its system message, 1000 tokens after the template's 108, ByT5 "
        "to 256): musubi's own text caching uses its own template, 1024 tokens and ByT5 to 128, so the values differ "
        "from a musubi-cached run's (the roles and widths are the same)"
    )
    return open_cache(cache, text=True)


def _setting_warnings(fingerprint: dict) -> list[str]:
    out = []
    if fingerprint.get("latents") == "sample":
        out.append("this cache holds posterior samples; musubi's own caching stores the mode (--latents mean)")
    if fingerprint.get("flip"):
        out.append("flipped latents are not exported: musubi has no flip augmentation in its cache")
    if "tiling" in fingerprint:
        tiles = fingerprint["tiling"]
        out.append(f"latents encoded in {tiles['tile']} px tiles (musubi's own caching tiles at 128 px by default)")
    return out


def _condition_warnings(reader: CacheReader) -> list[str]:
    """What the image-to-video parts hold where musubi's own caching would differ."""
    condition = (reader.control_fingerprint or {}).get("condition", {})
    if condition.get("kind") != "hunyuanvideo-1.5-i2v":
        return []
    out = [
        "latents_image holds the first frame's latents unscaled, as musubi's caching saves them and its trainer reads "
        "them (the diffusers pipeline and musubi's sampler scale them by 1.03682)"
    ]
    if condition.get("image") == "control":
        out.append("conditions from --control images: musubi's own caching conditions each clip on its first frame")
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    """musubi's ``dtype_to_str``: the torch name after the dot (``bfloat16``, ``float16``)."""
    return str(dtype).split(".")[-1]
