"""A video cache as a trainer reads it: clips joined with their video's caption (encoded once per video), batches of
one (W, H, F) shape, the clip records; and a run killed at any point resuming to the same tensors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cachebuild import open_cache
from cachebuild.cache.manifest import Manifest
from cachebuild.cli import cli
from cachebuild.testing import make_tiny_text_pipeline
from cachebuild.testing.videos import clip_frames, write_video
from tests.conftest import done_count, kill_while_running
from tests.test_pipeline import assert_same_cache, read_cache

CAPTIONS = {"walk": "a person walking", "run/fast": "a dog running", "pic": "a still photo", "orphan": "nothing"}


@pytest.fixture(scope="module")
def video_cache(tmp_path_factory, tiny_wan_vae) -> Path:
    """Latents of two videos and a picture (clips of 5 and 9 frames), and text from captions beside them."""
    root = tmp_path_factory.mktemp("video-cache")
    data = root / "data"
    write_video(data / "walk.mkv", clip_frames(10, (32, 16), seed=0))
    write_video(data / "run" / "fast.mkv", clip_frames(6, (32, 32), seed=1))
    Image.fromarray(clip_frames(1, (32, 32), seed=2)[0]).save(data / "pic.png")
    for key, text in CAPTIONS.items():
        (data / f"{key}.txt").write_text(text)
    out = root / "cache"
    args = ["latents", str(data), "--vae", str(tiny_wan_vae), "--latents", "mean", "--workers", "0", "--out", str(out)]
    args += ["--resolution", "32", "--min-bucket-reso", "16", "--bucket-reso-steps", "16", "--frames", "5,9"]
    args += ["--bucket-no-upscale"]  # each source keeps its own size: two spatial buckets
    args += ["--device", "cpu", "--dtype", "fp32", "--quiet"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    pipe = make_tiny_text_pipeline(root / "pipe", "sd15")
    text = ["textenc", str(data), "--model", str(pipe), "--out", str(out), "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(cli, text)
    assert result.exit_code == 0, result.output
    return out


def test_each_clip_joins_its_videos_caption_encoded_once(video_cache):
    cache = open_cache(video_cache)
    assert cache.keys() == ["pic", "run/fast@00000-005", "walk@00000-005", "walk@00000-009"]
    assert cache.unmatched == {"latents_only": [], "text_only": ["orphan"]}
    assert cache.caption("walk@00000-009") == cache.caption("walk@00000-005") == "a person walking"
    assert torch.equal(cache["walk@00000-005"]["clip_l"], cache["walk@00000-009"]["clip_l"])
    with Manifest.open(video_cache, read_only=True) as m:
        assert sorted(r.key for r in m.items("textenc", "done")) == ["orphan", "pic", "run/fast", "walk"]  # by video
    rec = cache["walk@00000-009"]
    assert (rec["source"], rec["start"], rec["frames"], rec["fps"], rec["bucket"]) == ("walk.mkv", 0, 9, 16.0, (32, 16))
    assert rec["latents"].shape == (4, 3, 4, 8)  # (C, 1 + (9 - 1) / 4, 16 / 4, 32 / 4)
    assert cache["pic"]["frames"] == 1 and cache["pic"]["latents"].shape == (4, 1, 8, 8)
    assert cache.pipeline_inputs("walk@00000-005", family="wan")["latents"].shape == (4, 2, 4, 8)


def test_the_sampler_batches_one_shape_of_frames_height_and_width(video_cache):
    cache = open_cache(video_cache)
    assert [cache.bucket(k) for k in cache] == [(32, 32, 1), (32, 32, 5), (32, 16, 5), (32, 16, 9)]
    loader = torch.utils.data.DataLoader(cache.dataset(), batch_sampler=cache.bucket_sampler(batch_size=4))
    batches = list(loader)
    assert len(batches) == 4  # four shapes, one batch each
    for batch in batches:
        assert len({tuple(t.shape) for t in batch["latents"]}) == 1


def test_status_counts_clips_by_shape(video_cache):
    result = CliRunner().invoke(cli, ["status", str(video_cache)])
    assert "buckets: 32x16x5 (1), 32x16x9 (1), 32x32x1 (1), 32x32x5 (1)" in result.output


@pytest.mark.slow
def test_sigkill_during_a_long_video_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_wan_vae):
    """One long video in many overlapping clips (seeked to keyframes, frames dropped to a lower rate), killed at three
    points: the finished cache holds the same tensors, bit for bit, as a run never interrupted."""
    data = tmp_path / "data"
    write_video(data / "long.mp4", clip_frames(160, (32, 32), seed=3), codec="libx264", options={"g": "8", "bf": "2"})
    args = [sys.executable, "-m", "cachebuild", "latents", str(data), "--vae", str(tiny_wan_vae), "--device", "cpu"]
    args += ["--resolution", "32", "--min-bucket-reso", "16", "--bucket-reso-steps", "16", "--dtype", "fp32"]
    args += ["--frames", "9", "--extract", "slide", "--stride", "6", "--fps", "12", "--batch-size", "1"]
    args += ["--shard-mb", "0.01", "--workers", "1", "--latents", "sample", "-q"]
    subprocess.run([*args, "--out", str(tmp_path / "whole")], check=True, capture_output=True, timeout=600)
    whole = read_cache(tmp_path / "whole")
    assert len(whole) == 19  # 160 frames at 16/s -> 120 at 12/s; 9-frame windows every 6 frames
    out = tmp_path / "killed"
    kills = kill_while_running([*args, "--out", str(out)], out, (2, 7, 12))
    assert kills >= 2, "the job finished before it could be interrupted; the test needs more work per clip"
    assert done_count(out) < 19
    final = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert_same_cache(read_cache(out), whole)
    assert all(np.isfinite(t.numpy()).all() for item in whole.values() for t in item.values())


def test_preview_shows_first_middle_and_last_frames_beside_the_source(video_cache, tiny_wan_vae, tmp_path):
    from cachebuild.config import ModelSpec
    from cachebuild.consumers.preview import PAD, preview_cache, tile_array

    tile = 48
    summary = preview_cache(video_cache, ModelSpec(vae=str(tiny_wan_vae)), tmp_path / "p.png", n=4, tile=tile)
    assert summary.keys == open_cache(video_cache).keys() and not summary.missing_sources
    grid = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    i = summary.keys.index("walk@00000-009")  # frames 0, 4 and 8 of walk.mkv, side by side
    x, y = PAD + (i % 2) * (2 * tile + 3 * PAD), PAD + (i // 2) * (tile + PAD)
    want = tile_array(Image.fromarray(np.concatenate(list(clip_frames(10, (32, 16), seed=0)[[0, 4, 8]]), axis=1)), tile)
    assert np.array_equal(grid[y : y + tile, x : x + tile], want)


@pytest.mark.gpu
def test_a_clip_encodes_on_cuda_as_on_the_cpu_and_its_peak_is_measured(tiny_wan_vae):
    from cachebuild.config import DType, LatentsMode, ModelSpec
    from cachebuild.families.vae import VaeEncoder, family_of, load_vae
    from cachebuild.hub import resolve_vae

    resolved = resolve_vae(ModelSpec(vae=str(tiny_wan_vae)))
    family = family_of(resolved, None)
    clip = torch.from_numpy(clip_frames(9, (32, 32), seed=4))[None]  # (1, F, H, W, 3)
    outs = []
    for name in ("cpu", "cuda"):
        device = torch.device(name)
        model = load_vae(resolved, family, torch.float32, device)
        encoder = VaeEncoder(model, family, device, DType.FP32, LatentsMode.MEAN, False, 0)
        outs.append(encoder.encode(["k"], clip)[0].tensors["latents"])
        if name == "cuda":
            peaks = [encoder.peak(1, (32, 32, n)) for n in (5, 9, 17)]
            assert all(p is not None and p > 0 for p in peaks)
    assert outs[0].shape == (4, 3, 8, 8) and torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_a_rebuilt_manifest_keeps_the_clip_shapes(video_cache, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(video_cache, copy)
    (copy / "manifest.sqlite").unlink()
    assert CliRunner().invoke(cli, ["rebuild-manifest", str(copy)]).exit_code == 0
    before, after = open_cache(video_cache), open_cache(copy)
    assert [after.bucket(k) for k in after] == [before.bucket(k) for k in before]


@pytest.mark.slow  # two spawned device processes each import torch and diffusers
def test_two_cpu_devices_give_the_clips_of_one(tmp_path, tiny_wan_vae):
    """Clips go through --devices as images do: the same tensors as one device (at its thread count), one
    manifest writer, striped shard names."""
    from tests.conftest import torch_threads

    data = tmp_path / "data"
    write_video(data / "a.mkv", clip_frames(14, (32, 16), seed=3))
    write_video(data / "b.mkv", clip_frames(9, (32, 32), seed=4))
    base = ["latents", str(data), "--vae", str(tiny_wan_vae), "--latents", "mean", "--frames", "5", "--workers", "0"]
    base += ["--resolution", "32", "--min-bucket-reso", "16", "--bucket-reso-steps", "16", "--bucket-no-upscale"]
    base += ["--extract", "chunk", "--dtype", "fp32", "--batch-size", "1", "--quiet"]
    with torch_threads(1):  # what each of two CPU device processes gets on two cores
        one = CliRunner().invoke(cli, [*base, "--device", "cpu", "--out", str(tmp_path / "one")])
    two = CliRunner().invoke(cli, [*base, "--devices", "cpu,cpu", "--out", str(tmp_path / "two")])
    assert one.exit_code == two.exit_code == 0, (one.output, two.output)
    assert sorted(read_cache(tmp_path / "one")) == ["a@00000-005", "a@00005-005", "b@00000-005"]  # whole clips
    assert_same_cache(read_cache(tmp_path / "two"), read_cache(tmp_path / "one"))
