"""webdataset export: a round trip through the webdataset library, values equal to the cache, re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cachebuild.config import BucketConfig, DType, LatentsMode, TextencConfig
from cachebuild.consumers.export.webdataset import export_webdataset, sample_name
from cachebuild.consumers.reader import open_cache
from cachebuild.jobs.latents import build_latents
from cachebuild.jobs.textenc import build_textenc
from cachebuild.testing import make_tiny_text_pipeline, make_tiny_vae
from tests.conftest import write_image
from tests.test_pipeline import make_cfg

wds = pytest.importorskip("webdataset")
BUCKETS = BucketConfig(resolution=(64, 64), min_reso=32, max_reso=128, steps=32)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wds")
    ds = root / "ds"
    for i, (key, size) in enumerate({"a": (80, 48), "b.v2": (64, 64), "sub/c": (48, 80), "d": (64, 64)}.items()):
        write_image(ds / f"{key}.png", size, seed=i)
        (ds / f"{key}.txt").write_text(f"caption {i}", encoding="utf-8")
    out = root / "cache"
    vae = make_tiny_vae(root / "vae", latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    build_latents(make_cfg(ds, out, vae, buckets=BUCKETS, latents=LatentsMode.MEAN, flip=True))
    pipe = make_tiny_text_pipeline(root / "pipe", "z-image")
    build_textenc(TextencConfig(ds, out, model=str(pipe), device="cpu", dtype=DType.FP32, dtype_out=DType.FP32))
    return out


def test_round_trip_through_the_webdataset_library(cache, tmp_path):
    summary = export_webdataset(cache, tmp_path, shard_mb=0.0005)  # tiny shards: several of them
    index = json.loads((tmp_path / "dataset.json").read_text())
    assert len(index["shards"]) > 1 and summary.written == len(index["shards"]) + 1
    assert index["latents"]["vae"]["scaling_factor"] == 0.3611 and index["text"]["family"] == "z-image"
    urls = [str(tmp_path / s) for s in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    reader = open_cache(cache)
    assert sorted(s["json"]["key"] for s in samples) == reader.keys() and len(samples) == index["samples"]
    buckets = [tuple(s["json"]["bucket"]) for s in samples]
    assert buckets == sorted(buckets)  # consecutive samples share a bucket
    for s in samples:
        key = s["json"]["key"]
        assert s["__key__"] == sample_name(key) and ("%2E" in s["__key__"]) == ("." in key)
        rec = reader[key]
        assert s["json"]["caption"] == reader.caption(key) and tuple(s["json"]["bucket"]) == rec["bucket"]
        stored = reader.tensors(key) | reader.text_tensors(key)
        assert sorted(k[: -len(".pth")] for k in s if k.endswith(".pth")) == sorted(stored)
        for name, tensor in stored.items():
            got = s[f"{name}.pth"]
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)


def test_rerun_skips_identical_shards_and_refuses_changed_ones(cache, tmp_path):
    first = export_webdataset(cache, tmp_path)
    again = export_webdataset(cache, tmp_path)
    assert again.written == 0 and again.unchanged == first.written
    (tmp_path / "shard-000000.tar").write_bytes(b"other")
    refused = export_webdataset(cache, tmp_path)
    assert refused.conflicts == ["shard-000000.tar"]
    assert export_webdataset(cache, tmp_path, overwrite=True).written == 1


def test_cli_webdataset_export(cache, tmp_path):
    from click.testing import CliRunner

    from cachebuild.cli import cli

    result = CliRunner().invoke(cli, ["export", str(cache), "--format", "webdataset", "--to", str(tmp_path), "-q"])
    assert result.exit_code == 0, result.output
    assert "webdataset export" in result.output and (tmp_path / "shard-000000.tar").is_file()
