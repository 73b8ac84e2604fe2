"""Sana: Gemma2's last hidden state over the complex human instruction and the caption, and the 32x DC-AE.

What ``SanaPipeline`` hands its transformer by default: the caption lower-cased and stripped, the instruction's
lines (``complex_human_instruction``, joined by newlines) put in front, tokenized right-padded to the instruction's
token count + 298 and run with the mask; of ``last_hidden_state`` it keeps row 0 and the last 299 rows
(``select_index``), the mask likewise: ``prompt_embeds`` (300, 2304), ``prompt_attention_mask`` (300,) int64.
Latents are the deterministic encoder output times ``scaling_factor`` (no shift), ``(32, H/32, W/32)``.

The stored ``gemma2`` is the rows of that selection under the mask: row 0 and the caption's real rows (a
caption that fills the 300 rows keeps all of them). Gemma2 is causal and right-padded, so with the mask these rows
do not depend on the padding; the transformer's cross-attention masks the rest. ``prompt_embeds`` comes back
zero-padded to 300.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING

import torch

from cachebuild.config import DType
from cachebuild.families.vae import normalize_latents

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"SanaPipeline": "sana"}
STORED_DTYPE = DType.BF16  # Gemma2's hidden states pass fp16's range (families.text.stored_dtype)
MAX_LENGTH = 300  # SanaPipeline's max_sequence_length: the rows it hands its transformer, the instruction's tokens
# not counted (see EncoderSpec.window)


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension)."""
    out = {"latents": normalize_latents(rec["latents"], vae)}  # z * scaling_factor: the fingerprint has no shift
    if "gemma2" in rec:
        out["prompt_embeds"] = rec["gemma2"]  # (300, D), zeros past the kept rows
        out["prompt_attention_mask"] = rec["gemma2_mask"]  # (300,) int64
    return out


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """Gemma2's last hidden state over the instruction and the lower-cased caption, right-padded and masked; row 0
    and the real rows of the last 299 positions. The tokenizer length depends on the instruction's token count, so
    the tokenizer is read here (no model)."""
    from cachebuild.families.tokens import load_tokenizer

    prefix = prompt_prefix()
    spec = ctx.llm("gemma2", "Gemma2Model", -1, MAX_LENGTH, True, prefix=prefix, lowercase=True, right_pad=True,
                   window=MAX_LENGTH)  # fmt: skip
    if not spec.tokenizer.is_dir():
        return [spec]  # resolve_encoders names what is missing
    prefix_tokens = len(load_tokenizer(spec).encode(prefix))  # <bos> included, as SanaPipeline counts them
    return [dataclasses.replace(spec, max_length=prefix_tokens + MAX_LENGTH - 2)]


def prompt_prefix() -> str:
    """The default ``complex_human_instruction`` of ``SanaPipeline.__call__``, its lines joined by newlines as
    the pipeline joins them, read from the installed diffusers (the reference) rather than copied."""
    import diffusers

    lines = inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default
    return "\n".join(lines)
