"""Build a project: every latent cache (those that share a decode, together), every text cache, every export.

Each cache is built by its job (``jobs.latents``, ``jobs.textenc``) with its own config and manifest, so it keeps
every guarantee a single command gives it (resume, fingerprints, the removal guard, per-item failures); the
exports are the ``cachebuild export`` functions. The only thing a project adds is the shared decode
(``project.shared``) for latent caches whose decode settings match (``decode_key``).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from cachebuild.cache.store import Progress, RunSummary
from cachebuild.config import CropMode, EngineKind, LatentsConfig
from cachebuild.errors import CachebuildError
from cachebuild.keep import ModelKeeper, keeping
from cachebuild.project.shared import Interrupted, build_together
from cachebuild.project.spec import EXPORTS, CacheSpec, ExportSpec, Project

# LatentsConfig fields that never reach the pixels: caches differing only in these share a decode. Any other field
# (a new pixel option included) keeps caches apart unless equal, which is never wrong, at worst a missed saving.
DECODE_FREE = frozenset(
    {
        "model",
        "latents",
        "dtype",
        "dtype_out",
        "batch_size",
        "workers",
        "format",
        "shard_mb",
        "hash_files",
        "retry_failed",
        "rebuild",
        "prune",
        "vram_budget_gb",
        "manifest_dir",
        "out",
        "flip",  # mirrored on the device from the same pixels
    }
)

ProjectProgress = Callable[[str, Progress], None]  # (what: "sdxl/photos latents", progress)


class CacheFailed(CachebuildError):
    """A cache of the project could not be built; the message names it and says why."""


@dataclass
class CacheResult:
    target: str
    dataset: str
    out: str
    latents: RunSummary | None = None
    text: RunSummary | None = None

    @property
    def label(self) -> str:
        return f"{self.target}/{self.dataset}"


@dataclass
class ExportResult:
    target: str
    dataset: str
    format: str
    summary: Any  # consumers.export.kohya.ExportSummary


@dataclass
class BuildSummary:
    """What ``build_project`` did: one entry per cache and export, and each shared decode's counts."""

    caches: list[CacheResult] = field(default_factory=list)
    exports: list[ExportResult] = field(default_factory=list)
    shared: list[dict] = field(default_factory=list)  # {"caches": [labels], "decoded": n, "fed": m}
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        """Items failed in every cache (a rerun with --retry-failed tries them again)."""
        return sum(s.failed for c in self.caches for s in (c.latents, c.text) if s is not None)

    @property
    def conflicts(self) -> int:
        return sum(len(e.summary.conflicts) for e in self.exports)


def build_project(
    project: Project,
    progress: ProjectProgress | None = None,
    keeper: ModelKeeper | None = None,
    stop: Callable[[], bool] | None = None,
    only: set[str] | None = None,
) -> BuildSummary:
    """Build every cache and export of ``project`` (of the datasets named in ``only``, when given).

    ``keeper`` keeps the models loaded afterwards (``cachebuild watch``); ``stop`` is asked between batches and
    raises ``Interrupted`` when it answers True.

    Raises:
        CacheFailed: a cache or export could not be built (bad settings for its store, a fingerprint mismatch,
            the removal guard); the message names the cache.
        Interrupted: ``stop`` asked for it.
    """
    start = time.monotonic()
    summary = BuildSummary(notes=list(project.notes))
    caches = [c for c in project.caches if only is None or c.dataset in only]
    results = {c.label: CacheResult(c.target, c.dataset, str(c.out)) for c in caches}
    summary.caches = list(results.values())
    with keeping(keeper):
        for group in latents_groups([c for c in caches if c.latents is not None]):
            _build_latents(group, results, summary, progress, keeper, stop)
        for cache in caches:
            if cache.text is not None:
                results[cache.label].text = _run(cache.label, _text_job, cache, _progress(progress, cache, stop))
    for export in project.exports:
        if only is None or export.dataset in only:
            summary.exports.append(_run(f"{export.label}", run_export, export))
    summary.seconds = time.monotonic() - start
    return summary


def latents_groups(caches: list[CacheSpec]) -> list[list[CacheSpec]]:
    """Caches in groups that share a decode, in the project's order; a cache that cannot share is alone."""
    groups: dict[object, list[CacheSpec]] = {}
    for i, cache in enumerate(caches):
        key = decode_key(cache.latents)
        groups.setdefault(key if key is not None else ("alone", i), []).append(cache)
    return list(groups.values())


def decode_key(cfg: LatentsConfig) -> str | None:
    """What decides the pixels a cache's items decode to, as one comparable value; None for a cache whose
    engine decodes on its own (several devices, Ray)."""
    if len(cfg.devices) > 1 or cfg.engine is not EngineKind.LOCAL:
        return None
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in DECODE_FREE}
    if cfg.crop is CropMode.CENTER:
        values.pop("seed")  # the seed reaches the pixels only through a random crop
    return repr(sorted((k, str(v) if k == "dataset" else v) for k, v in values.items()))


def run_export(export: ExportSpec):
    module, name = EXPORTS[export.format]
    fn = getattr(importlib.import_module(module), name)
    return ExportResult(export.target, export.dataset, export.format, fn(export.cache, export.to, **export.options))


def _build_latents(group, results, summary, progress, keeper, stop) -> None:
    labels = [c.label for c in group]
    progress_fns = [_progress(progress, c, stop, "latents") for c in group]
    if len(group) == 1 and keeper is None:  # one cache, no model to keep: the job as the command runs it
        from cachebuild.jobs.latents import build_latents

        results[labels[0]].latents = _run(labels[0], build_latents, group[0].latents, progress_fns[0])
        return
    cfgs = [c.latents for c in group]
    runs, count = _run(", ".join(labels), build_together, cfgs, progress_fns, keeper)
    for label, run in zip(labels, runs, strict=True):
        results[label].latents = run
    if count.caches > 1:  # more than one cache had items to encode: they shared the decode
        summary.shared.append({"caches": labels, "decoded": count.decoded, "fed": count.fed})


def _text_job(cache: CacheSpec, progress) -> RunSummary:
    from cachebuild.jobs.textenc import build_textenc

    return build_textenc(cache.text, progress)


def _progress(progress: ProjectProgress | None, cache: CacheSpec, stop, store: str = "text"):
    """The job's progress callback: the project's, labelled, and a ``stop`` check (between a job's batches)."""
    if progress is None and stop is None:
        return None
    label = f"{cache.label} {store}"

    def report(p: Progress) -> None:
        if progress is not None:
            progress(label, p)
        if stop is not None and stop():
            raise Interrupted(f"stopped during {label}")

    return report


def _run(label: str, fn, *args):
    try:
        return fn(*args)
    except (Interrupted, CacheFailed):
        raise
    except CachebuildError as exc:
        raise CacheFailed(f"{label}: {exc}") from exc
