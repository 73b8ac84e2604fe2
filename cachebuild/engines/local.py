"""The local engine: decode in worker processes of this machine, encode on one device in this process.

An engine decides *where* a job's stages run; the stages themselves are the job's. The job hands the engine
its batches (in order; any iterable, read lazily) and one function that encodes and stores a decoded batch;
the engine decodes the batches a bounded number ahead (``images.load.iter_batches``: ``workers +
PREFETCH_BATCHES`` in flight) and calls the function once per batch, in order, in this process, so the
manifest keeps exactly one writer.
A decode worker that dies (OOM killer, codec crash) costs at most its batch: the pool is restarted and
only a file that kills its decoder again fails, as a failed item; the workers die with this process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cachebuild.images.load import LoadedBatch, iter_batches
from cachebuild.images.plan import ItemPlan

BatchFn = Callable[[LoadedBatch], None]  # encode one decoded batch and hand its outputs to the store


@dataclass(frozen=True)
class LocalEngine:
    """One device, decode workers on this machine.

    Example:
        >>> LocalEngine(workers=2, max_pixels=178_956_970).run(batches, encode_and_store)
    """

    workers: int  # decode processes; 0 decodes in this process
    max_pixels: int  # decompression-bomb limit handed to the decoder

    def run(self, batches: Iterable[list[ItemPlan]], on_batch: BatchFn) -> None:
        """Decode ``batches`` and call ``on_batch`` with each, in order.

        ``batches`` is consumed lazily, a bounded number ahead of ``on_batch`` (a generator that plans as it
        goes keeps planning memory bounded too); it is iterated in this process, so it may use the manifest.
        """
        for loaded in iter_batches(batches, self.workers, self.max_pixels):
            on_batch(loaded)
