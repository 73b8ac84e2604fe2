"""engines.batchsize: the auto batch-size search against a fake device-memory model."""

from __future__ import annotations

import pytest

from cachebuild.engines.batchsize import (
    AUTO_BATCH_MAX,
    CPU_AUTO_BATCH,
    VRAM_MARGIN_MIN_BYTES,
    BatchSizer,
    default_budget,
    rechunk,
    search_batch_size,
)

GIB = 2**30


class FakeCard:
    """Peak bytes = model + n * per-image for a shape; past the card's memory the encode runs out of memory."""

    def __init__(self, total: int, model: int, per_pixel: float):
        self.total, self.model, self.per_pixel = total, model, per_pixel
        self.calls: list[tuple[int, tuple[int, int]]] = []

    def peak(self, n: int, bucket: tuple[int, int]) -> int | None:
        self.calls.append((n, bucket))
        need = self.model + int(n * bucket[0] * bucket[1] * self.per_pixel)
        return None if need > self.total else need


@pytest.mark.parametrize("cap", [0, 1, 2, 3, 5, 12, 31, 32, 33, 63, 64, 100])
def test_search_finds_the_largest_batch_that_fits(cap):
    assert search_batch_size(lambda n: n <= cap) == max(1, min(cap, AUTO_BATCH_MAX))


def test_search_tries_few_sizes():
    tried = []
    search_batch_size(lambda n: tried.append(n) or n <= 37)
    assert len(tried) <= 2 * AUTO_BATCH_MAX.bit_length()


def test_sizer_fits_the_budget_per_shape_and_searches_each_shape_once():
    card = FakeCard(total=24 * GIB, model=2 * GIB, per_pixel=1500.0)
    remembered = {}
    sizer = BatchSizer(None, label="card|bf16", budget=20 * GIB, peak=card.peak, remember=remembered.__setitem__)
    small, large = sizer.size((512, 512)), sizer.size((1024, 1024))
    assert card.model + small * 512 * 512 * 1500 <= 20 * GIB < card.model + (small + 1) * 512 * 512 * 1500
    assert card.model + large * 1024 * 1024 * 1500 <= 20 * GIB < card.model + (large + 1) * 1024 * 1024 * 1500
    calls = len(card.calls)
    assert sizer.size((512, 512)) == small and len(card.calls) == calls  # remembered within the run
    assert remembered == {
        "card|bf16|512x512": {"batch": small, "budget": 20 * GIB},
        "card|bf16|1024x1024": {"batch": large, "budget": 20 * GIB},
    }


def test_sizer_reuses_what_an_earlier_run_found_only_for_a_similar_budget():
    card = FakeCard(total=24 * GIB, model=2 * GIB, per_pixel=1500.0)
    known = {"card|bf16|512x512": {"batch": 7, "budget": 20 * GIB}}
    same = BatchSizer(None, label="card|bf16", budget=21 * GIB, peak=card.peak, known=known)
    assert same.size((512, 512)) == 7 and not card.calls
    smaller = BatchSizer(None, label="card|bf16", budget=8 * GIB, peak=card.peak, known=known)
    assert smaller.size((512, 512)) != 7 and card.calls


def test_an_image_that_does_not_fit_alone_gets_batch_one():
    card = FakeCard(total=4 * GIB, model=3 * GIB, per_pixel=5000.0)
    assert BatchSizer(None, label="x", budget=4 * GIB, peak=card.peak).size((1024, 1024)) == 1


def test_fixed_and_cpu_sizes():
    assert BatchSizer(6).size((64, 64)) == 6
    assert BatchSizer(None).size((64, 64)) == CPU_AUTO_BATCH  # no memory to measure: a fixed size


def test_default_budget_leaves_the_margin():
    assert default_budget(20 * GIB, 24 * GIB) == 20 * GIB - int(0.1 * 24 * GIB)
    assert default_budget(4 * GIB, 6 * GIB) == 3 * GIB  # at least VRAM_MARGIN_MIN_BYTES
    assert default_budget(VRAM_MARGIN_MIN_BYTES // 2, 6 * GIB) == 0


def test_rechunk():
    assert rechunk(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
