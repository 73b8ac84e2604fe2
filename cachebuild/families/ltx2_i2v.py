"""LTX-2's image-to-video conditions (``LTX2ImageToVideoPipeline``), as diffusers 0.42 computes them.

``__call__`` first re-compresses the image as one H.264 frame at the CRF of the text encoder's generation
(``apply_image_conditioning_crf``: 33 for Gemma 3's LTX-2, 18 for Gemma 4's LTX-2.5; odd sides cut to even), so
that the condition carries the compression the model was trained on; then ``video_processor.preprocess(image,
height, width)`` (bilinear resize to W x H, no crop, [-1, 1]). ``prepare_latents`` encodes it as one frame, takes
the posterior mode and normalises it with the VAE's ``latents_mean``/``latents_std`` buffers and **no**
``scaling_factor`` (``_normalize_latents``' default of 1.0; the text-to-video path passes the config's, which is 1.0
in the released weights), repeats it over the F' latent frames (``init_latents``) and keeps latent frame 0 clean:
``conditioning_mask`` is 1 there, packed like the latents into F' * h * w tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cachebuild.families.i2v import CONDITION_LATENTS, latent_frames
from cachebuild.families.video_vae import pack_ltx2_latents

CRF = {"gemma3": 33, "gemma4": 18, "gemma4_unified": 18}  # resolve_default_image_crf, by the text encoder's type
DEFAULT_CRF = 33  # DEFAULT_IMAGE_CRF: LTX-2 (Gemma 3)


def pipeline_crf(root: Path | None) -> int:
    """The CRF the pipeline at ``root`` re-compresses its image at, from its text encoder's ``model_type``."""
    import json

    config = root / "text_encoder" / "config.json" if root is not None else None
    if config is None or not config.is_file():
        return DEFAULT_CRF
    return CRF.get(json.loads(config.read_text()).get("model_type"), DEFAULT_CRF)


def recompress(image, crf: int):
    """The image after ``__call__``'s H.264 round trip at ``crf`` (0: as it is), as a PIL image."""
    import numpy as np
    from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf
    from PIL import Image

    if crf == 0:
        return image
    return Image.fromarray(apply_image_conditioning_crf(np.array(image.convert("RGB")), crf))


def prepare(kind: str, images: list, shape: tuple[int, int, int], crf: int = DEFAULT_CRF) -> tuple[torch.Tensor, list]:
    """(the VAE's input (1, 3, 1, H, W) float32 in [-1, 1], []) for a clip of ``shape`` (W, H, F)."""
    from diffusers.video_processor import VideoProcessor

    w, h, _ = shape
    processor = VideoProcessor(vae_scale_factor=32, resample="bilinear")  # the pipeline's video_processor
    return processor.preprocess(recompress(images[0], crf), height=h, width=w)[:, :, None], []


def condition_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """``init_latents`` (F' * h * w, C): the image's normalised latents repeated over the clip's latent frames,
    packed into tokens like the clip's ``latents``; ``conditioning_mask`` (F' * h * w,): 1 at latent frame 0's
    tokens. ``prepare_latents`` hands on ``pack(init_latents * mask + noise * (1 - mask))`` and the mask; without
    the batch dimension."""
    mean = torch.tensor(vae["latents_mean"], dtype=torch.float32).view(-1, 1, 1, 1)
    std = torch.tensor(vae["latents_std"], dtype=torch.float32).view(-1, 1, 1, 1)
    z = (rec[CONDITION_LATENTS].float() - mean) / std  # (C, 1, h, w): no scaling_factor on this path
    frames = latent_frames(rec["frames"], vae)
    mask = torch.zeros(frames, *z.shape[2:])
    mask[0] = 1.0
    return {"init_latents": pack_ltx2_latents(z.repeat(1, frames, 1, 1)), "conditioning_mask": mask.flatten()}
