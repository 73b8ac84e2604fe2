"""Qwen-Image: a causal 3D VAE used with one frame, normalised per channel, and 2x2 packing into tokens.

What ``QwenImagePipeline`` hands its transformer for an image (``_encode_vae_image`` in its img2img and edit
pipelines): the VAE's latents of the image as one frame, ``(z - latents_mean) * (1 / latents_std)`` per channel
with the vectors from the VAE config, transposed to ``(1, C, H/8, W/8)`` (frame axis first, C = ``z_dim`` = 16):
the layout ``prepare_latents`` builds before :func:`pack_latents` turns it into (H/16 * W/16, 64) tokens.
The cache stores the raw ``(C, H/8, W/8)`` latents; the vectors are in the fingerprint's ``vae`` object.
"""

from __future__ import annotations

import torch

PIPELINE = "QwenImagePipeline"


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension)."""
    return {"latents": normalize_latents(rec["latents"], vae)[None]}  # (1, C, h, w): frames, then channels


def normalize_latents(z: torch.Tensor, vae: dict) -> torch.Tensor:
    """Raw (C, h, w) -> ``(z - mean) * (1 / std)`` per channel, in float32, as the pipeline computes it."""
    mean = torch.tensor(vae["latents_mean"], dtype=torch.float32).view(-1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae["latents_std"], dtype=torch.float32).view(-1, 1, 1)
    return (z.float() - mean) * inv_std


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, 1, C, h, w) or (B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens, as QwenImagePipeline packs."""
    b, c, h, w = latents.shape[0], latents.shape[-3], latents.shape[-2], latents.shape[-1]
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)
