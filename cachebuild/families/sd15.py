"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a 4-channel VAE scaled by ``scaling_factor``.

What ``StableDiffusionPipeline`` hands its UNet: ``prompt_embeds`` (77, D), the text encoder's last hidden
state (or, with clip skip, an earlier layer through the final layer norm: what ``--clip-skip`` stores), and
latents ``z * scaling_factor`` (``(C, H/8, W/8)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cachebuild.families.vae import normalize_latents

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"StableDiffusionPipeline": "sd15"}  # sd2 where its text encoder is 1024 wide (families.text)


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """SD 1.x: CLIP-L's last layer, or with --clip-skip 2 the penultimate through the final norm; SD 2.x: the
    OpenCLIP-H encoder's last layer (diffusers' text_encoder already ends at OpenCLIP's penultimate)."""
    if ctx.family == "sd2":
        return [ctx.clip("clip_h", "text_encoder", "tokenizer", "CLIPTextModel", -1)]
    skip = ctx.cfg.clip_skip
    return [ctx.clip("clip_l", "text_encoder", "tokenizer", "CLIPTextModel", -skip, final_norm=skip > 1)]


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension)."""
    out = {"latents": normalize_latents(rec["latents"], vae)}
    text = rec.get("clip_l", rec.get("clip_h"))  # SD 1.x: CLIP-L; SD 2.x: OpenCLIP-H
    if text is not None:
        out["prompt_embeds"] = text
    return out
