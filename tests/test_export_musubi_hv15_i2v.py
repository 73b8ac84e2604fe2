"""musubi export of HunyuanVideo 1.5 image-to-video clips (``--arch hv15``): beside the latents, ``latents_image`` (the
first frame's latents unscaled at latent frame 0 and the mask channel, 33 channels) and ``siglip`` (SigLIP's last
hidden state), as ``hv_1_5_cache_latents --i2v`` writes them, read back by musubi's rules and collation
(tests/test_export_musubi_hv15.py restates them) and what its trainer makes of them."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.consumers.export.musubi_hv15 import SCALING
from cachebuild.testing import make_tiny_text_pipeline
from cachebuild.testing.i2v import make_tiny_i2v_pipeline
from cachebuild.testing.videos import clip_frames, write_video
from tests.test_export_musubi_hv15 import musubi_load_clips

ARGS = ["--buckets", "musubi", "--resolution", "32", "--latents", "mean", "--workers", "0", "--device", "cpu"]
ARGS += ["--dtype", "fp32", "--quiet"]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_i2v_clips_carry_musubis_latents_image_and_siglip(tmp_path):
    data = tmp_path / "data"
    write_video(data / "walk.mkv", clip_frames(10, (32, 32), seed=0))
    (data / "walk.txt").write_text('a person walking past a sign saying "open"')
    pipe = make_tiny_i2v_pipeline(tmp_path / "pipe", "hunyuanvideo-1.5-i2v", channels=32)  # musubi's trainer: 32
    out = tmp_path / "cache"
    invoke("latents", str(data), "--model", str(pipe), "--out", str(out), "--frames", "5,9", *ARGS)
    text = make_tiny_text_pipeline(tmp_path / "text", "hunyuanvideo-1.5")
    invoke("textenc", str(data), "--model", str(text), "--out", str(out), "--device", "cpu", "--quiet")
    folder = tmp_path / "musubi"
    summary = json.loads(invoke("export", str(out), "--format", "musubi", "--to", str(folder), "--json"))
    assert summary["family"] == "hv15" and any("unscaled" in w for w in summary["warnings"]), summary
    cache = open_cache(out)
    items = [it for group in musubi_load_clips(folder).values() for it in group]
    assert sorted((it["start"], it["frames"]) for it in items) == [(0, 5), (0, 9)]
    for item in items:
        key = f"walk@{item['start']:05d}-{item['frames']:03d}"
        rec, want = cache.record(key), cache.pipeline_inputs(key)
        f, h, w = rec["latents"].shape[1:]
        assert item["latents_image:key"] == f"latents_image_{f}x{h}x{w}_float32"
        image = item["latents_image"]
        assert image.dtype == torch.float32 and image.shape == (33, f, h, w)
        assert torch.equal(image[:32, 0], rec["condition_latents"][:, 0].float())  # the raw mode, as musubi saves it
        assert not image[:32, 1:].any() and torch.equal(image[32], want["mask_concat"][0])  # 1 at frame 0 only
        assert torch.allclose(image[:32] * SCALING, want["cond_latents_concat"], atol=1e-6)  # the pipeline scales it
        assert item["siglip:key"] == "siglip_float16" and item["siglip"].shape == (4, 32)  # tiny SigLIP: 4 tokens
        assert torch.equal(item["siglip"], want["image_embeds"].to(torch.float16))
        noisy = torch.randn(1, 32, f, h, w)  # hv_1_5_train_network: noisy latents ++ latents_image
        assert torch.cat([noisy, image[None]], dim=1).shape[1] == 2 * 32 + 1
