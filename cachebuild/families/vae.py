"""VAEs: what a VAE's latents are (channels, downsampling, scaling and shift), loading it, and encoding
bucket-sized pixel batches into the stored tensors through the guarded forward.

Which files hold the VAE is the hub's business (``cachebuild.hub``); this module only builds the model once
there is work to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cachebuild.config import DType, LatentsMode
from cachebuild.encode import GuardedForward
from cachebuild.errors import ModelLoadError
from cachebuild.hub import ResolvedVae
from cachebuild.keys import item_seed

log = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 8 * 1024 * 1024  # read size while hashing weights; large reads, bounded memory
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

# Family factors by preset, for VAEs whose config lacks them (single files, old configs).
PRESET_FACTORS: dict[str, dict] = {
    "sd15": {"scaling_factor": 0.18215, "shift_factor": None, "latent_channels": 4},
    "sd2": {"scaling_factor": 0.18215, "shift_factor": None, "latent_channels": 4},
    "sdxl": {"scaling_factor": 0.13025, "shift_factor": None, "latent_channels": 4},
    "sd3": {"scaling_factor": 1.5305, "shift_factor": 0.0609, "latent_channels": 16},
    "flux": {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16},
    "chroma": {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16},  # Flux.1's VAE
    "z-image": {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16},  # Flux.1's kind
    "sd35-large": {"scaling_factor": 1.5305, "shift_factor": 0.0609, "latent_channels": 16},
    "sd35-medium": {"scaling_factor": 1.5305, "shift_factor": 0.0609, "latent_channels": 16},
}


@dataclass(frozen=True)
class VaeFamily:
    """What a trainer needs to know about latents from this VAE."""

    cls: str  # "AutoencoderKL" or "AutoencoderTiny"
    latent_channels: int  # C of the stored (C, H/f, W/f) latents
    downsample: int  # f: pixels per latent cell along each side
    scaling_factor: float  # raw -> scaled: (z - shift_factor) * scaling_factor
    shift_factor: float | None

    @property
    def has_posterior(self) -> bool:
        """AutoencoderKL returns a distribution; AutoencoderTiny returns latents directly."""
        return self.cls == "AutoencoderKL"


def family_of(vae: ResolvedVae, preset: str | None) -> VaeFamily:
    """Latent channels, downsampling and scaling, from the VAE's config first and the preset second."""
    cfg = vae.config
    cls = cfg.get("_class_name", "AutoencoderKL")
    fallback = PRESET_FACTORS.get(preset or "", {})
    if cls == "AutoencoderTiny":
        downsample = 2 ** (len(cfg.get("encoder_block_out_channels", (64, 64, 64, 64))) - 1)
    else:
        downsample = 2 ** (len(cfg.get("block_out_channels", (128, 256, 512, 512))) - 1)
    scaling = cfg.get("scaling_factor", fallback.get("scaling_factor"))
    if scaling is None:
        raise ModelLoadError(
            f"the VAE config from {vae.source} has no scaling_factor; pass --model sd15|sdxl|sd3|flux|chroma|... so "
            "the family's factor is used"
        )
    return VaeFamily(
        cls=cls,
        latent_channels=int(cfg.get("latent_channels", fallback.get("latent_channels", 4))),
        downsample=downsample,
        scaling_factor=float(scaling),
        shift_factor=cfg.get("shift_factor", fallback.get("shift_factor")),
    )


def load_vae(vae: ResolvedVae, family: VaeFamily, dtype, device):
    """Build the VAE from local files, in eval mode on ``device`` with parameters in ``dtype``."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()  # the CLI owns the terminal
    cls = getattr(diffusers, family.cls, None)
    if cls is None:
        raise ModelLoadError(f"unsupported VAE class {family.cls}; cachebuild reads AutoencoderKL and AutoencoderTiny")
    try:
        if vae.file is None:
            model = cls.from_pretrained(vae.folder, torch_dtype=dtype)
        elif _has_diffusers_keys(vae.file):
            model = cls.from_config(vae.config)
            model.load_state_dict(_read_state_dict(vae.file), strict=True)
            model.to(dtype)
        else:
            model = cls.from_single_file(str(vae.file), config=str(vae.folder), torch_dtype=dtype)
    except Exception as exc:  # diffusers raises many types; report them as one with the source named
        raise ModelLoadError(f"could not load the VAE from {vae.source}: {exc}") from exc
    return model.to(device).eval().requires_grad_(False)


def _has_diffusers_keys(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith("encoder.down_blocks.") for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)


def _read_state_dict(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def normalize_latents(z: torch.Tensor, vae: dict) -> torch.Tensor:
    """Raw latents as the pipelines feed them: ``(z - shift_factor) * scaling_factor`` (no shift: 0), in float32.

    ``vae`` is the cache fingerprint's ``vae`` object (``scaling_factor``, ``shift_factor``).
    """
    shift = vae.get("shift_factor") or 0.0
    return (z.float() - float(shift)) * float(vae["scaling_factor"])


@dataclass
class EncodedItem:
    """What one image encodes to, on the CPU in float32. Shapes are (C, H/f, W/f)."""

    tensors: dict[str, torch.Tensor] | None  # None when the item failed
    reason: str | None = None
    upcast: bool = False  # True when fp32 was needed after a non-finite result


class VaeEncoder:
    """Turns bucket-sized uint8 pixel batches into latents, with the OOM and non-finite guards.

    Example:
        >>> enc = VaeEncoder(vae, family, torch.device("cpu"), DType.FP32, LatentsMode.MEAN, flip=False, seed=0)
        >>> out = enc.encode(["a", "b"], torch.zeros(2, 512, 512, 3, dtype=torch.uint8))
        >>> out[0].tensors["latents"].shape
        torch.Size([4, 64, 64])
    """

    def __init__(
        self, vae, family: VaeFamily, device: torch.device, dtype: DType, mode: LatentsMode, flip: bool, seed: int
    ):
        self.vae = vae
        self.family = family
        self.device = device
        self.dtype = dtype.torch
        self.mode = mode
        self.flip = flip
        self.seed = seed
        self.guard = GuardedForward(vae, device, self.dtype, lambda inputs, dt: list(self._raw(inputs[0], dt)), "VAE")

    @property
    def oom_splits(self) -> int:
        return self.guard.oom_splits

    @property
    def upcasts(self) -> int:
        return self.guard.upcasts

    def encode(self, keys: list[str], pixels: torch.Tensor) -> list[EncodedItem]:
        """Encode a batch of (B, H, W, 3) uint8 pixels; one result per key, in order."""
        raw = self.guard((pixels,))  # per image: (2C or C, h, w) float32, or a failure reason
        if self.flip:
            raw_flipped = self.guard((pixels.flip(2),))
        results = []
        for i, key in enumerate(keys):
            parts = {"": raw[i]} | ({"_flipped": raw_flipped[i]} if self.flip else {})
            reasons = [r for r in parts.values() if isinstance(r, str)]
            if reasons:
                results.append(EncodedItem(None, reasons[0]))
                continue
            tensors: dict[str, torch.Tensor] = {}
            for suffix, moments in parts.items():
                tensors |= self._finish(key, suffix, moments)
            results.append(EncodedItem(tensors))
        return results

    def _finish(self, key: str, suffix: str, moments: torch.Tensor) -> dict[str, torch.Tensor]:
        """Moments (mean ++ logvar along C, or plain latents) -> the stored tensors for this mode."""
        if not self.family.has_posterior:
            return {f"latents{suffix}": moments}
        mean, logvar = moments.chunk(2, dim=0)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the clamp diffusers' posterior applies
        if self.mode is LatentsMode.MEAN:
            return {f"latents{suffix}": mean}
        if self.mode is LatentsMode.MOMENTS:
            return {f"mean{suffix}": mean, f"std{suffix}": std}
        gen = torch.Generator().manual_seed(item_seed(self.seed, key, f"sample{suffix}"))
        noise = torch.randn(mean.shape, generator=gen, dtype=torch.float32)
        return {f"latents{suffix}": mean + std * noise}

    def _raw(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 2C, H/f, W/f) float32 on the CPU (moments, or latents for Tiny)."""
        with torch.inference_mode():
            x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
            x = x.to(dtype).div_(127.5).sub_(1.0)  # [0, 255] -> [-1, 1]
            enc = self.vae.encode(x)
            out = enc.latent_dist.parameters if self.family.has_posterior else enc.latents
            result = out.float().cpu()
            del x, enc, out
        return result
