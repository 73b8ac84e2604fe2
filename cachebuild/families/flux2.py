"""Flux.2: a 32-channel VAE whose latents are cut into 2x2 patches (128 channels) and normalised with the VAE's
batch-norm running statistics, then flattened into tokens.

What ``Flux2Pipeline`` hands its transformer for an image (``_encode_vae_image``): the posterior mode
``(C, H/8, W/8)``, patchified to ``(4C, H/16, W/16)`` (channel ``4c + 2dy + dx`` holds channel ``c`` at offset
``(dy, dx)``), then ``(p - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)``: the layout
``prepare_latents`` builds before :func:`pack_latents` flattens it into (H/16 * W/16, 4C) tokens. The cache
stores the raw ``(C, H/8, W/8)`` latents; the statistics are in the fingerprint's ``vae`` object.

Text (``encode_prompt``): ``prompt_embeds`` (512, 3D), the text encoder's hidden states at three layers side by
side per token (Flux2Pipeline: Mistral3 ``hidden_states`` 10, 20, 30, D = 5120, over a system and a user turn;
Flux2KleinPipeline: Qwen3 9, 18, 27, D = 2560 or 4096, over one user turn), encoded with the attention mask at
512 positions and returned whole: the transformer gets every row, the padding rows too (they are not zero, and
no mask goes with them), so the cache stores all 512 rows (``mistral3`` or ``qwen3``). ``text_ids`` (512, 4)
int64 is derived, not stored: ``(0, 0, 0, l)`` for row ``l``, whatever the prompt (``_prepare_text_ids``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cachebuild.config import DType

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"Flux2Pipeline": "flux2", "Flux2KleinPipeline": "flux2-klein"}
STORED_DTYPE = DType.BF16  # Mistral3's and Qwen3's hidden states pass fp16's range (families.text.stored_dtype)
MAX_LENGTH = 512  # Flux2Pipeline's and Flux2KleinPipeline's max_sequence_length: all 512 rows reach the
# transformer, template and padding rows included
LAYERS = (10, 20, 30)  # Flux2Pipeline's text_encoder_out_layers: Mistral hidden_states indices (0: embeddings)
KLEIN_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers: Qwen3 hidden_states indices
CHAT = (("add_generation_prompt", False),)  # as Flux2Pipeline._get_mistral_3_small_prompt_embeds
KLEIN_CHAT = (("add_generation_prompt", True), ("enable_thinking", False))  # as Flux2KleinPipeline's
SYSTEM_MESSAGE = (  # diffusers.pipelines.flux2.system_messages.SYSTEM_MESSAGE, the system turn of every prompt
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)
TEXT_NAMES = ("mistral3", "qwen3")  # the stored text tensor: Flux.2 [dev]'s Mistral3, or Flux.2 [klein]'s Qwen3


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension)."""
    out = {"latents": normalize_latents(rec["latents"], vae)} if "latents" in rec else {}
    for name in TEXT_NAMES:
        if name in rec:
            out["prompt_embeds"] = rec[name]  # (512, 3D)
            out["text_ids"] = text_ids(rec[name].shape[0])
    return out


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """Flux.2 [dev]: Mistral3 layers 10/20/30 over the system + user template (its processor's tokenizer);
    [klein]: Qwen3 layers 9/18/27 over the user template. Both masked, all 512 rows stored."""
    if ctx.family == "flux2-klein":
        return [
            ctx.llm("qwen3", "Qwen3ForCausalLM", -1, MAX_LENGTH, False, chat_template=KLEIN_CHAT, layers=KLEIN_LAYERS,
                    masked=True)
        ]  # fmt: skip
    return [
        ctx.llm("mistral3", "Mistral3ForConditionalGeneration", -1, MAX_LENGTH, False, chat_template=CHAT,
                layers=LAYERS, masked=True, system_message=SYSTEM_MESSAGE, processor=True)
    ]  # fmt: skip


def text_ids(length: int) -> torch.Tensor:
    """(length, 4) int64: the (t, h, w, l) position of each text row, ``(0, 0, 0, l)``, as the pipelines build it."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids


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
