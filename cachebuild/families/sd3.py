"""Stable Diffusion 3 / 3.5: CLIP-L and CLIP-G (penultimate layers, pooled projections) and T5-XXL.

What ``StableDiffusion3Pipeline`` hands its transformer: ``prompt_embeds`` (77 + L, 4096): the two CLIPs'
hidden states concatenated along the width (768 + 1280), zero-padded to T5's width, then T5's L rows below
them; ``pooled_prompt_embeds`` (2048,) = ``cat([clip_l_pooled, clip_g_pooled])``; latents
``(z - shift_factor) * scaling_factor``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cachebuild.families.vae import normalize_latents

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"StableDiffusion3Pipeline": "sd3"}
T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length (--t5-max-length overrides it)


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """Both CLIPs' penultimate layers and pooled projections, and T5."""
    return [
        ctx.clip("clip_l", "text_encoder", "tokenizer", "CLIPTextModelWithProjection", -2, pooled="text_embeds"),
        ctx.clip("clip_g", "text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", -2, pooled="text_embeds"),
        ctx.t5("text_encoder_3", "tokenizer_3", T5_MAX_LENGTH),
    ]


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension)."""
    out = {"latents": normalize_latents(rec["latents"], vae)}
    if "t5" in rec:
        clip = torch.cat([rec["clip_l"], rec["clip_g"]], dim=-1)  # (77, 2048)
        t5 = rec["t5"].to(clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (77, 4096)
        out["prompt_embeds"] = torch.cat([clip, t5], dim=-2)  # (77 + L, 4096)
        out["pooled_prompt_embeds"] = torch.cat([rec["clip_l_pooled"], rec["clip_g_pooled"]], dim=-1)
    return out
