"""What only a GPU shows of the engines: the overlapped loop's tensors, --batch-size auto found and
remembered, device memory back to nothing after a run, two GPUs. Skipped without CUDA (see conftest)."""

from __future__ import annotations

import pytest
import torch

from cachebuild.cache.manifest import Manifest
from cachebuild.config import BucketConfig, LatentsMode
from cachebuild.jobs.latents import build_latents
from tests.conftest import write_image
from tests.test_pipeline import make_cfg, read_cache

pytestmark = pytest.mark.gpu

SHAPES = [(512, 512), (640, 384), (384, 640)]
BUCKETS = BucketConfig(resolution=(512, 512), min_reso=256, max_reso=1024, steps=64)


def _dataset(root, n: int):
    for i in range(n):
        write_image(root / f"im{i:03d}.png", SHAPES[i % 3], seed=i)
    return root


def _close(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        for name in a[key]:
            torch.testing.assert_close(a[key][name].float(), b[key][name].float(), rtol=1e-3, atol=1e-3)


def test_overlapped_loop_matches_the_cpu_and_leaves_nothing_on_the_device(tmp_path, medium_vae):
    ds = _dataset(tmp_path / "ds", 12)
    kw = dict(buckets=BUCKETS, latents=LatentsMode.MEAN, flip=True, batch_size=4)
    build_latents(make_cfg(ds, tmp_path / "cpu", medium_vae, **kw))
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    summary = build_latents(make_cfg(ds, tmp_path / "gpu", medium_vae, device="cuda", **kw))
    assert summary.done == 12
    _close(read_cache(tmp_path / "gpu"), read_cache(tmp_path / "cpu"))
    assert torch.cuda.memory_allocated() - start < 1 << 20  # the 53 MiB model is gone


def test_auto_batch_size_is_found_per_shape_remembered_and_reused(tmp_path, tiny_vae, monkeypatch):
    ds = _dataset(tmp_path / "ds", 12)
    cfg = make_cfg(ds, tmp_path / "c", tiny_vae, device="cuda", buckets=BUCKETS, batch_size=None, vram_budget_gb=2)
    summary = build_latents(cfg)
    assert summary.done == 12
    assert summary.oom_splits == 0  # the sizes found fit: the split is the safety net, not the sizing
    with Manifest.open(cfg.out, create=False) as m:
        found = m.get_meta("auto_batch:latents")
    assert {k.rsplit("|", 1)[1] for k in found} == {f"{w}x{h}" for w, h in SHAPES}
    assert all(v["batch"] >= 1 and v["budget"] == 2 * 2**30 for v in found.values())
    from cachebuild.engines import batchsize

    monkeypatch.setattr(batchsize, "search_batch_size", lambda *a, **k: pytest.fail("searched again"))
    again = make_cfg(ds, tmp_path / "c2", tiny_vae, device="cuda", buckets=BUCKETS, batch_size=None, vram_budget_gb=2)
    with Manifest.open(again.out) as m:  # another cache, the same device: carry the found sizes over
        m.set_meta("auto_batch:latents", found)
    assert build_latents(again).done == 12


def test_a_small_budget_gives_smaller_batches(tmp_path, tiny_vae):
    ds = _dataset(tmp_path / "ds", 3)
    sizes = []
    base = torch.cuda.memory_allocated()
    for gb, out in ((0.05 + base / 2**30, "small"), (8, "large")):
        cfg = make_cfg(ds, tmp_path / out, tiny_vae, device="cuda", buckets=BUCKETS, batch_size=None, vram_budget_gb=gb)
        build_latents(cfg)
        with Manifest.open(cfg.out, create=False) as m:
            sizes.append(max(v["batch"] for v in m.get_meta("auto_batch:latents").values()))
    assert sizes[0] < sizes[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_give_the_tensors_of_one(tmp_path, tiny_vae):
    ds = _dataset(tmp_path / "ds", 12)
    kw = dict(buckets=BUCKETS, latents=LatentsMode.MEAN, batch_size=2)
    build_latents(make_cfg(ds, tmp_path / "one", tiny_vae, device="cuda:0", **kw))
    two = build_latents(make_cfg(ds, tmp_path / "two", tiny_vae, device=None, devices=("cuda:0", "cuda:1"), **kw))
    assert two.done == 12
    _close(read_cache(tmp_path / "two"), read_cache(tmp_path / "one"))
