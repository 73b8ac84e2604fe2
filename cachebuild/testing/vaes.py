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


def make_tiny_wan_vae(path: Path, z_dim: int = 4, seed: int = 0) -> Path:
    """Save a tiny AutoencoderKLWan to ``path``: two spatial stages, both also temporal, so it keeps Wan's 4x
    temporal compression and 4k+1 frame rule at 4x spatial; per-channel ``latents_mean``/``latents_std`` far from
    0 and 1 so that normalisation shows."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=torch.linspace(-1.0, 1.0, z_dim).tolist(),
        latents_std=torch.linspace(0.5, 3.0, z_dim).tolist(),
        scale_factor_temporal=4,
        scale_factor_spatial=4,
    )
    vae.save_pretrained(path)
    return path
