"""Fidelity for HiDream-I1: ``open_cache(out).pipeline_inputs(key)`` after ``cachebuild latents`` and ``cachebuild
textenc`` (through the CLI) equals ``HiDreamImagePipeline.encode_prompt`` on tiny random CLIP-L, CLIP-G, T5 and
Llama encoders, and the VAE encode normalised as its config says; then proof that a wrong layer, a missing mask,
CLIP cut at 77 tokens or trimmed rows would not pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachebuild import open_cache
from cachebuild.cache.manifest import Manifest
from cachebuild.cli import cli
from cachebuild.config import DType, TextencConfig, TextFamily
from cachebuild.families import hidream
from cachebuild.families import text as text_families
from cachebuild.testing import make_tiny_text_pipeline, make_tiny_vae
from tests.conftest import write_image
from tests.test_parity_pipelines import INIT_SCALE, TOLERANCE, load, reference_latents, relative_difference, tokenizer

CAPTIONS = {
    "a": "a photo of a cat",
    "b": "red car near the river at sunset",
    "c": " ".join(["cat"] * 100),  # past CLIP's usual 77 tokens: HiDream's CLIPs run at 128 positions
    "d": " ".join(["dog"] * 200),  # past 128 tokens for all four encoders: truncated alike
}
VAE_FACTORS = dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)  # Flux.1's VAE, as HiDream's
CPU = torch.device("cpu")


def reference_pipeline(root: Path):
    """HiDreamImagePipeline with its four text encoders loaded, and nothing else."""
    import diffusers

    return diffusers.HiDreamImagePipeline(
        scheduler=None,
        vae=None,
        text_encoder=load(root / "text_encoder", "CLIPTextModelWithProjection"),
        tokenizer=tokenizer(root / "tokenizer"),
        text_encoder_2=load(root / "text_encoder_2", "CLIPTextModelWithProjection"),
        tokenizer_2=tokenizer(root / "tokenizer_2"),
        text_encoder_3=load(root / "text_encoder_3", "T5EncoderModel"),
        tokenizer_3=tokenizer(root / "tokenizer_3"),
        text_encoder_4=load(root / "text_encoder_4", "LlamaForCausalLM"),
        tokenizer_4=tokenizer(root / "tokenizer_4"),
        transformer=None,
    )


def encode_prompt(pipe, text: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        t5, _, llama, _, pooled, _ = pipe.encode_prompt(text, device=CPU, do_classifier_free_guidance=False)
    # (1, L, D), (layers, 1, L, D), (1, D_l + D_g) -> without the batch dimension
    return {"prompt_embeds_t5": t5[0], "prompt_embeds_llama3": llama[:, 0], "pooled_prompt_embeds": pooled[0]}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(pipeline folder, vae folder, dataset, cache) built through the CLI."""
    root = tmp_path_factory.mktemp("hidream")
    pipe = make_tiny_text_pipeline(root / "pipe", "hidream", init_scale=INIT_SCALE)
    vae = make_tiny_vae(root / "vae", **VAE_FACTORS)
    data, out = root / "data", root / "cache"
    for i, (key, text) in enumerate(CAPTIONS.items()):
        write_image(data / f"{key}.png", (64, 64), seed=i)  # bucket-sized: no resize, no crop
        (data / f"{key}.txt").write_text(text, encoding="utf-8")
    common = ["--out", str(out), "--device", "cpu", "--dtype", "fp32", "--dtype-out", "fp32", "--quiet"]
    latents = ["latents", str(data), "--vae", str(vae), "--latents", "mean", "--workers", "0"]
    latents += ["--resolution", "64", "--min-bucket-reso", "64", "--bucket-reso-steps", "16"]
    for args in (latents, ["textenc", str(data), "--model", str(pipe)]):
        result = CliRunner().invoke(cli, [*args, *common])
        assert result.exit_code == 0, result.output
    return pipe, vae, data, out


@pytest.fixture(scope="module")
def pipe(built):
    return reference_pipeline(built[0])


def test_pipeline_inputs_equal_hidream_pipeline(built, pipe):
    _, vae, data, out = built
    cache = open_cache(out)
    for key, text in CAPTIONS.items():
        got = cache.pipeline_inputs(key)
        want = encode_prompt(pipe, text)
        assert want["prompt_embeds_llama3"].shape == (3, 128, 32)  # every layer, every padded row
        assert want["prompt_embeds_t5"].shape == (128, 32)
        for name, tensor in want.items():
            assert got[name].shape == tensor.shape, name
            assert relative_difference(got[name], tensor) <= TOLERANCE, (key, name)
        assert relative_difference(got["latents"], reference_latents(vae, data / f"{key}.png")) <= TOLERANCE


def test_a_wrong_layer_mask_length_or_trim_would_fail(built, pipe):
    """The comparison above is discriminating for each of HiDream's choices."""
    text = CAPTIONS["c"]
    want = encode_prompt(pipe, text)
    tok4, llama = pipe.tokenizer_4, pipe.text_encoder_4
    enc = tok4([text], padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    n = int(enc.attention_mask.sum())
    assert n < 128  # padding rows exist, so a mask and trimming can show
    with torch.no_grad():
        states = llama(enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True).hidden_states
        unmasked = llama(enc.input_ids, output_hidden_states=True).hidden_states
    assert torch.equal(torch.stack(states[1:])[:, 0], want["prompt_embeds_llama3"])  # what the pipeline computes
    shifted = torch.stack(states[:-1])[:, 0]  # off by one: the embeddings in, the last layer out
    assert relative_difference(shifted, want["prompt_embeds_llama3"]) > 100 * TOLERANCE
    # no mask: the real tokens are unchanged (causal, right-padded) but the padding rows the transformer reads are not
    assert relative_difference(torch.stack(unmasked[1:])[:, 0], want["prompt_embeds_llama3"]) > 100 * TOLERANCE
    trimmed = want["prompt_embeds_llama3"].clone()
    trimmed[:, n:] = 0  # real tokens only, padded back with zeros
    assert relative_difference(trimmed, want["prompt_embeds_llama3"]) > 100 * TOLERANCE

    tok3, t5 = pipe.tokenizer_3, pipe.text_encoder_3
    enc3 = tok3([text], padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    with torch.no_grad():
        t5_unmasked = t5(enc3.input_ids)[0][0]
    assert relative_difference(t5_unmasked, want["prompt_embeds_t5"]) > 100 * TOLERANCE

    ids77 = pipe.tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        pooled77 = pipe.text_encoder(ids77.input_ids)[0][0]  # CLIP-L cut at its usual 77 tokens
    assert relative_difference(pooled77, want["pooled_prompt_embeds"][:24]) > 100 * TOLERANCE


def test_hidream_specs_and_fingerprint(built, tmp_path):
    """Defaults as the pipeline's (128; CLIP at min(length, 218)); the new choices recorded only where set, so the
    other families' fingerprints are unchanged; bf16 storage by default; --max-length moves all four."""
    pipe_folder, _, data, out = built
    family, specs = text_families.resolve_encoders(TextencConfig(data, tmp_path / "x", model=str(pipe_folder)), CPU)
    assert family is TextFamily.HIDREAM and text_families.stored_dtype(family) is DType.BF16
    assert [(s.name, s.max_length, s.trim, s.attention_mask) for s in specs] == [
        ("clip_l", 128, False, False),
        ("clip_g", 128, False, False),
        ("t5", 128, False, True),
        ("llama3", 128, False, True),
    ]
    cfg = TextencConfig(data, tmp_path / "y", model=str(pipe_folder), max_length=300)
    assert [s.max_length for s in text_families.resolve_encoders(cfg, CPU)[1]] == [218, 218, 300, 300]
    with Manifest.open(out, create=False) as m:
        prints = m.fingerprint("textenc")["encoders"]
        flux = make_tiny_text_pipeline(tmp_path / "flux", "flux")
        flux_prints = [
            s.fingerprint(m)
            for s in text_families.resolve_encoders(TextencConfig(data, tmp_path / "z", model=str(flux)), CPU)[1]
        ]
    assert (prints[3]["class"], prints[3]["all_layers"], prints[3]["pad_with_eos"]) == ("LlamaModel", True, True)
    assert (prints[2]["attention_mask"], prints[2]["trim"]) == (True, False)
    for fp in flux_prints:
        assert "all_layers" not in fp and "pad_with_eos" not in fp and fp["attention_mask"] == fp["trim"]


def test_llama_comes_from_its_own_repository_where_the_pipeline_has_none(built, tmp_path, monkeypatch):
    """HiDream-I1's hub repository leaves out the gated Llama; its encoder and tokenizer come from LLAMA_REPO."""
    import shutil

    pipe_folder, _, data, _ = built
    bare = tmp_path / "pipe"
    shutil.copytree(pipe_folder, bare, ignore=shutil.ignore_patterns("text_encoder_4", "tokenizer_4"))
    llama = tmp_path / "llama"
    shutil.copytree(pipe_folder / "text_encoder_4", llama)
    for f in (pipe_folder / "tokenizer_4").iterdir():
        shutil.copy(f, llama / f.name)
    asked = []
    monkeypatch.setattr(hidream, "local_or_hub", lambda repo, rev: asked.append(repo) or llama)
    _, specs = text_families.resolve_encoders(TextencConfig(data, tmp_path / "c", model=str(bare)), CPU)
    assert asked == [hidream.LLAMA_REPO] and specs[3].folder == specs[3].tokenizer == llama


def test_a_hidream_cache_verifies_with_its_layer_axis(built):
    """verify expects Llama's stack as (layers, L, D) and T5 as (L, D), both at max length."""
    from cachebuild.consumers.verify import _expected, verify_cache

    report = verify_cache(built[3])
    assert report.ok, report.problems
    with Manifest.open(built[3], create=False) as m:
        expected = _expected("textenc", m.fingerprint("textenc"), {"tokens": {}})
    assert expected["llama3"] == (3, 128, 32) and expected["llama3"] != (128, 32)
