"""Store: what every cache store shares, whatever it holds (latents, text-encoder outputs).

``open_store`` takes a store from a manifest and a scan to a run's starting point (fingerprint check,
clean-up after a crash, index sync); ``ShardSink`` receives encoded items and commits each durable shard with
its items; ``finish_run`` drops shards nothing needs and fills in the ``RunSummary``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cachebuild.cache.files import TMP_SUFFIX, ShardInfo, shard_index
from cachebuild.cache.manifest import DONE, FAILED, PENDING, Manifest, ScanResult, SyncResult
from cachebuild.cache.shards import ShardWriter, open_writer
from cachebuild.errors import ConfigError, FingerprintMismatch, storage_error
from cachebuild.keys import path_text

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SHARD_MAX_SECONDS = 300.0  # commit a shard at least this often, so a crash loses minutes, not a shard's hours
# A scan may drop done items whose source is gone without --prune only while they are at most PRUNE_SHARE of
# the store's done items or at most PRUNE_FREE items: a user who deleted a few images never needs the flag,
# while a wrong, empty or half-mounted dataset folder cannot empty a cache that took hours to build.
PRUNE_SHARE = 0.10
PRUNE_FREE = 10


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
    fp32_conversions: int = 0  # times a model's weights were converted to fp32 for a redo (once where they are kept)
    allocator_trims: int = 0  # times the device's cached blocks were given back past --vram-budget plus a margin
    truncated: int = 0  # text only: captions cut at an encoder's max length
    failures: list[dict] = field(default_factory=list)  # [{"key", "reason"}] for this run's failures
    offloaded: list[str] = field(default_factory=list)  # models run with their weights streamed from host memory


@dataclass(frozen=True)
class Progress:
    """Sent after each batch to the caller's progress callback."""

    processed: int  # items finished (done or failed) in this run
    total: int  # items this run has to finish
    failed: int
    device_bytes: int | None
    devices: tuple[DeviceProgress, ...] = ()  # one per device process of a several-device run


@dataclass(frozen=True)
class DeviceProgress:
    """One device's share of a several-device run, for the progress bar."""

    name: str  # "cuda:1", "cpu#0"
    pid: int  # its encoder process
    processed: int  # items it finished
    rate: float  # items per second since it encoded its first batch
    alive: bool = True


ProgressFn = Callable[[Progress], None]


def finish_run(manifest: Manifest, summary: RunSummary, start: float) -> RunSummary:
    """Delete shards nothing points at any more and fill in the store's totals."""
    drop_dead_shards(manifest, summary.store)
    counts = manifest.counts(summary.store)
    summary.done, summary.failed, summary.pending = counts[DONE], counts[FAILED], counts[PENDING]
    summary.seconds = time.monotonic() - start
    return summary


def open_store(
    manifest: Manifest,
    store: str,
    fingerprint: dict,
    scan: ScanResult,
    retry_failed: bool,
    rebuild: bool,
    prune: bool = False,
) -> SyncResult:
    """Check removals and the fingerprint, clean up after a crash and sync the index with the scan.

    Raises:
        ConfigError: the scan would remove too much of the store (see :func:`check_removals`); nothing is
            touched.
        FingerprintMismatch: the store holds entries made with other byte-changing settings.
    """
    if not prune:
        check_removals(manifest, store, scan)
    folder = manifest.root / store
    old = manifest.fingerprint(store)
    if rebuild or (old is not None and old != fingerprint):
        if not rebuild:
            raise FingerprintMismatch(store, str(manifest.root), diff_fingerprints(old, fingerprint))
        dropped = manifest.clear_store(store)
        for name in dropped:
            (folder / name).unlink(missing_ok=True)
        if manifest.remote is not None:
            manifest.remote.drop(store, dropped)
    folder.mkdir(parents=True, exist_ok=True)
    clean_after_crash(manifest, store, folder)
    return manifest.sync_items(store, scan.files, scan.clashes, retry_failed, fingerprint, scan.unlisted)


def record_failures(manifest: Manifest, store: str, summary: RunSummary, failures: list[tuple[str, str]]) -> None:
    """Mark items failed with their reasons, and count them in this run's summary."""
    # a reason may quote a file name the OS gave with undecodable bytes: store and report it as text
    failures = [(key, path_text(reason)) for key, reason in failures]
    if failures:
        manifest.mark_failed(store, failures)
        summary.failed_now += len(failures)
        summary.failures += [{"key": k, "reason": r} for k, r in failures]


def check_removals(manifest: Manifest, store: str, scan: ScanResult) -> None:
    """Refuse a scan that finds nothing while the store holds items, or whose sync would drop more done items
    than ``PRUNE_SHARE`` and ``PRUNE_FREE`` allow; run before anything is touched. ``--rebuild`` does not
    lift it: a rebuild re-encodes what the scan finds, it does not confirm losing the rest.

    Raises:
        ConfigError: naming the counts and ``--prune``, the flag that confirms the removal.
    """
    total = sum(manifest.counts(store).values())
    if not total:
        return
    if not scan.files:
        raise ConfigError(
            f"the scan found no files, but the {store} store holds {total} item(s); refusing to remove them "
            "(is the dataset folder empty, wrong or not mounted?); check the path, or pass --prune to remove them"
        )
    found = {f.key for f in scan.files}
    done = manifest.keys(store, DONE)
    gone = [k for k in done if k not in found and not scan.covers(k)]
    if len(gone) > PRUNE_FREE and len(gone) > PRUNE_SHARE * len(done):
        raise ConfigError(
            f"{len(gone)} of the {len(done)} done item(s) in the {store} store have no source in this scan "
            f"(e.g. {gone[0]!r}); refusing to remove more than {PRUNE_SHARE:.0%} and {PRUNE_FREE} at once; "
            "check the dataset path, or pass --prune to remove them"
        )


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

    def __init__(
        self,
        manifest: Manifest,
        store: str,
        fmt: str,
        shard_bytes: int,
        header: dict,
        summary: RunSummary,
        first_index: int | None = None,
        index_step: int = 1,
    ):
        """``first_index`` and ``index_step`` stripe shard names between several sinks of one run (one per
        device process: sink k of K takes first + k, first + k + K, ...), so names never clash; by default
        the sink takes every index past the ones in use."""
        self.manifest, self.store, self.fmt = manifest, store, fmt
        self.folder = manifest.root / store
        self.shard_bytes, self.header, self.summary = shard_bytes, header, summary
        self._writer: ShardWriter | None = None
        self._rows: list[tuple[str, str | None, dict]] = []
        self._opened = 0.0
        self._next = _next_shard_index(manifest, store, self.folder) if first_index is None else first_index
        self._step = index_step
        fingerprint = manifest.fingerprint(store)
        # each shard describes itself well enough to rebuild the manifest from the shards (rebuild-manifest)
        self.header = header | {"fingerprint": json.dumps(fingerprint, sort_keys=True)}

    def add(
        self, name: str, tensors: dict[str, torch.Tensor], meta: dict, rows: list[tuple[str, str | None, dict]]
    ) -> None:
        """Put ``tensors`` under ``name`` in the open shard; ``rows`` (item key, bucket, info) are the
        manifest items that become done with this shard's commit."""
        if self._writer is None:
            self._writer = open_writer(self.fmt, self.folder, self._next, dict(self.header))
            self._next += self._step
            self._opened = time.monotonic()
        self._writer.write(name, tensors, meta)
        self._rows += rows
        if self._writer.nbytes >= self.shard_bytes or time.monotonic() - self._opened > SHARD_MAX_SECONDS:
            self.flush()

    def fail(self, failures: list[tuple[str, str]]) -> None:
        record_failures(self.manifest, self.store, self.summary, failures)

    def flush(self) -> None:
        """Write the open shard durably, then commit it with its items in one transaction."""
        if self._writer is None:
            return
        sources = self.manifest.sources(self.store, [key for key, _, _ in self._rows])
        self._writer.header["sources"] = json.dumps(sources, sort_keys=True)  # {key: [path, source fingerprint]}
        try:
            info = self._writer.close()
        except OSError as exc:  # disk full, read-only: one clear line; the committed shards are untouched
            raise (storage_error(exc) or exc) from exc
        if self.manifest.remote is not None:  # a remote --out: the shard lands there before its commit
            self.manifest.remote.upload_shard(self.store, info)
        self.commit(info, self._rows)
        if self.manifest.remote is not None:
            self.manifest.remote.committed()  # publishes the manifest snapshot, rate-limited
        self._writer, self._rows = None, []

    def commit(self, info: ShardInfo, rows: list[tuple[str, str | None, dict]]) -> None:
        """Register the durable shard ``info`` and its items in one transaction (a device process's sink
        sends them to the one manifest writer instead)."""
        self.manifest.commit_shard(self.store, info, rows)
        count_commit(self.summary, info, rows)

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.flush()  # on an exception the open shard is dropped: its items stay pending


def count_commit(summary: RunSummary, info: ShardInfo, rows: list) -> None:
    summary.shards_written += 1
    summary.bytes_written += info.bytes
    summary.encoded += len(rows)


def clean_after_crash(manifest: Manifest, store: str, folder: Path) -> None:
    """Delete temporary and unreferenced shard files; re-queue items whose shard file has gone."""
    known = {s["name"] for s in manifest.shards(store)}
    for entry in os.scandir(folder):
        if entry.name.endswith(TMP_SUFFIX) or (shard_index(entry.name) is not None and entry.name not in known):
            log.info("removing %s left by an interrupted run", entry.name)
            os.unlink(entry.path)
    if manifest.remote is not None:  # the shards live remotely; the local folder only stages them
        present = manifest.remote.clean(store, known)
        missing = [n for n in known if n not in present]
    else:
        missing = [n for n in known if not (folder / n).exists()]
    if missing:
        log.warning("%d shard file(s) missing from %s; their items will be encoded again", len(missing), folder)
        lost = set(missing)
        manifest.requeue_items(store, [r.key for r in manifest.items(store, DONE) if r.shard in lost])
        manifest.drop_dead_shards(store)  # the missing shards now hold no live item


def drop_dead_shards(manifest: Manifest, store: str) -> None:
    dead = manifest.drop_dead_shards(store)
    for name in dead:
        (manifest.root / store / name).unlink(missing_ok=True)
    if manifest.remote is not None:
        manifest.remote.drop(store, dead)


def first_free_shard_index(manifest: Manifest, store: str) -> int:
    """The first shard index no committed shard and no file in the store's folder uses."""
    return _next_shard_index(manifest, store, manifest.root / store)


def _next_shard_index(manifest: Manifest, store: str, folder: Path) -> int:
    """Past every index the manifest ever committed and every shard file lying in the folder."""
    on_disk = [i for i in (shard_index(e.name) for e in os.scandir(folder)) if i is not None]
    return max(manifest.next_shard_index(store), max(on_disk, default=-1) + 1)
