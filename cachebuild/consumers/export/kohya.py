"""Export a cache to kohya sd-scripts' own disk-cache layout, so `--cache_latents_to_disk` finds it ready.

One ``.npz`` per image, beside the image under ``--to`` (the dataset folder sd-scripts trains on), named and
filled the way sd-scripts' caching strategies name and fill them (docs/export.md has the table and where each
rule comes from):

  sd / sdxl: ``<stem>_<W:04d>x<H:04d>_<sd|sdxl>.npz`` with ``latents`` (C, H/8, W/8) float32, raw;
             ``original_size`` [W, H]; ``crop_ltrb``; ``latents_flipped`` with --flip-aug caches; ``alpha_mask``
             (H, W) float32 alpha / 255 with --alpha-mask caches.
  flux:      ``<stem>_<W:04d>x<H:04d>_flux.npz`` with the same fields suffixed ``_<h>x<w>`` (latent height x
             width), latents scaled as sd-scripts' Flux autoencoder returns them: (z - shift) * scale.

With text-encoder outputs of the same family in the cache, ``<stem>_te_outputs.npz`` (sdxl),
``<stem>_flux_te.npz`` (flux), ``<stem>_sd3_te.npz`` (sd3) or ``<stem>_lumina_te.npz`` (lumina: needs the
pipeline's tokenizer, see kohya_lumina) go beside the image too.

``W x H`` in the name is the image's own size, which sd-scripts parses back from the name. Nothing is written
outside ``--to``; an existing file with other contents is left alone unless ``overwrite`` is set, and a file
with the same contents is not rewritten, so an export can be re-run.
"""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cachebuild.config import ExifMode
from cachebuild.consumers.export.files import PixelCheck, stored_image_problem
from cachebuild.consumers.export.kohya_lumina import (
    ItemRefused,
    LuminaTokens,
    lumina_text_arrays,
    sd_scripts_gap,
    sd_scripts_options,
)
from cachebuild.consumers.reader import CacheReader, open_cache
from cachebuild.errors import ConfigError
from cachebuild.keys import fs_path, item_seed, path_text

log = logging.getLogger(__name__)

FAMILIES = ("sd", "sdxl", "flux", "sd3", "lumina")
KOHYA_DOWNSAMPLE = 8  # sd-scripts assumes 8 pixels per latent cell for every family it caches
SDXL_SCALING = 0.13025
SD3_SCALING = 1.5305
TEXT_SUFFIX = {"sdxl": "_te_outputs.npz", "flux": "_flux_te.npz"}  # sd-scripts keeps no SD 1.x text cache
TEXT_SUFFIX |= {"sd3": "_sd3_te.npz", "lumina": "_lumina_te.npz"}
MULTI_RESOLUTION = ("flux", "sd3", "lumina")  # keys suffixed _<h>x<w> (sd-scripts' multi_resolution=True)
SCALED = ("flux", "lumina")  # sd-scripts' Flux autoencoder (Lumina 2 uses it too) caches (z - shift) * scale
TEXT_FAMILIES = {"sdxl": ("sdxl",), "flux": ("flux",), "sd3": ("sd3",), "lumina": ("lumina", "lumina2")}


@dataclass
class ExportSummary:
    """What one export did; ``conflicts`` are files left alone because they differ (see ``overwrite``)."""

    family: str
    to: str
    written: int = 0
    unchanged: int = 0  # the file was already there with the same contents
    conflicts: list[str] = field(default_factory=list)  # paths relative to --to
    skipped: list[dict] = field(default_factory=list)  # [{"key", "reason"}] items not exported
    shadowed: list[str] = field(default_factory=list)  # old <stem>.npz files sd-scripts would read instead
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def detect_family(fingerprint: dict, text_family: str | None = None) -> str:
    """sd, sdxl, flux, sd3 or lumina, from the VAE recorded in the cache's fingerprint.

    16 channels with a shift factor is SD3 with SD3's scaling factor, else Flux, or Lumina 2 (the same VAE)
    when the text outputs are Lumina's; a scaling factor of 0.13025 is SDXL; any other 4-channel VAE is SD 1.x/2.x.

    Raises:
        ConfigError: the VAE matches no family; the message says to pass one.
    """
    _refuse_unexportable(fingerprint)
    vae = fingerprint.get("vae", {})
    channels, scale, shift = vae.get("latent_channels"), vae.get("scaling_factor"), vae.get("shift_factor")
    if channels == 16 and shift is not None:
        if scale is not None and abs(scale - SD3_SCALING) < 1e-4:
            return "sd3"
        return "lumina" if (text_family or "").startswith("lumina") else "flux"
    if scale is not None and abs(scale - SDXL_SCALING) < 1e-6:
        return "sdxl"
    if channels == 4:
        return "sd"
    raise ConfigError(f"cannot tell the model family of a {channels}-channel VAE; pass --family sd|sdxl|flux")


def kohya_npz_name(path: str, original_size: tuple[int, int], family: str) -> str:
    """The cache file sd-scripts looks for beside image ``path``: ``<stem>_<W:04d>x<H:04d>_<family>.npz``."""
    stem = os.path.splitext(path)[0]
    w, h = original_size
    return f"{stem}_{w:04d}x{h:04d}_{family}.npz"


def kohya_crop_ltrb(bucket: tuple[int, int], original_size: tuple[int, int]) -> tuple:
    """sd-scripts' ``crop_ltrb``: the box the image would fill if *fitted inside* the bucket, centred.

    This is sd-scripts' own formula (``get_crop_ltrb``, "according to the preprocessing of Stability AI"); it
    depends on the bucket and the original size only, never on the crop actually taken, and its values are
    floats. It is copied here so the exported value is the one sd-scripts would have written itself.
    """
    bucket_ar = bucket[0] / bucket[1]
    image_ar = original_size[0] / original_size[1]
    if bucket_ar > image_ar:  # bucket wider than the image: heights match
        resized_w, resized_h = bucket[1] * image_ar, bucket[1]
    else:
        resized_w, resized_h = bucket[0], bucket[0] / image_ar
    left = (bucket[0] - resized_w) // 2
    top = (bucket[1] - resized_h) // 2
    return left, top, left + resized_w, top + resized_h


def export_kohya(
    cache: str | os.PathLike,
    to: str | os.PathLike,
    family: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
    progress=None,
    model: str | None = None,
) -> ExportSummary:
    """Write the latent cache at ``cache`` as sd-scripts ``.npz`` files beside the images under ``to``.

    Args:
        cache: the cache folder.
        to: the dataset folder sd-scripts trains on (the images must be there; files go beside them).
        family: sd, sdxl, flux, sd3 or lumina; None detects it from the cache (:func:`detect_family`).
        overwrite: replace existing files whose contents differ.
        seed: for ``--latents moments`` caches, the seed of the one sample exported per image.
        progress: called with (done, total) after each item's latents.
        model: lumina: the Lumina 2 pipeline the text cache was built with; its tokenizer gives the ``input_ids``
            sd-scripts' text file holds (checked against the cache's tokenizer hash).

    Raises:
        ConfigError: unknown family, or one that does not fit the cache's VAE; ``to`` is not a folder; a
            Lumina 2 text cache without ``model``, or with a ``model`` whose tokenizer differs from the cache's.
        CacheError: ``cache`` is not a cache.

    Example:
        >>> export_kohya("./cache", "./dataset").written
        20000
    """
    start = time.monotonic()
    reader = open_cache(cache, text=False)  # every latents item, whether or not it has a caption
    text_family = (reader.text_fingerprint or {}).get("family")
    family = _check_family(family or detect_family(reader.fingerprint, text_family), reader.fingerprint)
    root = Path(to)
    if not root.is_dir():
        raise ConfigError(f"--to {root} is not a folder; pass the dataset folder sd-scripts trains on")
    summary = ExportSummary(family, str(root))
    downsample = reader.fingerprint.get("vae", {}).get("downsample")
    if downsample != KOHYA_DOWNSAMPLE:
        summary.warnings.append(
            f"this VAE downsamples by {downsample}, sd-scripts assumes {KOHYA_DOWNSAMPLE}: it will not use these files"
        )
    tokens = _lumina_tokens(reader.text_fingerprint, family, model, summary)  # before any file is written
    # stored paths are text; the files beside the images are named after the images' real bytes
    paths = {key: fs_path(rel) for key, rel in reader.source_paths().items()}
    pixels = PixelCheck(reader.fingerprint)
    for done, key in enumerate(reader, 1):
        _export_one(reader, key, paths.get(key), root, family, overwrite, seed, summary, pixels)
        if progress:
            progress(done, len(reader))
    summary.warnings += [w for w in [pixels.warning("sd-scripts")] if w]
    if reader.text_fingerprint is not None:
        _export_text(open_cache(cache, text=True), paths, root, family, overwrite, summary, tokens)
    if summary.shadowed:
        summary.warnings.append(
            f"{len(summary.shadowed)} old-style <stem>.npz file(s) sit beside exported images, e.g. "
            f"{summary.shadowed[0]}; sd-scripts reads those instead, so delete them"
        )
    summary.seconds = time.monotonic() - start
    return summary


def _export_one(
    reader: CacheReader, key: str, rel: str | None, root: Path, family: str, overwrite: bool, seed: int, s, pixels
) -> None:
    info = reader.info(key)
    original = tuple(info["original_size"])
    image = _inside(root, rel) if rel else None
    reason = _unusable(image, original, ExifMode.recorded(reader.fingerprint))
    if reason:
        _skip(s, key, reason)
        return
    pixels.check(key, image)
    target = image.with_name(os.path.basename(kohya_npz_name(rel, original, family)))
    written = _write_npz(target, kohya_arrays(reader, key, info, family, seed), root, overwrite, s)
    if written and family not in MULTI_RESOLUTION and image.with_suffix(".npz").exists():
        s.shadowed.append(path_text(str(image.with_suffix(".npz").relative_to(root.resolve()))))


def _lumina_tokens(fingerprint: dict | None, family: str, model: str | None, s: ExportSummary) -> LuminaTokens | None:
    """The tokenizer for a Lumina 2 text cache's ``input_ids``; None (with a warning) where sd-scripts' encoding
    cannot give the stored hidden states, or where there is no Lumina text to export."""
    if family != "lumina" or not fingerprint or fingerprint.get("family") not in TEXT_FAMILIES["lumina"]:
        return None
    encoder = next((e for e in fingerprint.get("encoders", []) if e.get("hidden")), {})
    gap = sd_scripts_gap(encoder)
    if gap:
        s.warnings.append(f"text outputs not exported: sd-scripts would compute other hidden states ({gap})")
        return None
    if model is None:  # the latents are still worth having; the text needs the pipeline's tokenizer
        s.warnings.append(
            "text outputs not exported: sd-scripts' _lumina_te.npz needs input_ids, tokenized again from each "
            "caption: pass --model with the Lumina 2 pipeline the text cache was built with"
        )
        return None
    tokens = LuminaTokens(encoder, model)
    options = sd_scripts_options(encoder)
    if options:  # sd-scripts does not check these against its files: a mismatch would train silently
        s.warnings.append(f"_lumina_te.npz files hold what sd-scripts caches with {' '.join(options)}: train with it")
    return tokens


def _export_text(
    reader: CacheReader,
    paths: dict[str, str],
    root: Path,
    family: str,
    overwrite: bool,
    s: ExportSummary,
    tokens: LuminaTokens | None = None,
) -> None:
    """``<stem>_te_outputs.npz`` (sdxl), ``<stem>_flux_te.npz`` (flux), ``<stem>_sd3_te.npz`` (sd3) or
    ``<stem>_lumina_te.npz`` (lumina, with ``tokens``) beside each image with a caption."""
    text_family = reader.text_fingerprint.get("family")
    if family not in TEXT_SUFFIX or text_family not in TEXT_FAMILIES[family]:
        s.warnings.append(f"text outputs ({text_family}) not exported: sd-scripts has no {family} text cache for them")
        return
    if family == "lumina" and tokens is None:
        return  # the reason is in the warnings already (_lumina_tokens)
    for key in reader.unmatched["text_only"]:
        _skip(s, key, "caption with no image in the latent cache: no place to put its text outputs")
    for key in reader:
        image = _inside(root, paths[key])
        if not image.is_file():
            continue  # already reported by the latents export
        target = image.with_name(os.path.splitext(image.name)[0] + TEXT_SUFFIX[family])
        try:
            arrays = kohya_text_arrays(reader, key, family, tokens)
        except ItemRefused as exc:
            _skip(s, key, f"text outputs not exported: {exc}")
            continue
        except ConfigError as exc:  # the text cache lacks a tensor the layout needs: latents only, said once
            s.warnings.append(f"text outputs not exported: {exc}")
            return
        _write_npz(target, arrays, root, overwrite, s)


def kohya_text_arrays(reader: CacheReader, key: str, family: str, tokens=None) -> dict[str, np.ndarray]:
    """The arrays of one item's sd-scripts text-encoder outputs file, by their npz names; ``tokens`` (lumina:
    a :class:`LuminaTokens`) gives the ``input_ids`` the cache does not store."""
    if family == "lumina":
        return lumina_text_arrays(reader, key, tokens)
    t = {
        name: v.float().numpy() if v.is_floating_point() else v.numpy() for name, v in reader.text_tensors(key).items()
    }
    if family == "sdxl":  # both CLIPs' penultimate layer, and the bigG projection of the pooled output
        return {"hidden_state1": t["clip_l"], "hidden_state2": t["clip_g"], "pool2": t["clip_g_pooled"]}
    length = t["t5"].shape[0]  # T5 at its max length; the mask marks the real tokens
    t5 = next(e for e in reader.text_fingerprint.get("encoders", []) if e["name"] == "t5")
    t5_masked = np.array(bool(t5.get("attention_mask", t5.get("trim"))))
    if family == "sd3":  # sd-scripts keeps the CLIPs apart from T5: (77, 768 + 1280) and (768 + 1280,)
        counts = reader.token_counts(key)
        return {
            "lg_out": np.concatenate([t["clip_l"], t["clip_g"]], axis=-1),
            "lg_pooled": np.concatenate([t["clip_l_pooled"], t["clip_g_pooled"]], axis=-1),
            "t5_out": t["t5"],
            # the tokenizers' masks, 1 at real tokens; sd-scripts requires them even when it does not apply them
            "clip_l_attn_mask": _token_mask(counts["clip_l"], t["clip_l"].shape[0]),
            "clip_g_attn_mask": _token_mask(counts["clip_g"], t["clip_g"].shape[0]),
            "t5_attn_mask": t["t5_mask"],
            "apply_lg_attn_mask": np.array(False),  # the CLIPs run unmasked, as the SD3 pipeline runs them
            "apply_t5_attn_mask": t5_masked,
        }
    return {
        "l_pooled": t["clip_l_pooled"],
        "t5_out": t["t5"],
        "txt_ids": np.zeros((length, 3), dtype=np.float32),
        "t5_attn_mask": t["t5_mask"],
        # masked (--t5-mask): train with --apply_t5_attn_mask; unmasked (the default, as the Flux.1 pipeline): without
        "apply_t5_attn_mask": t5_masked,
    }


def _token_mask(count: int, length: int) -> np.ndarray:
    return (np.arange(length) < count).astype(np.int64)  # as a tokenizer's attention_mask: int64, 1 at real tokens


def _write_npz(target: Path, arrays: dict[str, np.ndarray], root: Path, overwrite: bool, s: ExportSummary) -> bool:
    """Write ``arrays`` to ``target`` unless it holds them already or differs without ``overwrite``."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # numpy writes fixed zip timestamps: same arrays, same bytes
    data = buf.getvalue()
    if target.exists():
        if _same_contents(target, data, arrays):
            s.unchanged += 1
            return False
        if not overwrite:
            s.conflicts.append(path_text(str(target.relative_to(root.resolve()))))
            return False
    _write_replace(target, data)
    s.written += 1
    return True


def kohya_arrays(reader: CacheReader, key: str, info: dict, family: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays of one item's sd-scripts latents file, by their npz names."""
    tensors = reader.tensors(key)
    bucket, original = tuple(info["bucket"]), tuple(info["original_size"])
    out: dict[str, np.ndarray] = {}
    for suffix in ("", "_flipped"):
        z = _one_latent(tensors, suffix, key, seed)
        if z is None:
            continue
        if family in SCALED:  # sd-scripts' Flux autoencoder returns scaled latents, and caches them so
            z = (z - reader.shift_factor) * reader.scaling_factor
        out["latents" + suffix] = z.numpy()  # (C, H/8, W/8) float32
    if "alpha_mask" in tensors:  # sd-scripts' --alpha_mask: (H, W) float32 in [0, 1], unflipped (it flips it itself)
        out["alpha_mask"] = tensors["alpha_mask"].numpy().astype(np.float32) / 255.0
    res = f"_{out['latents'].shape[1]}x{out['latents'].shape[2]}" if family in MULTI_RESOLUTION else ""  # h x w
    result = {name + res: a for name, a in out.items()}
    result["original_size" + res] = np.array(original)  # [W, H]
    result["crop_ltrb" + res] = np.array(kohya_crop_ltrb(bucket, original))
    return result


def _one_latent(tensors: dict[str, torch.Tensor], suffix: str, key: str, seed: int) -> torch.Tensor | None:
    if "latents" + suffix in tensors:
        return tensors["latents" + suffix].float()
    if "mean" + suffix not in tensors:
        return None
    mean, std = tensors["mean" + suffix].float(), tensors["std" + suffix].float()
    gen = torch.Generator().manual_seed(item_seed(seed, key, f"export{suffix}"))  # one fixed draw per image
    return mean + std * torch.randn(mean.shape, generator=gen, dtype=torch.float32)


def _refuse_unexportable(fingerprint: dict) -> None:
    cls = fingerprint.get("vae", {}).get("class", "AutoencoderKL")
    if cls in ("AutoencoderKLQwenImage", "AutoencoderKLFlux2"):
        raise ConfigError(
            f"this is a {cls} cache; sd-scripts has no cache layout for it: export it with --format musubi "
            "(musubi-tuner trains it), or read it with open_cache(...).pipeline_inputs(key, family=...)"
        )


def _check_family(family: str, fingerprint: dict) -> str:
    _refuse_unexportable(fingerprint)
    if family not in FAMILIES:
        raise ConfigError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    channels = fingerprint.get("vae", {}).get("latent_channels")
    want = 16 if family in ("flux", "sd3", "lumina") else 4
    if channels != want:
        raise ConfigError(f"--family {family} needs {want}-channel latents; this cache has {channels}")
    scale = fingerprint.get("vae", {}).get("scaling_factor")
    is_sd3 = scale is not None and abs(scale - SD3_SCALING) < 1e-4
    if want == 16 and is_sd3 != (family == "sd3"):
        raise ConfigError(
            f"--family {family} does not fit this {'SD3' if is_sd3 else 'Flux.1-type'} VAE (scaling factor {scale}); "
            f"pass --family {'sd3' if is_sd3 else 'flux or lumina'}"
        )
    return family


def _inside(root: Path, rel: str) -> Path:
    # a path from the manifest never leads out of --to; checked on the path's parts, not where it resolves,
    # because a linked concept folder (10_concept -> elsewhere) is followed by the scan and used by sd-scripts
    if os.path.isabs(rel) or ".." in Path(rel).parts:
        raise ConfigError(f"item path {path_text(rel)!r} points outside --to {root}; the manifest may be damaged")
    return root.resolve() / rel


def _unusable(image: Path | None, original: tuple[int, int], exif: ExifMode = ExifMode.APPLY) -> str | None:
    """Why sd-scripts would not use a file beside this image, or None.

    sd-scripts reads the size (``imagesize``) and the pixels (``load_image``) as stored, never applying the EXIF
    orientation: a rotated image fits only a cache built with ``--exif ignore``.
    """
    if image is None or not image.is_file():
        return "image not found under --to; sd-scripts reads caches beside their images"
    return stored_image_problem(
        image,
        original,
        exif,
        "EXIF-rotated image: sd-scripts reads pixels unrotated and this cache holds them upright; rebuild the "
        "latents with --exif ignore to export it",
    )


def _same_contents(path: Path, data: bytes, arrays: dict[str, np.ndarray]) -> bool:
    existing = path.read_bytes()
    if existing == data:
        return True
    try:
        with np.load(io.BytesIO(existing)) as npz:
            if sorted(npz.files) != sorted(arrays):
                return False
            return all(npz[k].dtype == a.dtype and np.array_equal(npz[k], a) for k, a in arrays.items())
    except Exception:  # not a readable npz: it differs
        return False


def _write_replace(target: Path, data: bytes) -> None:
    # a temporary name then a rename, so sd-scripts never sees half a file; no fsync: the cache is the copy
    # that must survive a crash, and an export can simply be run again
    tmp = target.with_name(target.name + ".cachebuild-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def _skip(summary: ExportSummary, key: str, reason: str) -> None:
    summary.skipped.append({"key": key, "reason": reason})
