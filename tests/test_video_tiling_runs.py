"""A video run's tiles through the CLI (HunyuanVideo 1.5's tiny VAE, whose 4 px cells take tiles of 16 px): a
recorded setting applied to every clip; kept when a cache is finished or grows under ``--tiling auto``; chosen by
auto for a new cache only where its largest clip does not fit the budget. A clip that cannot fit at batch 1 even
tiled fails alone with the memory it needs, and the VAE encodes with its decoder released. A run interrupted half
way resumes to the tensors of one never interrupted."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cachebuild import open_cache
from cachebuild.cache.manifest import Manifest
from cachebuild.cli import cli
from cachebuild.cli.output import Interrupted
from cachebuild.families.vae import VaeEncoder
from cachebuild.families.video_vae import Tiling, encode_clip_raw
from cachebuild.testing.videos import clip_frames, write_video
from tests.conftest import done_count
from tests.test_parity_video_families import relative_difference
from tests.test_pipeline import assert_same_cache, read_cache
from tests.test_video_vae import pixels

KIND = "hunyuanvideo-1.5"
TILES = Tiling(16, 12)  # a 32 px clip takes 3 x 3 of them
TILE_ARGS = ["--tiling", "on", "--tile-size", "16", "--tile-stride", "12"]
WRONG = 1e-3  # tiles change these latents by far more (the tiles are 4 latent cells wide)


def run(data: Path, vae: Path, out: Path, *extra: str):
    args = ["latents", str(data), "--vae", str(vae), "--out", str(out), "--latents", "mean", "--workers", "0"]
    args += ["--resolution", "32", "--min-bucket-reso", "16", "--bucket-reso-steps", "16", "--frames", "5,9"]
    return CliRunner().invoke(cli, [*args, "--device", "cpu", "--dtype", "fp32", "--dtype-out", "fp32", *extra])


def test_tiles_are_recorded_applied_to_every_clip_and_kept_as_the_cache_grows(tmp_path, tiny_video_vaes):
    import diffusers

    folder, family, _ = tiny_video_vaes[KIND]
    vae = diffusers.AutoencoderKLHunyuanVideo15.from_pretrained(folder).eval()  # its own: tiles are set on the model
    frames = {"walk": clip_frames(9, (32, 32), seed=0), "run": clip_frames(5, (32, 32), seed=1)}
    write_video(tmp_path / "data" / "walk.mkv", frames["walk"])
    out = tmp_path / "cache"
    assert run(tmp_path / "data", folder, out, *TILE_ARGS).exit_code == 0
    fingerprint = open_cache(out).fingerprint
    assert fingerprint["tiling"] == {"tile": 16, "stride": 12}
    write_video(tmp_path / "data" / "run.mkv", frames["run"])  # a new video: auto finishes the cache as it began
    result = run(tmp_path / "data", folder, out, "--json")
    assert result.exit_code == 0 and '"encoded": 1,' in result.output, result.output
    cache = open_cache(out)
    assert cache.fingerprint == fingerprint and cache.keys() == ["run@00000-005", "walk@00000-005", "walk@00000-009"]
    c = family.latent_channels
    for key in cache:
        video, n = key.split("@")[0], int(key[-3:])
        clip = pixels(frames[video][:n])
        tiled, whole = (encode_clip_raw(vae, family, clip, t)[0, :c] for t in (TILES, None))
        assert relative_difference(cache[key]["latents"], tiled) < 1e-6, key
        assert relative_difference(cache[key]["latents"], whole) > WRONG, key
    refused = run(tmp_path / "data", folder, out, "--tiling", "off")
    assert refused.exit_code == 2 and "tiling" in refused.output and "Traceback" not in refused.output


def test_auto_tiles_a_new_cache_only_when_its_largest_clip_does_not_fit(tmp_path, tiny_video_vaes):
    """The tiny encoder needs a few MiB for a 9-frame clip: under a 1 MiB budget auto halves the VAE's own 256 px
    tiles to its smallest, 128 px; under 8 GiB it records nothing."""
    folder = tiny_video_vaes[KIND][0]
    write_video(tmp_path / "data" / "walk.mkv", clip_frames(9, (32, 32), seed=0))
    for budget, want in (("0.001", {"tile": 128, "stride": 96}), ("8", None)):
        out = tmp_path / budget
        assert run(tmp_path / "data", folder, out, "--vram-budget", budget, "--quiet").exit_code == 0
        assert open_cache(out).fingerprint.get("tiling") == want


def test_a_clip_that_cannot_fit_even_tiled_fails_alone_with_the_memory_it_needs(tmp_path, tiny_video_vaes, monkeypatch):
    """The 9-frame clip runs out of device memory whatever its batch: it fails with what it needs at batch 1 and the
    fix; the 5-frame clip of the same video is stored. The VAE that encodes holds no decoder."""
    import cachebuild.families.vae as vae_module

    folder = tiny_video_vaes[KIND][0]
    write_video(tmp_path / "data" / "walk.mkv", clip_frames(9, (32, 32), seed=0))
    decoders = []

    def encode(vae, family, x, tiling):
        decoders.append(vae.decoder)
        if x.shape[2] == 9:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return encode_clip_raw(vae, family, x, tiling)

    monkeypatch.setattr(vae_module, "encode_clip_raw", encode)
    out = tmp_path / "cache"
    result = run(tmp_path / "data", folder, out, *TILE_ARGS, "--vram-budget", "4", "--quiet")
    assert result.exit_code == 3, result.output
    with Manifest.open(out, read_only=True) as m:
        failed = {r.key: r.reason for r in m.items("latents", "failed")}
        assert [r.key for r in m.items("latents", "done")] == ["walk@00000-005"]
    assert list(failed) == ["walk@00000-009"]
    want = r"a 9x32x32 clip needs about \d+ MiB of device memory in 16 px tiles at batch 1, over the 4\.0 GiB budget"
    assert re.match(want + "; lower --tile-size", failed["walk@00000-009"]), failed
    assert decoders and all(d is None for d in decoders)


def test_an_interrupted_run_resumes_to_the_tensors_of_one_never_interrupted(tmp_path, video_family_caches, monkeypatch):
    """Ctrl-C at the third clip of a one-clip-per-batch, one-clip-per-shard run; the same command again finishes it,
    bit for bit the cache built in one go (tests.test_parity_video_families)."""
    built = video_family_caches[KIND]
    out = tmp_path / "cache"
    args = [*built.args(built.data, built.vae, out, "5,9"), "--batch-size", "1", "--shard-mb", "0.001"]
    calls = []
    encode_raw = VaeEncoder.encode_raw

    def interrupted(self, batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise Interrupted(signal.SIGINT)
        return encode_raw(self, batch)

    monkeypatch.setattr(VaeEncoder, "encode_raw", interrupted)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 130 and "run the same command to continue" in result.output, result.output
    assert 0 < done_count(out) < 6
    monkeypatch.undo()
    assert CliRunner().invoke(cli, args).exit_code == 0
    resumed, whole = read_cache(out), read_cache(built.cache)
    assert len(whole) == 6 and all(np.isfinite(t.numpy()).all() for item in whole.values() for t in item.values())
    assert_same_cache(resumed, whole)


def test_the_estimate_counts_the_encoder_alone():
    """Caching releases the decoder (video_vae.release_decoder): the released HunyuanVideo 1.5's encoder is a third of
    its weights, and that is what auto and a clip's failure count."""
    import diffusers

    from cachebuild.families.video_tiling import weight_bytes
    from cachebuild.testing import VIDEO_VAE_CONFIGS

    config = VIDEO_VAE_CONFIGS[KIND]
    with torch.device("meta"):
        model = diffusers.AutoencoderKLHunyuanVideo15.from_config(config)
    decoder = sum(p.numel() for p in model.decoder.parameters()) * 2
    assert weight_bytes(config, 2, encoder_only=True) == weight_bytes(config, 2) - decoder
    assert weight_bytes(config, 2, encoder_only=True) < 0.35 * weight_bytes(config, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["hunyuanvideo-1.5", "ltx-2"])
def test_auto_batch_on_cuda_sizes_each_clip_shape_and_keeps_the_latents(kind, video_family_caches, tmp_path):
    """--batch-size auto on a CUDA device searches each (W, H, F) shape once (remembered in the manifest) and the
    latents equal the CPU cache's within the noise of the device's kernels (cuDNN runs float32 convolutions in
    TF32 on Ampere and later by default)."""
    built = video_family_caches[kind]
    out = tmp_path / "cuda"
    args = built.args(built.data, built.vae, out, "9,17" if kind == "ltx-2" else "5,9")
    args[args.index("--device") + 1] = "cuda"
    assert CliRunner().invoke(cli, [*args, "--batch-size", "auto"]).exit_code == 0
    with Manifest.open(out, read_only=True) as m:
        searched = m.get_meta("auto_batch:latents") or {}
    cache = open_cache(out)
    assert {key.rsplit("|", 1)[1] for key in searched} == {"x".join(map(str, cache.bucket(k))) for k in cache}
    gpu, cpu = read_cache(out), read_cache(built.cache)
    assert sorted(gpu) == sorted(cpu)
    for key in cpu:
        assert relative_difference(gpu[key]["latents"], cpu[key]["latents"]) < 5e-3, key
