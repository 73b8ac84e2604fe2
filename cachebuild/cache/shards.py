"""Store: shard writers. A shard is built in memory, written to a temporary name, flushed, fsynced and
renamed; only then does the caller commit it to the manifest.

Writers share one small interface (``write``, ``close``, context manager) so that the safetensors and
HDF5 backends are interchangeable. Tensor names inside a shard are ``<key>/<name>`` (``sub/img001/latents``),
and each shard's metadata describes its items so a shard is readable without the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

SHARD_DIGITS = 5  # shard-00000 .. shard-99999; zero-padded so names sort in write order
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class ShardInfo:
    """A shard made durable: what the manifest records about it."""

    name: str  # file name inside the store folder
    keys: tuple[str, ...]
    bytes: int
    sha256: str


class ShardWriter(Protocol):
    """The interface every backend implements."""

    def write(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...

    def close(self) -> ShardInfo: ...

    @property
    def nbytes(self) -> int: ...


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous tensor owning exactly its bytes: a view into a batch's output would keep the
    whole batch alive in host memory until the shard is written."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def shard_name(index: int, suffix: str) -> str:
    return f"shard-{index:0{SHARD_DIGITS}d}{suffix}"


def shard_index(name: str) -> int | None:
    """The index in a shard file name, or None for a file that is not a shard."""
    stem = name.split(".", 1)[0]
    if not stem.startswith("shard-"):
        return None
    digits = stem[len("shard-") :]
    return int(digits) if digits.isdigit() else None


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, fsync it, rename it into place, fsync the folder."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def commit_bytes(path: Path, keys: tuple[str, ...], data: bytes) -> ShardInfo:
    """Make a serialized shard durable at ``path`` and describe it for the manifest."""
    write_durably(path, data)
    return ShardInfo(path.name, keys, len(data), hashlib.sha256(data).hexdigest())


@dataclass
class SafetensorsShardWriter:
    """Collects one shard's tensors, then writes them as one safetensors file on ``close``.

    Metadata (all safetensors metadata values are strings): ``cachebuild`` holds the format version,
    ``items`` a JSON object ``{key: meta}``; ``meta`` is whatever the pipeline records per item.

    Example:
        >>> with SafetensorsShardWriter(Path("cache/latents/shard-00000.safetensors"), {}) as w:
        ...     w.write("img001", {"latents": torch.zeros(4, 64, 64)}, {"bucket": [512, 512]})
    """

    path: Path
    header: dict  # shard-wide metadata, e.g. {"store": "latents", "scaling_factor": "0.13025"}
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    _items: dict[str, dict] = field(default_factory=dict)
    _nbytes: int = 0

    def write(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if key in self._items:
            raise ValueError(f"key {key!r} written twice to {self.path.name}")
        for name, t in tensors.items():
            self._tensors[f"{key}/{name}"] = own_storage(t)
            self._nbytes += t.numel() * t.element_size()
        self._items[key] = meta

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def close(self) -> ShardInfo:
        from safetensors.torch import save

        metadata = {k: str(v) for k, v in self.header.items()}
        metadata |= {"cachebuild": "1", "items": json.dumps(self._items, sort_keys=True)}
        info = commit_bytes(self.path, tuple(self._items), save(self._tensors, metadata=metadata))
        self._tensors.clear()
        return info

    def __enter__(self) -> SafetensorsShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()


def _hdf5_writer(path: Path, header: dict) -> ShardWriter:
    from cachebuild.cache.hdf5 import HDF5ShardWriter  # imported on use: h5py is the optional [hdf5] extra

    return HDF5ShardWriter(path, header)


WRITERS = {"safetensors": (".safetensors", SafetensorsShardWriter), "hdf5": (".h5", _hdf5_writer)}


def open_writer(fmt: str, folder: Path, index: int, header: dict) -> ShardWriter:
    suffix, cls = WRITERS[fmt]
    return cls(folder / shard_name(index, suffix), header)
