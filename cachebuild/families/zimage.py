"""Z-Image: Qwen3's penultimate hidden state at the real tokens of a chat-templated prompt, and Flux.1's VAE.

What ``ZImagePipeline`` hands its transformer: ``prompt_embeds`` (T, 2560), one tensor per prompt of its own
length: the caption as a user message through the tokenizer's chat template (``add_generation_prompt``,
``enable_thinking=True``), padded to 512 and run with the attention mask, ``hidden_states[-2]`` kept only where
the mask is 1 (so T counts the template's tokens too); latents ``(z - shift_factor) * scaling_factor`` in
``(16, H/8, W/8)`` (the transformer patchifies them itself).

The stored ``qwen3`` is exactly those T rows: Qwen3 is causal and right-padded, so with the mask its outputs at
the real tokens do not depend on how much padding follows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cachebuild.config import DType
from cachebuild.families.vae import normalize_latents

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"ZImagePipeline": "z-image"}
STORED_DTYPE = DType.BF16  # Qwen3's hidden states pass fp16's range (families.text.stored_dtype)
MAX_LENGTH = 512  # ZImagePipeline's max_sequence_length, counted with the chat template's tokens
CHAT = (("add_generation_prompt", True), ("enable_thinking", True))  # as ZImagePipeline._encode_prompt


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """Qwen3's penultimate hidden state at the real (template) tokens, masked."""
    return [ctx.llm("qwen3", "Qwen3Model", -2, MAX_LENGTH, True, chat_template=CHAT)]


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension)."""
    out = {"latents": normalize_latents(rec["latents"], vae)}
    if "qwen3" in rec:
        out["prompt_embeds"] = rec["qwen3"][rec["qwen3_mask"].bool()]  # the record pads to (512, D): back to (T, D)
    return out
