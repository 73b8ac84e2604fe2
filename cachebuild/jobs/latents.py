"""The latents job: scan -> plan -> load -> encode -> store -> commit, wired together.

``build_latents`` is the library entry point behind ``cachebuild latents``. The pieces every store shares
(``open_store``, ``ShardSink``, ``finish_run``) live in ``cache.store``; where the load and encode stages run
is the engine's business (``engines.local``); this module says what a latent item is: its plan, its
fingerprint, its tensors and metadata.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cachebuild.cache.manifest import LATENTS, PENDING, Manifest
from cachebuild.cache.remote import open_output
from cachebuild.cache.store import (
    Progress,
    ProgressFn,
    RunSummary,
    ShardSink,
    finish_run,
    open_store,
    record_failures,
)
from cachebuild.config import BucketRule, CropMode, DType, EngineKind, ExifMode, LatentsConfig, LatentsMode
from cachebuild.encode import pick_device, resolve_dtype
from cachebuild.engines.base import Encoded, Run, StageTimes
from cachebuild.engines.device import prefer_expandable_segments
from cachebuild.engines.local import LocalEngine
from cachebuild.errors import ConfigError, ItemError, StorageError
from cachebuild.families.vae import DETERMINISTIC_CLASSES, VaeEncoder, VaeFamily, family_of, load_vae
from cachebuild.families.video_tiling import tiling_fingerprint
from cachebuild.families.video_vae import Tiling, release_decoder
from cachebuild.hub import ResolvedVae, resolve_vae
from cachebuild.images.load import LOADER_VERSION, read_size
from cachebuild.images.musubi_buckets import MUSUBI_STEPS
from cachebuild.images.pixels import Pixels, run_pixels
from cachebuild.images.plan import BucketPlan, ItemPlan, batch_by_bucket, plan_item
from cachebuild.images.reads import TimedReads
from cachebuild.jobs import latents_clips as clips
from cachebuild.jobs.conditions import encode_conditions, plan_conditions, sync_conditions
from cachebuild.jobs.control import encode_controls, paired_scan
from cachebuild.jobs.latents_tiling import RunTiling, run_budget
from cachebuild.keys import fs_path
from cachebuild.sources.scan import scan_files
from cachebuild.storage import is_url

log = logging.getLogger(__name__)

HEADER_THREADS = 8  # parallel header reads while planning; I/O-bound, so threads beyond the core count help
PLAN_CHUNK_ITEMS = 8192  # pending items planned at a time (rows, header reads, plans, batches): planning memory
# stays at one chunk (under 1 KB an item) however large the dataset, while the partial batch a chunk leaves at
# the end of each bucket (one per bucket at most) stays a small share of the chunk's batches


def build_latents(
    cfg: LatentsConfig, progress: ProgressFn | None = None, times: StageTimes | None = None, engine=None
) -> RunSummary:
    """Build or finish the latent cache that ``cfg`` describes.

    Re-running with the same config after an interruption finishes the job; re-running a finished job
    loads no model and writes nothing. ``times``, when given, receives the seconds spent per stage (one
    device only; the benchmarks print them). ``engine``, when given, runs the stages in place of the engine
    ``--devices`` and ``--engine`` ask for (a caller that drives several caches' encoders itself).

    Raises:
        ConfigError, ModelLoadError, FingerprintMismatch, CacheError: before any work is done.

    Example:
        >>> build_latents(LatentsConfig(Path("data"), Path("cache"), ModelSpec(model="sdxl"))).done
        20000
    """
    start = time.monotonic()
    if (len(cfg.devices) > 1 or cfg.engine is EngineKind.RAY) and is_url(cfg.out):  # their processes write shards
        # to a folder path
        what = "--engine ray" if cfg.engine is EngineKind.RAY else "--devices"
        raise ConfigError(f"{what} with a URL --out is not supported yet; pass one --device, or a local --out")
    vae = resolve_vae(cfg.model)
    family = family_of(vae, cfg.model.preset)
    _check_against_family(cfg, family)
    conditions = plan_conditions(cfg, vae, family)  # image-to-video models' (jobs.conditions); Kontext's --control
    prefer_expandable_segments()  # before anything starts CUDA (resolve_dtype asks it about bf16)
    device = pick_device(cfg.devices[0] if cfg.devices else cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    summary = RunSummary(LATENTS, str(cfg.out))
    with open_output(cfg.out, cfg.manifest_dir) as manifest:  # a URL: cache.remote
        manifest.lock()
        # unset pixel options (and --tiling auto) continue a cache the way it was started; --rebuild starts anew
        existing = None if cfg.rebuild else manifest.fingerprint(LATENTS)
        pixels, pixel_fields = run_pixels(cfg.color, cfg.alpha, cfg.alpha_mask, existing)
        weights = manifest.files_sha256(vae.weight_files)
        tiles = RunTiling(cfg, family, vae.config, dtype, existing)
        fingerprint = latents_fingerprint(cfg, family, dtype.value, weights, pixel_fields, tiles.tiling)
        scan = scan_files(cfg.dataset, clips.media_extensions(family), content_hash=cfg.hash_files, exclude=cfg.out)
        if family.video:  # each video becomes its clips (headers read once per new or changed file)
            clips.check_fingerprint_first(manifest, fingerprint, cfg.rebuild)
            scan = clips.expand_clips(manifest, scan, cfg, family)
            if tiles.sized_by_clips:  # a new cache under --tiling auto: tiles only if its largest clip needs them
                fingerprint = latents_fingerprint(cfg, family, dtype.value, weights, pixel_fields, tiles.size_for(
                    manifest, scan))  # fmt: skip
        if cfg.control is not None:  # items are (image, condition image) pairs: jobs.control
            scan, controls = paired_scan(scan, cfg.control, cfg.hash_files, clips=family.video)
        sync = open_store(manifest, LATENTS, fingerprint, scan, cfg.retry_failed, cfg.rebuild, cfg.prune)
        if conditions is not None:  # encoded after the clips, from their records
            conditions_fp = sync_conditions(manifest, cfg, conditions, fingerprint, scan)
        elif cfg.control is not None:  # before the targets: a pair whose condition fails is not encoded
            encode_controls(manifest, cfg, (vae, family, fingerprint), dtype, device, (scan, controls), summary)
        del scan  # one SourceFile per file: the index has it now, and the model loads into the freed memory
        summary.new, summary.changed, summary.removed = sync.new, sync.changed, sync.removed
        source = {"dataset": str(cfg.dataset.resolve())}  # where the images are, for preview and export
        if manifest.get_meta(f"source:{LATENTS}") != source:
            manifest.set_meta(f"source:{LATENTS}", source)
        tally = _Tally(total=manifest.counts(LATENTS)[PENDING])
        if tally.total:
            engine = engine or make_engine(cfg)
            batch = engine.plan_batch_size(cfg.batch_size)
            batches = _plan_batches(manifest, cfg, family, summary, tally, batch, pixels)
            first = next(batches, None)  # plans the first chunk; None when no pending header could be read
            if first is not None:
                stages = LatentsStages(cfg, vae, family, dtype, _shard_header(cfg, family), tiling=tiles.tiling)
                run = Run(manifest, summary, cfg.batch_size, cfg.vram_budget_bytes, times=times)
                run.report = _reporter(run, tally, progress)
                engine.run(itertools.chain([first], batches), stages, run)
        else:
            summary.nothing_to_do = not (sync.new or sync.changed or sync.removed)
        if conditions is not None:  # after the clips: each made from its clip's record
            images = controls if cfg.control is not None else {}
            encode_conditions(manifest, cfg, conditions, (vae, family, conditions_fp), (dtype, device, images), summary)
        return finish_run(manifest, summary, start)


def make_engine(cfg: LatentsConfig):
    """The engine ``--devices`` asks for: one device in this process, or one encoder process per device;
    or with ``--engine ray``, a Ray cluster."""
    if cfg.engine is EngineKind.RAY:
        from cachebuild.engines.ray_cluster import RayEngine

        return RayEngine(cfg.ray_address, cfg.max_pixels)
    if len(cfg.devices) > 1:
        from cachebuild.engines.devices import DevicesEngine

        return DevicesEngine(cfg.devices, cfg.workers, cfg.max_pixels)
    return LocalEngine(cfg.workers, cfg.max_pixels, cfg.devices[0] if cfg.devices else cfg.device)


@dataclass
class LatentsStages:
    """The latents job's stages for an engine (``engines.base.Stages``); picklable, for device processes."""

    cfg: LatentsConfig
    vae: ResolvedVae
    family: VaeFamily
    dtype: DType  # the compute dtype, resolved for the run's device
    header: dict
    store: str = LATENTS
    tiling: Tiling | None = None  # a video VAE's tiles for every clip of the run (jobs.latents_tiling)

    @property
    def fmt(self) -> str:
        return self.cfg.format.value

    @property
    def shard_bytes(self) -> int:
        return self.cfg.shard_bytes

    @property
    def sizing_key(self) -> str:
        return f"{self.dtype.value}|{self.family.cls}|flip={self.cfg.flip}"

    def open_encoder(self, device: torch.device) -> VaeEncoder:
        model = load_vae(self.vae, self.family, self.dtype.torch, device)
        cfg, budget = self.cfg, None
        if self.family.video:  # caching never decodes; a video VAE's decoder is most of its weights
            release_decoder(model)
            budget = run_budget(cfg, device)  # for the reason a clip too large for the device fails with
        return VaeEncoder(model, self.family, device, self.dtype, cfg.latents, cfg.flip, cfg.seed, self.tiling, budget)

    def write(self, sink: ShardSink, encoded: Encoded) -> None:
        """Per item: the stored tensors (sampled with the item's seed), cast to --dtype-out, checked finite."""
        cfg, out_dtype = self.cfg, self.cfg.dtype_out.torch
        finisher = VaeEncoder(None, self.family, torch.device("cpu"), self.dtype, cfg.latents, cfg.flip, cfg.seed)
        failures = [(item.key, reason) for item, reason in encoded.failures]
        for i, (item, raw) in enumerate(zip(encoded.items, encoded.outputs.ready(), strict=True)):
            res = finisher.finish(item.key, raw)
            if res.tensors is None:
                failures.append((item.key, res.reason))
                continue
            tensors = {k: v.to(out_dtype) for k, v in res.tensors.items()}
            if not all(torch.isfinite(t).all() for t in tensors.values()):
                failures.append((item.key, f"latents overflow --dtype-out {cfg.dtype_out.value}; use fp32"))
                continue
            if encoded.alpha is not None:  # (H, W) uint8 at the bucket's size, copied out of the batch's array
                tensors["alpha_mask"] = torch.from_numpy(encoded.alpha[i].copy())
            if self.family.video:
                meta, bucket = clips.clip_meta(item, cfg.flip), clips.clip_bucket(item)
            else:
                meta, bucket = _item_meta(item, cfg), f"{item.bucket[0]}x{item.bucket[1]}"
            sink.add(item.key, tensors, meta, [(item.key, bucket, meta)])
        sink.fail(failures)


def _reporter(run: Run, tally: _Tally, progress: ProgressFn | None):
    def report(finished: int, device_bytes: int | None, devices: tuple) -> None:
        tally.processed += finished
        if progress:
            progress(Progress(tally.processed, tally.total, run.failed_so_far(), device_bytes, devices))

    return report


def latents_fingerprint(
    cfg: LatentsConfig, family: VaeFamily, dtype: str, weights: str, pixel_fields: dict | None = None,
    tiling: Tiling | None = None,
) -> dict:  # fmt: skip
    """Every setting that changes the bytes of a latent cache, and nothing else. ``pixel_fields``: what
    ``images.pixels.run_pixels`` gave for the cache (None: those of a new cache with ``cfg``'s options);
    ``tiling``: a video run's tiles (``jobs.latents_tiling``), recorded only where used."""
    b = cfg.buckets
    fp = {
        "vae": {
            "class": family.cls,
            "weights_sha256": weights,
            "latent_channels": family.latent_channels,
            "downsample": family.downsample,
            "scaling_factor": family.scaling_factor,
            "shift_factor": family.shift_factor,
        }
        | (family.normalization or {})  # only Qwen-Image's, Flux.2's and Wan's VAEs add keys: older caches still match
        | family.video_fingerprint(),
        "buckets": _buckets_fingerprint(b),
        "crop": cfg.crop.value,
        "flip": cfg.flip,
        "latents": cfg.latents.value,
        "dtype": dtype,
        "dtype_out": cfg.dtype_out.value,
        "format": cfg.format.value,
        "loader_version": LOADER_VERSION,
    }
    if cfg.crop is CropMode.RANDOM or cfg.latents is LatentsMode.SAMPLE:
        fp["seed"] = cfg.seed  # only where randomness reaches the bytes
    if cfg.exif is ExifMode.IGNORE:
        fp["exif"] = cfg.exif.value  # only when ignored: caches built before the option (applied) still match
    if cfg.control is not None:
        fp["control"] = True  # items are pairs with their condition images (jobs.control)
    if family.video:
        fp["clips"] = clips.clips_fingerprint(cfg, family)  # video families only: image caches keep matching
        fp |= tiling_fingerprint(tiling)  # only when tiled: untiled caches (those built before tiles) still match
    if pixel_fields is None:
        pixel_fields = run_pixels(cfg.color, cfg.alpha, cfg.alpha_mask, None)[1]
    return fp | pixel_fields  # each only where set; a cache from before the modes keeps its loader_version


@dataclass
class _Tally:
    """Progress of one run, shared by the planner (items whose header failed) and the encoder."""

    total: int  # pending items when the run started: the items this run has to finish
    processed: int = 0  # items finished (done or failed) so far


def _plan_batches(
    manifest: Manifest,
    cfg: LatentsConfig,
    family: VaeFamily,
    summary: RunSummary,
    tally: _Tally,
    batch_size: int,
    pixels: Pixels,
) -> Iterator[list[ItemPlan]]:
    """Bucket batches of the pending items, planned one chunk of ``PLAN_CHUNK_ITEMS`` at a time, lazily.

    Batches are bucket-homogeneous within a chunk, so the chunk size decides which items share a batch;
    the tensors do not depend on it (promise 6), as they do not depend on the batch size. ``batch_size`` is
    the engine's planning batch: under ``--batch-size auto`` the device cuts it to the size found for the shape.
    """
    bucket_plan = BucketPlan(cfg.buckets)
    with TimedReads(HEADER_THREADS, cfg.read_timeout) as reads:  # for the run: no thread churn per chunk
        pool = _TimedPool(reads)
        for page in manifest.item_pages(LATENTS, PENDING, PLAN_CHUNK_ITEMS):
            if family.video:  # clips and one-frame images, batched by (W, H, F)
                plans = clips.plan_clip_chunk(manifest, cfg, family, page, pool, summary)
            else:
                plans = _plan_chunk(manifest, cfg, bucket_plan, pool, page, summary, pixels)
            tally.processed += len(page) - len(plans)  # unreadable headers are finished: failed
            yield from batch_by_bucket(plans, batch_size)


def _plan_chunk(
    manifest: Manifest,
    cfg: LatentsConfig,
    bucket_plan: BucketPlan,
    pool: _TimedPool,
    pending,
    summary,
    pixels: Pixels,
) -> list[ItemPlan]:
    """Header reads (threads, each within --read-timeout: images.reads) and geometry for one chunk of pending
    items; unreadable ones fail here."""
    root = cfg.dataset.resolve()

    def one(row):
        path = str(root / fs_path(row.path))  # the stored text names the file's real bytes (keys.fs_path)
        try:
            size = read_size(path, cfg.max_pixels, cfg.exif)
            plan = plan_item(bucket_plan, row.key, path, size, cfg.crop, cfg.seed, cfg.exif, pixels, cfg.read_timeout)
            return plan, None
        except ItemError as exc:
            if isinstance(exc.__cause__, PermissionError):
                return None, (row.key, f"permission denied reading {row.path}; fix its permissions")
            return None, (row.key, str(exc))
        except StorageError:  # the object store failed, not the file: stop the run
            raise
        except Exception as exc:  # per-item boundary
            return None, (row.key, f"could not read the image header: {type(exc).__name__}: {exc}")

    results = pool.map(one, pending)
    record_failures(manifest, LATENTS, summary, [f for _, f in results if f])
    return [p for p, _ in results if p]


class _TimedPool:
    """The planners' ``pool.map(one, rows)``, where ``one`` gives ``(plan, None)`` or ``(None, (key, reason))``:
    each call within --read-timeout (images.reads), a read past it being the row's failure."""

    def __init__(self, reads: TimedReads):
        self.reads = reads

    def map(self, fn, rows) -> list[tuple]:
        out = []
        for row, result in zip(rows, self.reads.map(fn, rows, what=lambda row: row.path), strict=True):
            if isinstance(result, ItemError):  # ReadTimedOut
                out.append((None, (row.key, str(result))))
            elif isinstance(result, BaseException):  # a StorageError (or a bug): it stops the run, as before
                raise result
            else:
                out.append(result)
        return out


def _item_meta(item: ItemPlan, cfg: LatentsConfig) -> dict:
    return {
        "original_size": list(item.original),  # (W, H) after EXIF rotation; as stored with --exif ignore
        "bucket": list(item.bucket),  # (W, H)
        "resized": list(item.resized),  # (W, H) before the crop
        "crop": list(item.crop),  # (left, top) in resized pixels
        "flip": cfg.flip,  # True: `latents_flipped` holds the mirrored image's latents
    }


def _shard_header(cfg: LatentsConfig, family: VaeFamily) -> dict:
    extra = {"normalization": json.dumps(family.normalization)} if family.normalization else {}
    extra |= family.video_fingerprint()
    return extra | {
        "store": LATENTS,
        "vae_class": family.cls,
        "latent_channels": family.latent_channels,
        "downsample": family.downsample,
        "scaling_factor": family.scaling_factor,
        "shift_factor": "" if family.shift_factor is None else family.shift_factor,
        "latents_mode": cfg.latents.value,
        "dtype": cfg.dtype_out.value,
    }


def _buckets_fingerprint(b) -> dict:
    if b.rule is BucketRule.MUSUBI:  # musubi's selector reads the area and no_upscale only
        return {"rule": b.rule.value, "resolution": list(b.resolution), "no_upscale": b.no_upscale}
    return {  # kohya's rule: written without "rule", so caches built before the musubi rule still match
        "resolution": list(b.resolution),
        "min_reso": b.min_reso,
        "max_reso": b.max_reso,
        "steps": b.steps,
        "no_upscale": b.no_upscale,
    }


def _check_against_family(cfg: LatentsConfig, family: VaeFamily) -> None:
    if cfg.buckets.rule is BucketRule.MUSUBI and MUSUBI_STEPS % family.pixel_multiple:
        raise ConfigError(
            f"--buckets musubi makes sides multiples of {MUSUBI_STEPS} px, which this VAE cannot encode "
            f"(it needs multiples of {family.pixel_multiple}); use --buckets kohya"
        )
    if cfg.buckets.rule is BucketRule.KOHYA and cfg.buckets.steps % family.pixel_multiple:
        why = "downsampling factor" if family.pixel_multiple == family.downsample else "2x2 latent patches"
        raise ConfigError(
            f"--bucket-reso-steps {cfg.buckets.steps} is not a multiple of this VAE's {why} "
            f"({family.pixel_multiple} pixels); use a multiple such as {family.pixel_multiple * 8}"
        )
    if cfg.latents is LatentsMode.SAMPLE and family.cls in DETERMINISTIC_CLASSES:
        raise ConfigError(
            f"--latents sample draws from the VAE's posterior; {family.cls} has none (it encodes each image to one "
            "latent), so pass --latents mean"
        )
    clips.check_clip_options(cfg, family)
    if cfg.latents is LatentsMode.MOMENTS and not family.has_posterior:
        raise ConfigError(f"--latents moments needs a VAE with a posterior; {family.cls} has none; use mean")
