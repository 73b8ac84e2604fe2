"""Flux.1 text outputs equal what diffusers' own FluxPipeline.encode_prompt computes, through the CLI and the
reader; and the comparison is discriminating: the masked T5 that trainers can opt into differs from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.testing import make_tiny_text_pipeline, make_tiny_vae
from tests.conftest import write_image

CAPTIONS = {"a": "a photo of a cat", "b": "red car near the river at sunset"}


@pytest.fixture(scope="module")
def flux_pipeline(tmp_path_factory) -> Path:
    return make_tiny_text_pipeline(tmp_path_factory.mktemp("flux") / "pipe", "flux")


@pytest.fixture(scope="module")
def reference(flux_pipeline) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{caption key: (prompt_embeds (512, D), pooled_prompt_embeds (768-like,))} from FluxPipeline itself."""
    import transformers
    from diffusers import FluxPipeline

    tok = transformers.AutoTokenizer
    pipe = FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=transformers.CLIPTextModel.from_pretrained(flux_pipeline / "text_encoder").eval(),
        tokenizer=tok.from_pretrained(flux_pipeline / "tokenizer"),
        text_encoder_2=transformers.T5EncoderModel.from_pretrained(flux_pipeline / "text_encoder_2").eval(),
        tokenizer_2=tok.from_pretrained(flux_pipeline / "tokenizer_2"),
        transformer=None,
    )
    out = {}
    with torch.no_grad():
        for key, text in CAPTIONS.items():
            embeds, pooled, _ = pipe.encode_prompt(text, prompt_2=None, device=torch.device("cpu"))
            out[key] = (embeds[0], pooled[0])
    return out


def build(tmp_path: Path, pipe: Path, *extra: str) -> Path:
    """Latents (a tiny VAE) and Flux text outputs for CAPTIONS' keys, both through the CLI."""
    data, out = tmp_path / "data", tmp_path / "cache"
    for i, (key, text) in enumerate(CAPTIONS.items()):
        write_image(data / f"{key}.png", (64, 64), seed=i)
        (data / f"{key}.txt").write_text(text, encoding="utf-8")
    vae = make_tiny_vae(tmp_path / "vae", latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    common = ["--out", str(out), "--device", "cpu", "--quiet"]
    runs = [
        ["latents", str(data), "--vae", str(vae), "--resolution", "64", "--min-bucket-reso", "64", "--workers", "0"],
        ["textenc", str(data), "--model", str(pipe), "--dtype", "fp32", "--dtype-out", "fp32", *extra],
    ]
    for args in runs:
        result = CliRunner().invoke(cli, [*args, *common])
        assert result.exit_code == 0, result.output
    return out


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_flux_default_equals_the_flux_pipeline(tmp_path, flux_pipeline, reference):
    cache = open_cache(build(tmp_path, flux_pipeline))
    for key, (embeds, pooled) in reference.items():
        got = cache[key]
        assert got["t5"].shape == embeds.shape == (512, embeds.shape[-1])
        assert relative_difference(got["t5"], embeds) <= 1e-5
        assert relative_difference(got["clip_l_pooled"], pooled) <= 1e-5


def test_the_masked_option_differs_from_the_pipeline_so_the_check_is_discriminating(tmp_path, flux_pipeline, reference):
    cache = open_cache(build(tmp_path, flux_pipeline, "--t5-mask"))
    for key, (embeds, _) in reference.items():
        got = cache[key]
        n = int(got["t5_mask"].sum())
        # even at the real tokens, a masked T5 is not what the pipeline computes: the pipeline's tokens see padding
        assert relative_difference(got["t5"][:n], embeds[:n]) > 1e-3
