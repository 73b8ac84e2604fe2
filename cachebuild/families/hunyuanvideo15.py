"""HunyuanVideo 1.5 (``HunyuanVideo15Pipeline``, ``HunyuanVideo15ImageToVideoPipeline``): Qwen2.5-VL over a chat
template, and ByT5 over the caption's quoted text.

What ``encode_prompt`` hands the transformer (the image-to-video pipeline's text is the same):

- ``prompt_embeds`` (1000, 3584) and ``prompt_embeds_mask`` (1000,): the caption (" " when empty) as the user turn
  after :data:`SYSTEM_MESSAGE` through the tokenizer's chat template with the generation prompt, padded to
  1000 + 108 tokens, run through Qwen2.5-VL's text model with the mask; ``hidden_states[-3]``, the template's
  first 108 rows cropped;
- ``prompt_embeds_2`` (256, 1472) and ``prompt_embeds_mask_2`` (256,): ByT5 over the quoted text of the caption
  (``"..."`` or curly quotes, each as ``Text "x". ``, see :func:`glyph_text`), padded to 256 and masked; zeros and
  a zero mask when the caption quotes nothing. Both masks are cast to the embeddings' dtype.

The cache stores the real rows only (``qwen25vl`` (T, 3584), ``byt5`` (T2, 1472), T2 = 0 without quotes): the
transformer moves the rows under the mask to the front and zeroes the others (``transformer_hunyuan_video15``:
"invalid mllm (zeroed)"), so the pipeline's own rows at the padding, Qwen's and ByT5's outputs at masked positions,
reach nothing; the reader pads with zeros.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from cachebuild.config import DType
from cachebuild.families.video_vae import normalize_clip_latents

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"HunyuanVideo15Pipeline": "hunyuanvideo-1.5", "HunyuanVideo15ImageToVideoPipeline": "hunyuanvideo-1.5"}
STORED_DTYPE = DType.BF16  # Qwen2.5-VL's hidden states pass fp16's range (families.text.stored_dtype)
# the pipelines' system_message: its source continues the string over lines with a backslash, so each numbered
# point follows eight spaces of the next line's indentation
SYSTEM_MESSAGE = (
    "You are a helpful assistant. Describe the video by detailing the following aspects:         "
    "1. The main content and theme of the video.         "
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.         "
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.         "
    "4. background environment, light, style and atmosphere.         "
    "5. camera angles, movements, and transitions used in the video."
)
CHAT = (("add_generation_prompt", True),)  # _get_mllm_prompt_embeds's apply_chat_template
DROP = 108  # prompt_template_encode_start_idx: the template's rows before the caption, cropped
MAX_LENGTH = 1000 + DROP  # tokenizer_max_length + crop_start
LAYER = -3  # hidden_states[-(num_hidden_layers_to_skip + 1)], num_hidden_layers_to_skip = 2
BYT5_MAX_LENGTH = 256  # tokenizer_2_max_length
GLYPHS = re.compile(r"\"(.*?)\"|“(.*?)”")  # extract_glyph_texts's pattern
IMAGE_TOKENS, IMAGE_DIM = 729, 1152  # vision_num_semantic_tokens; vision_states_dim: the transformer config's
# image_embed_dim (the released models' 1152, the pipeline's own default without a transformer)


def text_to_video_condition(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """What ``HunyuanVideo15Pipeline`` hands its transformer beside the latents of a text-to-video clip
    (``prepare_cond_latents_and_mask`` and ``__call__``): ``cond_latents_concat`` zeros like ``z`` (C, F', h, w),
    ``mask_concat`` zeros (1, F', h, w), ``image_embeds`` zeros (729, 1152), which the transformer reads as "no
    image" (``is_t2v = torch.all(image_embeds == 0)``). float32; the pipeline makes them in the transformer's
    dtype."""
    return {
        "cond_latents_concat": torch.zeros_like(z),
        "mask_concat": torch.zeros((1, *z.shape[1:]), dtype=z.dtype),
        "image_embeds": torch.zeros((IMAGE_TOKENS, IMAGE_DIM), dtype=z.dtype),
    }


def user_text(caption: str) -> str:
    """The user turn ``format_text_input`` builds: the caption, or one space for an empty one."""
    return caption if caption else " "


def glyph_text(caption: str) -> str | None:
    """The text ByT5 encodes for ``caption``, as ``extract_glyph_texts``: each quoted span (duplicates dropped where
    there are several) as ``Text "x". ``, joined; None when nothing is quoted.

    Example:
        >>> glyph_text('a sign saying "open" and “closed”')
        'Text "open". Text "closed". '
    """
    found = [a or b for a, b in GLYPHS.findall(caption)]
    found = list(dict.fromkeys(found)) if len(found) > 1 else found
    return ". ".join(f'Text "{text}"' for text in found) + ". " if found else None


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """Qwen2.5-VL's third-from-last hidden state over the system and user template, the template's 108 rows
    dropped; ByT5's last hidden state over the quoted text. Both masked, the real rows kept."""
    root = ctx.root
    return [
        ctx.llm("qwen25vl", "Qwen2_5_VLTextModel", LAYER, MAX_LENGTH, True, chat_template=CHAT,
                system_message=SYSTEM_MESSAGE, drop_rows=DROP, prepare=user_text),
        ctx.llm("byt5", "T5EncoderModel", -1, BYT5_MAX_LENGTH, True, folder=root / "text_encoder_2",
                tokenizer=root / "tokenizer_2", prepare=glyph_text),
    ]  # fmt: skip


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """``latents`` (C, F', h, w): the clip's raw latents times ``scaling_factor``, as
    ``HunyuanVideo15ImageToVideoPipeline._get_image_latents`` scales what the VAE gives, with the text-to-video
    condition ``HunyuanVideo15Pipeline.__call__`` builds beside them (:func:`text_to_video_condition`; the
    transformer's ``hidden_states`` is ``latents``, ``cond_latents_concat`` and ``mask_concat`` concatenated along
    C: 65 channels for the released model).

    ``prompt_embeds`` (1000, D), ``prompt_embeds_mask``, ``prompt_embeds_2`` (256, D2), ``prompt_embeds_mask_2``:
    zeros past the real rows (where the pipeline has the encoders' outputs at padding, which the transformer
    zeroes), the masks in the embeddings' dtype as ``encode_prompt`` casts them."""
    out = {}
    if "latents" in rec:
        z = normalize_clip_latents(rec["latents"], vae)  # (C, F', h, w), float32
        out |= {"latents": z} | text_to_video_condition(z)
    for name, suffix in (("qwen25vl", ""), ("byt5", "_2")):
        if name in rec:
            out["prompt_embeds" + suffix] = rec[name]
            out["prompt_embeds_mask" + suffix] = rec[name + "_mask"].to(rec[name].dtype)
    return out
