"""HDF5 shards: the writer on its own, and `--format hdf5` end to end against safetensors."""

from __future__ import annotations

import builtins
import hashlib

import h5py
import pytest
import torch

from cachebuild import config
from cachebuild.cache.hdf5 import HDF5ShardWriter, read_items, read_tensor
from cachebuild.cache.manifest import Manifest
from cachebuild.cache.shards import open_writer
from cachebuild.config import DType, LatentsConfig, ModelSpec, StoreFormat
from cachebuild.consumers.reader import open_cache
from cachebuild.errors import ConfigError
from cachebuild.jobs.latents import build_latents
from tests.conftest import leave_uncommitted_shard, write_image
from tests.test_reader import small_cfg, small_dataset


def test_writer_round_trips_every_dtype_and_the_metadata(tmp_path):
    tensors = {
        "latents": torch.randn(4, 6, 8).to(torch.float16),
        "latents_flipped": torch.randn(4, 6, 8).to(torch.bfloat16),
        "mean": torch.randn(4, 6, 8),
    }
    meta = {"original_size": [160, 96], "bucket": [16, 12], "flip": True, "note": "x", "nested": {"a": [1]}}
    path = tmp_path / "shard-00003.h5"
    with HDF5ShardWriter(path, {"store": "latents", "scaling_factor": 0.13025}) as w:
        w.write("sub/img001", tensors, meta)
        w.write("img002", {"latents": torch.zeros(4, 2, 2, dtype=torch.float16)}, {"bucket": [4, 4]})
    assert w.nbytes == sum(t.numel() * t.element_size() for t in tensors.values()) + 4 * 2 * 2 * 2
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00003.h5"]  # no temporary file left
    with h5py.File(path, "r") as f:
        assert f.attrs["store"] == "latents" and f.attrs["scaling_factor"] == "0.13025"
        assert f.attrs["cachebuild"] == "1"
        for name, t in tensors.items():
            got = read_tensor(f[f"sub/img001/{name}"])
            assert got.dtype == t.dtype and torch.equal(got, t), name
    assert read_items(path) == {"sub/img001": meta, "img002": {"bucket": [4, 4]}}


def test_close_reports_size_and_checksum_of_the_file(tmp_path):
    w = HDF5ShardWriter(tmp_path / "shard-00000.h5", {})
    w.write("a", {"latents": torch.ones(2, 2)}, {})
    info = w.close()
    data = (tmp_path / "shard-00000.h5").read_bytes()
    assert (info.name, info.keys, info.bytes) == ("shard-00000.h5", ("a",), len(data))
    assert info.sha256 == hashlib.sha256(data).hexdigest()


def test_a_key_that_is_another_keys_tensor_path_is_refused_with_the_fix(tmp_path):
    w = HDF5ShardWriter(tmp_path / "shard-00000.h5", {})
    w.write("a", {"latents": torch.ones(1)}, {})
    with pytest.raises(ConfigError, match="--format safetensors"):
        w.write("a/latents", {"latents": torch.ones(1)}, {})
    w.write("a/other", {"latents": torch.ones(1)}, {})  # a sibling group is fine


def test_open_writer_gives_an_h5_shard(tmp_path):
    w = open_writer("hdf5", tmp_path, 7, {})
    assert isinstance(w, HDF5ShardWriter) and w.path.name == "shard-00007.h5"


def test_missing_h5py_is_reported_with_the_install_command(tmp_path, monkeypatch, tiny_vae):
    real_import = builtins.__import__

    def no_h5py(name, *args, **kwargs):
        if name == "h5py":
            raise ImportError("No module named 'h5py'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(ConfigError, match=r"pip install 'cachebuild\[hdf5\]'"):
        HDF5ShardWriter(tmp_path / "shard-00000.h5", {})
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"cachebuild\[hdf5\]"):  # before any work, from the config
        LatentsConfig(tmp_path, tmp_path / "c", ModelSpec(vae=str(tiny_vae)), format=StoreFormat.HDF5)


def test_hdf5_and_safetensors_runs_hold_identical_tensors(tmp_path, tiny_vae):
    dataset = small_dataset(tmp_path / "ds")
    st, h5 = tmp_path / "st", tmp_path / "h5"
    for out, fmt in ((st, StoreFormat.SAFETENSORS), (h5, StoreFormat.HDF5)):
        summary = build_latents(small_cfg(dataset, out, tiny_vae, format=fmt, flip=True, shard_mb=0.005))
        assert summary.done == 6 and summary.shards_written > 1
    assert {p.suffix for p in (h5 / "latents").iterdir()} == {".h5"}
    a, b = open_cache(st), open_cache(h5)
    assert a.keys() == b.keys() and len(a) == 6
    for key in a:
        ta, tb = a.tensors(key), b.tensors(key)
        assert sorted(ta) == sorted(tb) == ["latents", "latents_flipped"]
        for name in ta:
            assert ta[name].dtype == tb[name].dtype == torch.float16
            assert torch.equal(ta[name], tb[name]), f"{key}/{name}"
        assert a.info(key) == b.info(key)


def test_hdf5_bf16_run_reads_back_exactly(tmp_path, tiny_vae):
    dataset = small_dataset(tmp_path / "ds")
    st, h5 = tmp_path / "st", tmp_path / "h5"
    build_latents(small_cfg(dataset, st, tiny_vae, dtype_out=DType.BF16))
    build_latents(small_cfg(dataset, h5, tiny_vae, dtype_out=DType.BF16, format=StoreFormat.HDF5))
    a, b = open_cache(st), open_cache(h5)
    for key in a:
        assert b[key]["latents"].dtype == torch.bfloat16
        assert torch.equal(a[key]["latents"], b[key]["latents"])


def test_hdf5_crash_leftovers_are_cleaned_and_new_shards_numbered_after_them(tmp_path, tiny_vae):
    dataset = small_dataset(tmp_path / "ds")
    out = tmp_path / "cache"
    build_latents(small_cfg(dataset, out, tiny_vae, format=StoreFormat.HDF5, shard_mb=0.005))
    folder = out / "latents"
    committed = sorted(p.name for p in folder.iterdir())
    leftover = leave_uncommitted_shard(out, suffix=".h5")
    (folder / "shard-00000.h5.tmp").write_bytes(b"half written")
    write_image(dataset / "new.png", (64, 64), seed=50)
    summary = build_latents(small_cfg(dataset, out, tiny_vae, format=StoreFormat.HDF5, shard_mb=0.005))
    assert summary.encoded == 1 and summary.done == 7
    names = sorted(p.name for p in folder.iterdir())
    assert not any(n.endswith(".tmp") for n in names)
    new = sorted(set(names) - set(committed))
    assert new == [leftover]  # the leftover went, and its name was handed out again after the last committed one
    assert leftover == f"shard-{int(committed[-1][6:11]) + 1:05d}.h5"
    with Manifest.open(out, create=False) as m:
        assert {s["name"] for s in m.shards("latents")} == set(names)
    assert open_cache(out)["new"]["latents"].shape == (4, 32, 32)
