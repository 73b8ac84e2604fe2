"""Flux.1: CLIP-L's pooled output and T5-XXL, a 16-channel VAE with a shift, and 2x2 packing into tokens.

What ``FluxPipeline`` hands its transformer: ``prompt_embeds`` (L, 4096), T5 run unmasked over all L = 512
positions (the default text cache stores exactly that); ``pooled_prompt_embeds`` (768,); ``text_ids`` (L, 3)
zeros; latents ``(z - shift_factor) * scaling_factor`` in ``(16, H/8, W/8)``, the layout before
:func:`pack_latents` turns them into (H/16 * W/16, 64) tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cachebuild.families.vae import normalize_latents

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"FluxPipeline": "flux"}
T5_MAX_LENGTH = 512  # FluxPipeline's max_sequence_length (--t5-max-length overrides it)


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """CLIP-L's pooled output (no hidden states) and T5."""
    return [
        ctx.clip("clip_l", "text_encoder", "tokenizer", "CLIPTextModel", -1, hidden=False, pooled="pooler_output"),
        ctx.t5("text_encoder_2", "tokenizer_2", T5_MAX_LENGTH),
    ]


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension)."""
    out = {"latents": normalize_latents(rec["latents"], vae)}
    if "t5" in rec:
        out["prompt_embeds"] = rec["t5"]
        out["pooled_prompt_embeds"] = rec["clip_l_pooled"]
        out["text_ids"] = torch.zeros(rec["t5"].shape[0], 3, dtype=rec["t5"].dtype)
    return out


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens, as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)
