"""Text-encoder caches for Qwen-Image-Edit: each caption is encoded with its item's condition image.

The condition images sit in the ``--control`` folder under the caption's key (``sub/img001.txt`` pairs with
``sub/img001.png``, any image extension). An item's text id hashes its caption and its image's bytes, so
identical pairs are encoded once and a changed image (or caption) makes the item pending again: the scan's
per-item fingerprint covers both files. Items are encoded one at a time, as the pipeline encodes one prompt:
the rows never see padding. An item whose image is missing or unreadable fails with the reason.

Beside the rows each record holds the condition image's normalised VAE latents (``control_latents``), encoded
from the same resized picture by the pipeline's ``vae/``: the ``image_latents`` the transformer gets next to
the noise. (``cachebuild latents --source DIR`` would not give them: it resizes to training buckets, the
pipeline to :func:`cachebuild.families.qwenimage_edit.condition_size`.)
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import torch

from cachebuild.cache.manifest import PENDING, TEXTENC
from cachebuild.cache.remote import open_output
from cachebuild.cache.store import Progress, ProgressFn, RunSummary, ShardSink, finish_run, open_store
from cachebuild.config import TextencConfig, TextFamily
from cachebuild.encode import free_device_memory, is_out_of_memory
from cachebuild.errors import ConfigError, ModelLoadError
from cachebuild.families import family_module
from cachebuild.families import qwenimage_edit as edit
from cachebuild.families.text import EncoderSpec, resident
from cachebuild.hub import weight_files
from cachebuild.sources.captions import CaptionScan, caption_limit_fingerprint, scan_captions
from cachebuild.sources.scan import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


def build_textenc_edit(
    cfg: TextencConfig,
    family: TextFamily,
    specs: list[EncoderSpec],
    device: torch.device,
    start: float,
    progress: ProgressFn | None,
    caption_rules: int,
    page_size: int,
) -> RunSummary:
    """Build or finish a qwen-image-edit text cache; the same resume rules as every other store.
    ``caption_rules`` and ``page_size`` are jobs.textenc's (which this module does not import: it calls this)."""
    if cfg.control is None or not cfg.control.is_dir():
        raise ConfigError("qwen-image-edit encodes each caption with its condition image: pass --control DIR")
    (spec,) = specs
    module = family_module(family.value)
    captions = scan_captions(cfg.source, cfg.caption_ext, cfg.caption_column, cfg.caption_max_bytes)
    controls = _controls(cfg.control)
    captions, hashes = _with_controls(captions, controls)
    summary = RunSummary(TEXTENC, str(cfg.out))
    with open_output(cfg.out, cfg.manifest_dir) as manifest:
        manifest.lock()
        fingerprint = {
            "family": family.value,
            "encoders": [spec.fingerprint(manifest)],
            "dtype_out": cfg.dtype_out.value,
            "format": cfg.format.value,
            "caption_rules": caption_rules,
            "control_image": {
                "area": module.CONDITION_AREA,
                "multiple": 32,
                "vae_weights_sha256": manifest.files_sha256(weight_files(_vae_folder(spec))),
            }
            | ({"vae_area": module.VAE_AREA} if hasattr(module, "VAE_AREA") else {}),
            "extra_tensors": [edit.CONTROL_LATENTS],
        } | caption_limit_fingerprint(cfg)
        sync = open_store(manifest, TEXTENC, fingerprint, captions.scan, cfg.retry_failed, cfg.rebuild, cfg.prune)
        summary.new, summary.changed, summary.removed = sync.new, sync.changed, sync.removed
        total = manifest.counts(TEXTENC)[PENDING]
        if total:
            header = {"store": TEXTENC, "family": family.value, "dtype": cfg.dtype_out.value}
            with ShardSink(manifest, TEXTENC, cfg.format.value, cfg.shard_bytes, header, summary) as sink:
                _encode(
                    cfg, module, spec, device, (captions, controls, hashes), sink, summary, (total, page_size), progress
                )
        else:
            summary.nothing_to_do = not (sync.new or sync.changed or sync.removed)
        return finish_run(manifest, summary, start)


def _vae_folder(spec: EncoderSpec) -> Path:
    folder = spec.folder.parent / "vae"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{spec.folder.parent} has no vae/, which encodes the condition images; pass a complete "
                             "Qwen-Image-Edit pipeline")  # fmt: skip
    return folder


def _controls(folder: Path) -> dict[str, Path]:
    """key (the path under ``folder`` without its extension) -> image file."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return found


def _with_controls(captions: CaptionScan, controls: dict[str, Path]) -> tuple[CaptionScan, dict[str, str]]:
    """The scan with each item's fingerprint over its caption and its condition image, and the items without a
    readable image marked bad; and each usable item's image hash."""
    files, bad, hashes = [], dict(captions.bad), {}
    for f in captions.scan.files:
        image = controls.get(f.key)
        if image is None:
            if f.key in captions.texts:
                bad[f.key] = "no condition image under --control with this key"
            files.append(f)
            continue
        try:
            hashes[f.key] = edit.image_sha256(image)
        except OSError as exc:
            bad[f.key] = f"condition image {image} cannot be read ({exc.strerror or exc})"
            files.append(f)
            continue
        files.append(replace(f, sha256=hashlib.sha256(f"{f.sha256}:{hashes[f.key]}".encode()).hexdigest()))
    texts = {k: t for k, t in captions.texts.items() if k not in bad}
    return CaptionScan(replace(captions.scan, files=files), texts, bad), hashes


def _encode(cfg, module, spec, device, sources, sink: ShardSink, summary: RunSummary, sizes, progress):
    """Pending items a page at a time: fail those without a usable image, point those whose (caption, image)
    pair is stored, encode the rest one by one."""
    manifest = sink.manifest
    (captions, controls, hashes), (total, page_size) = sources, sizes
    done = 0
    processor = edit.load_processor(spec.tokenizer)
    vae = edit.load_condition_vae(_vae_folder(spec), spec.dtype.torch, device)
    with resident(spec, device, cfg.offload) as model:  # read once for every page
        summary.model_loaded = True
        summary.model_loads += 2  # the encoder and the condition images' VAE
        for page in manifest.item_pages(TEXTENC, PENDING, page_size):
            sink.fail([(r.key, captions.bad[r.key]) for r in page if r.key in captions.bad])
            groups: dict[str, tuple[str, Path, list[str]]] = {}
            for r in page:
                if r.key in captions.texts:
                    image = controls[r.key]
                    tid = edit.text_id(captions.texts[r.key], hashes[r.key])
                    groups.setdefault(tid, (captions.texts[r.key], image, []))[2].append(r.key)
            stored = manifest.done_by_info(TEXTENC, "text_id", sorted(groups))
            reuse = [(k, *stored[tid]) for tid, (_, _, keys) in groups.items() if tid in stored for k in keys]
            if reuse:
                manifest.point_items(TEXTENC, reuse)
                summary.encoded += len(reuse)
            for tid, (text, image, keys) in sorted(groups.items()):
                if tid in stored:
                    continue
                try:
                    picture, pixels = module.pictures(image)
                except OSError as exc:
                    sink.fail([(k, f"condition image {image} cannot be read ({exc})") for k in keys])
                    continue
                try:
                    rows = edit.encode(model, processor, text, picture, device, module.TEMPLATE)
                    latents = edit.condition_latents(vae, pixels, device, spec.dtype.torch)
                except Exception as exc:  # one pair is the smallest unit: out of memory fails it, not the run
                    if not is_out_of_memory(exc):
                        raise
                    free_device_memory(device)
                    reason = "out of device memory for this caption and image alone; run with --offload always"
                    sink.fail([(k, reason) for k in keys])
                    continue
                out, latents = rows.to(cfg.dtype_out.torch), latents.to(cfg.dtype_out.torch)
                if not (torch.isfinite(out).all() and torch.isfinite(latents).all()):
                    sink.fail([(k, f"encoder outputs overflow --dtype-out {cfg.dtype_out.value}") for k in keys])
                    continue
                info = {"text_id": tid, "tokens": {spec.name: int(rows.shape[0])}, "truncated": []}
                meta = info | {"text": text, "keys": keys, "control": str(image)}
                sink.add(tid, {spec.name: out, edit.CONTROL_LATENTS: latents}, meta, [(k, None, info) for k in keys])
            sink.flush()
            done += len(page)
            if progress:
                progress(Progress(done, total, summary.failed_now, None))
