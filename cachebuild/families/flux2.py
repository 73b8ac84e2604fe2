"""Flux.2: a 32-channel VAE whose latents are cut into 2x2 patches (128 channels) and normalised with the VAE's
batch-norm running statistics, then flattened into tokens.

What ``Flux2Pipeline`` hands its transformer for an image (``_encode_vae_image``): the posterior mode
``(C, H/8, W/8)``, patchified to ``(4C, H/16, W/16)`` (channel ``4c + 2dy + dx`` holds channel ``c`` at offset
``(dy, dx)``), then ``(p - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)``: the layout
``prepare_latents`` builds before :func:`pack_latents` flattens it into (H/16 * W/16, 4C) tokens. The cache
stores the raw ``(C, H/8, W/8)`` latents; the statistics are in the fingerprint's ``vae`` object.
"""

from __future__ import annotations

import torch

PIPELINE = "Flux2Pipeline"


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension)."""
    return {"latents": normalize_latents(rec["latents"], vae)}


def normalize_latents(z: torch.Tensor, vae: dict) -> torch.Tensor:
    """Raw (C, h, w) -> patchified (4C, h/2, w/2), batch-norm normalised, in float32, as the pipeline computes it."""
    p = patchify_latents(z.float()[None])[0]
    mean = torch.tensor(vae["bn_running_mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.sqrt(torch.tensor(vae["bn_running_var"], dtype=torch.float32).view(-1, 1, 1) + vae["batch_norm_eps"])
    return (p - mean) / std


def patchify_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, 4C, h/2, w/2): each 2x2 patch's four cells become channels ``4c + 2dy + dx``."""
    b, c, h, w = z.shape
    x = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, 4C, h/2, w/2) -> (B, h/2 * w/2, 4C): one token per patch, as Flux2Pipeline packs them."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)
