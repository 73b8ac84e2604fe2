"""What ``cachebuild watch`` reports, one event (a dict, a JSON line) at a time.

While watching, the files that changed name the items to look at: after a build, each one's row in each cache's
manifest says whether it was encoded (``done``), ``failed`` (with the reason) or ``removed``. A build with no
list of changes (the first one, a poll of a URL dataset) reports per cache instead: how many items it encoded,
failed and removed. Exports report the files they wrote.
"""

from __future__ import annotations

import os
from pathlib import Path

from cachebuild.cache.manifest import DONE, FAILED, STORES, TEXTENC, Manifest
from cachebuild.keys import path_text
from cachebuild.project.spec import CacheSpec, DatasetSpec, Project
from cachebuild.storage import is_url

Rows = dict[tuple[str, str], dict[str, tuple]]  # (cache label, store) -> {key: (status, reason, updated)}


def keys_of(paths: set[Path], dataset: DatasetSpec) -> set[str]:
    """The item keys that changed ``paths`` (images, caption files) stand for in ``dataset``."""
    keys = set()
    roots = [Path(r) for r in {str(dataset.path), str(dataset.captions)} if not is_url(r)]
    for path in paths:
        for root in roots:
            try:
                rel = os.path.relpath(path, root)
            except ValueError:
                continue
            if not rel.startswith(".."):
                rel = path_text(rel.replace(os.sep, "/"))
                keys.add(rel[: len(rel) - len(os.path.splitext(rel)[1])])
                break
    return keys


def read_rows(caches: list[CacheSpec], keys: dict[str, set[str]]) -> Rows:
    """Each cache's rows for the changed keys of its dataset (``keys``: dataset name -> keys)."""
    rows: Rows = {}
    for cache in caches:
        wanted = sorted(keys.get(cache.dataset, ()))
        if not wanted or is_url(cache.out) or not (Path(cache.out) / "manifest.sqlite").is_file():
            continue
        with Manifest.open(Path(cache.out), create=False, read_only=True) as manifest:
            for store in STORES:
                rows[(cache.label, store)] = manifest.statuses(store, wanted)
    return rows


def item_events(before: Rows, after: Rows, since: float) -> list[dict]:
    """``done`` and ``failed`` for rows that changed at or after ``since``, ``removed`` for rows that went."""
    events = []
    for (label, store), now in sorted(after.items()):
        name = "text" if store == TEXTENC else store
        for key, (status, reason, updated) in sorted(now.items()):
            if updated >= since and status == DONE:
                events.append({"event": "done", "cache": label, "store": name, "key": key})
            elif updated >= since and status == FAILED:
                events.append({"event": "failed", "cache": label, "store": name, "key": key, "reason": reason})
        for key in sorted(set(before.get((label, store), {})) - set(now)):
            events.append({"event": "removed", "cache": label, "store": name, "key": key})
    return events


def summary_events(summary, itemised: set[str]) -> list[dict]:
    """Per cache of a dataset not in ``itemised`` (built without a list of changes) the counts of what it did;
    per export, the files it wrote (or found differing and left alone)."""
    events = []
    for c in (c for c in summary.caches if c.dataset not in itemised):
        for store, s in (("latents", c.latents), ("text", c.text)):
            if s is not None and (s.encoded or s.failed_now or s.removed):
                events.append(
                    {"event": "cache", "cache": c.label, "store": store, "encoded": s.encoded, "failed": s.failed_now}
                    | {"removed": s.removed, "done": s.done, "pending": s.pending}
                )
    for e in summary.exports:
        x = e.summary
        if x.written or x.conflicts:  # conflicts: files that differ, left alone (the export's overwrite = true)
            events.append(
                {"event": "export", "cache": f"{e.target}/{e.dataset}", "format": e.format, "to": str(x.to)}
                | {"written": x.written, "unchanged": x.unchanged, "differing": len(x.conflicts)}
            )
    return events


def watched_roots(project: Project) -> dict[str, list[Path]]:
    """Local folders (and caption files) to watch, per dataset name; URL datasets are polled instead."""
    roots: dict[str, list[Path]] = {}
    for d in project.datasets:
        for place in {str(d.path), str(d.captions)}:
            if not is_url(place):
                roots.setdefault(d.name, []).append(Path(place))
    return roots


def written_by_us(project: Project) -> list[Path]:
    """Folders cachebuild itself writes (caches, exports outside the datasets): their changes are not news."""
    dataset_roots = {str(d.path) for d in project.datasets}
    places = [c.out for c in project.caches] + [e.to for e in project.exports if str(e.to) not in dataset_roots]
    return [Path(p) for p in places if not is_url(p)]
