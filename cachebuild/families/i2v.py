"""Image-to-video conditions: which pipelines take them, what a cache stores for them, and what the reader hands on.

Four kinds, each the arithmetic of its diffusers pipeline in a module of its own:

- ``wan-i2v`` (``WanImageToVideoPipeline``; :mod:`.wan_i2v`): the VAE's latents of the condition clip (the image,
  then mid-grey frames, and optionally the last image) with a 4-channel mask, and for Wan 2.1 CLIP-ViT-H's
  ``hidden_states[-2]`` of the image;
- ``wan-ti2v`` (Wan 2.2 TI2V-5B, ``WanPipeline``/``WanImageToVideoPipeline`` with ``expand_timesteps``;
  :mod:`.wan_i2v`): the latents of the image alone;
- ``hunyuanvideo-1.5-i2v`` (``HunyuanVideo15ImageToVideoPipeline``; :mod:`.hunyuanvideo15_i2v`): the image's
  latents at latent frame 0 with a mask channel, and SigLIP's ``last_hidden_state``;
- ``ltx-2-i2v`` (``LTX2ImageToVideoPipeline``; :mod:`.ltx2_i2v`): the latents of the image after an H.264 round
  trip, and the mask of latent frame 0.

The cache stores, per clip, in the ``control`` store under the clip's key: ``condition_latents`` (C, F_c, h, w), the
raw posterior mode of what the pipeline encodes (F_c: the clip's latent frames for ``wan-i2v``, else 1), and where
the pipeline has an image encoder ``image_embeds`` (N, T, D) (N: 1, or 2 with the last frame). The masks and the
normalisation are computed on reading (:func:`condition_inputs`), from the record and the VAE's fingerprint.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # verify and the reader ask for names and shapes before any tensor is read
    import torch

CONDITION_LATENTS = "condition_latents"  # raw (C, F_c, h, w) posterior mode of what the pipeline encodes
IMAGE_EMBEDS = "image_embeds"  # (N, T, D) image encoder output, N images (the first, and the last)


@dataclass(frozen=True)
class ConditionKind:
    """One image-to-video pipeline's conditions."""

    name: str  # wan-i2v, wan-ti2v, hunyuanvideo-1.5-i2v, ltx-2-i2v
    module: str  # the module under cachebuild.families holding its arithmetic
    vae_class: str  # the VAE class its pipeline encodes with
    clip_frames: bool  # the condition clip has the clip's frames (Wan I2V); False: the image alone, one frame
    encoder: str | None = None  # the pipeline folder's image encoder subfolder, where the pipeline may have one
    processor: str | None = None  # and its image processor's subfolder
    last_frame: bool = False  # the pipeline can condition on a last frame too (``last_image``)


KINDS = {
    k.name: k
    for k in (
        ConditionKind("wan-i2v", "wan_i2v", "AutoencoderKLWan", True, "image_encoder", "image_processor", True),
        ConditionKind("wan-ti2v", "wan_i2v", "AutoencoderKLWan", False),
        ConditionKind(
            "hunyuanvideo-1.5-i2v",
            "hunyuanvideo15_i2v",
            "AutoencoderKLHunyuanVideo15",
            False,
            "image_encoder",
            "feature_extractor",
        ),
        ConditionKind("ltx-2-i2v", "ltx2_i2v", "AutoencoderKLLTX2Video", False),
    )  # fmt: skip
}
PIPELINE_KINDS = {  # a pipeline folder's model_index.json _class_name -> its kind
    "WanImageToVideoPipeline": "wan-i2v",
    "HunyuanVideo15ImageToVideoPipeline": "hunyuanvideo-1.5-i2v",
    "LTX2ImageToVideoPipeline": "ltx-2-i2v",
}
PRESET_KINDS = {  # presets whose model is an image-to-video one (config.PRESETS)
    "wan2.1-i2v-14b-480p": "wan-i2v",
    "wan2.1-i2v-14b-720p": "wan-i2v",
    "wan2.2-i2v-a14b": "wan-i2v",
    "wan2.2-ti2v-5b": "wan-ti2v",  # TI2V-5B generates from text or an image; its I2V condition is cheap (1 frame)
    "hunyuanvideo-1.5-i2v": "hunyuanvideo-1.5-i2v",
    "hunyuanvideo-1.5-720p-i2v": "hunyuanvideo-1.5-i2v",
    "ltx-2-i2v": "ltx-2-i2v",  # the LTX-2 repository holds both pipelines; the preset names the I2V one
}


def detect_kind(preset: str | None, index: dict | None) -> ConditionKind | None:
    """The conditions of the model a latents run names: by preset, else by its pipeline's ``model_index.json``
    (Wan 2.2 TI2V-5B's says ``WanPipeline`` with ``expand_timesteps``); None for a text-to-video or image model."""
    if preset in PRESET_KINDS:
        return KINDS[PRESET_KINDS[preset]]
    cls = (index or {}).get("_class_name")
    if cls in ("WanPipeline", "WanImageToVideoPipeline") and (index or {}).get("expand_timesteps"):
        return KINDS["wan-ti2v"]
    return KINDS[PIPELINE_KINDS[cls]] if cls in PIPELINE_KINDS else None


def uses_encoder(kind: ConditionKind, index: dict | None) -> bool:
    """Whether the pipeline runs its image encoder: it is named in ``model_index.json`` (Wan 2.1's I2V pipelines
    name CLIP, Wan 2.2's name none: ``WanImageToVideoPipeline`` encodes the image only where its transformer has an
    ``image_dim``, and only Wan 2.1's has); HunyuanVideo 1.5's I2V pipeline always does."""
    if kind.encoder is None:
        return False
    entry = (index or {}).get(kind.encoder)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def kind_module(kind: ConditionKind):
    return importlib.import_module(f"cachebuild.families.{kind.module}")


def condition_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """A record's conditions under its pipeline's names (see each kind's module), none where it has no
    conditions. ``rec`` is a reader record with ``condition_kind``; ``vae`` the latents fingerprint's ``vae``."""
    if CONDITION_LATENTS not in rec or rec.get("condition_kind") not in KINDS:
        return {}
    return kind_module(KINDS[rec["condition_kind"]]).condition_inputs(rec, vae)


def stored_names(fingerprint: dict) -> list[str]:
    """The tensors a condition item of the ``control`` store holds, from that store's fingerprint."""
    return [CONDITION_LATENTS] + ([IMAGE_EMBEDS] if "image_encoder" in fingerprint else [])


def latent_frames(frames: int, vae: dict) -> int:
    """F' of a clip of ``frames`` frames: 1 + (F - 1) / t, t the VAE's temporal downsampling."""
    return 1 + (frames - 1) // int(vae.get("temporal_downsample", 1))


def expected_shapes(fingerprint: dict, info: dict) -> dict[str, tuple | None]:
    """Tensor name -> shape of one condition item (``verify``): from the conditions fingerprint and the item's
    record (``bucket`` (W, H), ``frames``)."""
    vae, cond = fingerprint.get("vae", {}), fingerprint.get("condition", {})
    c, f = vae.get("latent_channels"), vae.get("downsample")
    w, h = info["bucket"]
    frames = latent_frames(info.get("frames", 1), vae) if KINDS[cond["kind"]].clip_frames else 1
    out: dict[str, tuple | None] = {CONDITION_LATENTS: (c, frames, h // f, w // f) if c and f else None}
    encoder = fingerprint.get("image_encoder")
    if encoder is not None:
        out[IMAGE_EMBEDS] = (2 if cond.get("last_frame") else 1, *encoder["tokens"])
    return out
