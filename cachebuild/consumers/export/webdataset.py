"""Export a cache as WebDataset tar shards, for streaming training at scale.

Each sample is a group of tar members sharing one base name, as the ``webdataset`` library groups them:

  ``<key>.json``        the record's metadata: ``key`` (the cache key), ``original_size`` (W, H), ``crop``
                        (left, top), ``bucket`` (W, H), ``flip``, and ``caption`` when the cache has text
  ``<key>.<name>.pth``  one tensor per stored name, as stored (``latents`` raw, ``latents_flipped``, or
                        ``mean``/``std`` for moments caches; text tensors such as ``t5``, ``t5_mask``, ``qwen3``),
                        written with ``torch.save``, which ``webdataset``'s default decoder loads for ``.pth``

The base name is the cache key with ``%`` and ``.`` written ``%25`` and ``%2E`` (webdataset splits a member name
at the first dot of its last path part), so ``sub/img.v2`` becomes ``sub/img%2Ev2``; the JSON keeps the key as is.
Samples are ordered by bucket, then key, so a reader that batches consecutive samples mostly meets one bucket at
a time; shards ``shard-000000.tar`` ... hold about ``shard_mb`` each. ``dataset.json`` beside them records the
cache's fingerprints (scaling and shift factors, text encoders) and the shard names. Tar headers carry no time,
owner or mode of this machine, so the same cache gives the same bytes and a re-run skips identical shards.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import torch

from cachebuild.consumers.export.files import Progress, write_checked
from cachebuild.consumers.export.kohya import ExportSummary
from cachebuild.consumers.reader import open_cache

SHARD_MB = 256.0  # tensor bytes per tar shard: a shard is assembled in memory before it is written


def export_webdataset(
    cache: str | os.PathLike,
    to: str | os.PathLike,
    overwrite: bool = False,
    shard_mb: float = SHARD_MB,
    progress: Progress | None = None,
) -> ExportSummary:
    """Write every done item of the cache at ``cache`` as WebDataset tar shards in ``to``.

    Args:
        cache: the cache folder.
        to: the folder for the shards (created if missing).
        overwrite: replace existing shards whose contents differ.
        shard_mb: about how many MB of samples go into one shard.
        progress: called with (done, total) after each item.

    Example:
        >>> export_webdataset("./cache", "./shards").written  # shards written, with dataset.json
        3
    """
    start = time.monotonic()
    reader = open_cache(cache)  # text joined when the cache has it: only items with both are samples
    root = Path(to)
    root.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary("webdataset", str(root))
    for side, keys in reader.unmatched.items():
        for key in keys:
            summary.skipped.append({"key": key, "reason": f"{side.replace('_', ' ')}: a sample needs both sides"})
    keys = sorted(reader.keys(), key=lambda k: (reader.bucket(k), k))
    shards: list[str] = []
    pending, done = iter(keys), 0
    while True:  # one shard per turn, filled until it holds shard_mb of tensors or the keys run out
        buf, size, count = io.BytesIO(), 0, 0
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key in pending:
                size += _add_sample(tar, reader, key)
                count, done = count + 1, done + 1
                if progress:
                    progress(done, len(keys))
                if size >= shard_mb * 1024 * 1024:
                    break
        if not count:
            break
        shards.append(_write_shard(root, len(shards), buf.getvalue(), overwrite, summary))
    index = {
        "format": "cachebuild-webdataset/1",
        "shards": shards,
        "samples": len(keys),
        "latents": reader.fingerprint,
        "text": reader.text_fingerprint,
    }
    data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
    write_checked(root / "dataset.json", data, root, overwrite, summary, lambda old: False)
    summary.seconds = time.monotonic() - start
    return summary


def sample_name(key: str) -> str:
    """The tar base name of cache key ``key``: ``%`` and ``.`` escaped so webdataset splits at the right dot."""
    return key.replace("%", "%25").replace(".", "%2E")


def _add_sample(tar: tarfile.TarFile, reader, key: str) -> int:
    """Add one sample's members; return its tensor bytes."""
    info = reader.info(key)
    meta = {
        "key": key,
        "original_size": info["original_size"],
        "crop": info["crop"],
        "bucket": info["bucket"],
        "flip": bool(info.get("flip", False)),
    }
    tensors = dict(reader.tensors(key))
    if reader.text_fingerprint is not None:  # a joined reader: every item has its text
        meta["caption"] = reader.caption(key)
        tensors |= reader.text_tensors(key)
    base = sample_name(key)
    _add(tar, f"{base}.json", json.dumps(meta, sort_keys=True).encode())
    nbytes = 0
    for name in sorted(tensors):
        out = io.BytesIO()
        torch.save(tensors[name].contiguous().clone(), out)
        _add(tar, f"{base}.{name}.pth", out.getvalue())
        nbytes += out.tell()
    return nbytes


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size, member.mode, member.mtime = len(data), 0o644, 0  # nothing of this machine or this hour
    tar.addfile(member, io.BytesIO(data))


def _write_shard(root: Path, index: int, data: bytes, overwrite: bool, summary: ExportSummary) -> str:
    name = f"shard-{index:06d}.tar"
    write_checked(root / name, data, root, overwrite, summary, lambda old: False)
    return name
