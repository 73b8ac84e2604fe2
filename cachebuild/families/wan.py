"""Wan 2.1 / 2.2 (A14B): a causal 3D VAE over clips, normalised per channel.

What ``WanVideoToVideoPipeline.prepare_latents`` hands on for a clip of F frames (before it adds noise): the VAE's
posterior mode of the clip in [-1, 1], ``(z - latents_mean) * (1 / latents_std)`` per channel with the vectors
from the VAE config, laid out ``(1, C, F', H/8, W/8)`` with F' = 1 + (F - 1) / 4 and C = ``z_dim`` = 16. The cache
stores the raw ``(C, F', h, w)`` latents of each clip (an image of a video dataset is a clip of one frame); the
vectors are in the fingerprint's ``vae`` object. The text encoder (UMT5) is not cached yet.
"""

from __future__ import annotations

import torch

from cachebuild.families.qwenimage import normalize_latents as normalize_per_channel

PIPELINES: dict[str, str] = {}  # no text family yet: a Wan pipeline folder's captions are not encoded


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """``latents`` (C, F', h, w), normalised as ``prepare_latents`` normalises them (no batch dimension)."""
    if "latents" not in rec:
        return {}
    z = rec["latents"]  # (C, F', h, w)
    c = z.shape[0]
    return {"latents": normalize_per_channel(z.reshape(c, -1, z.shape[-1]), vae).reshape(z.shape)}
