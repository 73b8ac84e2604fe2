"""LTX-2 (``LTX2Pipeline``, ``LTX2ImageToVideoPipeline``): every hidden state of Gemma 3, per token.

What ``encode_prompt`` returns (the image-to-video pipeline's text is the same): the caption, stripped, tokenized
to 1024 tokens padded on the **left**, run through Gemma 3 with the mask; every hidden state (the embeddings and
each of the 48 layers: 49) stacked per channel, ``prompt_embeds`` (1024, 3840 * 49), with ``prompt_attention_mask``
(1024,) int64 (0 at the left padding). ``__call__`` hands both to ``LTX2TextConnectors``, whose first step
normalises each layer over the real tokens only and zeroes the padding rows (``per_layer_masked_mean_norm``, or
``per_token_rms_norm`` with the mask for LTX-2.3), then moves the real rows to the front and fills the rest with
its learnt registers: the pipeline's rows at the padding reach nothing.

What is stored, and why: all 49 layers of the real tokens only (``gemma3`` (T, 188160) in bf16, 376,320 bytes a
token: 29 MB for a 77-token caption, 96 MB for 256 tokens, 385 MB only for one that fills all 1024). A smaller
record would have to be taken inside the connectors: after their per-layer normalisation nothing shrinks, and
after ``text_proj_in`` (to 3840 a token) the cache would hold the output of connector weights, which LTX-2
trainings train and which differ between LTX-2 and LTX-2.3; the stored rows feed any connectors, and the reader
pads them back on the left with zeros, which the connectors read as the pipeline's rows. The encoder runs at the
full 1024 positions (as the pipeline does), since left padding moves the real tokens' positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cachebuild.config import DType
from cachebuild.families.video_vae import normalize_clip_latents, pack_ltx2_latents

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"LTX2Pipeline": "ltx-2", "LTX2ImageToVideoPipeline": "ltx-2"}
STORED_DTYPE = DType.BF16  # Gemma 3's hidden states pass fp16's range (families.text.stored_dtype)
MAX_LENGTH = 1024  # __call__'s max_sequence_length
DEFAULT_FPS = 24.0  # __call__'s frame_rate default


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """Gemma 3's hidden states, all of them per channel, left-padded and masked, the real rows kept; run through
    the model's ``model`` (no LM head over a 262k vocabulary)."""
    return [
        ctx.llm("gemma3", "Gemma3ForConditionalGeneration", -1, MAX_LENGTH, True, left_pad=True,
                per_channel_layers=True, body="model")
    ]  # fmt: skip


def pipeline_inputs(rec: dict, vae: dict) -> dict:
    """``latents`` (F' * h * w, C): the clip's raw latents normalised with the VAE's statistics and scaling factor
    (``LTX2Pipeline._normalize_latents``), packed into tokens as ``prepare_latents`` packs them (the transformer's
    patch 1: frames, then rows, then columns); ``latent_num_frames``, ``latent_height``, ``latent_width`` (F', h, w:
    ints) and ``frame_rate`` (the clip's rate: a float), which ``__call__`` hands the transformer as ``num_frames``,
    ``height``, ``width`` and ``fps`` (with ``motion_speed`` 1); with them it places the tokens:
    ``transformer.rope.prepare_video_coords(1, F', h, w, device, fps=frame_rate)``. The pipelines encode no audio:
    audio latents and the audio arguments are not in a cache.

    ``prompt_embeds`` (1024, D * (layers + 1)): zeros, then the stored rows; ``prompt_attention_mask`` (1024,)
    int64, 1 at those rows: the layout ``encode_prompt`` returns."""
    out: dict = {}
    if "latents" in rec:
        z = normalize_clip_latents(rec["latents"], vae)  # (C, F', h, w), float32
        frames, height, width = z.shape[1:]
        out |= {"latents": pack_ltx2_latents(z), "latent_num_frames": frames}
        out |= {"latent_height": height, "latent_width": width}
        out["frame_rate"] = float(rec.get("fps") or DEFAULT_FPS)  # a still (one frame, fps 0): its time position
        # is 0 at any rate
    if "gemma3" in rec:
        out |= {"prompt_embeds": rec["gemma3"], "prompt_attention_mask": rec["gemma3_mask"]}
    return out
