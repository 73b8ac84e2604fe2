"""Condition images for the latents job: ``cachebuild latents --model flux-kontext --control DIR``.

FLUX.1 Kontext trains on (target image, condition image) pairs. The condition image sits in DIR under the target's
key (``sub/img001.png`` pairs with ``DIR/sub/img001.*``, any image extension); it is sized, encoded and normalised
as :mod:`cachebuild.families.flux_kontext` says the pipeline does, at its own size, not the target's bucket.

Where it is stored, and why: each pair's condition latents are an item of a store of their own, ``control``, beside
the ``latents`` store and under the same keys (the reader joins them by key). An engine hands its encoder bucket
batches of pixels of one shape, and a condition image has a size of its own; a store of its own keeps what every
store has, with no engine change: crash consistency (shards committed before the manifest names them), a
fingerprint of the settings that make its bytes, resume, and a failure row with its reason per item.

Both stores see each item as the pair: its source fingerprint covers the image and the condition image, so a
changed or added condition image makes the pair pending in both, and an item without a usable condition image
fails in both with the reason (a missing one at the scan, an unreadable one when it is decoded, before the target
is encoded). Condition images are encoded one at a time on the device that encodes the targets, before them (one
more VAE load per run that has conditions to encode).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from cachebuild.cache.manifest import CONTROL, FAILED, LATENTS, PENDING, Manifest, ScanResult
from cachebuild.cache.store import RunSummary, ShardSink, finish_run, open_store, record_failures
from cachebuild.config import DType, ExifMode, LatentsConfig
from cachebuild.encode import GuardedForward, free_device_memory
from cachebuild.errors import ConfigError
from cachebuild.families import flux_kontext
from cachebuild.families.vae import VaeFamily, load_vae
from cachebuild.hub import ResolvedVae
from cachebuild.keys import fs_path, split_clip_key
from cachebuild.sources.scan import scan_files

log = logging.getLogger(__name__)

CONTROL_PAGE_ITEMS = 1024  # pending pairs read from the manifest at a time; each is committed with its page
CONTROL_LOADER_VERSION = 1  # bump when reading or resizing a condition image changes the pixels


def check_control(cfg: LatentsConfig, vae: ResolvedVae, family: VaeFamily) -> None:
    """Refuse ``--control`` where it has no meaning: a model that is not FLUX.1 Kontext's.

    Raises:
        ConfigError: naming the fix.
    """
    if cfg.control is None:
        return
    index = vae.folder.parent / "model_index.json" if vae.folder is not None else None
    cls = json.loads(index.read_text()).get("_class_name") if index is not None and index.is_file() else None
    if cfg.model.preset != "flux-kontext" and cls not in flux_kontext.PIPELINES:
        raise ConfigError(
            "--control gives condition images to FLUX.1 Kontext and the image-to-video models: pass --model "
            "flux-kontext or an I2V model (wan2.1-i2v-14b-480p, ltx-2-i2v, ... or a local pipeline folder), or drop "
            "--control"
        )
    if family.latent_channels != 16 or not family.has_posterior:
        raise ConfigError(f"--control needs Flux.1's 16-channel VAE; {vae.source} has {family.cls}")


def paired_scan(
    scan: ScanResult, folder: Path, content_hash: bool, clips: bool = False
) -> tuple[ScanResult, dict[str, Path]]:
    """The scan with each item's source fingerprint over its image and its condition image under ``folder`` (an
    item without one carries the reason it fails with), and each usable condition image's path by key. With
    ``clips``, a clip's condition image is the one under its video's key."""
    controls = {f.key: f for f in scan_files(folder, content_hash=content_hash).files}
    files, paths = [], {}
    for f in scan.files:
        span = split_clip_key(f.key) if clips else None
        c = controls.get(span[0] if span is not None else f.key)
        if f.reason is not None:
            files.append(f)
        elif c is None:
            files.append(replace(f, reason=f"no condition image with this key under --control {folder}"))
        elif c.reason is not None:
            files.append(replace(f, reason=f"condition image {c.path}: {c.reason}"))
        else:  # with content hashes, size and hash decide (cache.manifest.same_source): both sides are in the hash
            mine, theirs = f.sha256 or f"{f.size}:{f.mtime_ns}", c.sha256 or f"{c.size}:{c.mtime_ns}"
            both = hashlib.sha256(f"{mine}|{c.path}|{theirs}".encode()).hexdigest()
            files.append(replace(f, sha256=both))
            paths[f.key] = folder / fs_path(c.path)
    return replace(scan, files=files), paths


def control_fingerprint(latents_fingerprint: dict, multiple: int, cfg: LatentsConfig) -> dict:
    """Every setting that changes the condition latents' bytes."""
    fp = {
        "vae": latents_fingerprint["vae"],
        "condition": {
            "rule": "kontext",  # the nearest preferred resolution, floored to the packed latent grid
            "resolutions": [list(r) for r in flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS],
            "multiple": multiple,
            "resample": "lanczos",
        },
        "latents": "mode",  # the posterior mode, as the pipeline's sample_mode="argmax"
        "dtype": latents_fingerprint["dtype"],
        "dtype_out": cfg.dtype_out.value,
        "format": cfg.format.value,
        "loader_version": CONTROL_LOADER_VERSION,
    }
    return fp | ({"exif": cfg.exif.value} if cfg.exif is ExifMode.IGNORE else {})


def encode_controls(
    manifest: Manifest,
    cfg: LatentsConfig,
    sources: tuple[ResolvedVae, VaeFamily, dict],
    dtype: DType,
    device: torch.device,
    scan: tuple[ScanResult, dict[str, Path]],
    summary: RunSummary,
) -> None:
    """Sync the ``control`` store with the paired scan, encode its pending condition images, and fail the pending
    latents items whose condition image failed (their counts go into ``summary``, the latents run's)."""
    vae, family, latents_fp = sources
    paired, paths = scan
    start = time.monotonic()
    multiple = 2 * family.downsample  # the packed latent grid: 16 pixels for Flux.1's VAE
    fingerprint = control_fingerprint(latents_fp, multiple, cfg)
    open_store(manifest, CONTROL, fingerprint, paired, cfg.retry_failed, cfg.rebuild, cfg.prune)
    part = RunSummary(CONTROL, summary.out)
    if manifest.counts(CONTROL)[PENDING]:
        header = {
            "store": CONTROL,
            "vae_class": family.cls,
            "latent_channels": family.latent_channels,
            "downsample": family.downsample,
            "scaling_factor": family.scaling_factor,
            "shift_factor": "" if family.shift_factor is None else family.shift_factor,
            "latents_mode": "mode",
            "dtype": cfg.dtype_out.value,
        }  # raw latents with their factors, as the latents store records them
        with ShardSink(manifest, CONTROL, cfg.format.value, cfg.shard_bytes, header, part) as sink:
            _encode_pending(cfg, vae, family, (dtype, device, multiple), paths, sink)
    finish_run(manifest, part, start)
    summary.model_loaded |= part.model_loaded
    summary.shards_written += part.shards_written
    summary.bytes_written += part.bytes_written
    summary.oom_splits += part.oom_splits
    summary.fp32_redos += part.fp32_redos
    bad = manifest.conn.execute(  # pending pairs whose condition failed: as many rows as failures, at most
        "SELECT c.key, c.reason FROM items c JOIN items l ON l.store=? AND l.key=c.key AND l.status=? "
        "WHERE c.store=? AND c.status=? ORDER BY c.key",
        (LATENTS, PENDING, CONTROL, FAILED),
    ).fetchall()
    record_failures(manifest, LATENTS, summary, [(k, f"condition image: {reason}") for k, reason in bad])


def _encode_pending(cfg, vae: ResolvedVae, family: VaeFamily, run: tuple, paths: dict[str, Path], sink: ShardSink):
    """Each pending pair's condition image, one at a time: read and sized on the host, encoded on the device; a
    page's entries committed together."""
    dtype, device, multiple = run
    guard = None
    for page in sink.manifest.item_pages(CONTROL, PENDING, CONTROL_PAGE_ITEMS):
        for row in page:
            path = paths.get(row.key)
            if path is None:  # the scan gave it a reason; a pending row without one is a bug, still failed
                sink.fail([(row.key, "no condition image with this key under --control")])
                continue
            try:
                pixels, size = flux_kontext.condition_pixels(path, multiple, cfg.max_pixels, cfg.exif)
            except Exception as exc:  # per-item boundary: Pillow raises many types for a bad file
                sink.fail([(row.key, f"condition image {path} cannot be used: {type(exc).__name__}: {exc}")])
                continue
            if guard is None:  # loaded on the first readable image: a run whose conditions all fail loads nothing
                model = load_vae(vae, family, dtype.torch, device)
                guard = GuardedForward(model, device, dtype.torch, _mode_forward(model, device), "VAE")
                sink.summary.model_loaded = True
            (z,) = guard((pixels,))
            if isinstance(z, str):
                sink.fail([(row.key, f"condition image: {z}")])
                continue
            z = z.to(cfg.dtype_out.torch)  # (C, h, w) raw posterior mode
            if not torch.isfinite(z).all():
                sink.fail([(row.key, f"condition latents overflow --dtype-out {cfg.dtype_out.value}; use fp32")])
                continue
            meta = {"bucket": list(size), "condition": str(path.name)}  # (W, H) the condition was encoded at
            sink.add(row.key, {flux_kontext.CONTROL_LATENTS: z}, meta, [(row.key, f"{size[0]}x{size[1]}", meta)])
        sink.flush()
    if guard is not None:
        sink.summary.oom_splits += guard.oom_splits
        sink.summary.fp32_redos += guard.upcasts
        del guard, model
        free_device_memory(device)


def _mode_forward(model, device: torch.device):
    """The batch function for :class:`GuardedForward`: (1, 3, H, W) pixels in [-1, 1] -> per item the posterior's
    mode (C, h, w), float32 on the CPU (``retrieve_latents(..., sample_mode="argmax")``)."""

    def forward(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> list[torch.Tensor]:
        with torch.inference_mode():
            z = model.encode(inputs[0].to(device, dtype)).latent_dist.mode()  # (B, C, h, w)
            return list(z.float().cpu())

    return forward
