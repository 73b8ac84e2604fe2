"""Tiny VAEs of every kind the families load, and a synthetic latent cache index."""

from __future__ import annotations

import json
from pathlib import Path

TINY_VAE_LAYOUT = dict(  # two blocks (downsampling 2), a few thousand parameters: fast on a CPU
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
    mid_block_add_attention=False,  # attention over (H/2 * W/2) tokens would dominate CPU test time
)


def make_tiny_vae(
    path: Path,
    latent_channels: int = 4,
    scaling_factor: float = 0.13025,
    shift_factor: float | None = None,
    seed: int = 0,
) -> Path:
    """Save a ~40k-parameter AutoencoderKL (downsampling 2: two blocks) to ``path``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        **TINY_VAE_LAYOUT,
    )
    vae.save_pretrained(path)
    return path


def make_tiny_qwen_vae(path: Path, z_dim: int = 4, seed: int = 0) -> Path:
    """Save a tiny AutoencoderKLQwenImage (causal 3D, downsampling 2: one spatial stage) to ``path``, with
    per-channel ``latents_mean``/``latents_std`` far from 0 and 1 so that normalisation shows."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=torch.linspace(-1.0, 1.0, z_dim).tolist(),
        latents_std=torch.linspace(0.5, 3.0, z_dim).tolist(),
    )
    vae.save_pretrained(path)
    return path


def make_tiny_flux2_vae(path: Path, latent_channels: int = 4, seed: int = 0) -> Path:
    """Save a tiny AutoencoderKLFlux2 (downsampling 2) to ``path``; its batch norm over the 4C patch channels
    gets random running statistics (a fresh one has mean 0, variance 1) so that normalisation shows."""
    import torch
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(latent_channels=latent_channels, **TINY_VAE_LAYOUT)
    n = vae.bn.num_features
    vae.bn.running_mean.copy_(torch.randn(n))
    vae.bn.running_var.copy_(torch.rand(n) * 3.0 + 0.25)
    vae.save_pretrained(path)
    return path


def make_tiny_taesd(path: Path, seed: int = 0) -> Path:
    """Save a tiny AutoencoderTiny (downsampling 8) to ``path``."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )
    vae.save_pretrained(path)
    return path


def make_synthetic_manifest(root: Path, n: int) -> Path:
    """A latent cache index of ``n`` done items in 100-item shards, with no shard file on disk: for timing
    and testing what opening a large cache costs without building one."""
    from cachebuild.cache.manifest import Manifest

    fingerprint = {"vae": {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16}}
    info = json.dumps({"original_size": [1200, 800], "bucket": [1216, 832], "crop": [0, 3], "flip": False})
    buckets = ["1024x1024", "1216x832", "832x1216"]
    rows = [
        (
            "latents",
            f"d{i // 1000:03d}/img{i:06d}",
            f"img{i}.jpg",
            "done",
            f"shard-{i // 100:05d}.st",
            buckets[i % 3],
            info,
            0.0,
        )
        for i in range(n)
    ]
    with Manifest.open(root) as m:
        m.set_fingerprint("latents", fingerprint)
        with m.transaction() as c:
            c.executemany(
                "INSERT INTO items (store, key, path, status, shard, bucket, info, updated) VALUES (?,?,?,?,?,?,?,?)",
                rows,
            )
    return root


def make_tiny_dc_vae(path: Path, latent_channels: int = 4, scaling_factor: float = 0.41407, seed: int = 0) -> Path:
    """Save a tiny ``AutoencoderDC`` (Sana's VAE kind: no posterior) with two stages, downsampling 2, to ``path``."""
    import torch
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    vae = AutoencoderDC(
        latent_channels=latent_channels,
        attention_head_dim=8,
        encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()),
        scaling_factor=scaling_factor,
    )
    vae.save_pretrained(path)
    return path


def make_tiny_wan_vae(path: Path, seed: int = 0) -> Path:
    """Save a tiny AutoencoderKLWan (Wan 2.1's kind) to ``path``: see :func:`make_tiny_video_vae`."""
    return make_tiny_video_vae(path, "wan2.1", seed)


def _tiny_wan(torch, diffusers, ti2v: bool):
    """Wan 2.1's layout at 8 base channels with both stages 2x in time (x4, as the real one) and x4 in space; the
    TI2V-5B variant adds its residual blocks and 2x2 pixel patches (x8 in all). Statistics far from 0 and 1."""
    z = 4
    extra = (
        dict(is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=8) if ti2v else {}
    )
    return diffusers.AutoencoderKLWan(
        base_dim=8,
        z_dim=z,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=torch.linspace(-1.0, 1.0, z).tolist(),
        latents_std=torch.linspace(0.5, 3.0, z).tolist(),
        scale_factor_temporal=4,
        **({"scale_factor_spatial": 4} | extra),
    )


def _tiny_hunyuanvideo15(torch, diffusers, channels: int = 4):
    """Three blocks, the first two down in space and time: x4 in both (the real one: x16 in space)."""
    return diffusers.AutoencoderKLHunyuanVideo15(
        latent_channels=channels,
        block_out_channels=(8, 16, max(16, 2 * channels)),
        layers_per_block=1,
        spatial_compression_ratio=4,
    )  # its encoder averages the last block's channels in groups down to 2C: at least 2C of them


def _tiny_ltx2(torch, diffusers):
    """2x2 pixel patches and three blocks (time; space-time; space-time): x8 in space and time (the real one: x32,
    x8). Its per-channel statistics are buffers, as in the real weights: random here, so normalisation shows."""
    vae = diffusers.AutoencoderKLLTX2Video(
        latent_channels=4,
        block_out_channels=(8, 16, 16),
        decoder_block_out_channels=(8, 16, 16),
        layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True),
        decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False),
        downsample_type=("temporal", "spatiotemporal", "spatiotemporal"),
        upsample_residual=(True, True, True),
        upsample_factor=(2, 2, 2),
        patch_size=2,
        spatial_compression_ratio=8,
        temporal_compression_ratio=8,
    )
    vae.latents_mean.copy_(torch.randn(4))
    vae.latents_std.copy_(torch.rand(4) * 2.0 + 0.5)
    return vae


TINY_VIDEO_VAES = ("wan2.1", "wan2.2-ti2v", "hunyuanvideo-1.5", "ltx-2")  # make_tiny_video_vae's kinds


def make_tiny_video_vae(path: Path, kind: str, seed: int = 0, latent_channels: int = 4) -> Path:
    """Save a tiny video VAE of ``kind`` (one of :data:`TINY_VIDEO_VAES`) to ``path``: AutoencoderKLWan (Wan 2.1,
    or Wan 2.2 TI2V-5B's residual, patched variant), AutoencoderKLHunyuanVideo15 or AutoencoderKLLTX2Video, with a
    few hundred thousand parameters and each class's frame rule (4k+1 frames; 8k+1 for LTX-2). ``latent_channels``:
    4, or for HunyuanVideo 1.5 its real 32 (what musubi-tuner's hv15 trainer takes; about 2M parameters)."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    makers = {
        "wan2.1": lambda: _tiny_wan(torch, diffusers, ti2v=False),
        "wan2.2-ti2v": lambda: _tiny_wan(torch, diffusers, ti2v=True),
        "hunyuanvideo-1.5": lambda: _tiny_hunyuanvideo15(torch, diffusers, latent_channels),
        "ltx-2": lambda: _tiny_ltx2(torch, diffusers),
    }
    if kind not in makers:
        raise ValueError(f"no tiny video VAE of kind {kind!r}; choose one of {', '.join(TINY_VIDEO_VAES)}")
    if latent_channels != 4 and kind != "hunyuanvideo-1.5":
        raise ValueError(f"the tiny {kind} VAE has 4 latent channels; only hunyuanvideo-1.5 takes others")
    makers[kind]().save_pretrained(path)
    return path


VIDEO_VAE_CONFIGS: dict[str, dict] = {  # the released video VAEs' configs (diffusers' conversion scripts), statistics
    # left at the class's defaults or neutral: for measuring memory and tiling with random weights, never latents
    "wan2.1": {"_class_name": "AutoencoderKLWan"},  # every field at the class's default: Wan 2.1's VAE
    "wan2.2-ti2v": {  # scripts/convert_wan_to_diffusers.py: vae22_diffusers_config
        "_class_name": "AutoencoderKLWan",
        "base_dim": 160,
        "decoder_base_dim": 256,
        "z_dim": 48,
        "is_residual": True,
        "in_channels": 12,
        "out_channels": 12,
        "scale_factor_spatial": 16,
        "patch_size": 2,
        "latents_mean": [0.0] * 48,
        "latents_std": [1.0] * 48,
    },
    "hunyuanvideo-1.5": {"_class_name": "AutoencoderKLHunyuanVideo15"},  # convert_vae: the class's defaults
    "ltx-2": {  # scripts/convert_ltx2_to_diffusers.py: get_ltx2_video_vae_config("2.0")
        "_class_name": "AutoencoderKLLTX2Video",
        "latent_channels": 128,
        "block_out_channels": (256, 512, 1024, 2048),
        "decoder_block_out_channels": (256, 512, 1024),
        "layers_per_block": (4, 6, 6, 2, 2),
        "decoder_layers_per_block": (5, 5, 5, 5),
        "spatio_temporal_scaling": (True, True, True, True),
        "decoder_spatio_temporal_scaling": (True, True, True),
        "decoder_inject_noise": (False, False, False, False),
        "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        "upsample_residual": (True, True, True),
        "upsample_factor": (2, 2, 2),
        "timestep_conditioning": False,
        "patch_size": 4,
        "patch_size_t": 1,
        "decoder_causal": False,
        "spatial_compression_ratio": 32,
        "temporal_compression_ratio": 8,
    },
}


def build_video_vae(kind: str, dtype=None, device=None, seed: int = 0):
    """A video VAE of the released config of ``kind`` (:data:`VIDEO_VAE_CONFIGS`) with random weights, in eval mode:
    real widths and depths for measuring memory and what tiling changes (HunyuanVideo 1.5 and LTX-2 hold over a
    billion parameters: about 5 GB in float32)."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    cfg = dict(VIDEO_VAE_CONFIGS[kind])
    model = getattr(diffusers, cfg.pop("_class_name"))(**cfg)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def video_vae_family(kind: str):
    """The ``VaeFamily`` of the released config of ``kind``, with no weight files: LTX-2's statistics (buffers in
    its weights) are taken as zeros and ones, which changes no shape, memory or raw latent."""
    from cachebuild.families.vae import VaeFamily
    from cachebuild.families.video_vae import LTX2, video_family
    from cachebuild.hub import ResolvedVae

    config = VIDEO_VAE_CONFIGS[kind]
    if config["_class_name"] == LTX2:
        stats = {"latents_mean": [0.0] * 128, "latents_std": [1.0] * 128}
        return VaeFamily(LTX2, 128, 32, 1.0, None, stats, temporal_downsample=8, frame_modulus=8, default_fps=24.0)
    return video_family(ResolvedVae(kind, None, None, dict(config), ()))
