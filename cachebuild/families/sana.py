"""Sana: Gemma2's last hidden state over the complex human instruction and the caption, and the 32x DC-AE.

What ``SanaPipeline`` hands its transformer by default: the caption lower-cased and stripped, the instruction's
lines (``complex_human_instruction``, joined by newlines) put in front, tokenized right-padded to the instruction's
token count + 298 and run with the mask; of ``last_hidden_state`` it keeps row 0 and the last 299 rows
(``select_index``), the mask likewise: ``prompt_embeds`` (300, 2304), ``prompt_attention_mask`` (300,) int64.
Latents are the deterministic encoder output times ``scaling_factor`` (no shift), ``(32, H/32, W/32)``.

The stored ``gemma2`` is the rows of that selection under the mask: row 0 and the caption's real rows (a
caption that fills the 300 rows keeps all of them). Gemma2 is causal and right-padded, so with the mask these rows
do not depend on the padding; the transformer's cross-attention masks the rest. ``prompt_embeds`` comes back
zero-padded to 300.
"""

from __future__ import annotations

import torch

from cachebuild.families.vae import normalize_latents

PIPELINE = "SanaPipeline"


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension)."""
    out = {"latents": normalize_latents(rec["latents"], vae)}  # z * scaling_factor: the fingerprint has no shift
    if "gemma2" in rec:
        out["prompt_embeds"] = rec["gemma2"]  # (300, D), zeros past the kept rows
        out["prompt_attention_mask"] = rec["gemma2_mask"]  # (300,) int64
    return out
