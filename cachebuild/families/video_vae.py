"""Video VAEs: what a clip's latents are, encoding a clip and normalising its latents as each pipeline does, and
spatial tiling.

Read from diffusers 0.42.1 (``models/autoencoders/autoencoder_kl_{wan,hunyuanvideo15,ltx2}.py`` and the pipelines);
channels C, spatial and temporal downsampling, frame rule, the pipeline's normalisation, how the encoder runs:

- ``AutoencoderKLWan``, Wan 2.1 / 2.2 A14B: C 16, x8, x4, 4k+1 frames (the VAE drops extra frames silently);
  ``(z - mean) * (1 / std)`` with the config's vectors; causal chunks (frame 0, then 4 at a time, a feature cache
  between them), so memory stays flat in frames.
- The same class for Wan 2.2 TI2V-5B (``z_dim`` 48, ``is_residual``, ``patch_size`` 2): C 48, x16 (2x2 pixels folded
  into 12 channels, then x8), x4, 4k+1; the same normalisation over 48 values.
- ``AutoencoderKLHunyuanVideo15``: C 32, x16, x4, 4k+1 (a shape error otherwise); ``z * scaling_factor`` (1.03682);
  the whole clip at once, and its mid-block attention builds an L x L mask over every latent cell.
- ``AutoencoderKLLTX2Video``: C 128, x32, x8, 8k+1 (a shape error otherwise); ``(z - mean) * scaling_factor / std``
  with mean/std buffers in the weights (not the config); the whole clip at once.

Every pipeline takes the posterior's mode (``retrieve_latents(..., sample_mode="argmax")``). This module stores
nothing and imports no job: the clip pipeline (``video/``, ``jobs/``) calls it. Which tiles a run uses, their
fingerprint and the memory estimate are in ``families.video_tiling``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from cachebuild.errors import ModelLoadError
from cachebuild.families.vae_family import (  # noqa: F401 (the class table is imported from here too)
    HUNYUAN15,
    LTX2,
    VIDEO_CLASSES,
    WAN,
    VaeFamily,
    read_buffers,
)
from cachebuild.hub import ResolvedVae


def video_family(vae: ResolvedVae) -> VaeFamily:
    """Channels, spatial and temporal downsampling, frame rule, rate and normalisation of a video VAE, from its
    config and (LTX-2) the statistics buffers in its weights, without building the model.

    Raises:
        ModelLoadError: the class is not a video VAE, or the statistics are missing or of the wrong length.
    """
    cfg = vae.config
    cls = cfg.get("_class_name", "")
    if cls == WAN:  # each temperal_downsample entry is a 2x spatial stage, 2x in time where True; patch_size
        # (TI2V-5B: 2) folds 2x2 pixels into channels first
        stages = [bool(t) for t in _config_value(cfg, cls, "temperal_downsample")]
        channels = int(_config_value(cfg, cls, "z_dim"))
        space, time = 2 ** len(stages) * int(cfg.get("patch_size") or 1), 2 ** sum(stages)
        stats = _vectors(vae, cls, channels, cfg.get("latents_mean"), cfg.get("latents_std"))
        return _family(cls, channels, space, time, 1.0, stats)
    if cls == HUNYUAN15:
        channels = int(_config_value(cfg, cls, "latent_channels"))
        space = int(_config_value(cfg, cls, "spatial_compression_ratio"))
        time = int(_config_value(cfg, cls, "temporal_compression_ratio"))
        return _family(cls, channels, space, time, float(_config_value(cfg, cls, "scaling_factor")), None)
    if cls == LTX2:  # the ratios as the class computes them when the config leaves them out
        channels = int(_config_value(cfg, cls, "latent_channels"))
        scaling = _config_value(cfg, cls, "spatio_temporal_scaling")
        n = sum(scaling) if isinstance(scaling, (list, tuple)) else len(_config_value(cfg, cls, "layers_per_block")) - 1
        space = cfg.get("spatial_compression_ratio") or int(_config_value(cfg, cls, "patch_size")) * 2**n
        time = cfg.get("temporal_compression_ratio") or int(_config_value(cfg, cls, "patch_size_t")) * 2**n
        found = read_buffers(vae, ("latents_mean", "latents_std"), "the per-channel statistics LTX-2 normalises with")
        stats = _vectors(vae, cls, channels, found["latents_mean"].tolist(), found["latents_std"].tolist())
        return _family(cls, channels, int(space), int(time), float(_config_value(cfg, cls, "scaling_factor")), stats)
    raise ModelLoadError(f"{cls or 'the VAE'} from {vae.source} is not a video VAE ({', '.join(VIDEO_CLASSES)})")


def pixel_multiple(family: VaeFamily) -> int:
    """What a clip's bucket side must be a multiple of for the family's pipeline (Wan 2.1: 16, TI2V-5B: 32,
    HunyuanVideo 1.5: 16, LTX-2: 32): ``VaeFamily.pixel_multiple``, which the bucket checks read."""
    return family.pixel_multiple


def check_clip(family: VaeFamily, frames: int, height: int, width: int) -> None:
    """Refuse a clip shape the VAE would reject, or (Wan) silently cut: ``frames`` must be ``k * m + 1``, and the
    sides multiples of the downsampling.

    Raises:
        ValueError: the clip pipeline let a shape through that it should have refused.
    """
    m = family.frame_modulus
    if frames < 1 or (frames - 1) % m:
        low = (frames - 1) // m * m + 1
        raise ValueError(f"{family.cls} takes {m}k+1 frames; {frames} is not (nearest: {max(low, 1)}, {low + m})")
    if height % family.downsample or width % family.downsample:
        raise ValueError(f"{family.cls} takes sides in multiples of {family.downsample}; got {width}x{height}")


@dataclass(frozen=True)
class Tiling:
    """Overlapping square tiles: ``tile`` pixels a side, starting every ``stride`` pixels (overlap: the difference).
    Image pixels; ``video_tiling`` chooses them, ``apply_tiling`` hands them to the VAE."""

    tile: int
    stride: int


def encode_clip_raw(vae, family: VaeFamily, x: torch.Tensor, tiling: Tiling | None = None) -> torch.Tensor:
    """Encode clips as the family's pipeline does before normalising: the posterior's moments.

    Args:
        vae: the loaded diffusers VAE (``load_vae``), on the device of ``x``.
        family: its ``video_family``.
        x: ``(B, 3, F, H, W)`` pixels in [-1, 1], in the VAE's dtype.
        tiling: the spatial tiles to encode in (``video_tiling.resolve_tiling``), or None: whole frames.

    Returns:
        ``(B, 2C, F', H/f, W/f)`` float32 on the device: mean ++ logvar along C; the mean is what every pipeline
        takes (``retrieve_latents(..., sample_mode="argmax")``). F' = 1 + (F - 1) / t.

    Example:
        >>> encode_clip_raw(vae, family, torch.zeros(1, 3, 17, 480, 832), None).shape  # Wan 2.1
        torch.Size([1, 32, 5, 60, 104])
    """
    _, _, frames, height, width = x.shape
    check_clip(family, frames, height, width)
    apply_tiling(vae, family, tiling)  # the VAE object is shared between calls: set every time
    with torch.inference_mode():
        if family.cls == HUNYUAN15 and len(x) > 1:  # its mid-block attention builds a (B, L, L) mask that SDPA
            # reads as (heads, L, L) against one head, so batches fail (diffusers 0.42.1): a clip at a time, as its
            # pipelines and musubi-tuner encode one video
            return torch.cat([vae.encode(clip[None]).latent_dist.parameters.float() for clip in x])
        moments = vae.encode(x).latent_dist.parameters  # LTX-2: 128 means ++ its one logvar channel repeated
        return moments.float()


def normalize_clip_latents(z: torch.Tensor, vae: dict) -> torch.Tensor:
    """Raw stored latents ``(C, F', h, w)`` (or with batch dimensions in front) -> what the family's
    prepare-latents path hands its transformer, in float32. ``vae`` is the cache fingerprint's ``vae`` object
    (``class``, ``scaling_factor``, and ``latents_mean``/``latents_std`` where the class has them).

    - Wan (``WanVideoToVideoPipeline.prepare_latents``): ``(z - mean) * (1 / std)``;
    - HunyuanVideo 1.5 (``HunyuanVideo15ImageToVideoPipeline._get_image_latents``): ``z * scaling_factor``;
    - LTX-2 (``LTX2Pipeline._normalize_latents``): ``(z - mean) * scaling_factor / std``. Its condition paths
      (``LTX2ConditionPipeline.prepare_latents``, image-to-video) leave ``scaling_factor`` out; it is 1.0 in
      the released weights' config, where the two agree.
    """
    cls, z = vae.get("class"), z.float()
    if cls not in VIDEO_CLASSES:
        raise ValueError(f"the cache's latents are {cls}'s, not a video VAE's ({', '.join(VIDEO_CLASSES)})")
    if cls == HUNYUAN15:
        return z * float(vae["scaling_factor"])
    mean = torch.tensor(vae["latents_mean"], dtype=torch.float32).view(-1, 1, 1, 1)
    std = torch.tensor(vae["latents_std"], dtype=torch.float32).view(-1, 1, 1, 1)
    if cls == WAN:
        return (z - mean) * (1.0 / std)
    return (z - mean) * float(vae["scaling_factor"]) / std  # LTX-2


def pack_ltx2_latents(z: torch.Tensor) -> torch.Tensor:
    """``(C, F', h, w)`` -> ``(F' * h * w, C)``: LTX-2's token sequence (``LTX2Pipeline._pack_latents`` with the
    transformer's patch 1), frames outermost, then rows, then columns."""
    return z.flatten(1).transpose(0, 1)


def apply_tiling(vae, family: VaeFamily, tiling: Tiling | None) -> None:
    """Set ``vae``'s own tiling to ``tiling`` (None: off)."""
    if tiling is None:
        vae.use_tiling = False
        return
    t, s = tiling.tile, tiling.stride
    if family.cls == HUNYUAN15:  # its tiles are a size and an overlap factor, in pixels and latent cells
        f = family.downsample
        vae.enable_tiling(t, t, t // f, t // f, _overlap(t, s))
    else:  # Wan and LTX-2: size and stride in the pixels the encoder sees (TI2V-5B: patchified)
        p = _patch(family, vae.config)
        vae.enable_tiling(t // p, t // p, tile_sample_stride_height=s // p, tile_sample_stride_width=s // p)


def release_decoder(vae) -> int:
    """Drop the decoder of a VAE that will only encode; returns the parameter bytes freed. Caching never decodes,
    and a video VAE's decoder is most of its weights (HunyuanVideo 1.5: 871M of 1261M parameters, 1.6 GiB in bf16;
    Wan 2.2 TI2V-5B: 555M of 705M)."""
    decoder = getattr(vae, "decoder", None)
    if decoder is None:
        return 0
    freed = sum(p.numel() * p.element_size() for p in decoder.parameters())
    vae.decoder = None  # encode() never touches it; decode() would fail loudly, not silently
    return freed


def _family(cls: str, channels: int, space: int, time: int, scaling: float, stats: dict | None) -> VaeFamily:
    fps = VIDEO_CLASSES[cls].fps
    return VaeFamily(cls, channels, space, scaling, None, stats, temporal_downsample=time, frame_modulus=time,
                     default_fps=fps)  # fmt: skip


def _patch(family: VaeFamily, config) -> int:
    """Pixels per side that Wan folds into channels before its encoder (TI2V-5B: 2) and so before its tiles; LTX-2
    patchifies inside its encoder, after the tiles are cut."""
    return int(config.get("patch_size") or 1) if family.cls == WAN else 1


def _overlap(tile: int, stride: int) -> float:
    """HunyuanVideo 1.5's ``tile_overlap_factor`` for a stride: it tiles every ``int(tile * (1 - factor))``."""
    return 1.0 - stride / tile


def _config_value(cfg: dict, cls: str, name: str):
    """A config field, or the class's default where the config leaves it out (as ``from_pretrained`` does)."""
    if name in cfg:
        return cfg[name]
    import diffusers

    return inspect.signature(getattr(diffusers, cls).__init__).parameters[name].default


def _vectors(vae: ResolvedVae, cls: str, channels: int, mean, std) -> dict:
    """Per-channel ``latents_mean``/``latents_std`` as JSON-ready lists (Wan's config omits them: the class's own)."""
    mean = mean if mean is not None else _config_value({}, cls, "latents_mean")
    std = std if std is not None else _config_value({}, cls, "latents_std")
    if len(mean) != channels or len(std) != channels:
        raise ModelLoadError(
            f"the VAE from {vae.source} has latents_mean/std of {len(mean)}, not its {channels} channels"
        )
    return {"latents_mean": [float(v) for v in mean], "latents_std": [float(v) for v in std]}
