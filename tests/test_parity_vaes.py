"""Fidelity of the VAEs with per-channel normalisation: after ``cachebuild latents`` (through the CLI) on a tiny
random ``AutoencoderKLQwenImage`` or ``AutoencoderKLFlux2``, ``open_cache(out).pipeline_inputs(key, family=...)``
equals what ``QwenImageEditPipeline`` / ``Flux2Pipeline`` compute with their own ``_encode_vae_image`` (a
pipeline object holding only the VAE), in the layout their ``prepare_latents`` builds before packing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.config import ModelSpec
from cachebuild.consumers.preview import preview_cache
from cachebuild.consumers.verify import verify_cache
from cachebuild.errors import ConfigError
from cachebuild.families import flux2, qwenimage
from cachebuild.families.vae import family_of
from cachebuild.hub import resolve_vae
from cachebuild.testing import make_tiny_flux2_vae, make_tiny_qwen_vae, make_tiny_vae
from tests.conftest import write_image

TOLERANCE = 1e-5  # relative difference allowed against the pipeline, in fp32
KEYS = ("a", "b")
MAKERS = {"qwen-image": make_tiny_qwen_vae, "flux2": make_tiny_flux2_vae}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def reference_latents(family: str, vae_folder: Path, image: Path) -> torch.Tensor:
    """The pipeline's own encode-plus-normalisation of a bucket-sized image, batch dimension dropped."""
    import diffusers

    pixels = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1)[None].float()
    x = pixels / 127.5 - 1.0  # (1, 3, H, W) in [-1, 1], as the pipelines' image processors hand it on
    with torch.no_grad():
        if family == "qwen-image":
            vae = diffusers.AutoencoderKLQwenImage.from_pretrained(vae_folder).eval()
            pipe = diffusers.QwenImageEditPipeline(
                scheduler=None, vae=vae, text_encoder=None, tokenizer=None, processor=None, transformer=None
            )
            z = pipe._encode_vae_image(x[:, :, None], generator=None)  # (1, C, 1, h, w), the posterior mode
            return z.transpose(1, 2)[0]  # prepare_latents' layout: (1, C, h, w), frames first
        vae = diffusers.AutoencoderKLFlux2.from_pretrained(vae_folder).eval()
        pipe = diffusers.Flux2Pipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, transformer=None)
        return pipe._encode_vae_image(x, generator=None)[0]  # (4C, h/2, w/2)


@pytest.fixture(scope="module", params=["qwen-image", "flux2"])
def built(request, tmp_path_factory):
    """(family, vae folder, dataset, cache) built through the CLI."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    vae = MAKERS[family](root / "vae")
    data, out = root / "data", root / "cache"
    write_image(data / "a.png", (64, 64), seed=0)  # bucket-sized: no resize, no crop
    write_image(data / "b.png", (64, 64), seed=1)
    args = ["latents", str(data), "--vae", str(vae), "--latents", "mean", "--workers", "0", "--out", str(out)]
    args += ["--resolution", "64", "--min-bucket-reso", "64", "--bucket-reso-steps", "16"]
    args += ["--device", "cpu", "--dtype", "fp32", "--dtype-out", "fp32", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return family, vae, data, out


def test_pipeline_inputs_equal_the_pipelines_encode(built):
    family, vae, data, out = built
    cache = open_cache(out)
    for key in KEYS:
        got = cache.pipeline_inputs(key, family=family)["latents"]
        want = reference_latents(family, vae, data / f"{key}.png")
        assert got.shape == want.shape == ((1, 4, 32, 32) if family == "qwen-image" else (16, 16, 16))
        assert relative_difference(got, want) <= TOLERANCE
        assert cache[key]["latents"].shape == (4, 32, 32)  # stored raw: (C, H/f, W/f), the frame squeezed out


def test_skipped_normalisation_or_a_wrong_channel_order_would_fail(built):
    """The comparison above is discriminating: raw latents, or patches laid out in another channel order, are far
    off the pipeline's."""
    family, vae, data, out = built
    cache = open_cache(out)
    raw = cache["a"]["latents"]
    want = reference_latents(family, vae, data / "a.png")
    if family == "qwen-image":
        assert relative_difference(raw[None], want) > 100 * TOLERANCE
        reversed_stats = dict(cache.fingerprint["vae"])
        reversed_stats["latents_mean"] = reversed_stats["latents_mean"][::-1]
        reversed_stats["latents_std"] = reversed_stats["latents_std"][::-1]
        assert relative_difference(qwenimage.normalize_latents(raw, reversed_stats)[None], want) > 100 * TOLERANCE
        return
    assert relative_difference(flux2.patchify_latents(raw[None])[0], want) > 100 * TOLERANCE  # no batch norm
    c, h, w = raw.shape  # patch offset before channel, (dy, dx, c), instead of the pipeline's (c, dy, dx)
    offset_first = raw.reshape(c, h // 2, 2, w // 2, 2).permute(2, 4, 0, 1, 3).reshape(4 * c, h // 2, w // 2)
    bn = cache.fingerprint["vae"]
    mean = torch.tensor(bn["bn_running_mean"]).view(-1, 1, 1)
    std = torch.sqrt(torch.tensor(bn["bn_running_var"]).view(-1, 1, 1) + bn["batch_norm_eps"])
    assert relative_difference((offset_first - mean) / std, want) > 100 * TOLERANCE


def test_packing_matches_the_pipeline(built):
    import diffusers

    family, _, _, out = built
    latents = open_cache(out).pipeline_inputs("a", family=family)["latents"][None]
    if family == "qwen-image":
        want = diffusers.QwenImagePipeline._pack_latents(latents, 1, 4, 32, 32)
        assert torch.equal(qwenimage.pack_latents(latents), want)
    else:
        assert torch.equal(flux2.pack_latents(latents), diffusers.Flux2Pipeline._pack_latents(latents))


def test_verify_knows_the_shapes_and_preview_decodes(built, tmp_path):
    family, vae, data, out = built
    assert verify_cache(out).ok
    summary = preview_cache(out, ModelSpec(vae=str(vae)), tmp_path / "p.png", n=2, dataset=data, tile=32)
    assert summary.keys == list(KEYS)
    with pytest.raises(ConfigError, match="pipeline_inputs"):
        open_cache(out).dataset(scale=True)  # a scalar scale would be wrong for these latents


def test_the_fingerprint_records_the_statistics_and_only_for_these_vaes(built, tmp_path):
    family, vae, _, out = built
    recorded = open_cache(out).fingerprint["vae"]
    if family == "qwen-image":
        assert recorded["latents_std"] == pytest.approx(torch.linspace(0.5, 3.0, 4).tolist())
    else:
        assert len(recorded["bn_running_var"]) == 16 and recorded["patch_size"] == [2, 2]
        assert recorded["bn_running_mean"] != [0.0] * 16  # the tiny VAE's random statistics were read
    plain = family_of(resolve_vae(ModelSpec(vae=str(make_tiny_vae(tmp_path / "kl")))), None)
    assert plain.normalization is None  # AutoencoderKL caches keep their fingerprint: no new keys


def test_sample_and_moments_are_allowed_with_a_posterior_and_steps_must_fit_the_patches(built, tmp_path):
    family, vae, data, _ = built
    args = ["latents", str(data), "--vae", str(vae), "--workers", "0", "--device", "cpu", "--quiet"]
    args += ["--resolution", "64", "--min-bucket-reso", "64", "--dtype", "fp32"]
    moments = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "m"), "--latents", "moments"])
    assert moments.exit_code == 0, moments.output
    assert set(open_cache(tmp_path / "m").tensors("a")) == {"mean", "std"}
    odd = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "o"), "--bucket-reso-steps", "2"])
    assert odd.exit_code == 2 and "2x2 latent patches" in odd.output
