"""VAEs: what a VAE's latents are (channels, downsampling, scaling and shift), loading it, and encoding
bucket-sized pixel batches into the stored tensors through the guarded forward.

Which files hold the VAE is the hub's business (``cachebuild.hub``); this module only builds the model once
there is work to do.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from cachebuild.config import DType, LatentsMode
from cachebuild.encode import GuardedForward, is_out_of_memory
from cachebuild.errors import ModelLoadError
from cachebuild.families.vae_family import (  # noqa: F401 (VaeFamily and the class kinds are imported from here)
    DETERMINISTIC_CLASSES,
    FRAME_CLASSES,
    NORMALIZED_CLASSES,
    PACKED_CLASSES,
    POSTERIOR_CLASSES,
    VIDEO_CLASSES,
    VaeFamily,
    read_buffers,
)
from cachebuild.families.video_vae import Tiling, encode_clip_raw, video_family
from cachebuild.hub import ResolvedVae
from cachebuild.keys import item_seed

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
    "hidream": {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16},  # Flux.1's VAE
    "lumina2": {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16},  # Flux.1's VAE
    "sana": {"scaling_factor": 0.41407, "shift_factor": None, "latent_channels": 32},  # DC-AE f32c32
}


def family_of(vae: ResolvedVae, preset: str | None) -> VaeFamily:
    """Latent channels, downsampling and scaling, from the VAE's config first and the preset second."""
    cfg = vae.config
    cls = cfg.get("_class_name", "AutoencoderKL")
    if cls in VIDEO_CLASSES:  # Wan (2.1, 2.2 A14B, TI2V-5B), HunyuanVideo 1.5, LTX-2: families.video_vae
        return video_family(vae)
    if cls in PACKED_CLASSES:
        return _normalized_family(vae, cls)
    fallback = PRESET_FACTORS.get(preset or "", {})
    if cls == "AutoencoderTiny":
        downsample = 2 ** (len(cfg.get("encoder_block_out_channels", (64, 64, 64, 64))) - 1)
    elif cls == "AutoencoderDC":  # each encoder stage past the first halves the side: 32 for Sana's six
        downsample = 2 ** (len(cfg.get("encoder_block_out_channels", (128, 256, 512, 512, 1024, 1024))) - 1)
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


def _normalized_family(vae: ResolvedVae, cls: str) -> VaeFamily:
    """Qwen-Image's and Flux.2's VAEs: channels and downsampling from their own config fields, per-channel
    normalisation instead of scalar factors."""
    cfg = vae.config
    if cls == "AutoencoderKLQwenImage":  # z_dim channels; each temporal-downsample entry is a 2x spatial stage
        channels, downsample = int(cfg.get("z_dim", 16)), 2 ** len(cfg.get("temperal_downsample", (0, 0, 0)))
    else:
        channels = int(cfg.get("latent_channels", 32))
        downsample = 2 ** (len(cfg.get("block_out_channels", (128, 256, 512, 512))) - 1)
    return VaeFamily(cls, channels, downsample, 1.0, None, normalization_of(vae, cls, channels))


def normalization_of(vae: ResolvedVae, cls: str, channels: int) -> dict:
    """The per-channel statistics the pipeline normalises with, as JSON-ready lists, read without building
    the model: Qwen-Image's from its config (``latents_mean``, ``latents_std``: ``(z - mean) / std`` per
    channel); Flux.2's from the ``bn`` buffers in its weights (``bn_running_mean``, ``bn_running_var``,
    ``batch_norm_eps``, over the 4C channels of 2x2 patches: ``(p - mean) / sqrt(var + eps)``)."""
    cfg = vae.config
    if cls in NORMALIZED_CLASSES:  # Qwen-Image's
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is None or std is None:  # a hand-written config: the class's own defaults apply
            import inspect

            import diffusers

            params = inspect.signature(getattr(diffusers, cls).__init__).parameters
            mean, std = mean or params["latents_mean"].default, std or params["latents_std"].default
        if len(mean) != channels or len(std) != channels:
            raise ModelLoadError(f"the VAE config from {vae.source} has latents_mean/std not of z_dim {channels}")
        return {"latents_mean": [float(v) for v in mean], "latents_std": [float(v) for v in std]}
    patch = [int(v) for v in cfg.get("patch_size", (2, 2))]
    stats = read_buffers(vae, ("bn.running_mean", "bn.running_var"))
    return {
        "patch_size": patch,
        "bn_running_mean": stats["bn.running_mean"].float().tolist(),
        "bn_running_var": stats["bn.running_var"].float().tolist(),
        "batch_norm_eps": float(cfg.get("batch_norm_eps", 1e-4)),
    }


def load_vae(vae: ResolvedVae, family: VaeFamily, dtype, device):
    """Build the VAE from local files, in eval mode on ``device`` with parameters in ``dtype``."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()  # the CLI owns the terminal
    cls = getattr(diffusers, family.cls, None)
    if cls is None:
        raise ModelLoadError(
            f"unsupported VAE class {family.cls}; cachebuild reads AutoencoderKL, AutoencoderTiny, "
            f"AutoencoderKLQwenImage, AutoencoderKLFlux2, AutoencoderDC and {', '.join(VIDEO_CLASSES)}"
        )
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
        self,
        vae,
        family: VaeFamily,
        device: torch.device,
        dtype: DType,
        mode: LatentsMode,
        flip: bool,
        seed: int,
        tiling: Tiling | None = None,
        budget: int | None = None,
    ):
        self.vae = vae
        self.family = family
        self.device = device
        self.dtype = dtype.torch
        self.mode = mode
        self.flip = flip
        self.seed = seed
        self.tiling = tiling  # a video VAE's spatial tiles for every clip of the run (video_tiling.resolve_tiling)
        self.budget = budget  # the run's device-memory budget, bytes (None: not measured), for a clip's failure
        this = weakref.ref(self)  # the guard's forward must not hold the encoder: that cycle kept the VAE on the
        # device after a run until Python's garbage collector happened to run
        alone = (lambda inputs: this()._too_large(inputs[0])) if family.video else None
        self.guard = GuardedForward(
            vae, device, self.dtype, lambda inputs, dt: list(this()._raw(inputs[0], dt)), "VAE", alone
        )

    @property
    def oom_splits(self) -> int:
        return self.guard.oom_splits

    @property
    def upcasts(self) -> int:
        return self.guard.upcasts

    @property
    def fp32_conversions(self) -> int:
        return self.guard.fp32_conversions

    def encode(self, keys: list[str], pixels: torch.Tensor) -> list[EncodedItem]:
        """Encode a batch of (B, H, W, 3) uint8 pixels; one result per key, in order."""
        raws = [r if isinstance(r, str) else {s: t.cpu() for s, t in r.items()} for r in self.encode_raw(pixels)]
        return [self.finish(key, raw) for key, raw in zip(keys, raws, strict=True)]

    def encode_raw(self, pixels: torch.Tensor) -> list[dict[str, torch.Tensor] | str]:
        """The device half of ``encode``: (B, H, W, 3) uint8 pixels, or (B, F, H, W, 3) clips for a video VAE (on
        the host or already on the device) -> per item ``{"": moments, "_flipped": moments}`` (float32, (2C or C,
        h, w) or (2C, F', h, w), still on the device) or a failure reason. The mirrored image is made on the device,
        never copied over a second time."""
        pixels = pixels.to(self.device, non_blocking=True)
        raw = self.guard((pixels,))
        raw_flipped = self.guard((pixels.flip(-2),)) if self.flip else None  # W: (B, H, W, 3), (B, F, H, W, 3)
        results: list[dict[str, torch.Tensor] | str] = []
        for i in range(len(raw)):
            parts = {"": raw[i]} | ({"_flipped": raw_flipped[i]} if raw_flipped is not None else {})
            reasons = [r for r in parts.values() if isinstance(r, str)]
            results.append(reasons[0] if reasons else parts)
        return results

    def finish(self, key: str, raw: dict[str, torch.Tensor] | str) -> EncodedItem:
        """The host half of ``encode``: one image's moments (on the CPU) -> its stored tensors (float32)."""
        if isinstance(raw, str):
            return EncodedItem(None, raw)
        tensors: dict[str, torch.Tensor] = {}
        for suffix, moments in raw.items():
            tensors |= self._finish(key, suffix, moments)
        return EncodedItem(tensors)

    def peak(self, n: int, bucket: tuple[int, ...]) -> int | None:
        """Peak device bytes of encoding ``n`` zero images of ``bucket`` (W, H), or clips of (W, H, F), mirrored
        copy included; None when that runs out of memory or the device's memory is not measured (only CUDA's is)."""
        if self.device.type != "cuda":
            return None
        w, h, *frames = bucket
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            pixels = torch.zeros((n, *frames, h, w, 3), dtype=torch.uint8, device=self.device)
            out = self._raw(pixels, self.dtype)
            if self.flip:
                out = self._raw(pixels.flip(-2), self.dtype)
            del pixels, out
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            peak = None
        return peak  # outside the except block: the failed attempt's tensors are gone by now

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
        """(B, H, W, 3) uint8 -> (B, 2C, H/f, W/f) float32 on the device (moments, or latents for Tiny); the
        caller moves it off the device (``engines.device.copy_to_host``) without waiting for the copy. A video VAE
        takes (B, F, H, W, 3) clips -> (B, 2C, F', H/f, W/f)."""
        if self.family.video:
            return self._raw_clips(pixels, dtype)
        with torch.inference_mode():
            x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
            x = x.float().div_(127.5).sub_(1.0).to(dtype)  # [0, 255] -> [-1, 1] in fp32, then rounded once
            enc = self.vae.encode(x[:, :, None] if self.family.frames else x)  # one frame: (B, 3, 1, H, W)
            if self.family.has_posterior:
                out = enc.latent_dist.parameters
            else:  # AutoencoderDC names its output `latent`, AutoencoderTiny `latents`
                out = enc.latent if self.family.cls in DETERMINISTIC_CLASSES else enc.latents
            out = out[:, :, 0] if self.family.frames else out  # (B, 2C, 1, h, w) -> (B, 2C, h, w)
            result = out.float()
            del x, enc, out
        return result

    def _raw_clips(self, clips: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, F, H, W, 3) uint8 -> (B, 2C, F', h, w) float32 moments on the device, in the run's tiles. The pixels
        are brought to [-1, 1] in float32 and then cast, as the video pipelines' processor does before
        ``vae.encode``; ``video_vae.encode_clip_raw`` is the one place a clip meets its VAE."""
        with torch.inference_mode():
            x = clips.to(self.device, non_blocking=True).permute(0, 4, 1, 2, 3)  # (B, 3, F, H, W)
            x = (x.float() / 127.5 - 1.0).to(dtype).contiguous()
            result = encode_clip_raw(self.vae, self.family, x, self.tiling)
            del x
        return result

    def _too_large(self, clip: torch.Tensor) -> str:
        """Why a (1, F, H, W, 3) clip that ran out of device memory alone fails: the memory it needs at batch 1
        (the encoder's weights on the device and ``video_tiling.estimate_clip_bytes``), and the fix."""
        from cachebuild.families.video_tiling import estimate_clip_bytes, too_large_reason

        _, frames, height, width, _ = clip.shape
        weights = sum(p.numel() * p.element_size() for p in self.vae.parameters())
        clip_bytes = estimate_clip_bytes(
            self.family, self.vae.config, frames, height, width, 1, self.dtype.itemsize, self.tiling
        )
        return too_large_reason(self.family, weights + clip_bytes, self.budget, self.tiling, (frames, height, width))
