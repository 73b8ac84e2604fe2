"""Fidelity of Wan's clips: after ``cachebuild latents --frames ...`` (through the CLI) on lossless synthetic videos and
a tiny random ``AutoencoderKLWan``, ``open_cache(out).pipeline_inputs(clip key, family="wan")`` equals what
``WanVideoToVideoPipeline.prepare_latents`` computes from the same frames (its own ``video_processor`` and VAE call,
with a scheduler that hands the clean latents back instead of noising them), within 1e-5 in fp32; and a frame off
by one, the frames in the wrong order or the normalisation left out are far off it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.consumers.verify import verify_cache
from cachebuild.keys import split_clip_key
from cachebuild.testing.videos import clip_frames, write_video

TOLERANCE = 1e-5  # relative difference allowed against the pipeline, in fp32
SIZE = (32, 32)  # (W, H): a bucket of --resolution 32 with steps of 16, so frames are neither resized nor cut
VIDEOS = {"walk": 14, "run/fast": 7}  # key -> frames
CLIP_ARGS = ["--frames", "5,9", "--extract", "chunk"]


class CleanScheduler:
    """Hands ``prepare_latents`` its clean latents back: ``add_noise(x, noise, t) = x``."""

    def add_noise(self, original, noise, timestep):
        return original


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def pipeline_latents(vae_folder: Path, frames: np.ndarray) -> torch.Tensor:
    """``WanVideoToVideoPipeline.prepare_latents`` of (F, H, W, 3) uint8 ``frames``: (1, C, F', h, w)."""
    import diffusers

    vae = diffusers.AutoencoderKLWan.from_pretrained(vae_folder).eval()
    pipe = diffusers.WanVideoToVideoPipeline(
        tokenizer=None, text_encoder=None, transformer=None, vae=vae, scheduler=CleanScheduler()
    )
    h, w = frames.shape[1:3]
    video = pipe.video_processor.preprocess_video([Image.fromarray(f) for f in frames], height=h, width=w)
    with torch.no_grad():
        return pipe.prepare_latents(
            video, 1, vae.config.z_dim, h, w, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0),
            timestep=torch.tensor([500]),
        )  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_wan_vae):
    """(vae folder, {key: frames}, cache) built through the CLI."""
    root = tmp_path_factory.mktemp("wan")
    vae = tiny_wan_vae
    frames = {key: clip_frames(n, SIZE, seed=i) for i, (key, n) in enumerate(VIDEOS.items())}
    for key, pixels in frames.items():
        write_video(root / "data" / f"{key}.mkv", pixels)
    out = root / "cache"
    args = ["latents", str(root / "data"), "--vae", str(vae), "--latents", "mean", "--workers", "0", "--out", str(out)]
    args += ["--resolution", "32", "--min-bucket-reso", "16", "--bucket-reso-steps", "16", *CLIP_ARGS]
    args += ["--device", "cpu", "--dtype", "fp32", "--dtype-out", "fp32", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return vae, frames, out


def test_every_clip_equals_the_pipelines_prepare_latents(built):
    vae, frames, out = built
    cache = open_cache(out)
    # chunk: 14 frames -> 5-frame clips at 0 and 5 and a 9-frame clip at 0; 7 frames -> one 5-frame clip
    assert cache.keys() == ["run/fast@00000-005", "walk@00000-005", "walk@00000-009", "walk@00005-005"]
    for key in cache:
        video, start, n = split_clip_key(key)
        got = cache.pipeline_inputs(key, family="wan")["latents"]
        want = pipeline_latents(vae, frames[video][start : start + n])[0]
        assert got.shape == want.shape == (4, 1 + (n - 1) // 4, 8, 8)
        assert relative_difference(got, want) <= TOLERANCE, key
        rec = cache[key]
        assert (rec["source"], rec["start"], rec["frames"], rec["fps"]) == (f"{video}.mkv", start, n, 16.0)
        assert rec["bucket"] == SIZE and cache.bucket(key) == (*SIZE, n)


def test_a_frame_off_by_one_the_wrong_order_or_no_normalisation_would_fail(built):
    vae, frames, out = built
    cache = open_cache(out)
    got = cache.pipeline_inputs("walk@00005-005", family="wan")["latents"]
    pixels = frames["walk"]
    want = pipeline_latents(vae, pixels[5:10])[0]
    assert relative_difference(got, want) <= TOLERANCE
    assert relative_difference(got, pipeline_latents(vae, pixels[6:11])[0]) > 100 * TOLERANCE  # one frame late
    assert relative_difference(got, pipeline_latents(vae, pixels[5:10][::-1])[0]) > 100 * TOLERANCE  # reversed
    raw = cache["walk@00005-005"]["latents"]
    assert relative_difference(raw, want) > 100 * TOLERANCE  # not normalised


def test_verify_knows_the_clip_shapes(built):
    _, _, out = built
    report = verify_cache(out)
    assert report.ok, report.problems
    assert report.items_checked == 4
