"""The reading API: records, the open path, moments sampling, the dataset and DataLoader workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from cachebuild import open_cache
from cachebuild.cache.manifest import Manifest
from cachebuild.config import BucketConfig, LatentsMode
from cachebuild.consumers import handles
from cachebuild.errors import CacheError
from cachebuild.jobs.latents import build_latents
from cachebuild.testing import make_synthetic_manifest
from tests.conftest import write_image
from tests.test_pipeline import make_cfg, read_cache

SMALL_BUCKETS = BucketConfig(resolution=(64, 64), min_reso=32, max_reso=128, steps=32)  # fast CPU encodes
SMALL_SIZES = [(80, 48), (48, 80), (64, 64), (100, 60), (70, 70), (45, 75)]


def small_dataset(root: Path, n: int = len(SMALL_SIZES)) -> Path:
    """Small images of mixed aspect ratios, one in a subfolder; buckets 64x32, 32x64 and 64x64 at most."""
    for i, size in enumerate(SMALL_SIZES[:n]):
        sub = "sub/" if i == 1 else ""
        write_image(root / f"{sub}im{i}{'.png' if i % 2 else '.jpg'}", size, seed=i)
    return root


def small_cfg(dataset: Path, out: Path, vae: Path, **kw):
    return make_cfg(dataset, out, vae, **({"buckets": SMALL_BUCKETS} | kw))


@pytest.fixture(scope="module")
def flip_cache(tmp_path_factory, tiny_vae) -> Path:
    root = tmp_path_factory.mktemp("reader")
    out = root / "cache"
    build_latents(small_cfg(small_dataset(root / "ds"), out, tiny_vae, flip=True, shard_mb=0.01))
    return out


def test_records_hold_the_stored_tensors_and_geometry(flip_cache):
    cache = open_cache(flip_cache)
    stored = read_cache(flip_cache)
    with Manifest.open(flip_cache, create=False) as m:
        rows = {r.key: r for r in m.items("latents", "done")}
    assert cache.keys() == sorted(stored) == sorted(rows) and len(cache) == 6
    assert "sub/im1" in cache and "nope" not in cache
    for key in cache:
        rec = cache[key]
        info = rows[key].info
        assert rec["key"] == key
        assert rec["original_size"] == tuple(info["original_size"]) and rec["bucket"] == tuple(info["bucket"])
        assert rec["crop"] == tuple(info["crop"]) and rec["flip"] is True
        assert torch.equal(rec["latents"], stored[key]["latents"])
        assert torch.equal(rec["latents_flipped"], stored[key]["latents_flipped"])
        w, h = rec["bucket"]
        assert rec["latents"].shape == (4, h // 2, w // 2)
    assert cache.scaling_factor == pytest.approx(0.13025) and cache.shift_factor == 0.0


def test_unknown_key_and_missing_cache_say_what_to_do(flip_cache, tmp_path):
    with pytest.raises(KeyError, match="cachebuild status"):
        open_cache(flip_cache)["nope"]
    with pytest.raises(CacheError, match="not a cachebuild cache"):
        open_cache(tmp_path)
    Manifest.open(tmp_path).close()  # a manifest with no latents in it
    with pytest.raises(CacheError, match="cachebuild latents"):
        open_cache(tmp_path)


def test_a_missing_shard_file_names_verify_and_repair(flip_cache, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(flip_cache, copy)
    cache = open_cache(copy)
    (copy / "latents" / cache.shard_of("im0")).unlink()
    with pytest.raises(CacheError, match="--repair"):
        cache["im0"]


def test_a_100k_item_cache_opens_from_the_index_without_touching_a_shard(tmp_path, monkeypatch):
    make_synthetic_manifest(tmp_path, 100_000)  # benchmarks/bench_open.py times the same open

    def no_shard(*_a, **_k):
        raise AssertionError("opening the cache must not open a shard")

    monkeypatch.setattr(handles.ShardFile, "open", no_shard)
    cache = open_cache(tmp_path)
    sampler = cache.bucket_sampler(batch_size=8)
    assert len(cache) == 100_000 and cache.bucket("d000/img000001") == (1216, 832)
    assert cache.scaling_factor == pytest.approx(0.3611) and cache.shift_factor == pytest.approx(0.1159)
    assert len(sampler) == sum(-(-33_334 // 8) if i == 0 else -(-33_333 // 8) for i in range(3))


def test_dataset_scales_and_collates(flip_cache):
    cache = open_cache(flip_cache)
    raw, scaled = cache.dataset(), cache.dataset(scale=True)
    assert len(raw) == len(cache)
    rec, rec_scaled = raw[2], scaled[2]
    assert rec["key"] == cache.keys()[2] and rec["latents"].dtype == torch.float32
    expected = (rec["latents"] - cache.shift_factor) * cache.scaling_factor  # raw -> scaled
    torch.testing.assert_close(rec_scaled["latents"], expected)
    torch.testing.assert_close(rec_scaled["latents_flipped"], (rec["latents_flipped"] - 0.0) * 0.13025)
    assert rec["original_size"].dtype == torch.long and rec["bucket"].tolist() == list(cache.bucket(rec["key"]))


def test_dataloader_with_workers_yields_every_key_once_in_one_shape_per_batch(flip_cache):
    cache = open_cache(flip_cache)
    cache["im0"]  # a handle opened in the parent before the workers fork
    sampler = cache.bucket_sampler(batch_size=2, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(cache.dataset(scale=True), batch_sampler=sampler, num_workers=2)
    seen = []
    for batch in loader:
        b = len(batch["key"])
        assert batch["latents"].shape[0] == b and batch["original_size"].shape == (b, 2)
        assert len({tuple(x) for x in batch["bucket"].tolist()}) == 1
        seen += batch["key"]
    assert sorted(seen) == cache.keys()


def test_shard_handles_are_per_process(flip_cache, monkeypatch):
    cache = open_cache(flip_cache)
    cache["im0"]
    first = cache._handles.get(cache.shard_of("im0"))
    assert cache._handles.get(cache.shard_of("im0")) is first  # reused within a process
    monkeypatch.setattr(handles.os, "getpid", lambda: -1)  # as if forked
    assert cache._handles.get(cache.shard_of("im0")) is not first
    clone = pickle.loads(pickle.dumps(cache))  # as sent to a spawned worker
    assert not clone._handles._open and torch.equal(clone["im0"]["latents"], cache["im0"]["latents"])


def test_handles_stay_bounded(flip_cache, monkeypatch):
    monkeypatch.setattr(handles, "MAX_OPEN_SHARDS", 2)
    cache = open_cache(flip_cache)
    shards = {cache.shard_of(k) for k in cache}
    assert len(shards) > 2
    for key in cache:
        cache[key]
    assert len(cache._handles._open) == 2


def test_moments_caches_draw_a_fresh_seedable_sample_per_read(tmp_path, tiny_vae):
    out = tmp_path / "cache"
    build_latents(small_cfg(small_dataset(tmp_path / "ds", n=2), out, tiny_vae, latents=LatentsMode.MOMENTS))
    a, b = open_cache(out, seed=7), open_cache(out, seed=7)
    first, second = a["im0"]["latents"], a["im0"]["latents"]
    assert not torch.equal(first, second)  # fresh each read
    assert torch.equal(b["im0"]["latents"], first) and torch.equal(b["im0"]["latents"], second)  # seedable
    assert not torch.equal(open_cache(out, seed=8)["im0"]["latents"], first)
    stored = a.tensors("im0")
    assert sorted(stored) == ["mean", "std"] and first.shape == stored["mean"].shape
    draws = torch.stack([a["im0"]["latents"].float() for _ in range(400)])
    mean, std = stored["mean"].float(), stored["std"].float()
    assert ((draws.mean(0) - mean).abs() <= 5 * std / 20 + 1e-3).all()  # 5 standard errors of 400 draws
    assert (draws.std(0) / std).mean().item() == pytest.approx(1.0, abs=0.05)
