"""Wan 2.1 and 2.2 (``WanPipeline``, ``WanImageToVideoPipeline``): a causal 3D VAE over clips, normalised per
channel, and UMT5-XXL over the cleaned caption.

Latents: what ``WanVideoToVideoPipeline.prepare_latents`` hands on for a clip of F frames (before it adds noise):
the VAE's posterior mode of the clip in [-1, 1], ``(z - latents_mean) * (1 / latents_std)`` per channel with the
vectors from the VAE config, laid out ``(1, C, F', H/8, W/8)`` with F' = 1 + (F - 1) / 4 and C = ``z_dim`` = 16.
The cache stores the raw ``(C, F', h, w)`` latents of each clip (an image of a video dataset is a clip of one
frame); the vectors are in the fingerprint's ``vae`` object.

Text: what the pipelines' ``encode_prompt`` hands the transformer as ``prompt_embeds`` (512, 4096): the caption
cleaned as :func:`prompt_clean` cleans it (ftfy, HTML entities, whitespace), tokenized to ``max_sequence_length``
(512 in ``__call__``; ``encode_prompt`` alone defaults to 226, which no generation uses), run through UMT5 with the
attention mask, cut to the real tokens and padded back to 512 with exact zeros; no mask goes with it. The text of
the image-to-video pipelines is the same. The cache stores the real rows only (``umt5`` (T, 4096)): the rows past
them are zeros in the pipeline's own output, so storing them would hold nothing, and the reader pads them back
(``umt5_mask`` marks the real rows).
"""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING

import torch

from cachebuild.errors import ConfigError
from cachebuild.families.qwenimage import normalize_latents as normalize_per_channel

if TYPE_CHECKING:
    from cachebuild.families.text import EncoderSpec, SpecContext

PIPELINES = {"WanPipeline": "wan", "WanImageToVideoPipeline": "wan"}
MAX_LENGTH = 512  # __call__'s max_sequence_length (--t5-max-length overrides it, as the argument does)


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """``latents`` (C, F', h, w), normalised as ``prepare_latents`` normalises them, and ``prompt_embeds``
    (512, 4096): the stored rows and zeros after them, as ``encode_prompt`` returns them at ``__call__``'s length
    (no mask: the transformer attends to all 512 rows). No batch dimension."""
    out = {"prompt_embeds": rec["umt5"]} if "umt5" in rec else {}
    if "latents" in rec:
        z = rec["latents"]  # (C, F', h, w)
        c = z.shape[0]
        out["latents"] = normalize_per_channel(z.reshape(c, -1, z.shape[-1]), vae).reshape(z.shape)
    return out


def prompt_clean(text: str) -> str:
    """The pipelines' ``prompt_clean``: ftfy's text fixes, HTML entities unescaped twice, whitespace runs collapsed
    to one space, the ends stripped.

    Example:
        >>> prompt_clean("a  cat &amp;amp; a\\tdog ")
        'a cat & a dog'
    """
    try:
        import ftfy
    except ImportError as exc:  # diffusers skips ftfy where it is missing; its image-to-video pipeline cannot
        raise ConfigError(
            "Wan's captions are cleaned with ftfy, as its pipelines clean them: pip install ftfy"
        ) from exc
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def encoder_specs(ctx: SpecContext) -> list[EncoderSpec]:
    """UMT5's last hidden state, masked, the real tokens kept, over the cleaned caption."""
    return [ctx.t5("text_encoder", "tokenizer", MAX_LENGTH, name="umt5", cls="UMT5EncoderModel", trim=True,
                   prepare=prompt_clean)]  # fmt: skip
