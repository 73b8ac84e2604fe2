"""BucketBatchSampler: one bucket per batch, coverage, rank disjointness, equal lengths, determinism."""

from __future__ import annotations

import random

import pytest

from cachebuild.consumers.sampler import BucketBatchSampler
from cachebuild.errors import ConfigError

SHAPES = [(512, 512), (640, 384), (384, 640), (448, 576)]


def make_buckets(n: int = 103, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [rng.choice(SHAPES) for _ in range(n)]


def epoch(buckets, world_size=1, **kw) -> list[list[list[int]]]:
    """Each rank's batches for one epoch."""
    return [list(BucketBatchSampler(buckets, rank=r, world_size=world_size, **kw)) for r in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_every_index_once_per_epoch_single_bucket_batches_disjoint_ranks(world_size, batch_size):
    buckets = make_buckets()
    ranks = epoch(buckets, world_size, batch_size=batch_size, seed=1)
    seen = [i for batches in ranks for b in batches for i in b]
    assert sorted(seen) == list(range(len(buckets)))  # once each, across ranks: disjoint and complete
    for batches in ranks:
        for b in batches:
            assert 1 <= len(b) <= batch_size and len({buckets[i] for i in b}) == 1
    counts = [len(b) for b in ranks]
    assert max(counts) - min(counts) <= 1
    for r, batches in enumerate(ranks):
        assert len(BucketBatchSampler(buckets, batch_size, seed=1, rank=r, world_size=world_size)) == len(batches)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_drop_last_gives_full_batches_and_the_same_count_on_every_rank(world_size):
    buckets = make_buckets()
    ranks = epoch(buckets, world_size, batch_size=4, seed=2, drop_last=True)
    assert len({len(b) for b in ranks}) == 1
    assert all(len(b) == 4 for batches in ranks for b in batches)
    seen = [i for batches in ranks for b in batches for i in b]
    assert len(seen) == len(set(seen))
    assert len(BucketBatchSampler(buckets, 4, seed=2, drop_last=True, world_size=world_size)) == len(ranks[0])


def test_order_is_a_function_of_seed_and_epoch():
    buckets = make_buckets()
    a = BucketBatchSampler(buckets, 4, seed=5)
    b = BucketBatchSampler(buckets, 4, seed=5)
    assert list(a) == list(b) and list(a) == list(a)  # same seed, same epoch: same order, every time
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(BucketBatchSampler(buckets, 4, seed=6)) != list(BucketBatchSampler(buckets, 4, seed=5))


def test_no_shuffle_is_bucket_then_index_order():
    buckets = [(64, 32), (32, 64), (64, 32), (64, 32), (32, 64)]
    assert list(BucketBatchSampler(buckets, 2, shuffle=False)) == [[1, 4], [0, 2], [3]]


def test_bad_arguments_name_the_fix():
    with pytest.raises(ConfigError, match="batch_size"):
        BucketBatchSampler([(1, 1)], 0)
    with pytest.raises(ConfigError, match="rank"):
        BucketBatchSampler([(1, 1)], 1, rank=2, world_size=2)
