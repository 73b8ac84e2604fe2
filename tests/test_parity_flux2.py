"""Fidelity of the Flux.2 text encoders: after ``cachebuild latents`` and ``cachebuild textenc`` (through the CLI)
on tiny random components, ``open_cache(out).pipeline_inputs(key)`` equals what ``Flux2Pipeline.encode_prompt``
(Mistral3 behind a PixtralProcessor) and ``Flux2KleinPipeline.encode_prompt`` (Qwen3) return: ``prompt_embeds``
(512, 3D) and ``text_ids`` (512, 4).

The reference Flux2Pipeline gets a real ``PixtralProcessor`` (see :func:`pixtral_processor`): transformers 5
cannot load one without torchvision, which is not installed, but only its image half needs it; text runs through
the processor's own code (template rendering, the BOS rule, ``__call__`` with the merged text kwargs) unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cachebuild import open_cache
from cachebuild.families import flux2, tokens
from cachebuild.families import text as text_families
from cachebuild.testing import make_tiny_flux2_vae, make_tiny_text_pipeline
from tests.test_parity_pipelines import build_through_cli
from tests.test_parity_vaes import reference_latents

CAPTIONS = {
    "a": "a photo of a cat",
    "b": "red car near the river at sunset",
    "c": "a dog [IMG] under the tree",  # Flux2Pipeline removes [IMG] from prompts
    "d": " ".join(["cat"] * 600),  # longer than 512 tokens: truncated
}
INIT_SCALE = 10.0  # spreads the tiny encoders' weights so their layers (and a mask) differ visibly
TOLERANCE = 1e-5  # relative difference allowed against the pipeline, in fp32
FAMILIES = ("flux2", "flux2-klein")


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def pixtral_processor(folder: Path):
    """transformers' PixtralProcessor for the processor folder ``folder``, built as ``from_pretrained`` builds it
    (its tokenizer through ``TokenizersBackend.from_pretrained``, the folder's chat template) with a bare image
    processor. Its module imports the Pixtral image processor, which needs torchvision, for one image-size
    helper that text never calls: a stand-in module takes its place while the class is imported."""
    import importlib
    import sys
    import types

    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    images = "transformers.models.pixtral.image_processing_pixtral"
    name = "transformers.models.pixtral.processing_pixtral"
    saved = {m: sys.modules.pop(m) for m in (images, name) if m in sys.modules}
    sys.modules[images] = types.ModuleType(images)
    sys.modules[images].get_resize_output_image_size = None
    try:
        processor_cls = importlib.import_module(name).PixtralProcessor
    finally:
        for m in (images, name):
            sys.modules.pop(m, None)
        sys.modules.update(saved)
    tokenizer = TokenizersBackend.from_pretrained(folder)
    template = tokens.processor_chat_template(folder)
    return processor_cls(image_processor=ImageProcessingMixin(), tokenizer=tokenizer, chat_template=template)


def reference_pipeline(family: str, root: Path):
    """The family's diffusers pipeline with its text encoder loaded, and nothing else."""
    import diffusers
    import transformers

    if family == "flux2":
        te = transformers.Mistral3ForConditionalGeneration.from_pretrained(root / "text_encoder").eval()
        processor = pixtral_processor(root / "tokenizer")
        return diffusers.Flux2Pipeline(scheduler=None, vae=None, text_encoder=te, tokenizer=processor, transformer=None)
    te = transformers.Qwen3ForCausalLM.from_pretrained(root / "text_encoder").eval()
    tok = transformers.AutoTokenizer.from_pretrained(root / "tokenizer")
    return diffusers.Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=te, tokenizer=tok, transformer=None)


def encode_prompts(pipe, texts: list[str]) -> list[dict[str, torch.Tensor]]:
    """What the pipeline's own encode_prompt returns for each text (one batch), batch dimension dropped."""
    with torch.no_grad():
        embeds, text_ids = pipe.encode_prompt(texts, device=torch.device("cpu"))
    return [{"prompt_embeds": e, "text_ids": t} for e, t in zip(embeds, text_ids, strict=True)]


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    """(family, pipeline folder, vae folder, dataset, cache) built through the CLI."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    pipe = make_tiny_text_pipeline(root / "pipe", family, init_scale=INIT_SCALE)
    vae = make_tiny_flux2_vae(root / "vae")
    data, out = build_through_cli(root, CAPTIONS, pipe, ["--vae", str(vae)], step=32)
    return family, pipe, vae, data, out


def test_pipeline_inputs_equal_the_flux2_pipelines(built):
    family, pipe_folder, vae, data, out = built
    pipe = reference_pipeline(family, pipe_folder)
    cache = open_cache(out)
    assert cache.text_fingerprint["family"] == family
    for key, want in zip(CAPTIONS, encode_prompts(pipe, list(CAPTIONS.values())), strict=True):
        got = cache.pipeline_inputs(key)
        assert got["prompt_embeds"].shape == want["prompt_embeds"].shape == (512, 96), key  # 3 layers x 32
        assert relative_difference(got["prompt_embeds"], want["prompt_embeds"]) <= TOLERANCE, (family, key)
        assert torch.equal(got["text_ids"], want["text_ids"]) and got["text_ids"].dtype == want["text_ids"].dtype
        assert relative_difference(got["latents"], reference_latents("flux2", vae, data / f"{key}.png")) <= TOLERANCE


def test_the_fingerprint_records_the_flux2_choices(built):
    family, _, _, _, out = built
    from cachebuild.cache.manifest import Manifest

    with Manifest.open(out, create=False) as m:
        encoder = m.fingerprint("textenc")["encoders"][0]
    assert encoder["max_length"] == 512 and encoder["attention_mask"] and not encoder["trim"]
    assert encoder["layers"] == ([10, 20, 30] if family == "flux2" else [9, 18, 27])
    assert ("system_message" in encoder) == ("processor" in encoder) == (family == "flux2")
    from cachebuild.consumers.verify import verify_cache

    assert verify_cache(out).ok  # 512 rows per caption, as the fingerprint says
    assert open_cache(out).record("d")[encoder["name"]].shape == (512, 96)  # truncated at 512, stored whole


def _encoder_inputs(pipe, family: str, text: str, template: bool = True, side: str = "right"):
    """(input_ids, attention_mask) at 512 as the pipeline tokenizes ``text`` (or without its template)."""
    tok = pipe.tokenizer.tokenizer if family == "flux2" else pipe.tokenizer
    before, tok.padding_side = tok.padding_side, side
    try:
        if not template:
            enc = tok([text], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"]
        if family == "flux2":
            enc = processor_tokens(pipe.tokenizer, [text])
        else:
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            enc = tok([prompt], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    finally:
        tok.padding_side = before


def processor_tokens(processor, texts: list[str]):
    """Flux2Pipeline's tokenization of ``texts`` through its processor: the system + user chat format, right-padded
    to 512."""
    return processor.apply_chat_template(
        diffusers_format_input(texts),
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=512,
    )


def diffusers_format_input(prompts: list[str]):
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    return format_input(prompts)


def _hidden(pipe, ids, mask=None) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    return out.hidden_states


def _stack(hidden: tuple[torch.Tensor, ...], layers, row: int = 0) -> torch.Tensor:
    return torch.cat([hidden[k][row] for k in layers], dim=-1)  # (L, 3D)


def test_a_wrong_layer_template_mask_or_padding_would_fail(built):
    """The comparison above is discriminating: other layers, no template, no mask, left padding or a trimmed
    output each land far from the pipeline's prompt_embeds."""
    family, pipe_folder, _, _, _ = built
    pipe = reference_pipeline(family, pipe_folder)
    text = CAPTIONS["b"]
    right = encode_prompts(pipe, [text])[0]["prompt_embeds"]
    layers = tuple(flux2.LAYERS if family == "flux2" else flux2.KLEIN_LAYERS)
    ids, mask = _encoder_inputs(pipe, family, text)
    left_ids, left_mask = _encoder_inputs(pipe, family, text, side="left")
    bare_ids, bare_mask = _encoder_inputs(pipe, family, text, template=False)
    hidden = _hidden(pipe, torch.cat([ids, left_ids, bare_ids]), torch.cat([mask, left_mask, bare_mask]))
    assert torch.allclose(_stack(hidden, layers), right, rtol=1e-6, atol=1e-6)  # the reference is the pipeline's
    n = int(mask.sum())
    assert n < 512 and mask[0, :n].all()  # right-padded
    far = 100 * TOLERANCE
    for wrong in ((1, 2, 3), tuple(k + 1 for k in layers), (-3, -2, -1)):
        assert relative_difference(_stack(hidden, wrong), right) > far, wrong
    assert relative_difference(_stack(hidden, layers, 1), right) > far  # left padding
    assert relative_difference(_stack(hidden, layers, 2), right) > far  # no template
    unmasked = _stack(_hidden(pipe, ids), layers)  # causal: only the padding rows change
    assert relative_difference(unmasked[n:], right[n:]) > far
    trimmed = _stack(_hidden(pipe, ids[:, :n]), layers)  # the real tokens alone, at their own length:
    assert torch.allclose(trimmed, right[:n], atol=1e-4)  # equal where present, but the transformer also
    assert relative_difference(right[n:], torch.zeros_like(right[n:])) > far  # gets non-zero padding rows


def test_flux2_tokens_equal_the_processor_path(tmp_path):
    """The Mistral tokenizer is loaded as PixtralProcessor loads it, and tokenizes a caption as the processor's
    apply_chat_template does: one BOS (the template's, none added), [IMG] removed, right-padded to 512."""
    root = make_tiny_text_pipeline(tmp_path / "p", "flux2")
    family, (spec,) = text_families.resolve_encoders(_cfg(tmp_path, root), torch.device("cpu"))
    assert family.value == "flux2"
    tok = tokens.load_tokenizer(spec)
    processor = pixtral_processor(root / "tokenizer")
    assert type(processor).__name__ == "PixtralProcessor"
    texts = list(CAPTIONS.values())
    ids, mask, truncated = tokens.tokenize(tok, spec, texts)
    want = processor_tokens(processor, texts)
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask.long(), want["attention_mask"].long())
    assert truncated == [False, False, False, True]
    bos = tok.bos_token_id
    assert all(row[0] == bos and int((row == bos).sum()) == 1 for row in ids)
    assert tok.convert_tokens_to_ids("[IMG]") not in ids[2]
    prompt = tokens.chat_prompt(tok, spec, "a cat")
    assert prompt.startswith("<s>[SYSTEM_PROMPT]You are an AI") and prompt.endswith("[INST]a cat[/INST]")


def test_the_system_message_is_the_pipelines():
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    assert flux2.SYSTEM_MESSAGE == SYSTEM_MESSAGE


def test_processor_chat_template_prefers_the_legacy_json(tmp_path):
    import json

    assert tokens.processor_chat_template(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("jinja")
    assert tokens.processor_chat_template(tmp_path) == "jinja"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "legacy"}))
    assert tokens.processor_chat_template(tmp_path) == "legacy"


def test_text_ids_are_the_pipelines():
    import diffusers

    want = diffusers.Flux2Pipeline._prepare_text_ids(torch.zeros(1, 512, 8))[0]
    assert torch.equal(flux2.text_ids(512), want) and flux2.text_ids(512).dtype == want.dtype


def test_presets_and_detection(tmp_path):
    from cachebuild.config import PRESET_FAMILY, PRESETS

    assert PRESETS["flux2-klein-4b"] == "black-forest-labs/FLUX.2-klein-4B"
    assert PRESETS["flux2-klein-9b"] == "black-forest-labs/FLUX.2-klein-9B"
    presets = {"flux2-dev": "flux2", "flux2-klein-4b": "flux2-klein", "flux2-klein-9b": "flux2-klein"}
    for preset, family in presets.items():
        assert text_families._detect_family(preset, tmp_path).value == family == PRESET_FAMILY[preset]
    for family in FAMILIES:
        root = make_tiny_text_pipeline(tmp_path / family, family)
        assert text_families._detect_family(str(root), root).value == family


def _cfg(tmp_path: Path, model: Path):
    from cachebuild.config import TextencConfig

    captions = tmp_path / "captions"
    captions.mkdir(exist_ok=True)
    return TextencConfig(captions, tmp_path / "out", model=str(model))


def test_other_families_fingerprints_gain_no_flux2_keys(tmp_path):
    """Existing caches keep their fingerprints: the new choices are recorded only where set."""
    from cachebuild.cache.manifest import Manifest

    root = make_tiny_text_pipeline(tmp_path / "p", "chroma")
    _, specs = text_families.resolve_encoders(_cfg(tmp_path, root), torch.device("cpu"))
    with Manifest.open(tmp_path / "m") as m:
        printed = specs[0].fingerprint(m)
    assert not {"layers", "system_message", "processor", "masked"} & set(printed)
    assert printed["attention_mask"] is True and printed["trim"] is True  # Chroma: masked and trimmed, as before


def test_a_processor_folder_without_a_chat_template_is_refused(tmp_path):
    from cachebuild.errors import ModelLoadError

    root = make_tiny_text_pipeline(tmp_path / "p", "flux2")
    (root / "tokenizer" / "chat_template.jinja").unlink()
    _, (spec,) = text_families.resolve_encoders(_cfg(tmp_path, root), torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="chat_template"):
        tokens.load_tokenizer(spec)


def test_real_sizes_and_stored_dtype(tmp_path):
    """At FLUX.2-dev's size (Mistral text width 5120) a caption is (512, 15360), 15 MiB in bf16, the default."""
    import json

    from cachebuild.config import DType, TextFamily

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 5120}, "vision_config": {}}))
    spec = text_families.EncoderSpec(
        "mistral3", tmp_path, tmp_path, "Mistral3ForConditionalGeneration", -1, False, True, None, 512, False,
        DType.BF16, layers=flux2.LAYERS, masked=True,
    )  # fmt: skip
    width, _ = text_families.output_dims(spec)
    assert width == 15360 and 512 * width * 2 == 15 * 2**20
    assert text_families.stored_dtype(TextFamily.FLUX2) is DType.BF16
    assert text_families.stored_dtype(TextFamily.FLUX2_KLEIN) is DType.BF16
