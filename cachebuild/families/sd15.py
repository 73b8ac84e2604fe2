"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a 4-channel VAE scaled by ``scaling_factor``.

What ``StableDiffusionPipeline`` hands its UNet: ``prompt_embeds`` (77, D), the text encoder's last hidden
state (or, with clip skip, an earlier layer through the final layer norm: what ``--clip-skip`` stores), and
latents ``z * scaling_factor`` (``(C, H/8, W/8)``).
"""

from __future__ import annotations

import torch

from cachebuild.families.vae import normalize_latents

PIPELINE = "StableDiffusionPipeline"


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension)."""
    out = {"latents": normalize_latents(rec["latents"], vae)}
    text = rec.get("clip_l", rec.get("clip_h"))  # SD 1.x: CLIP-L; SD 2.x: OpenCLIP-H
    if text is not None:
        out["prompt_embeds"] = text
    return out
