"""Chroma: T5-XXL alone, run *with* its attention mask, and Flux.1's 16-channel VAE.

What ``ChromaPipeline`` hands its transformer: ``prompt_embeds`` (512, 4096); ``prompt_attention_mask`` (512,),
1 at the real tokens and the first padding token (the transformer attends to exactly those); ``text_ids``
(512, 3) zeros; latents ``(z - shift_factor) * scaling_factor`` in ``(16, H/8, W/8)`` (packed like Flux.1's).

Only the rows under the mask are stored: the transformer never reads the others, so the stored cache is
lossless for it, and ``prompt_embeds`` comes back with zeros there (the pipeline's own rows there are T5's
outputs at masked padding, which nothing uses).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cachebuild.families.vae import normalize_latents

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"ChromaPipeline": "chroma"}
T5_MAX_LENGTH = 512  # ChromaPipeline's max_sequence_length (--t5-max-length overrides it)


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """T5 masked whatever --t5-mask says, as ChromaPipeline runs it; its transformer sees one padding token."""
    return [ctx.t5("text_encoder", "tokenizer", T5_MAX_LENGTH, trim=True, extra_rows=1)]


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension)."""
    out = {"latents": normalize_latents(rec["latents"], vae)}
    if "t5" in rec:
        out["prompt_embeds"] = rec["t5"]
        out["prompt_attention_mask"] = rec["t5_mask"].to(rec["t5"].dtype)
        out["text_ids"] = torch.zeros(rec["t5"].shape[0], 3, dtype=rec["t5"].dtype)
    return out
