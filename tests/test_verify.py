"""verify: checksums, sizes, shapes, dtypes, NaN, missing and stray shards; --repair re-queues just the damage."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from cachebuild.cache.manifest import Manifest
from cachebuild.cli import cli
from cachebuild.config import StoreFormat
from cachebuild.consumers.verify import verify_cache
from cachebuild.errors import CacheError
from cachebuild.jobs.latents import build_latents
from tests.conftest import leave_uncommitted_shard
from tests.test_pipeline import assert_same_cache, read_cache
from tests.test_reader import small_cfg, small_dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_vae) -> tuple[Path, Path]:
    """(dataset, cache) with several shards; tests work on copies of the cache."""
    root = tmp_path_factory.mktemp("verify")
    dataset = small_dataset(root / "ds")
    build_latents(small_cfg(dataset, root / "cache", tiny_vae, shard_mb=0.02))
    return dataset, root / "cache"


@pytest.fixture
def cache(built, tmp_path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(built[1], copy)
    return copy


def _shard_items(out: Path) -> dict[str, list[str]]:
    with Manifest.open(out, create=False) as m:
        rows = m.items("latents", "done")
    by: dict[str, list[str]] = {}
    for r in rows:
        by.setdefault(r.shard, []).append(r.key)
    return by


def _rewrite_shard(out: Path, shard: str, change: dict[str, torch.Tensor], drop: str | None = None) -> None:
    """Replace (or drop) tensors in a shard and record the new file in the manifest, as if written that way."""
    path = out / "latents" / shard
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}  # noqa: SIM118
        meta = f.metadata()
    save_file(tensors | change, str(path), metadata=meta)
    data = path.read_bytes()
    with Manifest.open(out) as m:
        m.conn.execute(
            "UPDATE shards SET bytes=?, sha256=? WHERE name=?", (len(data), hashlib.sha256(data).hexdigest(), shard)
        )


def test_a_sound_cache_verifies(cache):
    report = verify_cache(cache)
    assert report.ok, report.problems
    assert report.items_checked == 6 and report.shards_checked == len(_shard_items(cache)) > 1
    assert report.stores == ["latents"]


def test_a_flipped_byte_names_the_shards_items_and_repair_reencodes_only_them(built, cache, tiny_vae):
    shards = _shard_items(cache)
    victim = sorted(shards)[0]
    path = cache / "latents" / victim
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # inside the tensor data
    path.write_bytes(bytes(data))
    report = verify_cache(cache)
    assert not report.ok
    assert report.damaged_keys == {"latents": sorted(shards[victim])}
    assert any("checksum" in p.message and p.shard == victim for p in report.problems)

    repaired = verify_cache(cache, repair=True)
    assert repaired.repaired_items == len(shards[victim]) and f"latents/{victim}" in repaired.removed_files
    assert not path.exists()
    with Manifest.open(cache, create=False) as m:
        assert sorted(r.key for r in m.items("latents", "pending")) == sorted(shards[victim])
    summary = build_latents(small_cfg(built[0], cache, tiny_vae, shard_mb=0.02))
    assert summary.encoded == len(shards[victim]) and summary.done == 6
    assert_same_cache(read_cache(cache), read_cache(built[1]))
    assert verify_cache(cache).ok


def test_a_truncated_shard_is_reported_by_size(cache):
    shards = _shard_items(cache)
    victim = sorted(shards)[-1]
    path = cache / "latents" / victim
    path.write_bytes(path.read_bytes()[:100])
    report = verify_cache(cache)
    assert report.damaged_keys == {"latents": sorted(shards[victim])}
    assert any("truncated" in p.message for p in report.problems)


def test_nan_wrong_shape_and_missing_tensor_are_found_per_item(cache):
    shards = _shard_items(cache)
    name = sorted(shards)[0]
    key = shards[name][0]
    with Manifest.open(cache, create=False) as m:
        others = [r for r in m.items("latents", "done") if r.shard != name]
    nan = torch.full((4, 32, 32), float("nan"), dtype=torch.float16)
    _rewrite_shard(cache, name, {f"{key}/latents": nan})
    other, gone = others[0], others[-1]
    _rewrite_shard(cache, other.shard, {f"{other.key}/latents": torch.zeros(4, 3, 3, dtype=torch.float16)})
    _rewrite_shard(cache, gone.shard, {}, drop=f"{gone.key}/latents")
    report = verify_cache(cache)
    messages = {(p.key, p.message) for p in report.problems}
    assert (key, f"{key}/latents holds NaN or Inf") in messages
    assert any(k == other.key and "shape (4, 3, 3)" in msg for k, msg in messages)
    assert (gone.key, f"tensor {gone.key}/latents is missing from the shard") in messages
    assert set(report.damaged_keys["latents"]) == {key, other.key, gone.key}
    verify_cache(cache, repair=True)
    with Manifest.open(cache, create=False) as m:
        assert {r.key for r in m.items("latents", "pending")} == {key, other.key, gone.key}
        assert len(m.items("latents", "done")) == 3  # the rest of those shards stays


def test_missing_shards_are_problems_stray_files_leftovers_and_repair_clears_both(cache):
    shards = _shard_items(cache)
    victim = sorted(shards)[0]
    (cache / "latents" / victim).unlink()
    (cache / "latents" / "shard-77777.safetensors").write_bytes(b"no run of this manifest wrote it")
    leftover = leave_uncommitted_shard(cache)  # a run killed later: its claim starts past the file above
    report = verify_cache(cache)
    assert report.damaged_keys == {"latents": sorted(shards[victim])}
    assert report.leftovers == [f"latents/{leftover}"]  # listed, but not a problem of its own
    assert report.unnamed == ["latents/shard-77777.safetensors"]
    assert not [p for p in report.problems if p.shard in (leftover, "shard-77777.safetensors")]
    verify_cache(cache, repair=True)
    assert not (cache / "latents" / leftover).exists()
    assert (cache / "latents" / "shard-77777.safetensors").exists()  # not proven ours: kept
    with Manifest.open(cache, create=False) as m:
        assert victim not in {s["name"] for s in m.shards("latents")}


def test_repair_refuses_while_a_build_holds_the_lock(cache):
    with Manifest.open(cache) as holder:
        holder.lock()
        with pytest.raises(CacheError, match="another cachebuild run"):
            verify_cache(cache, repair=True)


def test_hdf5_shards_verify_too(tmp_path, tiny_vae):
    out = tmp_path / "cache"
    build_latents(small_cfg(small_dataset(tmp_path / "ds", n=3), out, tiny_vae, format=StoreFormat.HDF5))
    assert verify_cache(out).ok
    shard = next((out / "latents").iterdir())
    shard.write_bytes(shard.read_bytes()[:-50])
    assert len(verify_cache(out).damaged_keys["latents"]) == 3


def test_cli_verify_exit_codes_and_item_names(cache):
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", str(cache)])
    assert ok.exit_code == 0, ok.output
    victim = sorted(_shard_items(cache))[0]
    keys = _shard_items(cache)[victim]
    (cache / "latents" / victim).write_bytes(b"x")
    bad = runner.invoke(cli, ["verify", str(cache)])
    assert bad.exit_code == 3
    assert all(k in bad.output for k in keys) and "--repair" in bad.output
    as_json = runner.invoke(cli, ["verify", str(cache), "--json"])
    assert json.loads(as_json.stdout)["damaged_keys"] == {"latents": sorted(keys)}
    fixed = runner.invoke(cli, ["verify", str(cache), "--repair"])
    # every damaged item is queued: --repair succeeds, so `verify --repair && cachebuild latents ...` rebuilds
    assert fixed.exit_code == 0 and "cachebuild latents" in fixed.output
    assert runner.invoke(cli, ["verify", str(cache)]).exit_code == 0  # the queued items are no longer done
    assert runner.invoke(cli, ["verify", str(cache / "nope")]).exit_code == 2


def test_a_plain_verify_opens_the_manifest_read_only(cache, monkeypatch):
    from cachebuild.consumers import verify

    seen = []
    real_open = Manifest.open

    def spy(root, create=True, read_only=False):
        seen.append(read_only)
        return real_open(root, create=create, read_only=read_only)

    monkeypatch.setattr(verify.Manifest, "open", spy)
    verify_cache(cache)
    verify_cache(cache, repair=True)
    assert seen == [True, False]  # only --repair writes


def test_trimmed_text_rows_past_the_real_tokens_are_expected(tmp_path):
    """Chroma keeps one padding row past the real tokens: a sound Chroma text cache verifies clean, and a row
    count off by one is still found."""
    from cachebuild.testing import make_tiny_text_pipeline

    pipe = make_tiny_text_pipeline(tmp_path / "pipe", "chroma")
    captions, out = tmp_path / "captions", tmp_path / "cache"
    captions.mkdir()
    (captions / "a.txt").write_text("a photo of a cat", encoding="utf-8")
    args = ["textenc", str(captions), "--model", str(pipe), "--out", str(out), "--device", "cpu", "--quiet"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    report = verify_cache(out)
    assert not report.problems, report.problems
    with Manifest.open(out) as m:  # one real token fewer recorded: the stored rows no longer match
        info = json.loads(m.conn.execute("SELECT info FROM items WHERE store='textenc'").fetchone()[0])
        info["tokens"]["t5"] -= 1
        with m.transaction() as c:
            c.execute("UPDATE items SET info=? WHERE store='textenc'", (json.dumps(info),))
    assert verify_cache(out).problems
