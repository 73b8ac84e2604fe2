"""A batch sampler whose every batch holds one bucket shape, for single-process and distributed training."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from cachebuild.errors import ConfigError


class BucketBatchSampler(torch.utils.data.Sampler):
    """Bucket-homogeneous batches of dataset indices, the same on every rank given the same seed and epoch.

    Each epoch: the indices of every bucket are shuffled and cut into batches; the batches of all buckets are
    shuffled together and dealt to ranks in turn (batch ``i`` goes to rank ``i % world_size``). So every
    index appears exactly once per epoch across all ranks, the ranks' sets are disjoint, and the order is a
    function of ``seed`` and the epoch alone (call :meth:`set_epoch` each epoch, as with DistributedSampler).

    With ``drop_last=False`` every index is used, each bucket's last batch may be short, and ranks may differ
    by one batch (wrap the loop in DDP's ``join()``). With ``drop_last=True`` only full batches are used and
    all ranks get the same number of them, which plain DDP needs.

    Example:
        >>> sampler = BucketBatchSampler([(512, 512), (512, 768), (512, 512)], batch_size=2, seed=0)
        >>> list(sampler)
        [[0, 2], [1]]
    """

    def __init__(
        self,
        buckets: Sequence[tuple[int, int]],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size); got rank {rank}, world_size {world_size}")
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(buckets):
            groups.setdefault(tuple(b), []).append(i)
        self._groups = [np.asarray(groups[b], dtype=np.int64) for b in sorted(groups)]

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose order the next iteration yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._epoch_batches()[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = self._batch_count()
        if self.drop_last:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def _batch_count(self) -> int:
        if self.drop_last:
            return sum(len(g) // self.batch_size for g in self._groups)
        return sum(-(-len(g) // self.batch_size) for g in self._groups)

    def _epoch_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        batches: list[list[int]] = []
        for group in self._groups:
            order = rng.permutation(group) if rng is not None else group
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch.tolist())
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.drop_last:  # the same number of batches on every rank
            batches = batches[: len(batches) - len(batches) % self.world_size]
        return batches
