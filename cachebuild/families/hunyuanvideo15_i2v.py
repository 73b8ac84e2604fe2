"""HunyuanVideo 1.5's image-to-video conditions (``HunyuanVideo15ImageToVideoPipeline``), as diffusers 0.42 computes
them.

``__call__`` resizes the image to cover the video's W x H and cuts the centre (``video_processor.resize(...,
resize_mode="crop")``); ``prepare_cond_latents_and_mask`` encodes that image as one frame (``_get_image_latents``:
``preprocess``, the posterior mode, ``* scaling_factor``), puts it at latent frame 0 of ``cond_latents_concat``
(32, F', h, w; zeros at the other frames) and builds ``mask_concat`` (1, F', h, w): 1 at latent frame 0. The
transformer's input is latents (32) ++ cond (32) ++ mask (1) = 65 channels. ``encode_image`` runs SigLIP on the
same cropped image through the pipeline's ``feature_extractor`` (resized to 384 x 384): ``last_hidden_state``
(729, 1152) is ``image_embeds``.

``__call__`` picks W x H from the image (``calculate_default_height_width``, the nearest aspect ratio of its
``target_size`` buckets); a cache takes the clip's bucket, the size the target latents were encoded at.
"""

from __future__ import annotations

import torch

from cachebuild.families.i2v import CONDITION_LATENTS, IMAGE_EMBEDS, latent_frames
from cachebuild.families.video_vae import normalize_clip_latents


def prepare(kind: str, images: list, shape: tuple[int, int, int]) -> tuple[torch.Tensor, list]:
    """(the VAE's input (1, 3, 1, H, W) float32 in [-1, 1], [the cropped image for SigLIP]) for a clip of ``shape``
    (W, H, F)."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    w, h, _ = shape
    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=16, do_resize=False, do_convert_rgb=True)
    image = processor.resize(images[0], height=h, width=w, resize_mode="crop")
    return processor.preprocess(image, height=h, width=w)[:, :, None], [image]  # _get_image_latents' unsqueeze(2)


def encoder_pixels(processor, images: list) -> torch.Tensor:
    """(1, 3, S, S) float32: ``_get_image_embeds``'s ``feature_extractor.preprocess(..., do_resize=True)``."""
    return processor.preprocess(images=images, do_resize=True, return_tensors="pt", do_convert_rgb=True)["pixel_values"]


def encoder_forward(encoder, pixels: torch.Tensor) -> torch.Tensor:
    """(1, T, D): SigLIP's ``last_hidden_state`` (its post-layernorm output)."""
    return encoder(pixel_values=pixels).last_hidden_state


def encoder_tokens(config: dict) -> tuple[int, int]:
    """(T, D) of SigLIP's output: one token per patch, no class token (so400m-patch14-384: 729, 1152)."""
    vision = config.get("vision_config", config)
    return (vision["image_size"] // vision["patch_size"]) ** 2, vision["hidden_size"]


def condition_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """``cond_latents_concat`` (C, F', h, w), ``mask_concat`` (1, F', h, w) and ``image_embeds`` (T, D): what
    ``prepare_cond_latents_and_mask`` and ``encode_image`` give for the record's clip, without the batch
    dimension."""
    z = normalize_clip_latents(rec[CONDITION_LATENTS], vae)  # (C, 1, h, w) * scaling_factor, float32
    frames = latent_frames(rec["frames"], vae)
    cond = z.repeat(1, frames, 1, 1)
    cond[:, 1:] = 0
    mask = torch.zeros(1, frames, *z.shape[2:])
    mask[:, 0] = 1.0
    out = {"cond_latents_concat": cond, "mask_concat": mask}
    if IMAGE_EMBEDS in rec:
        out["image_embeds"] = rec[IMAGE_EMBEDS][0]
    return out
