"""Models kept loaded between runs, for a caller that runs many small builds in a row as files arrive.

A job loads a model when it has work and frees it when the run ends: right for one build, wasteful for a
process that builds every few seconds as files arrive. A ``ModelKeeper`` made current with :func:`keeping`
holds what the jobs load (``get``) until it goes idle or its memory budget is full, then lets it go; outside
such a block nothing is kept and the jobs behave exactly as before. The keeper imports nothing of the package:
its owner says how a model's memory is counted and how the device is cleaned after a release.

Example:
    >>> keeper = ModelKeeper(budget_bytes=8 * 2**30, free=free_device_memory)
    >>> with keeping(keeper):
    ...     build_textenc(cfg)          # its encoders stay loaded
    >>> keeper.release_idle(300.0)     # later: gone if unused for five minutes
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_CURRENT: ContextVar[ModelKeeper | None] = ContextVar("cachebuild_model_keeper", default=None)


@dataclass
class _Kept:
    model: Any
    nbytes: int  # what it holds in memory, counted when it was loaded
    device: Any  # the device it lives on, handed to ``free`` after a release
    used: float  # time.monotonic() of its last ``get``


class ModelKeeper:
    """Loaded models by key, least recently used first out.

    Args:
        budget_bytes: memory the kept models may hold together (counted by ``nbytes``). Loading one past it
            releases the least recently used others first; one model larger than the budget is still loaded
            and kept alone.
        free: called with a device after models on it were released (gives cached memory back).
        nbytes: a model's memory in bytes; by default the sum of its ``parameters()`` (or its ``vae``'s or
            ``model``'s), 0 for an object with none.
    """

    def __init__(
        self,
        budget_bytes: int,
        free: Callable[[Any], None] = lambda device: None,
        nbytes: Callable[[Any], int] | None = None,
    ):
        self.budget_bytes = budget_bytes
        self._free, self._nbytes = free, nbytes or model_bytes
        self._kept: OrderedDict[Hashable, _Kept] = OrderedDict()
        self.loads = 0  # models loaded through the keeper (a test counts them)

    def get(self, key: Hashable, load: Callable[[], Any], device: Any = None) -> Any:
        """The model kept under ``key``, or ``load()`` kept under it now."""
        kept = self._kept.get(key)
        if kept is None:
            model = load()
            self.loads += 1
            kept = _Kept(model, self._nbytes(model), device, 0.0)
            self._make_room(kept.nbytes)
            self._kept[key] = kept
        kept.used = time.monotonic()
        self._kept.move_to_end(key)
        return kept.model

    @property
    def held_bytes(self) -> int:
        return sum(k.nbytes for k in self._kept.values())

    def __len__(self) -> int:
        return len(self._kept)

    def release_idle(self, idle_seconds: float) -> int:
        """Release every model unused for ``idle_seconds``; returns how many went."""
        now = time.monotonic()
        return self._release([key for key, k in self._kept.items() if now - k.used >= idle_seconds])

    def release_all(self) -> int:
        return self._release(list(self._kept))

    def _make_room(self, incoming: int) -> None:
        while self._kept and self.held_bytes + incoming > self.budget_bytes:
            self._release([next(iter(self._kept))])

    def _release(self, keys: list) -> int:
        devices = []
        for key in keys:
            kept = self._kept.pop(key)
            devices.append(kept.device)
            log.info("released a kept model (%.1f MiB)", kept.nbytes / 2**20)
            del kept
        for device in {str(d): d for d in devices if d is not None}.values():
            self._free(device)
        return len(keys)


def current() -> ModelKeeper | None:
    """The keeper made current by :func:`keeping`, or None (then nothing is kept)."""
    return _CURRENT.get()


@contextlib.contextmanager
def keeping(keeper: ModelKeeper | None) -> Iterator[ModelKeeper | None]:
    """Make ``keeper`` current inside the block (None: nothing kept, as outside any block)."""
    token = _CURRENT.set(keeper)
    try:
        yield keeper
    finally:
        _CURRENT.reset(token)


def model_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers (of the module inside a wrapper such as ``VaeEncoder``)."""
    for name in ("vae", "model"):
        inner = getattr(model, name, None)
        if inner is not None and hasattr(inner, "parameters"):
            model = inner
            break
    if not hasattr(model, "parameters"):
        return 0
    tensors = list(model.parameters()) + list(getattr(model, "buffers", list)())
    return sum(t.numel() * t.element_size() for t in tensors)
