"""Damage between the build and training: a shard overwritten in place (same size) or cut short is caught by the
reader the first time it opens the shard, and every read error names the item, the shard and the fix."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.consumers import handles
from cachebuild.errors import CacheError
from cachebuild.jobs.latents import build_latents
from tests.test_reader import small_cfg, small_dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_vae) -> Path:
    root = tmp_path_factory.mktemp("damage")
    build_latents(small_cfg(small_dataset(root / "ds"), root / "cache", tiny_vae, shard_mb=0.02))
    return root / "cache"


@pytest.fixture
def cache(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "cache"))


def overwrite_tensor_bytes(path: Path) -> None:
    """NaN (fp16 0xFFFF) over the shard's last KB, tensor data: the size stays, the header parses."""
    data = bytearray(path.read_bytes())
    data[-1024:] = b"\xff" * 1024
    path.write_bytes(bytes(data))


def named_fix(exc: CacheError, key: str, shard: str, root: Path) -> None:
    text = str(exc)
    assert repr(key) in text and f"latents/{shard}" in text, text
    assert f"cachebuild verify {root} --repair" in text, text


def test_a_shard_overwritten_in_place_is_refused_not_read_as_nan(cache):
    reader = open_cache(cache)
    key = reader.keys()[-1]
    shard = reader.shard_of(key)
    overwrite_tensor_bytes(cache / "latents" / shard)
    with pytest.raises(CacheError, match="SHA-256 differs") as info:
        reader[key]
    named_fix(info.value, key, shard, cache)
    unchecked = open_cache(cache, checksums=False)[key]["latents"]  # what the option skips: the NaN gets through
    assert not torch.isfinite(unchecked).all()


def test_a_truncated_shard_names_the_item_the_shard_and_the_fix(cache):
    reader = open_cache(cache)
    key = reader.keys()[0]
    shard = reader.shard_of(key)
    path = cache / "latents" / shard
    os.truncate(path, 40)  # cut inside the safetensors header
    with pytest.raises(CacheError, match="truncated or overwritten") as info:
        reader[key]
    named_fix(info.value, key, shard, cache)
    with pytest.raises(CacheError, match="SafetensorError") as info:  # unchecked, the open itself fails
        open_cache(cache, checksums=False)[key]
    named_fix(info.value, key, shard, cache)
    to = cache.parent / "shards"
    result = CliRunner().invoke(cli, ["export", str(cache), "--to", str(to), "--format", "webdataset", "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"cachebuild verify {cache} --repair" in result.output


def test_a_passed_check_is_remembered_until_the_file_changes(cache, monkeypatch):
    hashed = []
    real = handles.sha256_file
    monkeypatch.setattr(handles, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    shards = {open_cache(cache).shard_of(k) for k in open_cache(cache)}
    assert len(shards) > 1
    first = open_cache(cache)
    for key in first:
        first[key]
    assert sorted(hashed) == sorted(shards)  # once per shard, not once per item
    hashed.clear()
    second = open_cache(cache)  # another process, a later epoch, a later run: the same unchanged files
    for key in second:
        second[key]
    assert hashed == []
    victim = sorted(shards)[0]
    os.utime(cache / "latents" / victim, ns=(0, 0))  # rewritten (same bytes here): hashed again
    third = open_cache(cache)
    for key in third:
        third[key]
    assert hashed == [victim]
