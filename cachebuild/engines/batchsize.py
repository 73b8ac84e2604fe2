"""``--batch-size auto``: per bucket shape, the largest batch that fits the device-memory budget.

The search runs once per shape on the device that will encode it: a batch of zeros of that shape goes
through the encoder at doubling sizes until one does not fit (out of memory, or a peak over the budget),
then bisects between the last fit and the first miss. What it finds is remembered in the manifest (meta key
``auto_batch:<store>``), keyed by device name, compute dtype and shape, so the next run skips the search
when its budget is within ``BUDGET_TOLERANCE`` of the one searched with. The out-of-memory split of
``encode.GuardedForward`` stays the safety net for what the search could not see (fragmentation, a larger
neighbour on a shared card).

The batch size never changes the tensors (promise 6); it only decides speed and device memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

AUTO_BATCH_MAX = 64  # largest batch the search tries: past it a GPU gains little throughput, while host
# memory per batch (decoded pixels, outputs in flight) keeps growing
CPU_AUTO_BATCH = 4  # auto on a CPU (or MPS) device: a CPU gains nothing from larger batches, and 4 keeps
# host memory small
VRAM_MARGIN_SHARE = 0.10  # default --vram-budget: free device memory at start less this share of the card's
VRAM_MARGIN_MIN_BYTES = 1 << 30  # memory, and at least 1 GiB: room for the CUDA context's growth, the next
# batch's pixels staged while one encodes, outputs on their way to the host, and allocator fragmentation
BUDGET_TOLERANCE = 0.10  # a remembered size is reused while the budget is within 10% of the one searched with


def search_batch_size(fits: Callable[[int], bool], limit: int = AUTO_BATCH_MAX) -> int:
    """The largest ``n <= limit`` with ``fits(n)``, for a ``fits`` that holds up to some size and fails past
    it: doubling from 1, then bisection between the last fit and the first miss. 1 when nothing fits (the
    guard then fails the images that do not fit alone, with their reason).

    Example:
        >>> search_batch_size(lambda n: 2 + 3 * n <= 40)  # model 2 GB, 3 GB an image, 40 GB budget
        12
    """
    good, n = 0, 1
    while n <= limit and fits(n):
        good, n = n, n * 2
    bad = min(n, limit + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return max(good, 1)


def default_budget(free: int, total: int) -> int:
    """The default --vram-budget in bytes: free memory at start less the margin (see VRAM_MARGIN_SHARE)."""
    return max(0, free - max(VRAM_MARGIN_MIN_BYTES, int(VRAM_MARGIN_SHARE * total)))


class BatchSizer:
    """The batch size for each bucket shape: fixed, or searched once with ``peak`` and remembered.

    ``peak(n, bucket)`` encodes ``n`` images of ``bucket`` (W, H) and returns the peak device bytes, or None
    when it ran out of memory. ``known`` is what earlier runs found (the manifest meta), ``remember(key,
    value)`` records a new finding.
    """

    def __init__(
        self,
        fixed: int | None,
        *,
        label: str = "",
        budget: int | None = None,
        peak: Callable[[int, tuple[int, int]], int | None] | None = None,
        known: dict | None = None,
        remember: Callable[[str, dict], None] | None = None,
    ):
        self.fixed, self.label, self.budget, self.peak = fixed, label, budget, peak
        self.known = dict(known or {})
        self.remember = remember
        self.searches = 0  # shapes searched in this run

    def size(self, bucket: tuple[int, int]) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.peak is None or self.budget is None:
            return CPU_AUTO_BATCH
        key = f"{self.label}|{'x'.join(map(str, bucket))}"  # (W, H), or (W, H, F) for clips
        found = self.known.get(key)
        if found and abs(found["budget"] - self.budget) <= BUDGET_TOLERANCE * found["budget"]:
            return int(found["batch"])
        n = self._search(bucket)
        self.known[key] = {"batch": n, "budget": self.budget}
        if self.remember is not None:
            self.remember(key, self.known[key])
        return n

    def _search(self, bucket: tuple[int, int]) -> int:
        def fits(n: int) -> bool:
            peak = self.peak(n, bucket)
            return peak is not None and peak <= self.budget

        self.searches += 1
        n = search_batch_size(fits)
        shape = "x".join(map(str, bucket))
        log.info("batch size for %s on %s: %d (budget %.1f GiB)", shape, self.label, n, self.budget / 2**30)
        return n


def rechunk(items: list, size: int) -> list[list]:
    """``items`` in consecutive batches of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]
