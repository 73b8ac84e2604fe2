"""engines.local: batches are read lazily, a bounded number ahead of the per-batch function."""

from __future__ import annotations

import pytest

from cachebuild.config import BucketConfig, CropMode
from cachebuild.engines.local import LocalEngine
from cachebuild.images import load
from cachebuild.images.plan import BucketPlan, plan_item
from tests.conftest import write_image

MAX_PIXELS = 178_956_970


@pytest.mark.parametrize("workers", [0, 1])
def test_run_reads_a_generator_of_batches_a_bounded_number_ahead(tmp_path, workers):
    plan = BucketPlan(BucketConfig(resolution=(64, 64), min_reso=32, max_reso=128, steps=32))
    items = []
    for i in range(10):
        path = write_image(tmp_path / f"img{i:02d}.png", (64, 64), seed=i)
        items.append(plan_item(plan, path.stem, str(path), (64, 64), CropMode.CENTER, 0))
    pulled, ahead = [], []

    def batches():  # what a planner that works chunk by chunk hands the engine
        for item in items:
            pulled.append(item.key)
            yield [item]

    def on_batch(loaded: load.LoadedBatch) -> None:
        done = len(ahead) + 1
        ahead.append(len(pulled) - done)  # batches taken from the generator but not yet handed on

    LocalEngine(workers, MAX_PIXELS).run(batches(), on_batch)
    assert len(ahead) == 10
    assert max(ahead) <= workers + load.PREFETCH_BATCHES  # never the whole input
