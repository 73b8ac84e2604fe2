"""Wan's image-to-video conditions: ``WanImageToVideoPipeline`` (Wan 2.1 I2V 14B, Wan 2.2 I2V A14B) and Wan 2.2
TI2V-5B (the same pipeline, or ``WanPipeline``, with ``expand_timesteps``), as diffusers 0.42 computes them.

``wan-i2v`` (``__call__`` and ``prepare_latents`` without ``expand_timesteps``):

- the image (and ``last_image``) through ``video_processor.preprocess(image, height, width)`` (resized to the
  clip's W x H, no crop, scaled to [-1, 1]); the condition clip is the image, then F - 1 frames of zeros (F - 2 and
  the last image with one), zeros being mid-grey pixels in [-1, 1] that the VAE encodes like any other frame (their
  latents are not zero, and the causal encoder carries the image into them);
- its posterior mode (``sample_mode="argmax"``) normalised ``(z - mean) * (1 / std)``: 16 channels over F' frames;
- the mask: 1 on pixel frame 0 (and the last), 0 elsewhere, frame 0 repeated 4 times, folded into 4 channels per
  latent frame; ``condition`` = mask (4) ++ latents (16) = 20 channels (Wan's ``y``), what ``__call__`` concatenates
  to the noise (16 + 20 = the transformer's 36 input channels);
- where the transformer has an ``image_dim`` (Wan 2.1's), ``encode_image``: the pipeline's ``image_processor``
  (CLIPImageProcessor: shortest side to 224, centre crop 224) on the image as given, CLIP-ViT-H's
  ``hidden_states[-2]`` (257, 1280); with a last image both, (2, 257, 1280), which the transformer folds into 514
  tokens.

``wan-ti2v`` (``expand_timesteps``): the image alone through the same preprocessing, one frame, its normalised
latents (48, 1, h, w) as ``condition``, and ``first_frame_mask`` (1, F', h, w): 0 on latent frame 0, 1 elsewhere;
the transformer's input is ``(1 - mask) * condition + mask * latents``.
"""

from __future__ import annotations

import torch

from cachebuild.families.i2v import CONDITION_LATENTS, IMAGE_EMBEDS, latent_frames
from cachebuild.families.video_vae import normalize_clip_latents

CLIP_LAYER = -2  # encode_image: image_embeds.hidden_states[-2]


def prepare(kind: str, images: list, shape: tuple[int, int, int]) -> tuple[torch.Tensor, list]:
    """(the VAE's input (1, 3, F_c, H, W) float32 in [-1, 1], the images for the image encoder) for the condition
    image (and the last one) of a clip of ``shape`` (W, H, F), as ``__call__`` and ``prepare_latents`` build them.

    Args:
        kind: ``wan-i2v`` or ``wan-ti2v``.
        images: the condition image, and the last image where one is used, as PIL images.
    """
    from diffusers.video_processor import VideoProcessor

    w, h, frames = shape
    processor = VideoProcessor(vae_scale_factor=8)  # the factor only sets default sizes; the clip's are given
    first = processor.preprocess(images[0], height=h, width=w)[:, :, None]  # (1, 3, 1, H, W)
    if kind == "wan-ti2v":
        return first, []
    if len(images) == 1:
        return torch.cat([first, first.new_zeros(1, 3, frames - 1, h, w)], dim=2), images
    if frames < 2:
        raise ValueError("a one-frame item has no last frame to condition on; drop --last-frame or use clips")
    last = processor.preprocess(images[1], height=h, width=w)[:, :, None]
    return torch.cat([first, first.new_zeros(1, 3, frames - 2, h, w), last], dim=2), images


def encoder_pixels(processor, images: list) -> torch.Tensor:
    """(N, 3, S, S) float32: ``encode_image``'s ``image_processor(images=image, return_tensors="pt")``."""
    return processor(images=images, return_tensors="pt")["pixel_values"]


def encoder_forward(encoder, pixels: torch.Tensor) -> torch.Tensor:
    """(N, T, D): CLIP's ``hidden_states[-2]`` (the 31st of ViT-H's 32 blocks)."""
    return encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[CLIP_LAYER]


def encoder_tokens(config: dict) -> tuple[int, int]:
    """(T, D) of the CLIP vision encoder's output: a class token and one per patch (ViT-H/14 at 224: 257, 1280)."""
    vision = config.get("vision_config", config)
    return (vision["image_size"] // vision["patch_size"]) ** 2 + 1, vision["hidden_size"]


def condition_mask(frames: int, height: int, width: int, last: bool, temporal: int = 4) -> torch.Tensor:
    """(t, F', h, w) float32: ``prepare_latents``'s ``mask_lat_size`` for a clip of ``frames`` pixel frames, t the
    VAE's temporal downsampling (``vae_scale_factor_temporal``, 4): one mask channel per pixel frame a latent
    frame covers."""
    mask = torch.ones(1, 1, frames, height, width)
    mask[:, :, 1 : frames - 1 if last else frames] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal)  # frame 0 stands for t frames
    mask = torch.concat([first, mask[:, :, 1:]], dim=2)
    mask = mask.view(1, -1, temporal, height, width).transpose(1, 2)  # (1, t, F', h, w)
    return mask[0]


def condition_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """What ``prepare_latents`` (and ``encode_image``) give for the record's clip, without the batch dimension:

    - ``wan-i2v``: ``condition`` (4 + C, F', h, w): the mask, then the normalised latents; ``image_embeds`` (T, D),
      or (2, T, D) with a last frame, where the pipeline has an image encoder;
    - ``wan-ti2v``: ``condition`` (C, 1, h, w) normalised, and ``first_frame_mask`` (1, F', h, w).
    """
    z = normalize_clip_latents(rec[CONDITION_LATENTS], vae)  # (C, F_c, h, w) float32
    _, _, h, w = z.shape
    if rec["condition_kind"] == "wan-ti2v":
        mask = torch.ones(1, latent_frames(rec["frames"], vae), h, w)
        mask[:, 0] = 0
        return {"condition": z, "first_frame_mask": mask}
    mask = condition_mask(rec["frames"], h, w, rec.get("condition_last_frame", False), int(vae["temporal_downsample"]))
    out = {"condition": torch.cat([mask, z])}
    if IMAGE_EMBEDS in rec:
        embeds = rec[IMAGE_EMBEDS]  # (N, T, D)
        out["image_embeds"] = embeds[0] if embeds.shape[0] == 1 else embeds
    return out
