"""Fidelity: for each family, ``open_cache(out).pipeline_inputs(key)`` after ``cachebuild latents`` and
``cachebuild textenc`` (through the CLI) equals what the family's own diffusers pipeline computes: its
``encode_prompt`` on the same tiny random components, and its VAE encode plus the normalisation its config
names. The tiny encoders are built with a large initial spread, so that a wrong hidden layer or a wrong mask
shows; each family's second test proves that it does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.testing import make_tiny_text_pipeline, make_tiny_vae
from tests.conftest import write_image

CAPTIONS = {
    "a": "a photo of a cat",
    "b": "red car near the river at sunset",
    "c": " ".join(["cat"] * 63),  # 64 T5 tokens with </s>: a masked encode runs past one multiple of 64
    "d": "A  Photo of the CAT,  near\tthe river",  # case, doubled and odd whitespace, punctuation: each
    # tokenizer's own clean-up must run as the pipeline's class runs it (surrounding whitespace is not part of a
    # caption: the caption rules strip it)
}
INIT_SCALE = 10.0  # spreads the tiny encoders' weights so their layers (and a mask) differ visibly
TOLERANCE = 1e-5  # relative difference allowed against the pipeline, in fp32
VAE_FACTORS = {  # the VAE config each family's pipeline normalises with
    "sd15": dict(latent_channels=4, scaling_factor=0.18215),
    "sdxl": dict(latent_channels=4, scaling_factor=0.13025),
    "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
    "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
    "chroma": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
    "z-image": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def load(folder: Path, cls: str):
    import transformers

    return getattr(transformers, cls).from_pretrained(folder).eval()


def tokenizer(folder: Path):
    """The tokenizer as the pipeline loads it: with the class its model_index.json names for that folder."""
    import json

    import transformers

    index = json.loads((folder.parent / "model_index.json").read_text())
    return getattr(transformers, index[folder.name][1]).from_pretrained(folder)


def reference_pipeline(family: str, root: Path):
    """The family's diffusers pipeline with its text encoders loaded, and nothing else."""
    import diffusers

    if family == "sd15":
        return diffusers.StableDiffusionPipeline(
            vae=None,
            text_encoder=load(root / "text_encoder", "CLIPTextModel"),
            tokenizer=tokenizer(root / "tokenizer"),
            unet=None,
            scheduler=None,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            vae=None,
            text_encoder=load(root / "text_encoder", "CLIPTextModel"),
            text_encoder_2=load(root / "text_encoder_2", "CLIPTextModelWithProjection"),
            tokenizer=tokenizer(root / "tokenizer"),
            tokenizer_2=tokenizer(root / "tokenizer_2"),
            unet=None,
            scheduler=None,
        )
    if family == "sd3":
        return diffusers.StableDiffusion3Pipeline(
            transformer=None,
            scheduler=None,
            vae=None,
            text_encoder=load(root / "text_encoder", "CLIPTextModelWithProjection"),
            tokenizer=tokenizer(root / "tokenizer"),
            text_encoder_2=load(root / "text_encoder_2", "CLIPTextModelWithProjection"),
            tokenizer_2=tokenizer(root / "tokenizer_2"),
            text_encoder_3=load(root / "text_encoder_3", "T5EncoderModel"),
            tokenizer_3=tokenizer(root / "tokenizer_3"),
        )
    if family == "chroma":
        return diffusers.ChromaPipeline(
            scheduler=None,
            vae=None,
            text_encoder=load(root / "text_encoder", "T5EncoderModel"),
            tokenizer=tokenizer(root / "tokenizer"),
            transformer=None,
        )
    if family == "z-image":
        return diffusers.ZImagePipeline(
            scheduler=None,
            vae=None,
            text_encoder=load(root / "text_encoder", "Qwen3Model"),
            tokenizer=tokenizer(root / "tokenizer"),
            transformer=None,
        )
    return diffusers.FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=load(root / "text_encoder", "CLIPTextModel"),
        tokenizer=tokenizer(root / "tokenizer"),
        text_encoder_2=load(root / "text_encoder_2", "T5EncoderModel"),
        tokenizer_2=tokenizer(root / "tokenizer_2"),
        transformer=None,
    )


def encode_prompt(family: str, pipe, text: str) -> dict[str, torch.Tensor]:
    """What the pipeline's own encode_prompt returns for ``text``, batch dimension dropped."""
    cpu = torch.device("cpu")
    with torch.no_grad():
        if family == "sd15":
            embeds, _ = pipe.encode_prompt(text, cpu, 1, do_classifier_free_guidance=False)
            return {"prompt_embeds": embeds[0]}
        if family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(text, device=cpu, do_classifier_free_guidance=False)
            return {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                text, None, None, device=cpu, do_classifier_free_guidance=False, max_sequence_length=256
            )
            return {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}
        if family == "chroma":
            embeds, text_ids, mask, *_ = pipe.encode_prompt(text, device=cpu, do_classifier_free_guidance=False)
            return {"prompt_embeds": embeds[0], "prompt_attention_mask": mask[0], "text_ids": text_ids}
        if family == "z-image":  # a list of (T_i, D): the real tokens of each prompt
            embeds, _ = pipe.encode_prompt(text, device=cpu, do_classifier_free_guidance=False)
            return {"prompt_embeds": embeds[0]}
        embeds, pooled, text_ids = pipe.encode_prompt(text, prompt_2=None, device=cpu)
        return {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0], "text_ids": text_ids}


def reference_latents(vae_folder: Path, image: Path) -> torch.Tensor:
    """The VAE's posterior mean for a bucket-sized image, normalised as the pipelines do with its config."""
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    pixels = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        z = vae.encode(pixels / 127.5 - 1.0).latent_dist.mode()[0]
    shift = vae.config.shift_factor or 0.0
    return (z - shift) * vae.config.scaling_factor


def build_through_cli(root: Path, captions: dict[str, str], pipe: Path, vae: list[str], step: int = 16):
    """(dataset, cache): a 64-px image and a caption per key under ``root / "data"``, then ``cachebuild latents
    --latents mean`` with the ``vae`` arguments and ``cachebuild textenc --model pipe``, in fp32, through the CLI.
    Bucket-sized images: no resize, no crop."""
    data, out = root / "data", root / "cache"
    for i, (key, text) in enumerate(captions.items()):
        write_image(data / f"{key}.png", (64, 64), seed=i)
        (data / f"{key}.txt").write_text(text, encoding="utf-8")
    common = ["--out", str(out), "--device", "cpu", "--dtype", "fp32", "--dtype-out", "fp32", "--quiet"]
    buckets = ["--resolution", "64", "--min-bucket-reso", "64", "--bucket-reso-steps", str(step)]
    runs = [
        ["latents", str(data), *vae, "--latents", "mean", "--workers", "0", *buckets],
        ["textenc", str(data), "--model", str(pipe)],
    ]
    for args in runs:
        result = CliRunner().invoke(cli, [*args, *common])
        assert result.exit_code == 0, result.output
    return data, out


@pytest.fixture(scope="module", params=["sd15", "sdxl", "sd3", "flux", "chroma", "z-image"])
def built(request, tmp_path_factory):
    """(family, pipeline folder, vae folder, dataset, cache) built through the CLI."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    pipe = make_tiny_text_pipeline(root / "pipe", family, init_scale=INIT_SCALE)
    vae = make_tiny_vae(root / "vae", **VAE_FACTORS[family])
    data, out = build_through_cli(root, CAPTIONS, pipe, ["--vae", str(vae)])
    return family, pipe, vae, data, out


def test_pipeline_inputs_equal_the_family_pipeline(built):
    family, pipe_folder, vae, data, out = built
    pipe = reference_pipeline(family, pipe_folder)
    cache = open_cache(out)
    for key, text in CAPTIONS.items():
        got = cache.pipeline_inputs(key)
        want = encode_prompt(family, pipe, text)
        if "prompt_attention_mask" in want:  # only the rows under the mask reach the transformer (and are stored)
            keep = want["prompt_attention_mask"].bool()
            assert torch.equal(got["prompt_attention_mask"], want["prompt_attention_mask"])
            got["prompt_embeds"], want["prompt_embeds"] = got["prompt_embeds"][keep], want["prompt_embeds"][keep]
        for name, tensor in want.items():
            assert got[name].shape == tensor.shape, (family, name)
            if tensor.abs().sum() == 0:
                assert not got[name].abs().sum(), (family, name)  # text_ids: zeros
            else:
                assert relative_difference(got[name], tensor) <= TOLERANCE, (family, name)
        assert relative_difference(got["latents"], reference_latents(vae, data / f"{key}.png")) <= TOLERANCE


def test_a_wrong_layer_or_mask_would_fail(built):
    """The comparison above is discriminating: the neighbouring layer, or T5 run with the mask, is far off."""
    family, pipe_folder, _, _, _ = built
    pipe = reference_pipeline(family, pipe_folder)
    text = CAPTIONS["b"]
    right = encode_prompt(family, pipe, text)["prompt_embeds"]
    if family == "chroma":  # T5 masked: an unmasked encode must fail at the real tokens
        enc = pipe.tokenizer([text], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        with torch.no_grad():
            unmasked = pipe.text_encoder(enc.input_ids).last_hidden_state[0]
        n = int(enc.attention_mask.sum())
        assert relative_difference(unmasked[:n], right[:n]) > 100 * TOLERANCE
        return
    if family == "z-image":  # the last layer instead of the penultimate must fail; so must a missing template
        # (no mask would not: Qwen3 is causal and right-padded, so the real tokens never see the padding)
        prompt = pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        enc = pipe.tokenizer([prompt], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = pipe.text_encoder(enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True)
        n = int(enc.attention_mask.sum())
        assert torch.equal(out.hidden_states[-2][0, :n], right)  # the reference is what the pipeline computes
        assert relative_difference(out.hidden_states[-1][0, :n], right) > 100 * TOLERANCE
        bare = pipe.tokenizer([text], return_tensors="pt").input_ids
        with torch.no_grad():
            untemplated = pipe.text_encoder(bare, output_hidden_states=True).hidden_states[-2][0]
        assert untemplated.shape[0] < n and relative_difference(untemplated, right[: untemplated.shape[0]]) > 0.1
        return
    tok = pipe.tokenizer
    ids = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
    if family in ("sdxl", "sd3"):  # penultimate layer stored: the last one instead must fail
        wrong_clip = hidden[-1][0]
        assert relative_difference(wrong_clip, right[:77, : wrong_clip.shape[-1]]) > 100 * TOLERANCE
    if family == "sd15":  # last layer stored: the penultimate one instead must fail
        assert relative_difference(hidden[-2][0], right) > 100 * TOLERANCE
    if family in ("sd3", "flux"):  # T5 unmasked: a masked encode must fail, even at the real tokens
        t5, t5_tok = (
            (pipe.text_encoder_3, pipe.tokenizer_3) if family == "sd3" else (pipe.text_encoder_2, pipe.tokenizer_2)
        )
        length = 256 if family == "sd3" else 512
        enc = t5_tok([text], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        with torch.no_grad():
            masked = t5(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state[0]
        n = int(enc.attention_mask.sum())
        unmasked = right[-length:]
        assert relative_difference(masked[:n], unmasked[:n]) > 100 * TOLERANCE


def test_verify_and_preview_accept_the_cache(built, tmp_path):
    """Both stores of every family verify clean, and preview decodes its latents with the family's VAE."""
    family, _, vae, data, out = built
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 0, (family, result.output)
    png = tmp_path / "grid.png"
    args = ["preview", str(out), "--vae", str(vae), "-n", "2", "-o", str(png), "--dataset", str(data)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and png.is_file(), (family, result.output)
