"""Tiny image-to-video pipeline folders: ``model_index.json``, a tiny video VAE and, where the pipeline has one, a tiny
image encoder with its processor (a CLIP or SigLIP vision tower on 28 x 28 pixels, 14-pixel patches)."""

from __future__ import annotations

import json
from pathlib import Path

from cachebuild.testing.vaes import make_tiny_video_vae

VISION_SIZE, VISION_PATCH = 28, 14  # pixels the tiny encoders see, and their patch side: 2 x 2 patches
TINY_I2V = {  # name: (model_index _class_name, tiny VAE kind, image encoder kind or None, extra model_index fields)
    "wan2.1-i2v": ("WanImageToVideoPipeline", "wan2.1", "clip", {}),
    "wan2.2-i2v": ("WanImageToVideoPipeline", "wan2.1", None, {}),
    "wan2.2-ti2v": ("WanPipeline", "wan2.2-ti2v", None, {"expand_timesteps": True}),
    "hunyuanvideo-1.5-i2v": ("HunyuanVideo15ImageToVideoPipeline", "hunyuanvideo-1.5", "siglip", {}),
    "ltx-2-i2v": ("LTX2ImageToVideoPipeline", "ltx-2", None, {}),
}
LTX2_TINY_SCALING = 0.7  # the tiny LTX-2 VAE's scaling_factor: not 1.0, so that applying it where the image path
# leaves it out shows (the released VAE's is 1.0)


def make_tiny_clip_vision(encoder: Path, processor: Path, seed: int = 0, init_scale: float = 4.0) -> Path:
    """A 3-layer ``CLIPVisionModel`` (32 wide, 5 tokens: a class token and 2 x 2 patches) and a
    ``CLIPImageProcessor`` resizing the shortest side to 28 and cutting the 28 x 28 centre, as ViT-H's does at 224."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=VISION_SIZE,
        patch_size=VISION_PATCH, projection_dim=24, initializer_range=0.02 * init_scale, initializer_factor=init_scale,
    )  # fmt: skip
    CLIPVisionModel(config).save_pretrained(encoder)
    size = {"shortest_edge": VISION_SIZE}
    CLIPImageProcessor(size=size, crop_size={"height": VISION_SIZE, "width": VISION_SIZE}).save_pretrained(processor)
    return encoder


def make_tiny_siglip(encoder: Path, processor: Path, seed: int = 0, init_scale: float = 4.0) -> Path:
    """A 2-layer ``SiglipVisionModel`` (32 wide, 4 tokens: 2 x 2 patches) and a ``SiglipImageProcessor`` resizing to
    28 x 28, as so400m-patch14-384's does to 384."""
    import torch
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=VISION_SIZE,
        patch_size=VISION_PATCH, vision_use_head=False, initializer_range=0.02 * init_scale,
    )  # fmt: skip
    SiglipVisionModel(config).save_pretrained(encoder)
    SiglipImageProcessor(size={"height": VISION_SIZE, "width": VISION_SIZE}).save_pretrained(processor)
    return encoder


def make_tiny_i2v_pipeline(path: Path, name: str, seed: int = 0, channels: int | None = None) -> Path:
    """A pipeline folder of :data:`TINY_I2V` ``name`` holding what its conditions need: ``vae/`` and the image
    encoder (``image_encoder/`` with ``image_processor/`` for Wan 2.1, ``feature_extractor/`` for HunyuanVideo 1.5).
    No text encoders: ``make_tiny_text_pipeline`` makes those. ``channels``: a Wan or HunyuanVideo 1.5 VAE with that
    many latent channels (the real 16 or 32, which musubi's trainers take) in place of the tiny ones' 4."""
    cls, vae_kind, encoder, extra = TINY_I2V[name]
    path.mkdir(parents=True, exist_ok=True)
    if channels is not None and vae_kind.startswith("wan"):
        _make_wan_vae(path / "vae", channels, seed)
    else:
        make_tiny_video_vae(path / "vae", vae_kind, seed, **({"latent_channels": channels} if channels else {}))
    index: dict = {"_class_name": cls, "vae": ["diffusers", _vae_class(path / "vae")]} | extra
    if vae_kind == "ltx-2":
        config_file = path / "vae" / "config.json"
        config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"scaling_factor": LTX2_TINY_SCALING}))
    if encoder == "clip":
        make_tiny_clip_vision(path / "image_encoder", path / "image_processor", seed)
        index |= {"image_encoder": ["transformers", "CLIPVisionModel"]}
        index |= {"image_processor": ["transformers", "CLIPImageProcessor"]}
    elif encoder == "siglip":
        make_tiny_siglip(path / "image_encoder", path / "feature_extractor", seed)
        index |= {"image_encoder": ["transformers", "SiglipVisionModel"]}
        index |= {"feature_extractor": ["transformers", "SiglipImageProcessor"]}
    elif cls == "WanImageToVideoPipeline":  # Wan 2.2's I2V repositories name no image encoder
        index |= {"image_encoder": [None, None], "image_processor": [None, None]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def _make_wan_vae(path: Path, channels: int, seed: int) -> Path:
    """A tiny ``AutoencoderKLWan`` (x4 in space and time) with ``channels`` latent channels."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=channels, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
        latents_mean=torch.linspace(-1.0, 1.0, channels).tolist(),
        latents_std=torch.linspace(0.5, 3.0, channels).tolist(), scale_factor_temporal=4, scale_factor_spatial=4,
    ).save_pretrained(path)  # fmt: skip
    return path


def _vae_class(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["_class_name"]
