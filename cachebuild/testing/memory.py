"""Counting the tensor memory a piece of torch code holds at its peak, on any device, without a GPU.

``PeakBytes`` is a dispatch mode: every tensor an operator returns inside it is counted until its storage is
freed, and the high-water mark is kept. Under ``FakeTensorMode`` nothing is computed, so a real-width video VAE can
be traced at 720p and 81 frames in seconds on a laptop (``benchmarks/bench_video_memory.py --cpu``). What it does
not see, a CUDA device adds: the allocator's rounding and cached blocks, cuDNN workspaces, and kernels that need
less than their decomposition (flash attention never builds the L x L scores; ``sdpa_outputs_only`` stands in).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class PeakBytes(TorchDispatchMode):
    """Storage bytes created inside the mode that are alive, now and at the peak.

    Example:
        >>> with PeakBytes() as m:
        ...     y = torch.zeros(1024) * 2
        >>> m.peak
        8192
    """

    def __init__(self, *external: torch.Tensor):
        super().__init__()
        self._seen = WeakIdKeyDictionary()  # storage -> counted bytes (0: made outside, never counted)
        self._refs: list = []  # weakrefs whose callbacks take a storage's bytes off when it is freed
        self.now = 0
        self.peak = 0
        for t in external:  # weights and inputs: counted by the caller, also when an operator views them
            self._seen[t.untyped_storage()] = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._count(t.untyped_storage())
        return out

    def _count(self, storage) -> None:
        if storage in self._seen:
            return
        n = storage.nbytes()
        self._seen[storage] = n
        self.now += n
        self.peak = max(self.peak, self.now)
        self._refs.append(weakref.ref(storage, lambda _ref, n=n: self._free(n)))

    def _free(self, n: int) -> None:
        self.now -= n


@contextlib.contextmanager
def sdpa_outputs_only():
    """``scaled_dot_product_attention`` allocating only its output, as CUDA's flash and memory-efficient kernels do
    (the values are left empty: for counting memory under fake tensors, never for results)."""
    fn = torch.nn.functional

    def outputs_only(q, k, v, *args, **kwargs):
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    saved = fn.scaled_dot_product_attention
    fn.scaled_dot_product_attention = outputs_only
    try:
        yield
    finally:
        fn.scaled_dot_product_attention = saved
