"""Captions to token ids, per encoder: each pipeline's template, system prompt, prefix, padding side and length
(``EncoderSpec``), and the tokenizer loaded as that pipeline loads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cachebuild.errors import ModelLoadError

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec

IMAGE_TOKEN = "[IMG]"  # a processor prompt loses it (PixtralProcessor would count it as an image slot): Flux.2


def load_tokenizer(spec: EncoderSpec):
    from transformers import AutoTokenizer

    if spec.processor:
        return load_processor_tokenizer(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    except Exception as exc:
        raise ModelLoadError(f"could not load the {spec.name} tokenizer from {spec.tokenizer}: {exc}") from exc
    if spec.pad_with_eos:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_processor_tokenizer(spec: EncoderSpec):
    """The text half of a PixtralProcessor folder, loaded without the processor (which needs torchvision).

    ``PixtralProcessor.from_pretrained`` loads its tokenizer with ``TokenizersBackend.from_pretrained`` (the
    folder's tokenizer.json as it is, padding on the right), not with ``AutoTokenizer``, which goes by the class
    that tokenizer_config.json names: ``LlamaTokenizer`` for FLUX.2-dev, a class that pads on the left and builds
    its own pre-tokenizer. The chat template is the processor's: ``chat_template.json`` first, then
    ``chat_template.jinja``.
    """
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        tokenizer = TokenizersBackend.from_pretrained(spec.tokenizer)
    except Exception as exc:
        raise ModelLoadError(f"could not load the {spec.name} tokenizer from {spec.tokenizer}: {exc}") from exc
    template = processor_chat_template(spec.tokenizer)
    if template is None:
        raise ModelLoadError(
            f"{spec.tokenizer} has no chat_template.json or chat_template.jinja, which the {spec.name} processor "
            "needs; pass a complete pipeline folder"
        )
    tokenizer.chat_template = template
    return tokenizer


def processor_chat_template(folder: Path) -> str | None:
    """The chat template a processor loads from ``folder``: the legacy ``chat_template.json`` wins over
    ``chat_template.jinja``, as in ``ProcessorMixin.from_pretrained``."""
    legacy, raw = folder / "chat_template.json", folder / "chat_template.jinja"
    if legacy.is_file():
        return json.loads(legacy.read_text(encoding="utf-8"))["chat_template"]
    return raw.read_text(encoding="utf-8") if raw.is_file() else None


def tokenize(tokenizer, spec: EncoderSpec, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """(input_ids (N, L), attention_mask (N, L), truncated per text) padded to the spec's max length; a text that
    ``spec.prepare`` turns into None gets no tokens at all (padding and a zero mask)."""
    empty: list[int] = []
    if spec.prepare is not None:
        prepared = [spec.prepare(text) for text in texts]
        empty = [i for i, text in enumerate(prepared) if text is None]
        texts = [text or "" for text in prepared]
    if spec.chat_template:
        texts = [chat_prompt(tokenizer, spec, text) for text in texts]
    if spec.lowercase:
        texts = [text.lower().strip() for text in texts]
    if spec.prefix:
        texts = [spec.prefix + text for text in texts]
    if spec.right_pad or spec.left_pad:  # the pipeline sets the side itself
        tokenizer.padding_side = "left" if spec.left_pad else "right"
    if spec.prompt_template:
        texts = [spec.prompt_template.format(text) for text in texts]  # the caption's own braces stay as they are
    special = {}
    if spec.processor:  # a processor adds no special tokens to a prompt that starts with BOS (it has them already)
        bos = tokenizer.bos_token
        special["add_special_tokens"] = not (bos is not None and bool(texts) and texts[0].startswith(bos))
    enc = tokenizer(
        texts, padding="max_length", max_length=spec.max_length, truncation=True, return_tensors="pt", **special
    )
    # truncated: more than max length tokens. Cut at one past it, so no list as long as the whole text is built
    # (the text itself is bounded by --caption-max-bytes: sources.captions)
    over = tokenizer(texts, max_length=spec.max_length + 1, truncation=True, verbose=False, **special)["input_ids"]
    ids, mask = enc["input_ids"], enc["attention_mask"]
    for i in empty:
        ids[i], mask[i] = tokenizer.pad_token_id, 0
    return ids, mask, [len(row) > spec.max_length and i not in empty for i, row in enumerate(over)]


def chat_prompt(tokenizer, spec: EncoderSpec, text: str) -> str:
    """``text`` as the one user message of the tokenizer's chat template, untokenized (Z-Image's prompt).

    Example:
        >>> chat_prompt(qwen_tokenizer, spec, "a cat")
        '<|im_start|>user\\na cat<|im_end|>\\n<|im_start|>assistant\\n'
    """
    if spec.processor:
        text = text.replace(IMAGE_TOKEN, "")
    messages = [{"role": "user", "content": text}]
    if spec.system_message and spec.processor:  # Flux.2: contents as typed parts, as its format_input builds them
        messages = [
            {"role": "system", "content": [{"type": "text", "text": spec.system_message}]},
            {"role": "user", "content": [{"type": "text", "text": text}]},
        ]
    elif spec.system_message:  # plain strings (HunyuanVideo 1.5's format_text_input)
        messages = [{"role": "system", "content": spec.system_message}, messages[0]]
    return tokenizer.apply_chat_template(messages, tokenize=False, **dict(spec.chat_template))
