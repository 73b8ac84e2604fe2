"""Text-encoder caches: the same scan -> manifest -> shard -> commit machinery as latents, for captions.

Memory: pending captions are read from the manifest, tokenized and encoded one chunk at a time (at most
``TEXT_CHUNK_CAPTIONS`` captions a page, chunks of at most ``--chunk-mb`` of outputs: ``jobs.textenc_plan``), so
host memory does not grow with the dataset. Each encoder's weights are read from disk once per run and device,
however many chunks there are: all encoders stay on the device where they fit together, and otherwise each is
kept in host memory and takes its turn on the device per chunk, so device memory is the largest encoder plus
one batch (``engines.text`` says why, with the measurements).

Devices: one device runs in this process; ``--devices`` runs one encoder process per device and ``--engine ray``
one encoder actor per GPU of a cluster (``engines.devices``, ``engines.ray_cluster``), each opening its encoders
once, this process the manifest's one writer. Deduplication stays global and the tensors stay those of one
device: a chunk is encoded in the same batches wherever it runs.

Storage: identical caption text is encoded once per store; tensors live under the caption's text id
(``<text_id>/clip_l``) and every item with that text points at them. Each encoder's outputs are what its
family's pipeline computes (``families.text``): full max-length rows where the pipeline runs unmasked (Flux.1
and SD3 T5 by default), the real tokens only where it runs masked and keeps only those (``trim``), which
then run at a padded length of ``engines.text.PAD_MULTIPLE`` rather than at max length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from cachebuild import keep
from cachebuild.cache.manifest import PENDING, TEXTENC, Manifest
from cachebuild.cache.remote import open_output
from cachebuild.cache.store import Progress, ProgressFn, RunSummary, ShardSink, finish_run, open_store
from cachebuild.config import EngineKind, TextencConfig
from cachebuild.encode import device_memory_bytes, pick_device, use_device
from cachebuild.engines.base import Encoded, Run
from cachebuild.engines.device import prefer_expandable_segments
from cachebuild.engines.local import add_encoder_counts
from cachebuild.engines.text import EncoderSet, TextItem, drive_text
from cachebuild.errors import ConfigError
from cachebuild.families import MODULES, family_module
from cachebuild.families.text import EncoderSpec, resolve_encoders, stored_dtype
from cachebuild.jobs.textenc_plan import TextPlanner, cut_chunks
from cachebuild.sources.captions import caption_limit_fingerprint, scan_captions
from cachebuild.storage import is_url

log = logging.getLogger(__name__)

CAPTION_RULES_VERSION = 1  # bump when caption reading changes the text handed to the tokenizers
TEXT_CHUNK_CAPTIONS = 2048  # pending captions read, tokenized and planned at a time (a page): their rows and
# tokens (5 bytes a position: 2.5 KB a caption for T5 at 512) stay bounded however many captions there are, and
# one commit per page lets the next page find the captions it stored. The --chunk-mb output budget cuts a page
# of Flux-sized T5 outputs (4 MiB a caption unmasked) into chunks of about 512


def build_textenc(cfg: TextencConfig, progress: ProgressFn | None = None) -> RunSummary:
    """Build or finish the text-encoder cache that ``cfg`` describes; same resume rules as latents.

    Raises:
        ConfigError, ModelLoadError, FingerprintMismatch, CacheError: before any work is done.

    Example:
        >>> build_textenc(TextencConfig(Path("captions"), Path("cache"), model="sdxl")).done
        20000
    """
    start = time.monotonic()
    several = len(cfg.devices) > 1 or cfg.engine is EngineKind.RAY
    if several and is_url(cfg.out):  # their processes write shards to a folder path
        what = "--engine ray" if cfg.engine is EngineKind.RAY else "--devices"
        raise ConfigError(f"{what} with a URL --out is not supported yet; pass one --device, or a local --out")
    prefer_expandable_segments()  # before anything starts CUDA (resolve_encoders asks it about bf16)
    device = pick_device(cfg.devices[0] if cfg.devices else cfg.device)
    if not several:
        device = use_device(device)  # cuda:k: no context on GPU 0 (several devices: each process its own)
    family, specs = resolve_encoders(cfg, device)
    if cfg.dtype_out is None:  # the family's stored dtype, resolved before it enters the fingerprint
        cfg = dataclasses.replace(cfg, dtype_out=stored_dtype(family))
    if family.value in MODULES and hasattr(family_module(family.value), "pictures"):  # captions encoded with
        # their condition images (qwen-image-edit, -plus): a job of its own
        if several:
            raise ConfigError(f"{family.value} encodes one caption and image at a time on one device; pass --device")
        from cachebuild.jobs.textenc_edit import build_textenc_edit

        return build_textenc_edit(
            cfg, family, specs, device, start, progress, CAPTION_RULES_VERSION, TEXT_CHUNK_CAPTIONS
        )
    if cfg.control is not None:
        raise ConfigError(f"--control is for the qwen-image-edit families; {family.value} encodes captions alone")
    captions = scan_captions(cfg.source, cfg.caption_ext, cfg.caption_column, cfg.caption_max_bytes)
    summary = RunSummary(TEXTENC, str(cfg.out))
    with open_output(cfg.out, cfg.manifest_dir) as manifest:  # a URL: cache.remote
        manifest.lock()
        fingerprint = {
            "family": family.value,
            "encoders": [s.fingerprint(manifest) for s in specs],
            "dtype_out": cfg.dtype_out.value,
            "format": cfg.format.value,
            "caption_rules": CAPTION_RULES_VERSION,
        } | caption_limit_fingerprint(cfg)
        sync = open_store(manifest, TEXTENC, fingerprint, captions.scan, cfg.retry_failed, cfg.rebuild, cfg.prune)
        summary.new, summary.changed, summary.removed = sync.new, sync.changed, sync.removed
        tally = _Tally(manifest.counts(TEXTENC)[PENDING] * len(specs), summary, progress, len(specs))
        if tally.total:
            header = {"store": TEXTENC, "family": family.value, "dtype": cfg.dtype_out.value}
            # a Ray task writes one shard: its chunk is at most a shard's worth
            budget = min(cfg.chunk_bytes, cfg.shard_bytes) if cfg.engine is EngineKind.RAY else cfg.chunk_bytes
            stages = TextStages(cfg, specs, header, budget)
            itemsize = cfg.dtype_out.torch.itemsize
            planner = TextPlanner(manifest, specs, captions, summary, budget, itemsize, TEXT_CHUNK_CAPTIONS, tally.add)
            if several:
                _encode_on_engine(stages, planner, manifest, tally)
            else:
                with ShardSink(manifest, TEXTENC, cfg.format.value, cfg.shard_bytes, header, summary) as sink:
                    _encode_here(stages, device, planner, sink, tally)
            planner.finish()  # items left behind while their caption was in flight
            if summary.truncated:
                log.warning("%d caption(s) longer than an encoder's max length were truncated", summary.truncated)
        else:
            summary.nothing_to_do = not (sync.new or sync.changed or sync.removed)
        return finish_run(manifest, summary, start)


@dataclass
class TextStages:
    """The text job's stages for an engine (``engines.base.Stages``); picklable, for device processes and Ray
    actors. A chunk of captions is the unit an engine hands a device; ``drive`` runs it (``engines.text``)."""

    cfg: TextencConfig
    specs: list[EncoderSpec]
    header: dict
    budget: int  # bytes of stored outputs per chunk
    store: str = TEXTENC
    sizing_key: str = "text"

    @property
    def fmt(self) -> str:
        return self.cfg.format.value

    @property
    def shard_bytes(self) -> int:
        return self.cfg.shard_bytes

    def open_encoder(self, device: torch.device) -> EncoderSet:
        """Every encoder of the family, read from disk once for the run."""
        return EncoderSet(self.specs, device, self.cfg.offload)

    def drive(self, encoders: EncoderSet, chunks: Iterable[list[TextItem]], device, put, run: Run) -> None:
        """The device loop of an engine's device: ``run.report`` after each batch through every encoder."""

        def step(items: list[TextItem], done: bool) -> None:
            if done:
                run.report(len(items), device_memory_bytes(device), ())

        drive_text(encoders, chunks, put, step, self.cfg.batch_size, self.cfg.dtype_out.torch)

    def write(self, sink: ShardSink, encoded: Encoded) -> None:
        """Per caption: its tensors under its text id, every item with the caption pointing at them."""
        values = encoded.outputs.ready()
        for j, item in enumerate(encoded.items):
            _store_text(sink, self.specs, item, values[j])
            values[j] = None  # released as it goes into the shard

    def regroup(self, items: list[TextItem]) -> list[list[TextItem]]:
        """A lost device's captions in chunks again (``engines.devices``)."""
        return list(cut_chunks(sorted(items, key=lambda i: (i.pad, i.tid)), self.budget))


def _encode_here(
    stages: TextStages, device: torch.device, planner: TextPlanner, sink: ShardSink, tally: _Tally
) -> None:
    """One device in this process: the encoders open when the first chunk needs them (a run that finds every
    caption stored loads none), each page is committed before the next is looked up."""
    chunks = planner.chunks(settle=sink.flush)
    first = next(chunks, None)
    if first is None:
        return
    summary = sink.summary
    with _open_encoders(stages, device, summary) as encoders:
        summary.model_loaded = True
        summary.offloaded += [name for name in encoders.streamed if name not in summary.offloaded]

        def step(items: list[TextItem], done: bool) -> None:
            tally.add(sum(len(i.keys) for i in items))

        cfg = stages.cfg
        put = functools.partial(stages.write, sink)
        drive_text(encoders, itertools.chain([first], chunks), put, step, cfg.batch_size, cfg.dtype_out.torch)


_COUNTS = ("oom_splits", "upcasts", "fp32_conversions", "loads")  # what add_encoder_counts reads off an encoder


@contextlib.contextmanager
def _open_encoders(stages: TextStages, device: torch.device, summary: RunSummary) -> Iterator[EncoderSet]:
    """The device's encoders for this run, their counts added to the run's summary after it. Under a current
    ``keep.ModelKeeper`` (``cachebuild watch``) the set is kept loaded between runs, and a run counts only what
    happened in it (no read from disk when the set was kept)."""
    keeper = keep.current()
    if keeper is None:
        with stages.open_encoder(device) as encoders:
            yield encoders
            add_encoder_counts(summary, encoders)  # its guards' counts and its reads from disk
        return
    key = ("text", tuple(stages.specs), str(device), stages.cfg.offload)
    loaded = keeper.loads
    encoders = keeper.get(key, lambda: stages.open_encoder(device), device)
    fresh = keeper.loads > loaded  # read from disk for this run: all its counts are this run's
    before = {name: 0 if fresh else getattr(encoders, name) for name in _COUNTS}
    yield encoders
    add_encoder_counts(summary, SimpleNamespace(**{n: getattr(encoders, n) - before[n] for n in _COUNTS}))


def _encode_on_engine(stages: TextStages, planner: TextPlanner, manifest: Manifest, tally: _Tally) -> None:
    """Several devices (``engines.devices``) or a Ray cluster: this process plans and is the manifest's one writer;
    each device opens its encoders once and encodes the chunks it is handed."""
    cfg = stages.cfg
    chunks = planner.chunks(settle=lambda: None)
    first = next(chunks, None)
    if first is None:
        return
    if cfg.engine is EngineKind.RAY:
        from cachebuild.engines.ray_cluster import RayEngine

        engine = RayEngine(cfg.ray_address, max_pixels=0)
    else:
        from cachebuild.engines.devices import DevicesEngine

        engine = DevicesEngine(cfg.devices, workers=0, max_pixels=0)
    run = Run(manifest, tally.summary, cfg.batch_size, None)
    run.report = lambda n, device_bytes, devices: tally.committed(device_bytes, devices)
    engine.run(itertools.chain([first], chunks), stages, run)
    tally.committed()


@dataclass
class _Tally:
    """Progress of one run in (item, encoder) steps: an item counts once per encoder when its caption has been
    through that encoder, or for every encoder at once when it fails or reuses a stored caption."""

    total: int  # pending items when the run started, times the encoders
    summary: RunSummary
    progress: ProgressFn | None
    per_item: int  # encoders
    steps: int = 0  # steps finished so far

    def add(self, steps: int) -> None:
        self.steps += steps
        self._show(None, ())

    def committed(self, device_bytes: int | None = None, devices: tuple = ()) -> None:
        """Several devices: the steps of every item committed or failed so far (they report per shard)."""
        self.steps = (self.summary.encoded + self.summary.failed_now) * self.per_item
        self._show(device_bytes, devices)

    def _show(self, device_bytes: int | None, devices: tuple) -> None:
        if self.progress:
            self.progress(Progress(self.steps, self.total, self.summary.failed_now, device_bytes, devices))


def _store_text(sink: ShardSink, specs: list[EncoderSpec], item: TextItem, result: dict | str) -> None:
    if isinstance(result, str):
        sink.fail([(k, result) for k in item.keys])
        return
    if not all(torch.isfinite(t).all() for t in result.values()):
        reason = f"encoder outputs overflow --dtype-out {sink.header['dtype']}; use bf16 or fp32"
        sink.fail([(k, reason) for k in item.keys])
        return
    info = {
        "text_id": item.tid,
        "tokens": {s.name: item.real(s.name) for s in specs},  # real tokens, incl. special
        "truncated": list(item.truncated),
    }
    sink.add(item.tid, result, info | {"text": item.text, "keys": item.keys}, [(k, None, info) for k in item.keys])
