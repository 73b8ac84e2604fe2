"""Tiny random-weight models for tests, examples and offline trials.

They are built from configs and saved with ``save_pretrained``, so they load through exactly the path a
hub id or a local folder takes. Their latents are meaningless; their shapes and code paths are real.

    python -m cachebuild.testing vae ./examples/tiny-vae
"""

from __future__ import annotations

import sys
from pathlib import Path


def make_tiny_vae(path: Path, latent_channels: int = 4, scaling_factor: float = 0.13025,
                  shift_factor: float | None = None, seed: int = 0) -> Path:
    """Save a ~60k-parameter AutoencoderKL (downsampling 2: two blocks) to ``path``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        mid_block_add_attention=False,  # attention over (H/2 * W/2) tokens would dominate CPU test time
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )
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


def main(argv: list[str]) -> int:
    makers = {"vae": make_tiny_vae, "taesd": make_tiny_taesd}
    if len(argv) != 2 or argv[0] not in makers:
        print(f"usage: python -m cachebuild.testing {{{'|'.join(makers)}}} OUT_FOLDER", file=sys.stderr)
        return 2
    print(makers[argv[0]](Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
