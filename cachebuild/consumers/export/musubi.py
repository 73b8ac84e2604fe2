"""Export a cache to musubi-tuner's own cache layout, so its training starts without a caching run.

musubi-tuner keeps one flat ``cache_directory`` per dataset with two safetensors files per image, named after the
image's file stem; at training it globs ``*_<arch>.safetensors``, parses the image size back from the name,
recomputes the bucket from that size (:mod:`cachebuild.images.musubi_buckets`) and stacks each bucket's latents.
Per architecture, as its ``dataset/cache_io.py`` and ``*_cache_latents.py`` write them (musubi-tuner v0.3.4):

  latents ``<stem>_<W:04d>x<H:04d>_<arch>.safetensors`` (W x H: the image's own size, as Pillow reads it):
    qi     ``latents_1x<h>x<w>_bfloat16`` (C, 1, h, w): the posterior mode, ``(z - mean) / std`` per channel
    zi     ``latents_1x<h>x<w>_float32``  (C, h, w):    the posterior mode, raw (the trainer shifts and scales)
    f2*    ``latents_<h>x<w>_float32``    (4C, h/2, w/2): the mean patchified 2x2, batch-norm normalised
    qie, fk: as qi and as Flux.1, with the condition image's latents beside them (:mod:`.musubi_pairs`)
    metadata ``architecture`` (full name), ``width``, ``height``, ``format_version`` "1.0.1"
  text ``<stem>_<arch>_te.safetensors``:
    qi ``varlen_vl_embed_<dtype>`` (T, D); zi ``varlen_llm_embed_<dtype>`` (T, D): real tokens only;
    f2* ``ctx_vec_<dtype>`` (512, D): every padded position; metadata ``architecture``, ``caption1``,
    ``format_version``.

Key suffixes are torch dtype names (``bfloat16``, not ``bf16``): musubi's collator strips a known dtype name
to find the tensor's role. Latents come from the stored record through the family's ``pipeline_inputs`` (the
same normalisation the diffusers pipeline applies, which is musubi's); text through ``pipeline_inputs`` by the
pipeline's names, so a family's text exports as soon as cachebuild stores it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cachebuild.consumers.export.files import (
    PixelCheck,
    Progress,
    safetensors_bytes,
    same_safetensors,
    write_checked,
)
from cachebuild.consumers.export.kohya import ExportSummary
from cachebuild.consumers.export.musubi_images import (
    FORMAT_VERSION,
    bucket_rule,
    image_refusal,
    image_root,
    musubi_latent_name,
    musubi_text_name,
)
from cachebuild.consumers.export.musubi_pairs import PAIRS, check_pairs, control_tensors, kontext_text_tensors
from cachebuild.consumers.reader import CacheReader, open_cache
from cachebuild.errors import ConfigError
from cachebuild.keys import fs_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MusubiArch:
    """One musubi-tuner architecture: its names, the cache family it reads, and its tensors' keys and dtypes."""

    name: str  # short name in file names: qi, zi, f2d, ...
    full: str  # the ``architecture`` metadata value
    family: str  # cachebuild's family, for pipeline_inputs
    vae_class: str  # the VAE class the latent cache must come from
    latent_dtype: torch.dtype  # what musubi's own caching writes (the VAE's compute dtype there)
    frames: bool  # latent key with a leading ``1x`` frame count
    text_key: str  # text tensor's name before its dtype suffix
    text_families: tuple[str, ...]  # text cache families whose outputs this architecture takes
    text_dim: int | None = None  # width of the real model's text output, to tell the Flux.2 variants apart


ARCHS = {
    a.name: a
    for a in (
        MusubiArch(
            "qi",
            "qwen_image",
            "qwen-image",
            "AutoencoderKLQwenImage",
            torch.bfloat16,
            True,
            "varlen_vl_embed",
            ("qwen-image",),
        ),
        MusubiArch("zi", "z_image", "z-image", "AutoencoderKL", torch.float32, True, "varlen_llm_embed", ("z-image",)),
        MusubiArch(
            "f2d",
            "flux_2_dev",
            "flux2",
            "AutoencoderKLFlux2",
            torch.float32,
            False,
            "ctx_vec",
            ("flux2", "flux2-dev"),
            3 * 5120,  # Mistral Small 3.1, layers 10/20/30
        ),
        MusubiArch(
            "f2k4b",
            "flux_2_klein_4b",
            "flux2",
            "AutoencoderKLFlux2",
            torch.float32,
            False,
            "ctx_vec",
            ("flux2-klein", "flux2-klein-4b"),
            3 * 2560,  # Qwen3-4B, layers 9/18/27
        ),
        MusubiArch(
            "f2k9b",
            "flux_2_klein_9b",
            "flux2",
            "AutoencoderKLFlux2",
            torch.float32,
            False,
            "ctx_vec",
            ("flux2-klein", "flux2-klein-9b"),
            3 * 4096,  # Qwen3-8B, layers 9/18/27
        ),
        # image pairs (musubi_pairs): Qwen-Image-Edit's files carry Qwen-Image's architecture name
        MusubiArch(
            "qie",
            "qwen_image",
            "qwen-image",
            "AutoencoderKLQwenImage",
            torch.bfloat16,
            True,
            "varlen_vl_embed",
            ("qwen-image-edit", "qwen-image-edit-plus"),
        ),
        MusubiArch(
            "fk",
            "flux_kontext",
            "flux-kontext",
            "AutoencoderKL",
            torch.float32,
            True,
            "t5_vec",
            ("flux-kontext", "flux"),
        ),
    )  # fmt: skip
}


CLIP_ARCHS = ("hv15", "wan")  # video architectures, exported by modules of their own (musubi_hv15, musubi_wan)


def export_musubi(
    cache: str | os.PathLike,
    to: str | os.PathLike,
    arch: str | None = None,
    overwrite: bool = False,
    images: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> ExportSummary:
    """Write the cache as musubi-tuner cache files into the folder ``to`` (its ``cache_directory``).

    Args:
        cache: the cache folder.
        to: musubi's cache directory for this dataset (created if missing; flat, as musubi reads it).
        arch: qi, zi, f2d, f2k4b, f2k9b, qie, fk, hv15 or wan (clips: modules of their own); None tells it from
            the cache where it can.
        overwrite: replace existing files whose contents differ.
        images: the image folder, to read each image's EXIF orientation and size as musubi will; default the
            folder the cache was built from.
        progress: called with (done, total) after each item.

    Raises:
        ConfigError: an unknown arch, or one the cache's VAE or text does not fit; images not found.

    Example:
        >>> export_musubi("./cache", "./musubi_cache", arch="zi").written
        40000
    """
    start = time.monotonic()
    reader = open_cache(cache, text=False)
    name = _pick_arch(arch, reader)
    if name == "hv15":  # HunyuanVideo 1.5's clips: a module of their own
        from cachebuild.consumers.export.musubi_hv15 import export_hv15

        return export_hv15(cache, to, overwrite=overwrite, progress=progress)
    if name == "wan":  # Wan's clips: a module of their own
        from cachebuild.consumers.export.musubi_wan import export_musubi_wan

        return export_musubi_wan(cache, to, overwrite, images, progress)
    arch_ = ARCHS[name]
    _check_vae(arch_, reader.fingerprint)
    pair_warnings = check_pairs(arch_, reader) if arch_.name in PAIRS else []  # refusals before any file
    root = Path(to)
    root.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary(arch_.name, str(root))
    root_of_images = image_root(reader, images)
    text = _text_reader(cache, reader, arch_, summary)
    _warn_settings(reader.fingerprint, summary, arch_)
    summary.warnings += pair_warnings
    paths = {key: fs_path(rel) for key, rel in reader.source_paths().items()}
    rule = bucket_rule(reader.fingerprint)
    stems: dict[str, str] = {}
    keys = reader.keys()
    pixels = PixelCheck(reader.fingerprint)
    for done, key in enumerate(keys, 1):
        reason = image_refusal(reader, key, paths.get(key), root_of_images, rule, stems)
        if reason:
            summary.skipped.append({"key": key, "reason": reason})
        else:
            pixels.check(key, root_of_images / paths[key])
            _export_item(reader, text, key, paths[key], arch_, root, overwrite, summary)
        if progress:
            progress(done, len(keys))
    summary.warnings += [w for w in [pixels.warning("musubi-tuner")] if w]
    summary.seconds = time.monotonic() - start
    return summary


def musubi_latent_tensors(reader: CacheReader, key: str, arch: MusubiArch) -> dict[str, torch.Tensor]:
    """``{key name: tensor}`` of one item's musubi latent file."""
    from cachebuild.families import pipeline_inputs_for

    stored = reader.tensors(key)
    # musubi caches the posterior mode: a moments cache gives its mean, never a fresh draw
    rec = {"latents": stored["mean"] if "mean" in stored else stored["latents"]}
    if arch.name == "zi":  # musubi stores Z-Image's raw VAE output; its trainer applies (z - shift) * scale
        z = rec["latents"].to(arch.latent_dtype)  # (C, h, w)
    else:
        z = pipeline_inputs_for(arch.family)(rec, reader.fingerprint.get("vae", {}))["latents"]
        if arch.family == "qwen-image":
            z = z.transpose(0, 1)  # the pipeline's (1, C, h, w) -> musubi's (C, 1, h, w)
        z = z.to(arch.latent_dtype)
    h, w = z.shape[-2:]
    dims = f"1x{h}x{w}" if arch.frames else f"{h}x{w}"
    return {f"latents_{dims}_{_dtype_name(z.dtype)}": z.contiguous()}


def musubi_text_tensors(reader: CacheReader, key: str, arch: MusubiArch) -> dict[str, torch.Tensor]:
    """``{key name: tensor}`` of one item's musubi text file, from the pipeline's ``prompt_embeds``."""
    if arch.name == "fk":
        return kontext_text_tensors(reader, key)
    inputs = reader.pipeline_inputs(key, family=reader.text_fingerprint.get("family"))
    if arch.name == "qi":  # musubi keeps up to encode_prompt's 1024 rows, past __call__'s 512 default
        rec = reader.record(key)
        inputs = {"prompt_embeds": rec["qwen25vl"][rec["qwen25vl_mask"].bool()]}
    if "prompt_embeds" not in inputs:
        raise ConfigError(f"this cache's {arch.family} text gives no prompt_embeds yet; export it without text")
    embeds = inputs["prompt_embeds"]  # (T, D) or (L, D) padded
    mask = inputs.get("prompt_embeds_mask", inputs.get("prompt_attention_mask"))
    if arch.text_key.startswith("varlen_") and mask is not None:
        embeds = embeds[mask.bool()]  # musubi keeps the real tokens only
    if arch.text_dim is not None and embeds.shape[-1] in _REAL_TEXT_DIMS and embeds.shape[-1] != arch.text_dim:
        raise ConfigError(
            f"text outputs are {embeds.shape[-1]} wide, {arch.name} takes {arch.text_dim}; pick the --arch of the "
            f"text encoder the cache was built with ({_REAL_TEXT_DIMS[embeds.shape[-1]]})"
        )
    return {f"{arch.text_key}_{_dtype_name(embeds.dtype)}": embeds.contiguous()}


_REAL_TEXT_DIMS = {a.text_dim: a.name for a in ARCHS.values() if a.text_dim}


def _export_item(reader, text, key, rel, arch, root, overwrite, s) -> None:
    original = tuple(reader.info(key)["original_size"])
    tensors = musubi_latent_tensors(reader, key, arch)
    if arch.name in PAIRS:
        control = control_tensors(reader, text, key, arch)
        if isinstance(control, str):
            s.skipped.append({"key": key, "reason": control})
            return
        tensors |= control
    meta = {"architecture": arch.full, "width": str(original[0]), "height": str(original[1])}
    meta["format_version"] = FORMAT_VERSION
    _write(root / musubi_latent_name(rel, original, arch.name), tensors, meta, root, overwrite, s)
    if text is None:
        return
    if key not in text:
        s.skipped.append({"key": key, "reason": "no caption in the text cache: latents written, musubi skips the item"})
        return
    te = musubi_text_tensors(text, key, arch)
    meta = {"architecture": arch.full, "caption1": text.caption(key) or "", "format_version": FORMAT_VERSION}
    _write(root / musubi_text_name(rel, arch.name), te, meta, root, overwrite, s)


def _write(target: Path, tensors: dict, meta: dict, root: Path, overwrite: bool, s: ExportSummary) -> None:
    data = safetensors_bytes(tensors, meta)
    write_checked(target, data, root, overwrite, s, lambda old: same_safetensors(old, tensors, meta))


def _pick_arch(arch: str | None, reader: CacheReader) -> str:
    if arch is not None:
        if arch not in ARCHS and arch not in CLIP_ARCHS:
            raise ConfigError(
                f"--arch must be one of {', '.join([*ARCHS, *CLIP_ARCHS])} for musubi export, got {arch!r}"
            )
        return arch
    cls = reader.fingerprint.get("vae", {}).get("class")
    text_family = (reader.text_fingerprint or {}).get("family")
    if text_family in ARCHS["qie"].text_families:
        return "qie"
    if text_family == "flux-kontext" or reader.fingerprint.get("control"):
        return "fk"
    if cls == "AutoencoderKLQwenImage":
        return "qi"
    if cls == "AutoencoderKLHunyuanVideo15":
        return "hv15"
    if cls == "AutoencoderKLWan":
        return "wan"
    if text_family == "z-image":
        return "zi"
    for a in ARCHS.values():  # a Flux.2 text cache names its variant
        if a.vae_class == cls and text_family in a.text_families and text_family not in ("flux2-klein",):
            return a.name
    raise ConfigError(f"cannot tell the musubi architecture of this cache; pass --arch ({', '.join(ARCHS)})")


def _check_vae(arch: MusubiArch, fingerprint: dict) -> None:
    vae = fingerprint.get("vae", {})
    cls = vae.get("class", "AutoencoderKL")
    if cls != arch.vae_class:
        raise ConfigError(f"--arch {arch.name} needs latents of {arch.vae_class}; this cache has {cls}")
    if arch.name in ("zi", "fk") and (vae.get("shift_factor") is None or vae.get("latent_channels") != 16):
        raise ConfigError(
            f"--arch {arch.name} needs Flux.1's 16-channel VAE (scale 0.3611, shift 0.1159); this cache has another"
        )


def _text_reader(cache, reader: CacheReader, arch: MusubiArch, s: ExportSummary) -> CacheReader | None:
    """The text side to export, or None with the reason in the summary's warnings."""
    family = (reader.text_fingerprint or {}).get("family")
    if family is None:
        s.warnings.append(
            f"no text outputs in the cache: only latents written; musubi trains an item only with its "
            f"_{arch.name}_te file (build them with cachebuild textenc, or musubi's own text caching)"
        )
        return None
    if family not in arch.text_families:
        s.warnings.append(f"text outputs of {family} not exported: {arch.name} takes {' or '.join(arch.text_families)}")
        return None
    return open_cache(cache, text=True)


def _warn_settings(fingerprint: dict, s: ExportSummary, arch: MusubiArch) -> None:
    if fingerprint.get("buckets", {}).get("rule") != "musubi":
        s.warnings.append("built with kohya's bucket rule: items whose bucket musubi would pick otherwise are refused")
    if fingerprint.get("latents") == "sample" and arch.name != "fk":  # Kontext's caching samples (musubi_pairs)
        s.warnings.append(
            "this cache holds posterior samples; musubi's own caching stores the mode (build with --latents mean "
            "to match it)"
        )
    if fingerprint.get("flip"):
        s.warnings.append("flipped latents are not exported: musubi has no flip augmentation in its cache")
    if fingerprint.get("alpha_mask"):  # its image caching drops the alpha channel (encode_datasets, supports_alpha)
        s.warnings.append("alpha masks are not exported: musubi-tuner keeps no loss mask for these architectures")


def _dtype_name(dtype: torch.dtype) -> str:
    """musubi's ``dtype_to_str``: the torch name after the dot (``bfloat16``, ``float32``)."""
    return str(dtype).split(".")[-1]
