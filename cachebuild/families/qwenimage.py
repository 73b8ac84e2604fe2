"""Qwen-Image: a causal 3D VAE used with one frame, normalised per channel, and 2x2 packing into tokens.

What ``QwenImagePipeline`` hands its transformer for an image (``_encode_vae_image`` in its img2img and edit
pipelines): the VAE's latents of the image as one frame, ``(z - latents_mean) * (1 / latents_std)`` per channel
with the vectors from the VAE config, transposed to ``(1, C, H/8, W/8)`` (frame axis first, C = ``z_dim`` = 16):
the layout ``prepare_latents`` builds before :func:`pack_latents` turns it into (H/16 * W/16, 64) tokens.
The cache stores the raw ``(C, H/8, W/8)`` latents; the vectors are in the fingerprint's ``vae`` object.

Text, as ``encode_prompt`` computes it: the caption goes into the pipeline's template (a system message asking
for a description, then the caption as the user's turn, then the assistant's header), is tokenized to at most
1024 + 34 tokens (padded to the batch's longest, right side), run through Qwen2.5-VL with the attention mask,
and the last hidden state (final norm included) is kept at the real tokens less the template's first 34: the
caption's tokens and the template's closing ones. The stored ``qwen25vl`` is exactly those T rows (T <= 1024):
Qwen2.5-VL is causal and right-padded, so with the mask its outputs at the real tokens do not depend on how
much padding follows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cachebuild.config import DType

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"QwenImagePipeline": "qwen-image"}
STORED_DTYPE = DType.BF16  # Qwen2.5-VL's hidden states pass fp16's range (families.text.stored_dtype)
# QwenImagePipeline's prompt_template_encode: a system message, then the caption as the user's turn
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
DROP = 34  # prompt_template_encode_start_idx: the template's tokens before the caption, not kept
TOKENIZER_MAX_LENGTH = 1024 + DROP  # the pipeline's tokenizer_max_length plus the dropped tokens
MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default: prompt_embeds rows past it never reach the
# transformer (encode_prompt's own default is 1024, which the stored rows already respect)


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """The pipeline's names for one record's tensors (no batch dimension).

    ``prompt_embeds`` (T, 3584) and ``prompt_embeds_mask`` (T,) int64 ones are one prompt's ``encode_prompt``
    output at ``__call__``'s default ``max_sequence_length`` (512 rows at most). For a batch the pipeline pads
    each prompt's rows with zeros to the longest prompt and the mask with zeros to match (then passes the mask
    as None where no prompt is padded); ``torch.nn.utils.rnn.pad_sequence(..., batch_first=True)`` over these
    gives the same.
    """
    out = {}
    if "latents" in rec:
        out["latents"] = normalize_latents(rec["latents"], vae)[None]  # (1, C, h, w): frames, then channels
    if "qwen25vl" in rec:
        embeds = rec["qwen25vl"][rec["qwen25vl_mask"].bool()][:MAX_SEQUENCE_LENGTH]  # padded record -> (T, D)
        out["prompt_embeds"] = embeds
        out["prompt_embeds_mask"] = torch.ones(embeds.shape[0], dtype=torch.long)
    return out


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """Qwen2.5-VL's last hidden state, masked, the template's prefix dropped; run through its ``model`` (no LM
    head)."""
    return [
        ctx.llm("qwen25vl", "Qwen2_5_VLForConditionalGeneration", -1, TOKENIZER_MAX_LENGTH, True,
                prompt_template=TEMPLATE, drop_rows=DROP, body="model")
    ]  # fmt: skip


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
