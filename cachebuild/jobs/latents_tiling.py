"""A video run's spatial tiles: chosen once per run, recorded in the fingerprint where tiles are used, applied to
every clip.

``--tiling off`` and ``on`` are settings; ``auto`` on a cache being finished keeps what the cache was started with
(its fingerprint says), so a resumed or extended cache never mixes tiled and untiled latents. Only ``auto`` on a
new cache (or ``--rebuild``) looks at the data: the largest clip the scan holds, at the bucket it will be cut to,
against the device-memory budget (``--vram-budget``, or on CUDA the first device's free memory less the
batch-size search's margin), counting the encoder's weights only (the decoder is released before caching). The
choice itself is ``families.video_tiling.resolve_tiling``; this module gathers its inputs.
"""

from __future__ import annotations

import logging

from cachebuild.cache.manifest import Manifest, ScanResult
from cachebuild.config import DType, LatentsConfig, TilingMode
from cachebuild.errors import ItemError
from cachebuild.families.vae_family import VaeFamily
from cachebuild.families.video_tiling import estimate_clip_bytes, resolve_tiling, weight_bytes
from cachebuild.families.video_vae import Tiling
from cachebuild.images.plan import BucketPlan
from cachebuild.keys import split_clip_key
from cachebuild.video.probe import HEADER_META, VideoHeader

log = logging.getLogger(__name__)


class RunTiling:
    """The tiles of one run of a video family (``tiling`` None: whole frames).

    Example:
        >>> tiles = RunTiling(cfg, family, vae.config, DType.BF16, manifest.fingerprint(LATENTS))
        >>> if tiles.sized_by_clips:
        ...     tiles.size_for(manifest, expanded_scan)
        >>> tiles.tiling
        Tiling(tile=256, stride=192)
    """

    def __init__(self, cfg: LatentsConfig, family: VaeFamily, config: dict, dtype: DType, existing: dict | None):
        """``existing``: the fingerprint of the cache being finished (None for a new one, or with --rebuild)."""
        self.cfg, self.family, self.config, self.dtype, self.existing = cfg, family, config, dtype, existing
        self.tiling: Tiling | None = None
        self.sized_by_clips = family.video and cfg.tiling is TilingMode.AUTO and existing is None
        if family.video and not self.sized_by_clips:  # a setting, or what the cache was started with
            size = (cfg.tile_size, cfg.tile_stride)
            self.tiling = resolve_tiling(cfg.tiling, family, config, (1, 1, 1), None, size=size, existing=existing)

    def size_for(self, manifest: Manifest, scan: ScanResult) -> Tiling | None:
        """Auto on a new cache: the tiles the largest clip of the (expanded) ``scan`` needs under the budget."""
        largest = largest_clip(manifest, scan, self.cfg, self.family, self.config)
        budget = run_budget(self.cfg)
        dtype_bytes = self.dtype.torch.itemsize
        self.tiling = resolve_tiling(
            TilingMode.AUTO, self.family, self.config, largest or (1, 1, 1), budget, dtype_bytes,
            (self.cfg.tile_size, self.cfg.tile_stride), None, weight_bytes(self.config, dtype_bytes, encoder_only=True),
        )  # fmt: skip
        if self.tiling is not None and largest is not None:
            log.info(
                "tiling %s clips in %d px tiles every %d px: the largest (%s frames of %dx%d) needs more than the "
                "%.1f GiB budget untiled", self.family.cls, self.tiling.tile, self.tiling.stride, largest[0],
                largest[2], largest[1], budget / 2**30,
            )  # fmt: skip
        return self.tiling


def run_budget(cfg: LatentsConfig, device=None) -> int | None:
    """The device bytes a clip may take at batch 1: ``--vram-budget``, else on a CUDA device its free memory less
    the margin the batch-size search keeps; None where memory is not measured (a CPU, MPS). ``device``: the one to
    measure; by default the run's first, the one its compute dtype was resolved on (with ``--engine ray`` there is
    none here: None)."""
    if cfg.vram_budget_bytes is not None:
        return cfg.vram_budget_bytes
    import torch

    from cachebuild.config import EngineKind
    from cachebuild.encode import pick_device
    from cachebuild.engines.batchsize import default_budget

    if device is None:
        if cfg.engine is EngineKind.RAY:
            return None
        device = pick_device(cfg.devices[0] if cfg.devices else cfg.device)
    return default_budget(*torch.cuda.mem_get_info(device)) if device.type == "cuda" else None


def largest_clip(
    manifest: Manifest, scan: ScanResult, cfg: LatentsConfig, family: VaeFamily, config: dict
) -> tuple[int, int, int] | None:
    """(frames, height, width) of the clip of ``scan`` that needs the most device memory untiled, at the bucket its
    video is cut to (headers as ``latents_clips.expand_clips`` remembered them); None when it holds no clip (images
    are one frame: smaller than any clip of their bucket)."""
    buckets = BucketPlan(cfg.buckets)
    sizes: dict[str, tuple[int, int] | None] = {}  # video path -> its bucket (W, H)
    shapes: set[tuple[int, int, int]] = set()
    for f in scan.files:
        span = split_clip_key(f.key) if f.reason is None else None
        if span is None:
            continue
        if f.path not in sizes:
            entry = manifest.get_meta(HEADER_META + f.path) or {}
            try:
                sizes[f.path] = (
                    buckets.select(VideoHeader.from_json(entry["header"]).size) if "header" in entry else None
                )
            except ItemError:  # too small for the bucket rule: it fails when planned
                sizes[f.path] = None
        if sizes[f.path] is not None:
            w, h = sizes[f.path]
            shapes.add((span[2], h, w))
    return max(shapes, key=lambda s: estimate_clip_bytes(family, config, *s), default=None)
