"""End-to-end behaviour of build_latents: parity, resume, idempotence, fingerprints, bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from cachebuild.cache.manifest import Manifest
from cachebuild.config import BucketConfig, CropMode, DType, LatentsConfig, LatentsMode, ModelSpec
from cachebuild.errors import ConfigError, FingerprintMismatch
from cachebuild.jobs import latents as pipeline
from cachebuild.jobs.latents import build_latents
from tests.conftest import ODD_IMAGES, done_count, kill_while_running, leave_uncommitted_shard, write_image

BUCKETS = BucketConfig(resolution=(128, 128), min_reso=64, max_reso=256, steps=64)


def make_cfg(dataset: Path, out: Path, vae: Path, **kw) -> LatentsConfig:
    base = dict(model=ModelSpec(vae=str(vae)), buckets=BUCKETS, workers=0, dtype=DType.FP32, batch_size=3, device="cpu")
    return LatentsConfig(dataset=dataset, out=out, **(base | kw))


def read_cache(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{key: {tensor name: tensor}} for every done item, through the manifest like a reader would."""
    result = {}
    with Manifest.open(out, create=False) as m:
        rows = m.items("latents", "done")
    for row in rows:
        with safe_open(str(out / "latents" / row.shard), framework="pt") as f:
            names = [n for n in f.keys() if n.rsplit("/", 1)[0] == row.key]  # noqa: SIM118
            result[row.key] = {n.rsplit("/", 1)[1]: f.get_tensor(n) for n in names}
    return result


def assert_same_cache(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert sorted(a[key]) == sorted(b[key]), key
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}/{name} differs"


def test_mean_latents_match_a_direct_encode(tmp_path, tiny_vae):
    from diffusers import AutoencoderKL

    root = tmp_path / "ds"
    path = write_image(root / "square.png", (128, 128), seed=3)  # already bucket-sized: no resize, no crop
    out = tmp_path / "cache"
    build_latents(make_cfg(root, out, tiny_vae, latents=LatentsMode.MEAN, dtype_out=DType.FP32))

    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = vae.encode(pixels * 2 - 1).latent_dist.mean[0]
    got = read_cache(out)["square"]["latents"]
    assert got.shape == (4, 64, 64)  # (C, H/f, W/f) with f = 2 for the tiny VAE
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_run_records_geometry_and_factors_in_shard_and_manifest(tmp_path, tiny_vae, dataset):
    out = tmp_path / "cache"
    summary = build_latents(make_cfg(dataset, out, tiny_vae, flip=True))
    assert (summary.done, summary.failed, summary.pending) == (8, 0, 0)
    with Manifest.open(out, create=False) as m:
        rows = {r.key: r for r in m.items("latents")}
        shard = m.shards("latents")[0]["name"]
    assert set(rows) == {f"img{i:03d}" for i in range(7)} | {"sub/img007"}
    row = rows["img000"]  # 160x96: wide
    assert row.info["original_size"] == [160, 96]
    assert row.bucket == f"{row.info['bucket'][0]}x{row.info['bucket'][1]}"
    tensors = read_cache(out)["img000"]
    w, h = row.info["bucket"]
    assert tensors["latents"].shape == (4, h // 2, w // 2)
    assert tensors["latents_flipped"].shape == tensors["latents"].shape
    assert tensors["latents"].dtype == torch.float16  # the default stored dtype
    with safe_open(str(out / "latents" / shard), framework="pt") as f:
        meta = f.metadata()
    assert float(meta["scaling_factor"]) == pytest.approx(0.13025)
    assert meta["latents_mode"] == "sample"


def test_rerun_of_a_finished_job_loads_no_model_and_writes_nothing(tmp_path, tiny_vae, dataset, monkeypatch):
    out = tmp_path / "cache"
    build_latents(make_cfg(dataset, out, tiny_vae))
    before = {p: p.stat().st_mtime_ns for p in (out / "latents").iterdir()}

    def no_model(*_a, **_k):
        raise AssertionError("a finished job must not load the model")

    monkeypatch.setattr(pipeline, "load_vae", no_model)
    again = build_latents(make_cfg(dataset, out, tiny_vae, batch_size=1, workers=0))  # batch size may change
    assert again.nothing_to_do and not again.model_loaded
    assert (again.encoded, again.shards_written, again.done) == (0, 0, 8)
    assert {p: p.stat().st_mtime_ns for p in (out / "latents").iterdir()} == before


def test_changed_added_and_deleted_files_touch_only_themselves(tmp_path, tiny_vae, dataset):
    out = tmp_path / "cache"
    build_latents(make_cfg(dataset, out, tiny_vae))
    first = read_cache(out)
    write_image(dataset / "img001.jpg", (96, 160), seed=99)  # same name, new pixels
    os.utime(dataset / "img001.jpg", ns=(1, 1))  # and a different mtime for certain
    write_image(dataset / "new.png", (128, 128), seed=7)
    (dataset / "img002.jpg").unlink()
    summary = build_latents(make_cfg(dataset, out, tiny_vae))
    assert (summary.encoded, summary.new, summary.changed, summary.removed) == (2, 1, 1, 1)
    second = read_cache(out)
    assert set(second) == set(first) - {"img002"} | {"new"}
    assert not torch.equal(second["img001"]["latents"], first["img001"]["latents"])
    for key in set(first) - {"img001", "img002"}:
        assert torch.equal(second[key]["latents"], first[key]["latents"])


def test_changed_settings_are_refused_by_name_and_rebuild_discards(tmp_path, tiny_vae, dataset):
    out = tmp_path / "cache"
    build_latents(make_cfg(dataset, out, tiny_vae))
    with pytest.raises(FingerprintMismatch) as err:
        build_latents(make_cfg(dataset, out, tiny_vae, flip=True, crop=CropMode.RANDOM))
    message = str(err.value)
    assert "flip" in message and "crop" in message and "--rebuild" in message and "--out" in message
    assert read_cache(out)  # nothing was lost
    summary = build_latents(make_cfg(dataset, out, tiny_vae, flip=True, rebuild=True))
    assert summary.encoded == 8
    assert all("latents_flipped" in t for t in read_cache(out).values())


def test_settings_that_do_not_change_bytes_may_change(tmp_path, tiny_vae, dataset):
    out = tmp_path / "cache"
    build_latents(make_cfg(dataset, out, tiny_vae, batch_size=1, shard_mb=0.01))
    build_latents(make_cfg(dataset, out, tiny_vae, batch_size=8, workers=1, retry_failed=True))


def test_results_do_not_depend_on_batch_size_or_workers(tmp_path, tiny_vae, dataset):
    a, b = tmp_path / "a", tmp_path / "b"
    build_latents(make_cfg(dataset, a, tiny_vae, batch_size=1, dtype_out=DType.FP32))
    build_latents(make_cfg(dataset, b, tiny_vae, batch_size=8, workers=2, dtype_out=DType.FP32, shard_mb=0.05))
    assert_same_cache(read_cache(a), read_cache(b))  # bit for bit: CPU kernels here ignore the batch shape


def test_results_do_not_depend_on_the_planning_chunk(tmp_path, tiny_vae, dataset, monkeypatch):
    (dataset / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")  # a header failure inside a chunk
    a, b = tmp_path / "a", tmp_path / "b"
    build_latents(make_cfg(dataset, a, tiny_vae, dtype_out=DType.FP32))
    monkeypatch.setattr(pipeline, "PLAN_CHUNK_ITEMS", 3)  # 9 items: three chunks, batches cut at each boundary
    seen = []
    summary = build_latents(make_cfg(dataset, b, tiny_vae, dtype_out=DType.FP32), progress=seen.append)
    assert (summary.done, summary.failed) == (8, 1)
    assert_same_cache(read_cache(a), read_cache(b))
    assert seen[-1].processed == seen[-1].total == 9  # the header failure counts as finished
    assert summary.model_loads == 1  # one read of the VAE for the three chunks


def test_odd_and_broken_files_end_done_or_failed_with_a_reason(tmp_path, tiny_vae):
    if not ODD_IMAGES.is_dir():
        pytest.skip("shared odd-images corpus not present")
    root = tmp_path / "odd"
    shutil.copytree(ODD_IMAGES, root)
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not a picture")
    jpeg = write_image(tmp_path / "whole.jpg", (200, 150), seed=1).read_bytes()
    (root / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    summary = build_latents(make_cfg(root, tmp_path / "cache", tiny_vae, batch_size=4))
    with Manifest.open(tmp_path / "cache", create=False) as m:
        rows = {r.key: r for r in m.items("latents")}
    assert summary.pending == 0 and all(r.status in ("done", "failed") for r in rows.values())
    for row in rows.values():
        if row.status == "failed":
            assert row.reason and len(row.reason) > 15, row
    assert rows["zero"].status == "failed" and "empty" in rows["zero"].reason
    assert rows["text"].status == "failed" and "not an image" in rows["text"].reason
    assert rows["cut"].status == "failed" and "truncated" in rows["cut"].reason
    assert rows["decompression_bomb"].status == "failed" and "--max-pixels" in rows["decompression_bomb"].reason
    assert rows["hopper"].status == "failed" and "share the key" in rows["hopper"].reason  # .jpg .png .gif ...
    for key in ("pil_sample_cmyk", "hopper_orientation_6", "1_trns", "apng_mode_16bit", "dispose_bgnd_rgba"):
        assert rows[key].status == "done", rows[key]


def test_retry_failed_encodes_a_fixed_file(tmp_path, tiny_vae):
    root = tmp_path / "ds"
    write_image(root / "good.png", (128, 128))
    (root / "bad.png").write_bytes(b"junk")
    out = tmp_path / "cache"
    assert build_latents(make_cfg(root, out, tiny_vae)).failed == 1
    assert build_latents(make_cfg(root, out, tiny_vae)).failed == 1  # not retried by default
    write_image(tmp_path / "fixed.png", (128, 128))
    shutil.copyfile(tmp_path / "fixed.png", root / "bad.png")  # a changed file is picked up anyway
    summary = build_latents(make_cfg(root, out, tiny_vae, retry_failed=True))
    assert (summary.done, summary.failed) == (2, 0)


def test_bucket_steps_must_fit_the_vae_downsampling(tmp_path, tiny_vae, dataset):
    from cachebuild.testing import make_tiny_taesd

    taesd = make_tiny_taesd(tmp_path / "taesd")  # downsampling 8
    buckets = BucketConfig(resolution=(132, 132), min_reso=36, max_reso=252, steps=36)
    with pytest.raises(ConfigError, match="multiple"):
        build_latents(make_cfg(dataset, tmp_path / "c", taesd, buckets=buckets))
    with pytest.raises(ConfigError, match="moments"):
        build_latents(make_cfg(dataset, tmp_path / "c", taesd, latents=LatentsMode.MOMENTS))
    summary = build_latents(make_cfg(dataset, tmp_path / "c", taesd, buckets=BUCKETS))
    assert summary.done == 8


def test_crash_leftovers_are_cleaned_and_missing_shards_reencoded(tmp_path, tiny_vae, dataset):
    out = tmp_path / "cache"
    build_latents(make_cfg(dataset, out, tiny_vae, shard_mb=0.01))
    before = read_cache(out)
    shards = sorted((out / "latents").iterdir())
    (out / "latents" / "shard-00050.safetensors").write_bytes(b"no run of this manifest wrote it")
    leftover = leave_uncommitted_shard(out)  # a run killed later: its claim starts past the file above
    (out / "latents" / "shard-00000.safetensors.tmp").write_bytes(b"half written")
    shards[0].unlink()  # a committed shard lost: its items must be encoded again
    summary = build_latents(make_cfg(dataset, out, tiny_vae, shard_mb=0.01))
    assert summary.encoded >= 1 and summary.pending == 0
    names = {p.name for p in (out / "latents").iterdir()}
    assert not any(n.endswith(".tmp") for n in names)
    with Manifest.open(out, create=False) as m:  # the leftover went (its name may be handed out again)
        assert names - {s["name"] for s in m.shards("latents")} == {"shard-00050.safetensors"}
    assert leftover.startswith("shard-00051")  # not proven a leftover, shard-00050 was kept (cache.claims)
    assert_same_cache(read_cache(out), before)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cachebuild", *args]


@pytest.mark.slow
def test_sigkill_at_any_point_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_vae):
    root = tmp_path / "ds"
    for i in range(36):
        write_image(root / f"im{i:02d}.png", [(128, 128), (160, 96), (96, 160)][i % 3], seed=i)
    args = [
        "latents",
        str(root),
        "--vae",
        str(tiny_vae),
        "--resolution",
        "128",
        "--min-bucket-reso",
        "64",
        "--max-bucket-reso",
        "256",
        "--dtype",
        "fp32",
        "--batch-size",
        "2",
        "--shard-mb",
        "0.05",
        "-q",
        "--workers",
        "0",
        "--random-crop",
        "--flip-aug",
        "--device",
        "cpu",
    ]
    subprocess.run(_cli(*args, "--out", str(tmp_path / "whole")), check=True, capture_output=True)
    whole = read_cache(tmp_path / "whole")
    assert len(whole) == 36

    out = tmp_path / "killed"
    kills = kill_while_running(_cli(*args, "--out", str(out)), out, (2, 6, 12))  # at different points
    assert kills >= 2, "the job finished before it could be interrupted; the test needs more work per item"
    assert done_count(out) < 36
    final = subprocess.run(_cli(*args, "--out", str(out)), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert_same_cache(read_cache(out), whole)
    again = subprocess.run(_cli(*args, "--out", str(out)), capture_output=True, text=True)
    assert again.returncode == 0 and "nothing left to do" in again.stderr
