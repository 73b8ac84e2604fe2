"""Several latent caches of one dataset, decoded once: each image is read, resized and cropped once and its pixels
are fed to every VAE that still needs it.

Caches whose decode settings match (``build.decode_key``: the dataset, buckets, crop, EXIF rule, pixel limit,
device) plan the same ``ItemPlan`` for the same key. ``build_together`` runs ``jobs.latents.build_latents`` for
each of them with an engine of its own (``_Link``): each job checks its fingerprint, syncs its own manifest and
plans its own pending items, then hands its batches and stages to its link. Each link starts the next job inside
its ``run``, so when the last one joins, every manifest is open (in this thread) and ``_Group.drive`` runs them all:

    per step: the next planned batch of every job -> the distinct plans among them, per bucket, cut to the
    smallest device batch of the jobs that want them -> decoded once (``images.load.iter_batches``, the same
    bounded prefetch as one job) -> staged on the device once -> each job's items through its VAE -> its own
    writer thread, sink and manifest.

Jobs with the same pending items (the usual case: new images are pending in every cache) plan identical batches,
so every image is decoded once. Jobs whose pending items differ still get each of theirs, in their own batches;
an image two of them need in different steps is decoded in each.

Memory: the group's VAEs are on the device together (for "model" in promise 1 read "the group's VAEs"), plus one
decoded batch staged once and each VAE's activations in turn; the decode queue is one job's.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

from cachebuild.cache.store import ProgressFn, RunSummary
from cachebuild.config import LatentsConfig
from cachebuild.engines.base import Encoded, Run, merge_summary
from cachebuild.engines.local import AUTO_BATCH_META, LocalEngine, WriterThreadFor, open_sizer
from cachebuild.jobs.latents import build_latents
from cachebuild.keep import ModelKeeper

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Raised by a progress callback between batches when its caller asks to stop; every job's open shard is
    dropped (its items stay pending, as after a kill) and the committed ones stay."""


@dataclass
class DecodeCount:
    """How many images one group decoded, and how many it handed to encoders (summed over its caches)."""

    decoded: int = 0  # images that reached the decoder (failed ones included)
    fed: int = 0  # decoded images handed to a VAE, once per cache that wanted them
    caches: int = 0  # caches that encoded in the group's stream


def build_together(
    cfgs: list[LatentsConfig],
    progress: list[ProgressFn | None] | None = None,
    keeper: ModelKeeper | None = None,
) -> tuple[list[RunSummary], DecodeCount]:
    """Build the latent caches ``cfgs`` (one local device, image families) over one decode.

    Each cache keeps everything one ``build_latents`` gives it: its manifest, fingerprint check, resume, sink and
    summary. ``keeper`` keeps the VAEs loaded after the run. A progress callback that raises (``Interrupted``, after
    a batch) stops every job there: the shards committed stay, the open ones are dropped as after a kill.

    Example:
        >>> summaries, count = build_together([cfg_sdxl, cfg_flux])
        >>> count.decoded, count.fed
        (20000, 40000)
    """
    group = _Group(cfgs, progress or [None] * len(cfgs), keeper)
    group.build(0)
    return group.summaries, group.count


@dataclass
class _Joined:
    """A job that reached its engine: its planned batches, its stages and its run."""

    batches: Iterator
    stages: object  # jobs.latents.LatentsStages
    run: Run


class _Group:
    def __init__(self, cfgs, progress, keeper):
        self.cfgs, self.progress, self.keeper = cfgs, progress, keeper
        self.summaries: list[RunSummary | None] = [None] * len(cfgs)
        self.joined: list[_Joined] = []
        self.count = DecodeCount()
        # one planning batch for every job, so that jobs with the same pending items plan the same batches: the
        # smallest, so that the job with the smallest batch encodes exactly the batches it would alone
        self.planning_batch = min(_engine(c).plan_batch_size(c.batch_size) for c in cfgs)

    def build(self, i: int) -> None:
        """Build job ``i``; the jobs after it are built inside its run (``_Link.run``), or after it when it has
        nothing to encode. After the last one, drive every job that joined."""
        if i == len(self.cfgs):
            if self.joined:
                self.drive()
            return
        link = _Link(self, i)
        self.summaries[i] = build_latents(self.cfgs[i], self.progress[i], engine=link)
        if not link.joined:
            self.build(i + 1)

    def drive(self) -> None:
        from cachebuild.encode import free_device_memory, pick_device, use_device

        device = use_device(pick_device(self.cfgs[0].device))
        jobs = self.joined
        encoders = [self._encoder(j, device) for j in jobs]
        counts = [_guard_counts(e) for e in encoders]  # a kept encoder counts across runs: this run's share only
        parts = [RunSummary(j.run.summary.store, j.run.summary.out) for j in jobs]  # the writer threads' counts
        try:
            with contextlib.ExitStack() as stack:
                writers = []
                for j, part in zip(jobs, parts, strict=True):
                    j.run.live.append(part)
                    j.run.summary.model_loaded = True
                    writer = WriterThreadFor(j.stages, j.run.manifest.root, part, None, j.run.manifest.remote, device)
                    writers.append(stack.enter_context(writer))
                _Stream(self, jobs, encoders, writers, device).run()
        finally:
            _add_counts(jobs, parts, encoders, counts)
            self.count.caches += len(jobs)
            del encoders
            if self.keeper is None:
                free_device_memory(device)  # nothing of the models is left on the device when the run returns

    def _encoder(self, job: _Joined, device):
        if self.keeper is None:
            return job.stages.open_encoder(device)
        cfg = job.stages.cfg
        key = ("vae", repr(job.stages.vae), job.stages.dtype, cfg.latents, cfg.flip, cfg.seed, str(device))
        return self.keeper.get(key, lambda: job.stages.open_encoder(device), device)


@dataclass
class _Link:
    """The engine one job of a group sees: it joins the group, then builds the next job."""

    group: _Group
    index: int
    joined: bool = False

    def plan_batch_size(self, batch_size: int | None) -> int:
        return self.group.planning_batch

    def run(self, batches, stages, run: Run) -> None:
        self.joined = True
        if getattr(stages.family, "video", False):  # clips decode their own way: that job runs alone
            _engine(stages.cfg).run(batches, stages, run)
        else:
            self.group.joined.append(_Joined(iter(batches), stages, run))
        self.group.build(self.index + 1)


class _Stream:
    """The device loop of a group: one decode, every job's encoder and writer."""

    def __init__(self, group: _Group, jobs: list[_Joined], encoders: list, writers: list, device):
        from cachebuild.engines.device import DeviceStreams

        self.group, self.jobs, self.encoders, self.writers, self.device = group, jobs, encoders, writers, device
        self.streams = DeviceStreams(device)
        self.wants: deque[dict[int, set]] = deque()  # per unit in flight: job -> the plans it wants
        self.sizers, self.budget = self._sizers()

    def run(self) -> None:
        from cachebuild.engines.device import Stager, trim_if_over
        from cachebuild.images.load import iter_batches

        cfgs = [j.stages.cfg for j in self.jobs]
        decoded = iter_batches(self._units(), max(c.workers for c in cfgs), cfgs[0].max_pixels)
        with contextlib.closing(decoded), Stager(self.streams) as stager:
            ahead = _submit(stager, next(decoded, None))
            while ahead is not None:
                loaded, staged = ahead.result()  # staged once for every job, while the previous batch encoded
                wants = self.wants.popleft()
                ahead = _submit(stager, next(decoded, None))
                pixels = staged.wait() if staged is not None else None
                self.group.count.decoded += len(loaded.items) + len(loaded.failures)
                for k, want in sorted(wants.items()):
                    self._encode_for(k, loaded, pixels, want)
                if trim_if_over(self.device, self.budget):
                    self.jobs[0].run.summary.allocator_trims += 1  # one device loop: counted once, on the first cache
        for sizer in self.sizers:
            sizer.peak = None  # its bound method holds an encoder, and with it a model

    def _units(self) -> Iterator[list]:
        """Decode units: per step (one planned batch of each job), the distinct plans by bucket, cut to the
        smallest device batch of the jobs that want them; ``self.wants`` gets each unit's owners."""
        from cachebuild.encode import free_device_memory
        from cachebuild.engines.batchsize import rechunk

        for step in itertools.zip_longest(*(j.batches for j in self.jobs)):
            owners: dict = {}  # plan -> the jobs whose batch holds it
            for k, batch in enumerate(step):
                for plan in batch or ():
                    owners.setdefault(plan, set()).add(k)
            for bucket in sorted({p.bucket for p in owners}):
                plans = sorted((p for p in owners if p.bucket == bucket), key=lambda p: p.key)
                wanting = set().union(*(owners[p] for p in plans))
                searches = sum(s.searches for s in self.sizers)
                size = min(self.sizers[k].size(bucket) for k in wanting)
                if sum(s.searches for s in self.sizers) != searches:
                    free_device_memory(self.device)  # a batch-size search's cached blocks
                for unit in rechunk(plans, size):
                    self.wants.append({k: {p for p in unit if k in owners[p]} for k in wanting})
                    yield unit

    def _encode_for(self, k: int, loaded, pixels, want: set) -> None:
        import torch

        from cachebuild.encode import device_memory_bytes
        from cachebuild.engines.device import HostOutputs

        idx = [i for i, plan in enumerate(loaded.items) if plan in want]
        failures = [(plan, reason) for plan, reason in loaded.failures if plan in want]
        outputs = HostOutputs([], None)
        if idx:
            mine = pixels if len(idx) == len(loaded.items) else pixels[torch.tensor(idx, device=pixels.device)]
            outputs = self.streams.to_host(self.encoders[k].encode_raw(mine))  # (b, H, W, 3) uint8 in
        items = [loaded.items[i] for i in idx]
        self.writers[k].put(Encoded(items, outputs, failures, **_extras(loaded, idx)))
        self.group.count.fed += len(items)
        self.jobs[k].run.report(len(items) + len(failures), device_memory_bytes(self.device), ())

    def _sizers(self):
        budget = None
        sizers = []
        for job, enc in zip(self.jobs, self.encoders, strict=True):
            manifest, store = job.run.manifest, job.stages.store
            known = manifest.get_meta(AUTO_BATCH_META.format(store=store))
            sizer, b = open_sizer(self.device, job.run, job.stages.sizing_key, known, _recorder(manifest, store))
            sizer.peak = enc.peak  # used only where device memory is measured (a budget is known)
            sizers.append(sizer)
            budget = b if budget is None or b is None else min(budget, b)
        return sizers, budget


_GUARD_COUNTS = ("oom_splits", "fp32_redos", "fp32_conversions")  # RunSummary fields an encoder's guard adds to


def _add_counts(jobs: list[_Joined], parts: list[RunSummary], encoders: list, before: list[tuple]) -> None:
    """Each writer thread's counts and its encoder's guard counts of this run into its job's summary."""
    for job, part, encoder, then in zip(jobs, parts, encoders, before, strict=True):
        job.run.live.remove(part)
        merge_summary(job.run.summary, part)
        for name, now, was in zip(_GUARD_COUNTS, _guard_counts(encoder), then, strict=True):
            setattr(job.run.summary, name, getattr(job.run.summary, name) + now - was)


def _guard_counts(encoder) -> tuple[int, int, int]:
    """The encoder's guard counts, as ``engines.local.add_encoder_counts`` reads them."""
    return encoder.oom_splits, encoder.upcasts, getattr(encoder, "fp32_conversions", 0)


def _submit(stager, loaded):
    return None if loaded is None else stager.submit(loaded)


def _extras(loaded, idx: list[int]) -> dict:
    """What a decoded batch carries per item besides pixels (a mask, where the loader gives one) for the
    fields of ``Encoded`` of the same name, cut to ``idx``."""
    wanted = {f.name for f in fields(Encoded)} - {"items", "outputs", "failures"}
    out = {}
    for f in fields(loaded):
        if f.name in wanted:
            value = getattr(loaded, f.name)
            out[f.name] = None if value is None else value[idx]
    return out


def _recorder(manifest, store: str) -> Callable[[str, dict], None]:
    key = AUTO_BATCH_META.format(store=store)

    def remember(name: str, value: dict) -> None:
        manifest.set_meta(key, (manifest.get_meta(key) or {}) | {name: value})

    return remember


def _engine(cfg: LatentsConfig) -> LocalEngine:
    return LocalEngine(cfg.workers, cfg.max_pixels, cfg.devices[0] if cfg.devices else cfg.device)
