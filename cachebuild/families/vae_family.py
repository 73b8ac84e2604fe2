"""What a VAE's latents are: ``VaeFamily`` and the kinds of VAE classes, in one place for image and video VAEs.

Each class name belongs to the kinds that describe how it encodes and how its pipeline uses the latents: a
posterior or not, a causal 3D VAE run on one frame, 2x2 packing, per-channel normalisation, and for the video VAEs
(``VIDEO_CLASSES``) the rate the family trains at, the transformer's patch, whether the encoder takes the whole
clip at once, and its own tiles. ``families.vae`` (image VAEs, the encoder) and ``families.video_vae`` (a video
VAE's family, encode and normalisation) both read this table; nothing else repeats it. Imports no model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cachebuild.errors import ModelLoadError
from cachebuild.hub import ResolvedVae

WAN, HUNYUAN15, LTX2 = "AutoencoderKLWan", "AutoencoderKLHunyuanVideo15", "AutoencoderKLLTX2Video"


@dataclass(frozen=True)
class VideoClass:
    """What a video VAE class means for its pipeline, beyond the config's numbers."""

    fps: float  # the rate the family trains at: what --fps alone resamples to
    transformer_patch: int  # latent cells per side of the transformer's patch: a bucket side is a multiple of
    # this times the VAE's downsampling
    whole_clip: bool  # the encoder takes the whole clip at once (memory grows with frames); False: causal chunks
    tile: int  # the VAE's own tile side (``tile_sample_min_height``), image pixels
    stride: int  # and the distance between tile starts (``tile_sample_stride_height``; HunyuanVideo 1.5: tile x
    # (1 - ``tile_overlap_factor``))


VIDEO_CLASSES: dict[str, VideoClass] = {
    # Wan: musubi-tuner's TARGET_FPS_WAN and the rate the pipelines' examples export at; transformer patch
    # (1, 2, 2), so WanPipeline asks for sides in multiples of 16 (32 for TI2V-5B's 16x VAE)
    WAN: VideoClass(fps=16.0, transformer_patch=2, whole_clip=False, tile=256, stride=192),
    # HunyuanVideo 1.5: musubi-tuner's TARGET_FPS_HUNYUAN_VIDEO_1_5 and the I2V pipeline's example (the T2V
    # example exports at 15); its transformer's patch is 1
    HUNYUAN15: VideoClass(fps=24.0, transformer_patch=1, whole_clip=True, tile=256, stride=192),
    # LTX-2: LTX2Pipeline's frame_rate default (its transformer's positions depend on it); patch 1, sides of 32
    LTX2: VideoClass(fps=24.0, transformer_patch=1, whole_clip=True, tile=512, stride=448),
}
# every video VAE returns a distribution: clips go in as (B, 3, F, H, W); an image is a 1-frame clip
POSTERIOR_CLASSES = ("AutoencoderKL", "AutoencoderKLQwenImage", "AutoencoderKLFlux2", *VIDEO_CLASSES)
FRAME_CLASSES = ("AutoencoderKLQwenImage",)  # causal 3D VAEs: an image goes in as one frame, (B, 3, 1, H, W)
DETERMINISTIC_CLASSES = ("AutoencoderDC",)  # encode -> one `latent`, no distribution: only --latents mean
PACKED_CLASSES = ("AutoencoderKLQwenImage", "AutoencoderKLFlux2")  # their pipelines take 2x2 latent patches, so a
# bucket side is a multiple of twice the downsampling (a video VAE's patch is its VideoClass's)
NORMALIZED_CLASSES = ("AutoencoderKLQwenImage",)  # (z - latents_mean) / latents_std per channel, the vectors in
# the config (or the class's defaults); the video VAEs' statistics are video_vae's


@dataclass(frozen=True)
class VaeFamily:
    """What a trainer needs to know about latents from this VAE."""

    cls: str  # "AutoencoderKL", "AutoencoderTiny", "AutoencoderKLQwenImage", "AutoencoderKLFlux2", "AutoencoderDC"
    latent_channels: int  # C of the stored (C, H/f, W/f) latents
    downsample: int  # f: pixels per latent cell along each side
    scaling_factor: float  # raw -> scaled: (z - shift_factor) * scaling_factor (1.0 where `normalization` rules)
    shift_factor: float | None
    normalization: dict | None = field(default=None, hash=False)  # per-channel statistics replacing the scalar
    # factors: Qwen-Image's `latents_mean`/`latents_std`, Flux.2's batch-norm running stats (see normalization_of)
    temporal_downsample: int = 1  # video VAEs: F frames -> 1 + (F - 1) / t latent frames (Wan: 4)
    frame_modulus: int = 1  # video VAEs: a clip has k * m + 1 frames (Wan: 4k+1); 1: any count
    default_fps: float | None = None  # video VAEs: the rate the family trains at (Wan: 16), for --fps alone

    @property
    def has_posterior(self) -> bool:
        """AutoencoderKL and its Qwen-Image and Flux.2 variants return a distribution; AutoencoderTiny does not."""
        return self.cls in POSTERIOR_CLASSES

    @property
    def frames(self) -> bool:
        """A causal 3D VAE used for images: encoded as one frame, (B, 3, 1, H, W) -> (B, 2C, 1, h, w)."""
        return self.cls in FRAME_CLASSES

    @property
    def video(self) -> bool:
        """A video VAE: every item is a clip, (F, H, W, 3) -> (C, F', h, w); an image is a 1-frame clip."""
        return self.cls in VIDEO_CLASSES

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of ``frames`` frames (a causal VAE: the first frame alone, then t at a time)."""
        return 1 + (frames - 1) // self.temporal_downsample

    def video_fingerprint(self) -> dict:
        """The video factors for a cache's fingerprint; empty for image VAEs, whose caches keep matching."""
        if not self.video:
            return {}
        return {"temporal_downsample": self.temporal_downsample, "frame_modulus": self.frame_modulus}

    @property
    def pixel_multiple(self) -> int:
        """What a bucket side must be a multiple of for this VAE's pipeline (Wan 2.1: 16, TI2V-5B: 32,
        HunyuanVideo 1.5: 16, LTX-2: 32; Qwen-Image and Flux.2: 16)."""
        if self.video:
            return self.downsample * VIDEO_CLASSES[self.cls].transformer_patch
        return self.downsample * (2 if self.cls in PACKED_CLASSES else 1)


def read_buffers(
    vae: ResolvedVae, names: tuple[str, ...], what: str = "the batch-norm statistics Flux.2 normalises with"
):
    """Named tensors from the VAE's safetensors weights, without reading the rest: ``{name: tensor}``.

    Raises:
        ModelLoadError: one of ``names`` is in none of the files; the message names ``what`` they are.
    """
    from safetensors import safe_open

    found = {}
    for path in vae.weight_files:
        if path.suffix != ".safetensors":
            continue
        with safe_open(str(path), framework="pt") as f:
            found |= {n: f.get_tensor(n) for n in names if n in f.keys()}  # noqa: SIM118 (not a dict)
    missing = [n for n in names if n not in found]
    if missing:
        raise ModelLoadError(
            f"the VAE weights from {vae.source} hold no {', '.join(missing)} ({what}); pass the diffusers VAE folder "
            "(safetensors) of the model"
        )
    return found
