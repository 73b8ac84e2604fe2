"""Keep every cache of a project current: build, then build again whenever its files change.

The loop, one ``tick`` at a time:

* changes come from ``watchfiles`` (an extra: ``pip install 'cachebuild[watch]'``) for local folders, in a
  thread of their own; URL datasets (and local ones without watchfiles) are built again every ``poll`` seconds,
  the build's scan being the listing;
* a changed file is read only once it is stable: the same size and modification time for ``settle`` seconds
  (a file still being written keeps changing); one that never stops changing is read after ``max_settle``;
* the build is ``build_project`` for the datasets that changed: each cache's job as ever (resume, fingerprints,
  the removal guard of ``--prune``: a folder that vanishes refuses with an error event, its cache untouched);
* models stay loaded between builds (``keep.ModelKeeper``), up to a memory budget, and are released after
  ``idle_timeout`` seconds without work, which frees the device;
* ``stop`` (a signal) is asked every tick and between a build's batches: the build stops there, its committed
  shards kept, and the next start resumes where it stopped.

Events (``events.py``) go to ``emit`` one at a time.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cachebuild.errors import CachebuildError
from cachebuild.keep import ModelKeeper
from cachebuild.project.build import build_project
from cachebuild.project.events import (
    item_events,
    keys_of,
    read_rows,
    summary_events,
    watched_roots,
    written_by_us,
)
from cachebuild.project.spec import Project

log = logging.getLogger(__name__)

Emit = Callable[[dict], None]
KEEP_SHARE = 0.6  # of the device's memory (the host's on a CPU) that kept models may hold: the rest is for batches
IGNORED_SUFFIXES = (".npz", ".safetensors", ".tar", ".cachebuild-tmp", ".sqlite", ".sqlite-wal", ".sqlite-shm")
# what exports (sd-scripts' beside the images, musubi's cache_directory, which may be the image folder) and
# manifests write: never a source, and a change to one is no news


@dataclass(frozen=True)
class WatchOptions:
    settle: float = 1.0  # seconds a changed file must keep its size and mtime before it is read
    max_settle: float = 60.0  # a file changing for longer than this is read anyway (it may never stop)
    poll: float = 30.0  # seconds between builds of URL datasets, and of local ones without watchfiles
    idle_timeout: float = 300.0  # seconds without work after which kept models are released
    keep_bytes: int | None = None  # memory kept models may hold; None: KEEP_SHARE of the device's (host's)
    tick: float = 0.2  # seconds between looks at changes, the stop flag and the idle clock


def watch_project(project: Project, opts: WatchOptions, emit: Emit, stop: Callable[[], bool]) -> None:
    """Build ``project`` and keep it current until ``stop()``; raises ``shared.Interrupted`` when a stop cuts a
    build short (its committed work kept)."""
    from cachebuild.encode import free_device_memory

    keeper = ModelKeeper(opts.keep_bytes or _default_budget(project), free=free_device_memory)
    changes = _Changes(project, opts)
    try:
        _cycle(project, None, {}, keeper, emit, stop)
        emit({"event": "ready", "caches": len(project.caches), "watching": sorted(changes.roots)})
        last_work = time.monotonic()
        while not stop():
            ready = changes.next(opts.tick)
            if ready is not None:
                names, paths = ready
                _cycle(project, names, paths, keeper, emit, stop)
                last_work = time.monotonic()
            elif len(keeper) and time.monotonic() - last_work >= opts.idle_timeout:
                emit({"event": "released", "models": keeper.release_all()})
    finally:
        changes.close()
        keeper.release_all()


def _cycle(project: Project, names: set[str] | None, paths: dict, keeper, emit: Emit, stop) -> None:
    """One build (of the datasets ``names``; all when None) and its events."""
    keys = {name: keys_of(p, _dataset(project, name)) for name, p in paths.items()}
    caches = [c for c in project.caches if names is None or c.dataset in names]
    before, since = read_rows(caches, keys), time.time()
    try:
        summary = build_project(project, None, keeper, stop, only=names)
    except CachebuildError as exc:  # the guard against a vanished folder, a bad file: said, and watched on
        emit({"event": "error", "message": str(exc)})
        return
    for event in item_events(before, read_rows(caches, keys), since) + summary_events(summary, set(keys)):
        emit(event)


def _dataset(project: Project, name: str):
    return next(d for d in project.datasets if d.name == name)


def _default_budget(project: Project) -> int:
    import psutil

    from cachebuild.encode import pick_device

    devices = {c.latents.device if c.latents else c.text.device for c in project.caches}
    device = pick_device(next(iter(devices)) if len(devices) == 1 else None)
    if device.type == "cuda":
        import torch

        return int(KEEP_SHARE * torch.cuda.get_device_properties(device).total_memory)
    return int(KEEP_SHARE * psutil.virtual_memory().total)


class _Changes:
    """Changed paths per dataset, handed out once they are stable; and the poll clock of the other datasets."""

    def __init__(self, project: Project, opts: WatchOptions):
        self.opts = opts
        self.roots = watched_roots(project)
        self.ours = [str(p) for p in written_by_us(project)]
        self.polled = {d.name for d in project.datasets} - set(self.roots)
        self.pending: dict[str, dict[str, tuple]] = {}  # dataset -> path -> (signature, stable since, first seen)
        self.events: queue.Queue = queue.Queue()
        self.stop_event = threading.Event()
        self.thread = None
        self.next_poll = time.monotonic() + opts.poll
        if self.roots:
            try:
                import watchfiles  # noqa: F401
            except ImportError:
                log.warning(
                    "watchfiles is not installed (pip install 'cachebuild[watch]'): polling every %s s", opts.poll
                )
                self.polled |= set(self.roots)
                self.roots = {}
            else:
                self.thread = threading.Thread(target=self._watch, name="cachebuild-watch", daemon=True)
                self.thread.start()

    def next(self, timeout: float) -> tuple[set[str], dict[str, set[Path]]] | None:
        """Datasets ready to build and their changed paths, or None after ``timeout`` with nothing ready."""
        try:
            self._add(*self.events.get(timeout=timeout))
            while True:
                self._add(*self.events.get_nowait())
        except queue.Empty:
            pass
        ready = self._stable()
        if self.polled and time.monotonic() >= self.next_poll:
            self.next_poll = time.monotonic() + self.opts.poll
            return (set(ready) | self.polled), ready
        return (set(ready), ready) if ready else None

    def close(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def _watch(self) -> None:
        import watchfiles

        paths = [str(p) for roots in self.roots.values() for p in roots]
        try:
            for batch in watchfiles.watch(*paths, stop_event=self.stop_event, debounce=200, step=50):
                for _, path in batch:
                    self.events.put((path, False))
        except Exception as exc:  # a watched folder removed, the watch limit reached: fall back to polling
            log.warning("watching files stopped (%s); polling every %s s instead", exc, self.opts.poll)
            self.events.put((str(exc), True))

    def _add(self, path: str, broken: bool) -> None:
        if broken:
            self.polled |= set(self.roots)
            return
        name = os.path.basename(path)
        if name.startswith(".") or name.endswith(IGNORED_SUFFIXES) or any(_under(path, o) for o in self.ours):
            return
        for dataset, roots in self.roots.items():
            if any(_under(path, str(r)) for r in roots):
                now = time.monotonic()
                old = self.pending.setdefault(dataset, {}).get(path)
                self.pending[dataset][path] = (None, now, old[2] if old else now)  # look again from now

    def _stable(self) -> dict[str, set[Path]]:
        """The datasets all of whose changed paths kept one signature for ``settle`` seconds (or changed for
        longer than ``max_settle``), with those paths; the rest wait."""
        now, ready = time.monotonic(), {}
        for dataset, paths in list(self.pending.items()):
            settled = True
            for path, (sig, since, first) in paths.items():
                current = _signature(path)
                if current != sig:
                    paths[path] = (current, now, first)
                    settled = False
                elif now - since < self.opts.settle and now - first < self.opts.max_settle:
                    settled = False
            if settled:
                ready[dataset] = {Path(p) for p in self.pending.pop(dataset)}
        return ready


def _signature(path: str) -> tuple | None:
    """(size, mtime) of a file, or None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
