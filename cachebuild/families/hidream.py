"""HiDream-I1: two CLIPs' pooled projections, T5-XXL and every layer of Llama 3.1 8B, and Flux.1's VAE.

What ``HiDreamImagePipeline.encode_prompt`` hands its transformer (defaults, max_sequence_length 128):
``pooled_prompt_embeds`` (2048,), CLIP-L's and CLIP-G's ``text_embeds`` concatenated, both run unmasked over
min(128, 218) positions; ``prompt_embeds_t5`` (128, 4096), T5 run with its attention mask, every padded row
kept; ``prompt_embeds_llama3`` (32, 128, 4096), Llama's ``hidden_states[1:]`` (the output of each of its 32
layers, the last after the final norm) run with the attention mask over the caption padded with EOS to 128,
stacked on a leading layer axis (the pipeline's (layers, B, L, D) without B); latents
``(z - shift_factor) * scaling_factor`` in ``(16, H/8, W/8)`` (the transformer patchifies them itself).

Nothing is trimmed: the transformer attends to every text row with no mask, so the rows T5 and Llama compute
at the padding are part of its input, and they depend on the prompt (masked keys, but their queries still see
the real tokens). The stored tensors are exactly the pipeline's.
"""

from __future__ import annotations

import torch

from cachebuild.families.vae import normalize_latents

PIPELINE = "HiDreamImagePipeline"


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension)."""
    out = {"latents": normalize_latents(rec["latents"], vae)}
    if "llama3" in rec:
        out["prompt_embeds_t5"] = rec["t5"]  # (L, 4096)
        out["prompt_embeds_llama3"] = rec["llama3"]  # (layers, L, 4096)
        out["pooled_prompt_embeds"] = torch.cat([rec["clip_l_pooled"], rec["clip_g_pooled"]], dim=-1)  # (768 + 1280,)
    return out
