"""SDXL: CLIP-L and OpenCLIP-bigG, both at their penultimate layer, bigG's pooled projection, and the size
conditioning (``add_time_ids``).

What ``StableDiffusionXLPipeline`` hands its UNet: ``prompt_embeds`` (77, 768 + 1280) =
``cat([clip_l, clip_g], -1)``; ``pooled_prompt_embeds`` (1280,) = ``clip_g_pooled``; ``add_time_ids`` (6,) =
``original_size (H, W) + crops_coords_top_left (top, left) + target_size (H, W)``; latents
``z * scaling_factor``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cachebuild.families.vae import normalize_latents

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"StableDiffusionXLPipeline": "sdxl"}


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """CLIP-L and OpenCLIP-bigG at their penultimate layers, bigG's pooled projection."""
    return [
        ctx.clip("clip_l", "text_encoder", "tokenizer", "CLIPTextModel", -2),
        ctx.clip("clip_g", "text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", -2, pooled="text_embeds"),
    ]


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension)."""
    (w, h), (left, top), (bw, bh) = rec["original_size"], rec["crop"], rec["bucket"]
    out = {
        "latents": normalize_latents(rec["latents"], vae),
        "add_time_ids": torch.tensor([h, w, top, left, bh, bw], dtype=torch.float32),  # (H, W) order, as SDXL
    }
    if "clip_l" in rec:
        out["prompt_embeds"] = torch.cat([rec["clip_l"], rec["clip_g"]], dim=-1)  # (77, 2048)
        out["pooled_prompt_embeds"] = rec["clip_g_pooled"]
    return out
