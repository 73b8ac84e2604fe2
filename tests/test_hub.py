"""Real weights from the hub (opt-in: CACHEBUILD_HUB_TESTS=1 and network; skipped otherwise)."""

from __future__ import annotations

import pytest

from cachebuild.config import BucketConfig, ModelSpec
from cachebuild.jobs.latents import build_latents
from tests.conftest import write_image
from tests.test_pipeline import make_cfg, read_cache

pytestmark = pytest.mark.hub


def test_sdxl_vae_from_the_hub(tmp_path):
    ds = tmp_path / "ds"
    write_image(ds / "a.png", (1024, 1024))
    cfg = make_cfg(
        ds, tmp_path / "c", tmp_path, model=ModelSpec(model="sdxl"), buckets=BucketConfig(resolution=(1024, 1024))
    )
    summary = build_latents(cfg)
    assert summary.done == 1
    z = read_cache(tmp_path / "c")["a"]["latents"]
    assert z.shape == (4, 128, 128)
