"""Fidelity of the Qwen-Image family: after ``cachebuild latents --model DIR`` and ``cachebuild textenc --model DIR``
(through the CLI) on a tiny random Qwen-Image pipeline folder, ``open_cache(out).pipeline_inputs(key)`` equals
``QwenImagePipeline.encode_prompt`` (at ``__call__``'s default ``max_sequence_length``) on the same Qwen2.5-VL, and
its VAE encode plus per-channel normalisation. The tiny encoder has a large initial spread, so that a wrong layer,
a missing template or drop, or rows taken without the mask show; the second group of tests proves that they do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachebuild import open_cache
from cachebuild.cache.manifest import Manifest
from cachebuild.cli import cli
from cachebuild.config import DType, TextFamily
from cachebuild.families import qwenimage
from cachebuild.families.qwenimage import DROP as QWENIMAGE_DROP
from cachebuild.families.qwenimage import TEMPLATE as QWENIMAGE_TEMPLATE
from cachebuild.families.qwenimage import TOKENIZER_MAX_LENGTH as QWENIMAGE_MAX_LENGTH
from cachebuild.families.text import EncoderSpec, _detect_family, stored_dtype
from cachebuild.testing import make_tiny_text_pipeline
from tests.test_parity_pipelines import build_through_cli
from tests.test_parity_vaes import reference_latents
from tests.test_textenc import read_text_cache

CAPTIONS = {
    "a": "a photo of a cat",
    "b": "red {car} near the river at sunset",  # braces stay literal: the template is filled with str.format
    "c": " ".join(["cat"] * 600),  # about 680 kept rows: past __call__'s 512, inside encode_prompt's 1024
    "d": " ".join(["dog"] * 1200),  # past 1024 + 34 tokens: truncated as the pipeline's tokenizer truncates
}
INIT_SCALE = 10.0  # spreads the tiny encoder's weights so that its layers differ visibly
TOLERANCE = 1e-5  # relative difference allowed against the pipeline, in fp32
CPU = torch.device("cpu")


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def reference_pipeline(root: Path):
    """QwenImagePipeline holding only its text encoder and tokenizer, loaded as the pipeline loads them."""
    import diffusers
    import transformers

    return diffusers.QwenImagePipeline(
        scheduler=None,
        vae=None,
        text_encoder=transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder").eval(),
        tokenizer=transformers.Qwen2Tokenizer.from_pretrained(root / "tokenizer"),
        transformer=None,
    )


def encode_prompt(pipe, texts: list[str], max_sequence_length: int = qwenimage.MAX_SEQUENCE_LENGTH):
    """(prompt_embeds (B, T, D), prompt_embeds_mask (B, T)) as the pipeline computes them; the pipeline's None
    mask (no prompt padded) comes back as ones."""
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(texts, device=CPU, max_sequence_length=max_sequence_length)
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.long) if mask is None else mask


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(pipeline folder, dataset, cache) built through the CLI from the pipeline folder alone."""
    root = tmp_path_factory.mktemp("qwen-image")
    pipe = make_tiny_text_pipeline(root / "pipe", "qwen-image", init_scale=INIT_SCALE)
    data, out = build_through_cli(root, CAPTIONS, pipe, ["--model", str(pipe)])
    return pipe, data, out


def test_pipeline_inputs_equal_the_pipeline(built):
    pipe_folder, data, out = built
    pipe = reference_pipeline(pipe_folder)
    cache = open_cache(out)
    for key, text in CAPTIONS.items():
        got = cache.pipeline_inputs(key)
        embeds, mask = encode_prompt(pipe, [text])
        assert got["prompt_embeds"].shape == embeds[0].shape, key
        assert relative_difference(got["prompt_embeds"], embeds[0]) <= TOLERANCE, key
        assert torch.equal(got["prompt_embeds_mask"], mask[0]), key
        want_latents = reference_latents("qwen-image", pipe_folder / "vae", data / f"{key}.png")
        assert got["latents"].shape == want_latents.shape == (1, 4, 32, 32)
        assert relative_difference(got["latents"], want_latents) <= TOLERANCE
    assert cache.pipeline_inputs("c")["prompt_embeds"].shape[0] == qwenimage.MAX_SEQUENCE_LENGTH


def test_the_record_keeps_every_row_encode_prompt_returns_by_default(built):
    """Stored: the real tokens after the drop, up to 1024 (encode_prompt's default); a record pads them to 1024."""
    pipe_folder, _, out = built
    pipe = reference_pipeline(pipe_folder)
    cache = open_cache(out)
    for key in ("c", "d"):
        embeds, _ = encode_prompt(pipe, [CAPTIONS[key]], max_sequence_length=1024)
        rec = cache.record(key)
        assert rec["qwen25vl"].shape == (QWENIMAGE_MAX_LENGTH - QWENIMAGE_DROP, 32)
        kept = rec["qwen25vl"][rec["qwen25vl_mask"].bool()]
        assert kept.shape == embeds[0].shape and kept.shape[0] > qwenimage.MAX_SEQUENCE_LENGTH
        assert relative_difference(kept, embeds[0]) <= TOLERANCE
    assert int(cache.record("d")["qwen25vl_mask"].sum()) == 1024  # truncated at 1024 + 34 tokens, as the pipeline


def test_a_batch_is_the_prompts_padded_with_zeros(built):
    """What the docstring of pipeline_inputs says: the pipeline's batch is the single prompts, zero-padded."""
    pipe_folder, _, out = built
    cache = open_cache(out)
    keys = ["a", "b", "c"]
    embeds, mask = encode_prompt(reference_pipeline(pipe_folder), [CAPTIONS[k] for k in keys])
    items = [cache.pipeline_inputs(k) for k in keys]
    padded = torch.nn.utils.rnn.pad_sequence([i["prompt_embeds"] for i in items], batch_first=True)
    padded_mask = torch.nn.utils.rnn.pad_sequence([i["prompt_embeds_mask"] for i in items], batch_first=True)
    assert torch.equal(padded_mask, mask)
    assert relative_difference(padded, embeds) <= TOLERANCE


def test_a_wrong_layer_template_drop_or_mask_would_fail(built):
    """The comparison above is discriminating: each of these departures from the pipeline is far off."""
    pipe_folder, _, _ = built
    pipe = reference_pipeline(pipe_folder)
    text = CAPTIONS["b"]
    right = encode_prompt(pipe, [text])[0][0]  # (T, D)
    enc = pipe.tokenizer([QWENIMAGE_TEMPLATE.format(text)], return_tensors="pt")
    n = int(enc.attention_mask.sum())
    with torch.no_grad():
        hidden = pipe.text_encoder(**enc, output_hidden_states=True).hidden_states
    assert torch.equal(hidden[-1][0, QWENIMAGE_DROP:n], right)  # the reference is what the pipeline computes
    # the penultimate layer instead of the last
    assert relative_difference(hidden[-2][0, QWENIMAGE_DROP:n], right) > 100 * TOLERANCE
    # the template's first rows kept (no drop): other rows in the same places
    assert relative_difference(hidden[-1][0, : n - QWENIMAGE_DROP], right) > 0.1
    # no template: the bare caption, whose rows see no system message before them
    bare = pipe.tokenizer([text], return_tensors="pt").input_ids
    with torch.no_grad():
        untemplated = pipe.text_encoder(bare, output_hidden_states=True).hidden_states[-1][0]
    tail = len(pipe.tokenizer("<|im_end|>\n<|im_start|>assistant\n").input_ids)  # the template after the caption
    assert enc.input_ids[0, n - tail - bare.shape[1] : n - tail].tolist() == bare[0].tolist()
    caption_rows = right[right.shape[0] - tail - bare.shape[1] : right.shape[0] - tail]  # the same tokens, templated
    assert relative_difference(untemplated, caption_rows) > 0.1
    # rows taken without the mask: padding rows where the pipeline has zeros (and a mask of zeros) in a batch
    batch = pipe.tokenizer([QWENIMAGE_TEMPLATE.format(t) for t in (text, CAPTIONS["c"])], padding=True)
    ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
    with torch.no_grad():
        padded = pipe.text_encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    unmasked_rows = padded[0, QWENIMAGE_DROP:]
    want = encode_prompt(pipe, [text, CAPTIONS["c"]], max_sequence_length=1024)[0][0]
    assert unmasked_rows.shape == want.shape
    assert relative_difference(unmasked_rows, want) > 0.1


def test_qwen_image_is_found_by_preset_and_class_and_stored_in_bf16(built, tmp_path):
    pipe_folder, data, _ = built
    assert _detect_family("qwen-image", pipe_folder) is TextFamily.QWENIMAGE
    assert _detect_family(str(pipe_folder), pipe_folder) is TextFamily.QWENIMAGE  # by model_index.json's class
    assert stored_dtype(TextFamily.QWENIMAGE) is DType.BF16
    out = tmp_path / "cache"
    args = ["textenc", str(data), "--model", str(pipe_folder), "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--dtype", "fp32", "--quiet"])
    assert result.exit_code == 0, result.output
    with Manifest.open(out, create=False) as manifest:
        fingerprint = manifest.fingerprint("textenc")
        truncated = {row.key: row.info["truncated"] for row in manifest.items("textenc", "done")}
    assert fingerprint["dtype_out"] == "bf16"
    assert read_text_cache(out)["a"]["qwen25vl"].dtype == torch.bfloat16
    assert truncated == {"a": [], "b": [], "c": [], "d": ["qwen25vl"]}  # only past 1024 + 34 tokens
    (encoder,) = fingerprint["encoders"]
    assert encoder["prompt_template"] == QWENIMAGE_TEMPLATE and encoder["drop_rows"] == QWENIMAGE_DROP
    assert encoder["class"] == "Qwen2_5_VLForConditionalGeneration" and encoder["layer"] == -1


def test_the_new_spec_fields_stay_out_of_other_fingerprints():
    """prompt_template and drop_rows enter the fingerprint only where set: other caches keep theirs."""

    class Hashes:
        @staticmethod
        def files_sha256(_files) -> str:
            return "0" * 64

    spec = EncoderSpec("t5", Path("."), Path("."), "T5EncoderModel", -1, False, True, None, 512, True, DType.FP32)
    fingerprint = spec.fingerprint(Hashes())
    assert "prompt_template" not in fingerprint and "drop_rows" not in fingerprint


def test_verify_and_preview_accept_the_cache(built, tmp_path):
    """The trimmed rows (the 34 dropped ones not counted) verify clean; preview decodes with the 3D VAE."""
    from click.testing import CliRunner

    from cachebuild.cli import cli

    pipe_folder, data, out = built
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 0, result.output
    png = tmp_path / "grid.png"
    args = ["preview", str(out), "--model", str(pipe_folder), "-n", "2", "-o", str(png), "--dataset", str(data)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and png.is_file(), result.output
