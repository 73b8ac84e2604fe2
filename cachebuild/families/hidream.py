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

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cachebuild.config import DType
from cachebuild.families.vae import normalize_latents
from cachebuild.hub import local_or_hub

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"HiDreamImagePipeline": "hidream"}
STORED_DTYPE = DType.BF16  # Llama's hidden states pass fp16's range (families.text.stored_dtype)
MAX_LENGTH = 128  # HiDreamImagePipeline's max_sequence_length: T5's and Llama's padded length
CLIP_LIMIT = 218  # its CLIP encoders pad to min(max_sequence_length, 218) (their position tables hold 248)
LLAMA_REPO = "meta-llama/Meta-Llama-3.1-8B-Instruct"  # HiDream's text_encoder_4 where the pipeline has none (its
# hub repository leaves the gated Llama out; the pipeline's docstring loads it from here)


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension)."""
    out = {"latents": normalize_latents(rec["latents"], vae)}
    if "llama3" in rec:
        out["prompt_embeds_t5"] = rec["t5"]  # (L, 4096)
        out["prompt_embeds_llama3"] = rec["llama3"]  # (layers, L, 4096)
        out["pooled_prompt_embeds"] = torch.cat([rec["clip_l_pooled"], rec["clip_g_pooled"]], dim=-1)  # (768 + 1280,)
    return out


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """HiDreamImagePipeline.encode_prompt's four encoders: the CLIPs' pooled projections (unmasked, causal, at
    min(max_sequence_length, 218)); T5 and Llama 3.1 with their masks, every padded row kept (the transformer
    gets no text mask); Llama's hidden states after each of its layers, stacked. ``--max-length`` sets
    max_sequence_length."""
    root, length = ctx.root, ctx.cfg.max_length or MAX_LENGTH
    clip_length = min(length, CLIP_LIMIT)
    llama, llama_tok = root / "text_encoder_4", root / "tokenizer_4"
    if not (llama / "config.json").is_file():
        llama = llama_tok = local_or_hub(LLAMA_REPO, None)
    clip_cls, t5_length = "CLIPTextModelWithProjection", min(length, _tokenizer_limit(root / "tokenizer_3"))
    return [
        ctx.clip("clip_l", "text_encoder", "tokenizer", clip_cls, -1, hidden=False, pooled="text_embeds",
                 max_length=clip_length),
        ctx.clip("clip_g", "text_encoder_2", "tokenizer_2", clip_cls, -1, hidden=False, pooled="text_embeds",
                 max_length=clip_length),
        # max_length given again: --max-length sets it, not --t5-max-length; --t5-mask does not apply either
        ctx.t5("text_encoder_3", "tokenizer_3", t5_length, max_length=t5_length, trim=False, masked=True),
        # LlamaModel: the pipeline's LlamaForCausalLM without its LM head, the same hidden states
        ctx.llm("llama3", "LlamaModel", -1, min(length, _tokenizer_limit(llama_tok)), False, folder=llama,
                tokenizer=llama_tok, masked=True, all_layers=True, pad_with_eos=True),
    ]  # fmt: skip


def _tokenizer_limit(folder: Path) -> int:
    """The tokenizer's model_max_length (the pipeline caps max_sequence_length with it); unbounded if unset."""
    config = folder / "tokenizer_config.json"
    limit = json.loads(config.read_text()).get("model_max_length") if config.is_file() else None
    return int(limit) if isinstance(limit, (int, float)) else 1 << 30
