"""HDF5 shards: the same writer interface, schema and durability protocol as the safetensors shards.

Layout of one ``shard-NNNNN.h5`` file (see docs/format.md):

* ``<key>/<name>`` datasets, one per tensor, exactly the safetensors tensor names (``sub/img001/latents``);
  HDF5 turns the ``/`` into groups, so ``sub/img001`` is a group holding ``latents``.
* The item's metadata as attributes of its ``<key>`` group, plus ``cachebuild_item = True`` marking the group
  as an item (keys may contain folders, so not every group is an item).
* The shard header and ``cachebuild`` (format version) as attributes of the root group.
* Each dataset's ``dtype`` attribute names the stored torch dtype. HDF5 has no bfloat16, so bf16 tensors are
  stored as their raw 16-bit patterns (uint16) with ``dtype = "bf16"``; :func:`read_tensor` undoes it.

The file is built in memory, then written like a safetensors shard: temporary name, flush, fsync, rename.
h5py is optional (the ``[hdf5]`` extra); every entry point here says how to install it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cachebuild.cache.files import ShardInfo, commit_bytes, own_storage
from cachebuild.errors import ConfigError

INSTALL_HINT = "install it with: pip install 'cachebuild[hdf5]'"
ITEM_MARK = "cachebuild_item"  # group attribute that marks an item group
FORMAT_VERSION = "1"

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TORCH_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def require_h5py():
    """The h5py module, or a ConfigError that says how to install it."""
    try:
        import h5py
    except ImportError:
        raise ConfigError(f"--format hdf5 needs the h5py package; {INSTALL_HINT}") from None
    return h5py


@dataclass
class HDF5ShardWriter:
    """Collects one shard's tensors, then writes them as one HDF5 file on ``close``.

    Example:
        >>> with HDF5ShardWriter(Path("cache/latents/shard-00000.h5"), {"store": "latents"}) as w:
        ...     w.write("sub/img001", {"latents": torch.zeros(4, 64, 64)}, {"bucket": [512, 512]})
    """

    path: Path
    header: dict  # shard-wide metadata, stored as root attributes
    _tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    _items: dict[str, dict] = field(default_factory=dict)
    _groups: set[str] = field(default_factory=set)  # every HDF5 group path the entries so far need
    _datasets: set[str] = field(default_factory=set)
    _nbytes: int = 0

    def __post_init__(self) -> None:
        require_h5py()  # fail at the first shard, before anything is encoded into it

    def write(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if key in self._items:
            raise ValueError(f"key {key!r} written twice to {self.path.name}")
        self._claim_paths(key, tensors)
        self._tensors[key] = {name: own_storage(t.detach().cpu()) for name, t in tensors.items()}
        self._nbytes += sum(t.numel() * t.element_size() for t in tensors.values())
        self._items[key] = meta

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def close(self) -> ShardInfo:
        h5py = require_h5py()
        buf = io.BytesIO()
        with h5py.File(buf, "w") as f:
            for k, v in self.header.items():
                f.attrs[k] = str(v)  # strings, as in safetensors metadata, so readers parse both alike
            f.attrs["cachebuild"] = FORMAT_VERSION
            for key, tensors in self._tensors.items():
                group = f.require_group(key)
                group.attrs[ITEM_MARK] = True
                for name, value in self._items[key].items():
                    group.attrs[name] = _to_attr(value)
                for name, t in tensors.items():
                    ds = group.create_dataset(name, data=_to_numpy(t), track_times=False)
                    ds.attrs["dtype"] = _DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch."))
        info = commit_bytes(self.path, tuple(self._items), buf.getvalue())
        self._tensors.clear()
        return info

    def __enter__(self) -> HDF5ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()

    def _claim_paths(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """HDF5 cannot hold a dataset and a group at one path: refuse key ``a/latents`` beside key ``a``."""
        parts = key.split("/")
        groups = {"/".join(parts[: i + 1]) for i in range(len(parts))}
        datasets = {f"{key}/{name}" for name in tensors}
        clash = (groups & self._datasets) | (datasets & (self._groups | self._datasets))
        if clash:
            raise ConfigError(
                f"item {key!r} cannot share an HDF5 shard with the item that uses {sorted(clash)[0]!r}: HDF5 "
                "holds a group or a dataset at a path, not both; rename one of the two source files or use "
                "--format safetensors"
            )
        self._groups |= groups
        self._datasets |= datasets


def read_tensor(dataset) -> torch.Tensor:
    """A torch tensor from one shard dataset, bf16 restored from its 16-bit patterns."""
    array = dataset[()]
    if dataset.attrs.get("dtype") == "bf16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def read_items(path: Path) -> dict[str, dict]:
    """``{key: meta}`` for every item in an HDF5 shard, read from the file alone (no manifest).

    Example:
        >>> read_items(Path("cache/latents/shard-00000.h5"))["sub/img001"]["bucket"]
        [512, 512]
    """
    h5py = require_h5py()
    items: dict[str, dict] = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and obj.attrs.get(ITEM_MARK, False):
            items[name] = {k: _from_attr(v) for k, v in obj.attrs.items() if k != ITEM_MARK}

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return items


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)  # HDF5 has no bfloat16: keep the bit patterns
    return t.numpy()


def _to_attr(value):
    """Plain numbers, strings, bools and lists of numbers as native attributes; anything else as JSON text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return np.asarray(value)
    return "json:" + json.dumps(value, sort_keys=True)


def _from_attr(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[len("json:") :])
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
