"""Fidelity for Lumina 2 and Sana (Gemma2 text encoders): ``open_cache(out).pipeline_inputs(key)`` after
``cachebuild latents --latents mean`` and ``cachebuild textenc`` through the CLI equals ``Lumina2Pipeline`` /
``SanaPipeline``'s own ``encode_prompt`` (Sana with the ``complex_human_instruction`` its ``__call__`` passes by
default) and their VAE encode plus normalisation, on tiny random components; and a wrong layer, a missing system
prompt or instruction, the tokenizer's own left padding, or a caption left in its case would each fail that test."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.config import TextencConfig, TextFamily
from cachebuild.families import text as text_families
from cachebuild.testing import make_tiny_dc_vae, make_tiny_text_pipeline, make_tiny_vae
from tests.conftest import write_image
from tests.test_parity_pipelines import INIT_SCALE, TOLERANCE, load, relative_difference, tokenizer

CAPTIONS = {
    "a": "a photo of a cat",
    "b": "Red Car near the River at Sunset",  # Sana lower-cases it; Lumina 2 does not
    "c": " ".join(["cat"] * 63),  # past one multiple of 64 tokens with either prefix
    "d": " ".join(["dog"] * 320),  # longer than either max length: truncated, Sana keeps all 300 rows
}
LUMINA2_VAE = dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)  # Flux.1's kind


def sana_instruction() -> list[str]:
    """What SanaPipeline.__call__ passes to encode_prompt when the caller names no instruction."""
    import diffusers

    return inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default


def reference_pipeline(family: str, root: Path):
    import diffusers

    parts = dict(text_encoder=load(root / "text_encoder", "Gemma2Model"), tokenizer=tokenizer(root / "tokenizer"))
    if family == "lumina2":
        return diffusers.Lumina2Pipeline(transformer=None, scheduler=None, vae=None, **parts)
    return diffusers.SanaPipeline(vae=None, transformer=None, scheduler=None, **parts)


def encode_prompt(family: str, pipe, text: str) -> dict[str, torch.Tensor]:
    """What the pipeline hands its transformer for ``text`` at its defaults, batch dimension dropped."""
    extra = {"complex_human_instruction": sana_instruction()} if family == "sana" else {}
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(
            text, do_classifier_free_guidance=False, device=torch.device("cpu"), **extra
        )
    return {"prompt_embeds": embeds[0], "prompt_attention_mask": mask[0]}


def reference_latents(family: str, vae_folder: Path, image: Path) -> torch.Tensor:
    import numpy as np
    from diffusers import AutoencoderDC, AutoencoderKL
    from PIL import Image

    pixels = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1)[None].float()
    x = pixels / 127.5 - 1.0
    with torch.no_grad():
        if family == "sana":  # no posterior: the encoder's one latent, times the scaling factor
            vae = AutoencoderDC.from_pretrained(vae_folder).eval()
            return vae.encode(x).latent[0] * vae.config.scaling_factor
        vae = AutoencoderKL.from_pretrained(vae_folder).eval()
        z = vae.encode(x).latent_dist.mode()[0]
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def build(root: Path, family: str, latents: str = "mean") -> tuple[Path, Path, Path, Path, CliRunner]:
    pipe = make_tiny_text_pipeline(root / "pipe", family, init_scale=INIT_SCALE)
    vae = make_tiny_dc_vae(root / "vae") if family == "sana" else make_tiny_vae(root / "vae", **LUMINA2_VAE)
    data, out = root / "data", root / "cache"
    for i, (key, text) in enumerate(CAPTIONS.items()):
        write_image(data / f"{key}.png", (64, 64), seed=i)  # bucket-sized: no resize, no crop
        (data / f"{key}.txt").write_text(text, encoding="utf-8")
    return pipe, vae, data, out, CliRunner()


COMMON = ["--device", "cpu", "--dtype", "fp32", "--dtype-out", "fp32", "--quiet"]
BUCKETS = ["--resolution", "64", "--min-bucket-reso", "64", "--bucket-reso-steps", "16", "--workers", "0"]


@pytest.fixture(scope="module", params=["lumina2", "sana"])
def built(request, tmp_path_factory):
    """(family, pipeline folder, vae folder, dataset, cache) built through the CLI."""
    family = request.param
    pipe, vae, data, out, runner = build(tmp_path_factory.mktemp(family), family)
    runs = [
        ["latents", str(data), "--vae", str(vae), "--latents", "mean", *BUCKETS],
        ["textenc", str(data), "--model", str(pipe)],
    ]
    for args in runs:
        result = runner.invoke(cli, [*args, "--out", str(out), *COMMON])
        assert result.exit_code == 0, result.output
    return family, pipe, vae, data, out


def test_pipeline_inputs_equal_the_family_pipeline(built):
    family, pipe_folder, vae, data, out = built
    pipe = reference_pipeline(family, pipe_folder)
    cache = open_cache(out)
    length = 256 if family == "lumina2" else 300
    for key, text in CAPTIONS.items():
        got, want = cache.pipeline_inputs(key), encode_prompt(family, pipe, text)
        mask = want["prompt_attention_mask"]
        assert mask.shape == (length,) and got["prompt_attention_mask"].dtype == mask.dtype
        assert torch.equal(got["prompt_attention_mask"], mask)
        assert got["prompt_embeds"].shape == want["prompt_embeds"].shape == (length, 32)
        keep = mask.bool()  # the rows the transformer reads; the others come back as zeros
        assert relative_difference(got["prompt_embeds"][keep], want["prompt_embeds"][keep]) <= TOLERANCE, key
        assert not got["prompt_embeds"][~keep].abs().sum()
        want_latents = reference_latents(family, vae, data / f"{key}.png")
        assert got["latents"].shape == want_latents.shape
        assert relative_difference(got["latents"], want_latents) <= TOLERANCE
    assert int(encode_prompt(family, pipe, CAPTIONS["d"])["prompt_attention_mask"].sum()) == length  # truncated
    result = CliRunner().invoke(cli, ["verify", str(out)])  # the stored row counts are the ones verify expects
    assert result.exit_code == 0, result.output


def test_a_wrong_layer_prefix_padding_or_case_would_fail(built):
    """Each way of getting the encoding slightly wrong moves the real rows far past the tolerance."""
    family, pipe_folder, _, _, _ = built
    pipe = reference_pipeline(family, pipe_folder)
    text = CAPTIONS["b"]
    want = encode_prompt(family, pipe, text)
    right, keep = want["prompt_embeds"], want["prompt_attention_mask"].bool()
    tok, model = pipe.tokenizer, pipe.text_encoder
    lumina = family == "lumina2"
    prefix = pipe.system_prompt + " <Prompt Start> " if lumina else "\n".join(sana_instruction())
    caption = text if lumina else text.lower()
    length = 256 if lumina else len(tok.encode(prefix)) + 298

    def rows(prompt: str, layer: int, side: str = "right") -> torch.Tensor:
        """The encoder's ``layer`` at the rows the pipeline keeps, for ``prompt`` padded on ``side``."""
        tok.padding_side = side
        enc = tok([prompt], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        tok.padding_side = "right"
        with torch.no_grad():
            h = model(enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True).hidden_states
        h = h[layer][0]
        return h[:256][keep] if lumina else h[[0, *range(length - 299, length)]][keep]

    stored = -2 if lumina else -1  # Lumina 2: the penultimate layer; Sana: the last (its final norm included)
    assert relative_difference(rows(prefix + caption, stored), right[keep]) <= TOLERANCE  # the reference
    assert relative_difference(rows(prefix + caption, -1 if lumina else -2), right[keep]) > 100 * TOLERANCE
    assert relative_difference(rows(prefix + caption, stored, side="left"), right[keep]) > 100 * TOLERANCE
    bare = tok([caption], return_tensors="pt")  # no system prompt / instruction before the caption
    with torch.no_grad():
        h = model(**bare, output_hidden_states=True).hidden_states[stored][0]
    n = min(h.shape[0], int(keep.sum()))
    tail = right[keep][-(n - 1) :]
    assert relative_difference(h[-(n - 1) :], tail) > 0.1
    if not lumina:  # Sana lower-cases the caption: the caption as written gives other rows
        assert relative_difference(rows(prefix + text, stored), right[keep]) > 100 * TOLERANCE


def test_sana_refuses_sampling_from_a_vae_without_posterior(tmp_path):
    _, vae, data, out, runner = build(tmp_path, "sana")
    for mode in ("sample", "moments"):
        args = ["latents", str(data), "--vae", str(vae), "--latents", mode, "--out", str(out), *BUCKETS, *COMMON]
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert "AutoencoderDC" in result.output and "mean" in result.output and "Traceback" not in result.output
    assert not (out / "latents").exists() or not any((out / "latents").iterdir())


def test_dc_vae_channels_and_downsampling_come_from_its_config():
    from cachebuild.families.vae import family_of
    from cachebuild.hub import ResolvedVae

    sana_like = {"_class_name": "AutoencoderDC", "latent_channels": 32, "scaling_factor": 0.41407}
    sana_like["encoder_block_out_channels"] = [128, 256, 512, 512, 1024, 1024]
    fam = family_of(ResolvedVae("x", None, None, sana_like, ()), None)
    assert (fam.latent_channels, fam.downsample, fam.scaling_factor, fam.shift_factor) == (32, 32, 0.41407, None)
    assert not fam.has_posterior and fam.pixel_multiple == 32
    small = sana_like | {"latent_channels": 8, "encoder_block_out_channels": [8, 16, 32]}
    assert (family_of(ResolvedVae("x", None, None, small, ()), None).latent_channels, 8) == (8, 8)
    assert family_of(ResolvedVae("x", None, None, small, ()), None).downsample == 4


def test_encoder_settings_are_fingerprinted_only_where_set(built, tmp_path):
    """The prompt prefix, case folding, padding side and Sana's window are in the encoder's fingerprint; a family
    without them has no such keys, so caches built before keep their fingerprints."""
    from cachebuild.cache.manifest import Manifest

    family, pipe, _, data, out = built
    with Manifest.open(out, create=False) as m:
        enc = m.fingerprint("textenc")["encoders"][0]
        flux = make_tiny_text_pipeline(tmp_path / "flux", "flux")
        cfg = TextencConfig(data, tmp_path / "o", model=str(flux))
        _, flux_specs = text_families.resolve_encoders(cfg, torch.device("cpu"))
        new_keys = {"prefix", "lowercase", "padding_side", "window"}
        assert all(not new_keys & set(s.fingerprint(m)) for s in flux_specs)
    assert m is not None and enc["class"] == "Gemma2Model" and enc["padding_side"] == "right" and enc["trim"]
    if family == "lumina2":
        assert enc["prefix"].endswith(" <Prompt Start> ") and enc["layer"] == -2 and enc["max_length"] == 256
        assert "lowercase" not in enc and "window" not in enc
    else:
        assert enc["prefix"] == "\n".join(sana_instruction()) and enc["lowercase"] and enc["window"] == 300
        instruction_tokens = len(tokenizer(pipe / "tokenizer").encode(enc["prefix"]))  # <bos> included
        assert enc["layer"] == -1 and enc["max_length"] == instruction_tokens + 298


def test_presets_and_pipeline_classes_name_the_families(tmp_path):
    from cachebuild.config import PRESETS

    assert PRESETS["lumina2"] == "Alpha-VLLM/Lumina-Image-2.0"
    assert PRESETS["sana"].startswith("Efficient-Large-Model/Sana_")
    for name in ("lumina2", "sana"):
        assert text_families._detect_family(name, tmp_path) is TextFamily(name)
    classes = {"Lumina2Pipeline": "lumina2", "Lumina2Text2ImgPipeline": "lumina2", "SanaPipeline": "sana"}
    for cls, family in classes.items():
        (tmp_path / "model_index.json").write_text(f'{{"_class_name": "{cls}"}}')
        assert text_families._detect_family(str(tmp_path), tmp_path) is TextFamily(family)


def test_preview_decodes_the_latents_with_the_family_vae(built, tmp_path):
    """preview takes the VAE the cache was built with, Sana's AutoencoderDC too, and decodes the stored latents."""
    _, _, vae, _, out = built
    png = tmp_path / "p.png"
    result = CliRunner().invoke(cli, ["preview", str(out), "--vae", str(vae), "--output", str(png), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 0


def test_hub_fetch_skips_sharded_fp16_copies():
    """Sana's text encoder folder holds its weights twice, plain and as `fp16` shards: only the plain are fetched."""
    from huggingface_hub.utils import filter_repo_objects

    from cachebuild.hub import HUB_IGNORE

    files = [f"text_encoder/model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    files += [f"text_encoder/model.fp16-0000{i}-of-00002.safetensors" for i in (1, 2)]
    files += ["text_encoder/model.safetensors.index.json", "vae/diffusion_pytorch_model.fp16.safetensors"]
    kept = list(filter_repo_objects(files, allow_patterns=["*/*.json", "*/*.safetensors"], ignore_patterns=HUB_IGNORE))
    assert kept == [*files[:2], "text_encoder/model.safetensors.index.json"]
