"""The pipeline: scan -> plan -> load -> encode -> store -> commit, for one cache store.

``build_latents`` is the library entry point behind ``cachebuild latents``. The store-generic pieces
(``open_store``: lock, fingerprint check, crash clean-up and index sync; ``ShardSink``: shard rotation
and commits) serve every kind of cache that lives in the manifest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cachebuild.cache.manifest import DONE, FAILED, PENDING, Manifest, SyncResult
from cachebuild.cache.shards import TMP_SUFFIX, ShardWriter, open_writer, shard_index
from cachebuild.config import CropMode, LatentsConfig, LatentsMode
from cachebuild.encode import VaeEncoder, device_memory_bytes, free_device_memory, pick_device, resolve_dtype
from cachebuild.errors import ConfigError, FingerprintMismatch, ItemError
from cachebuild.families.vae import VaeFamily, family_of, load_vae, resolve_vae, sha256_file
from cachebuild.images.load import LOADER_VERSION, iter_batches, read_size
from cachebuild.images.plan import BucketPlan, ItemPlan, batch_by_bucket, plan_item
from cachebuild.sources.scan import ScanResult, scan_files

log = logging.getLogger(__name__)

LATENTS = "latents"  # store name: folder under --out and the manifest's store key
SHARD_MAX_SECONDS = 300.0  # commit a shard at least this often, so a crash loses minutes, not a shard's hours
HEADER_THREADS = 8  # parallel header reads while planning; I/O-bound, so threads beyond the core count help


@dataclass
class RunSummary:
    """What one run did; the CLI prints it, ``--json`` dumps it."""

    store: str
    out: str
    done: int = 0  # items done in the cache after this run
    failed: int = 0
    pending: int = 0
    encoded: int = 0  # items encoded by this run
    failed_now: int = 0  # items that failed in this run
    new: int = 0
    changed: int = 0
    removed: int = 0
    shards_written: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    model_loaded: bool = False
    nothing_to_do: bool = False
    oom_splits: int = 0
    fp32_redos: int = 0
    truncated: int = 0  # text only: captions cut at an encoder's max length
    failures: list[dict] = field(default_factory=list)  # [{"key", "reason"}] for this run's failures


@dataclass(frozen=True)
class Progress:
    """Sent after each batch to the caller's progress callback."""

    processed: int  # items finished (done or failed) in this run
    total: int  # items this run has to finish
    failed: int
    device_bytes: int | None


ProgressFn = Callable[[Progress], None]


def build_latents(cfg: LatentsConfig, progress: ProgressFn | None = None) -> RunSummary:
    """Build or finish the latent cache that ``cfg`` describes.

    Re-running with the same config after an interruption finishes the job; re-running a finished job
    loads no model and writes nothing.

    Raises:
        ConfigError, ModelLoadError, FingerprintMismatch, CacheError: before any work is done.

    Example:
        >>> build_latents(LatentsConfig(Path("data"), Path("cache"), ModelSpec(model="sdxl"))).done
        20000
    """
    start = time.monotonic()
    vae = resolve_vae(cfg.model)
    family = family_of(vae, cfg.model.preset)
    _check_against_family(cfg, family)
    device = pick_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    summary = RunSummary(LATENTS, str(cfg.out))
    with Manifest.open(cfg.out) as manifest:
        manifest.lock()
        fingerprint = latents_fingerprint(cfg, family, dtype.value, weights_sha256(vae.weight_files, manifest))
        scan = scan_files(cfg.dataset, content_hash=cfg.hash_files, exclude=cfg.out)
        sync = open_store(manifest, LATENTS, fingerprint, scan, cfg.retry_failed, cfg.rebuild)
        summary.new, summary.changed, summary.removed = sync.new, sync.changed, sync.removed
        source = {"dataset": str(cfg.dataset.resolve())}  # where the images are, for preview and export
        if manifest.get_meta(f"source:{LATENTS}") != source:
            manifest.set_meta(f"source:{LATENTS}", source)
        pending = manifest.items(LATENTS, PENDING)
        if pending:
            plans = _plan_pending(manifest, cfg, pending, summary)
            if plans:
                model = load_vae(vae, family, dtype.torch, device)
                summary.model_loaded = True
                encoder = VaeEncoder(model, family, device, dtype, cfg.latents, cfg.flip, cfg.seed)
                header = _shard_header(cfg, family)
                with ShardSink(manifest, LATENTS, cfg.format.value, cfg.shard_bytes, header, summary) as sink:
                    _encode_all(cfg, plans, encoder, sink, summary, progress)
                summary.oom_splits, summary.fp32_redos = encoder.guard.oom_splits, encoder.guard.upcasts
                del model, encoder
                free_device_memory(device)
        else:
            summary.nothing_to_do = not (sync.new or sync.changed or sync.removed)
        return finish_run(manifest, summary, start)


def finish_run(manifest: Manifest, summary: RunSummary, start: float) -> RunSummary:
    """Delete shards nothing points at any more and fill in the store's totals."""
    drop_dead_shards(manifest, summary.store)
    counts = manifest.counts(summary.store)
    summary.done, summary.failed, summary.pending = counts[DONE], counts[FAILED], counts[PENDING]
    summary.seconds = time.monotonic() - start
    return summary


def latents_fingerprint(cfg: LatentsConfig, family: VaeFamily, dtype: str, weights: str) -> dict:
    """Every setting that changes the bytes of a latent cache, and nothing else."""
    b = cfg.buckets
    fp = {
        "vae": {
            "class": family.cls,
            "weights_sha256": weights,
            "latent_channels": family.latent_channels,
            "downsample": family.downsample,
            "scaling_factor": family.scaling_factor,
            "shift_factor": family.shift_factor,
        },
        "buckets": {
            "resolution": list(b.resolution),
            "min_reso": b.min_reso,
            "max_reso": b.max_reso,
            "steps": b.steps,
            "no_upscale": b.no_upscale,
        },
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
    return fp


def weights_sha256(files: tuple[Path, ...], manifest: Manifest) -> str:
    """Hash of model files, each remembered by (path, size, mtime) so a re-run does not re-read them."""
    parts = []
    for f in files:
        digest = manifest.remembered_hash(f)
        if digest is None:
            digest = sha256_file(f)
            manifest.remember_hash(f, digest)
        parts.append(digest)
    return parts[0] if len(parts) == 1 else sha256_text("".join(parts))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def open_store(
    manifest: Manifest, store: str, fingerprint: dict, scan: ScanResult, retry_failed: bool, rebuild: bool
) -> SyncResult:
    """Check the fingerprint, clean up after a crash and sync the index with the scan.

    Raises:
        FingerprintMismatch: the store holds entries made with other byte-changing settings.
    """
    folder = manifest.root / store
    old = manifest.fingerprint(store)
    if rebuild or (old is not None and old != fingerprint):
        if not rebuild:
            raise FingerprintMismatch(store, str(manifest.root), diff_fingerprints(old, fingerprint))
        for name in manifest.clear_store(store):
            (folder / name).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    _clean_after_crash(manifest, store, folder)
    return manifest.sync_items(store, scan.files, scan.clashes, retry_failed, fingerprint)


def diff_fingerprints(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted name, old, new) for each setting that differs."""
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_fingerprints(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


class ShardSink:
    """Receives encoded items, rotates shards by size and age, and commits each durable shard.

    Failures are recorded as they arrive; done items become visible only with their shard's commit.
    """

    def __init__(self, manifest: Manifest, store: str, fmt: str, shard_bytes: int, header: dict, summary: RunSummary):
        self.manifest, self.store, self.fmt = manifest, store, fmt
        self.folder = manifest.root / store
        self.shard_bytes, self.header, self.summary = shard_bytes, header, summary
        self._writer: ShardWriter | None = None
        self._rows: list[tuple[str, str | None, dict]] = []
        self._opened = 0.0
        self._next = _next_shard_index(manifest, store, self.folder)

    def add(
        self, name: str, tensors: dict[str, torch.Tensor], meta: dict, rows: list[tuple[str, str | None, dict]]
    ) -> None:
        """Put ``tensors`` under ``name`` in the open shard; ``rows`` (item key, bucket, info) are the
        manifest items that become done with this shard's commit."""
        if self._writer is None:
            self._writer = open_writer(self.fmt, self.folder, self._next, self.header)
            self._next += 1
            self._opened = time.monotonic()
        self._writer.write(name, tensors, meta)
        self._rows += rows
        if self._writer.nbytes >= self.shard_bytes or time.monotonic() - self._opened > SHARD_MAX_SECONDS:
            self.flush()

    def fail(self, failures: list[tuple[str, str]]) -> None:
        if failures:
            self.manifest.mark_failed(self.store, failures)
            self.summary.failed_now += len(failures)
            self.summary.failures += [{"key": k, "reason": r} for k, r in failures]

    def flush(self) -> None:
        """Write the open shard durably, then commit it with its items in one transaction."""
        if self._writer is None:
            return
        info = self._writer.close()
        self.manifest.commit_shard(self.store, info, self._rows)
        self.summary.shards_written += 1
        self.summary.bytes_written += info.bytes
        self.summary.encoded += len(self._rows)
        self._writer, self._rows = None, []

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.flush()  # on an exception the open shard is dropped: its items stay pending


def _encode_all(
    cfg: LatentsConfig,
    plans: list[ItemPlan],
    encoder: VaeEncoder,
    sink: ShardSink,
    summary: RunSummary,
    progress: ProgressFn | None,
) -> None:
    batches = list(batch_by_bucket(plans, cfg.batch_size))
    processed, last_bucket = 0, None
    out_dtype = cfg.dtype_out.torch
    for loaded in iter_batches(batches, cfg.workers, cfg.max_pixels):
        failures = [(item.key, reason) for item, reason in loaded.failures]
        if loaded.pixels is not None:
            bucket = loaded.items[0].bucket
            if last_bucket is not None and bucket != last_bucket:
                free_device_memory(encoder.device)  # a new shape: drop the old shape's cached blocks
            last_bucket = bucket
            results = encoder.encode([i.key for i in loaded.items], torch.from_numpy(loaded.pixels))
            for item, res in zip(loaded.items, results, strict=True):
                if res.tensors is None:
                    failures.append((item.key, res.reason))
                    continue
                tensors = {k: v.to(out_dtype) for k, v in res.tensors.items()}
                if not all(torch.isfinite(t).all() for t in tensors.values()):
                    failures.append((item.key, f"latents overflow --dtype-out {cfg.dtype_out.value}; use fp32"))
                    continue
                meta = _item_meta(item, cfg)
                sink.add(item.key, tensors, meta, [(item.key, f"{item.bucket[0]}x{item.bucket[1]}", meta)])
        sink.fail(failures)
        processed += len(loaded.items) + len(loaded.failures)
        if progress:
            progress(Progress(processed, len(plans), summary.failed_now, device_memory_bytes(encoder.device)))


def _plan_pending(manifest: Manifest, cfg: LatentsConfig, pending, summary: RunSummary) -> list[ItemPlan]:
    """Header reads (threaded) and geometry for pending items; unreadable ones fail here."""
    bucket_plan = BucketPlan(cfg.buckets)
    root = cfg.dataset.resolve()

    def one(row):
        path = str(root / row.path)
        try:
            size = read_size(path, cfg.max_pixels)
            return plan_item(bucket_plan, row.key, path, size, cfg.crop, cfg.seed), None
        except ItemError as exc:
            return None, (row.key, str(exc))
        except Exception as exc:  # per-item boundary
            return None, (row.key, f"could not read the image header: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        results = list(pool.map(one, pending))
    failures = [f for _, f in results if f]
    if failures:
        manifest.mark_failed(LATENTS, failures)
        summary.failed_now += len(failures)
        summary.failures += [{"key": k, "reason": r} for k, r in failures]
    return [p for p, _ in results if p]


def _item_meta(item: ItemPlan, cfg: LatentsConfig) -> dict:
    return {
        "original_size": list(item.original),  # (W, H) after EXIF rotation
        "bucket": list(item.bucket),  # (W, H)
        "resized": list(item.resized),  # (W, H) before the crop
        "crop": list(item.crop),  # (left, top) in resized pixels
        "flip": cfg.flip,  # True: `latents_flipped` holds the mirrored image's latents
    }


def _shard_header(cfg: LatentsConfig, family: VaeFamily) -> dict:
    return {
        "store": LATENTS,
        "vae_class": family.cls,
        "latent_channels": family.latent_channels,
        "downsample": family.downsample,
        "scaling_factor": family.scaling_factor,
        "shift_factor": "" if family.shift_factor is None else family.shift_factor,
        "latents_mode": cfg.latents.value,
        "dtype": cfg.dtype_out.value,
    }


def _check_against_family(cfg: LatentsConfig, family: VaeFamily) -> None:
    if cfg.buckets.steps % family.downsample:
        raise ConfigError(
            f"--bucket-reso-steps {cfg.buckets.steps} is not a multiple of this VAE's downsampling factor "
            f"({family.downsample}); use a multiple such as {family.downsample * 8}"
        )
    if cfg.latents is LatentsMode.MOMENTS and not family.has_posterior:
        raise ConfigError(f"--latents moments needs a VAE with a posterior; {family.cls} has none; use mean")


def _clean_after_crash(manifest: Manifest, store: str, folder: Path) -> None:
    """Delete temporary and unreferenced shard files; re-queue items whose shard file has gone."""
    known = {s["name"] for s in manifest.shards(store)}
    for entry in os.scandir(folder):
        if entry.name.endswith(TMP_SUFFIX) or (shard_index(entry.name) is not None and entry.name not in known):
            log.info("removing %s left by an interrupted run", entry.name)
            os.unlink(entry.path)
    missing = [n for n in known if not (folder / n).exists()]
    if missing:
        log.warning("%d shard file(s) missing from %s; their items will be encoded again", len(missing), folder)
        lost = set(missing)
        manifest.requeue_items(store, [r.key for r in manifest.items(store, DONE) if r.shard in lost])
        manifest.drop_dead_shards(store)  # the missing shards now hold no live item


def drop_dead_shards(manifest: Manifest, store: str) -> None:
    for name in manifest.drop_dead_shards(store):
        (manifest.root / store / name).unlink(missing_ok=True)


def _next_shard_index(manifest: Manifest, store: str, folder: Path) -> int:
    names = [s["name"] for s in manifest.shards(store)] + [e.name for e in os.scandir(folder)]
    indices = [i for i in map(shard_index, names) if i is not None]
    return max(indices, default=-1) + 1
