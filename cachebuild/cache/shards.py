"""Shards: the writers (safetensors here, HDF5 in ``hdf5``) and ``ShardFile``, the one reader of both.

A shard is built in memory, written to a temporary name, flushed, fsynced and renamed (``files``); only then
does the caller commit it to the manifest.

Writers share one small interface (``write``, ``close``, context manager) so that the safetensors and
HDF5 backends are interchangeable. Tensor names inside a shard are ``<key>/<name>`` (``sub/img001/latents``),
and each shard's metadata describes its items so a shard is readable without the manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cachebuild.cache.files import ShardInfo, commit_bytes, own_storage, shard_name
from cachebuild.errors import CacheError

if TYPE_CHECKING:
    import torch


class ShardWriter(Protocol):
    """The interface every backend implements."""

    def write(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...

    def close(self) -> ShardInfo: ...

    @property
    def nbytes(self) -> int: ...


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


class ShardFile:
    """One shard file opened for reading by full tensor name ``<entry>/<name>``: safetensors (memory-mapped)
    or HDF5. A context manager; the reader keeps them open, ``verify`` opens one at a time."""

    def __init__(self, path: Path, handle, hdf5: bool):
        self.path, self.handle, self.hdf5 = path, handle, hdf5
        self._names: set[str] | None = None

    @classmethod
    def open(cls, path: Path) -> ShardFile:
        if not path.is_file():
            raise CacheError(f"the file {path} is missing")
        if path.suffix == ".h5":
            from cachebuild.cache.hdf5 import require_h5py

            return cls(path, require_h5py().File(path, "r"), True)
        from safetensors import safe_open

        return cls(path, safe_open(str(path), framework="pt"), False)  # memory-mapped

    def has(self, name: str) -> bool:
        if self.hdf5:
            return name in self.handle and hasattr(self.handle[name], "shape")
        if self._names is None:
            self._names = set(self.handle.keys())  # noqa: SIM118 (safe_open is not a dict)
        return name in self._names

    def get(self, name: str) -> torch.Tensor:
        if self.hdf5:
            from cachebuild.cache.hdf5 import read_tensor

            return read_tensor(self.handle[name])
        return self.handle.get_tensor(name)

    def read(self, entry: str, names: list[str]) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` for ``<entry>/<name>``; a missing one is a damaged cache, named as such."""
        from safetensors import SafetensorError

        try:
            return {n: self.get(f"{entry}/{n}") for n in names}
        except (KeyError, SafetensorError) as exc:
            raise CacheError(f"it does not hold {entry}/{names[0]} as the manifest says ({exc})") from exc

    def describe(self) -> tuple[dict[str, str], dict[str, dict]]:
        """(shard header, ``{entry: item metadata}``), read from the file alone, without the manifest."""
        if self.hdf5:
            from cachebuild.cache.hdf5 import read_items

            header = {k: str(v) for k, v in self.handle.attrs.items()}
            return header, read_items(self.path)
        header = dict(self.handle.metadata() or {})
        return header, json.loads(header.pop("items", "{}"))

    def close(self) -> None:
        if self.hdf5:
            self.handle.close()

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, *_) -> None:
        self.close()
