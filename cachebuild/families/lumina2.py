"""Lumina 2: Gemma2's penultimate hidden state over the system prompt and the caption, and Flux.1's 16-channel VAE.

What ``Lumina2Pipeline`` hands its transformer: ``prompt_embeds`` (256, 2304) and ``prompt_attention_mask``
(256,), int64, 1 at the real tokens: the caption joined after the pipeline's system prompt and " <Prompt Start> ",
right-padded to 256 tokens (the system prompt's tokens counted), run with the mask, ``hidden_states[-2]``;
latents ``(z - shift_factor) * scaling_factor`` in ``(16, H/8, W/8)`` (the transformer patchifies them itself).

The stored ``gemma2`` is the real rows only: Gemma2 is causal and right-padded, so with the mask its outputs there
do not depend on the padding, and the transformer takes exactly the first ``mask.sum()`` caption rows into its
joint sequence (its caption refiner attends with the mask), never a padding row. ``prompt_embeds`` comes back
zero-padded to 256; the pipeline's own rows there are Gemma2's outputs at masked padding, which nothing reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cachebuild.config import DType
from cachebuild.families.vae import normalize_latents

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"Lumina2Pipeline": "lumina2", "Lumina2Text2ImgPipeline": "lumina2"}  # the same pipeline's earlier name
STORED_DTYPE = DType.BF16  # Gemma2's hidden states pass fp16's range (families.text.stored_dtype)
MAX_LENGTH = 256  # Lumina2Pipeline's max_sequence_length, counted with the system prompt's tokens


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension)."""
    out = {"latents": normalize_latents(rec["latents"], vae)}
    if "gemma2" in rec:
        out["prompt_embeds"] = rec["gemma2"]  # (256, D), zeros past the real tokens
        out["prompt_attention_mask"] = rec["gemma2_mask"]  # (256,) int64, as the tokenizer returns it
    return out


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """Gemma2's penultimate hidden state over the system prompt and the caption, right-padded and masked, real
    tokens only."""
    return [ctx.llm("gemma2", "Gemma2Model", -2, MAX_LENGTH, True, prefix=prompt_prefix(), right_pad=True)]


def prompt_prefix() -> str:
    """What the pipeline joins in front of every caption by default: its ``system_prompt`` and " <Prompt Start> ",
    read from the installed diffusers (the reference) rather than copied."""
    import diffusers

    pipe = diffusers.Lumina2Pipeline(transformer=None, scheduler=None, vae=None, text_encoder=None, tokenizer=None)
    return pipe.system_prompt + " <Prompt Start> "
