"""The video VAEs at the function level: each class's family from its config (and LTX-2's statistics from its
weights), the released configs' factors, a frame count off the rule refused before the VAE sees it, the decoder
released without changing the encode, the presets. Their parity with each pipeline is checked through the CLI
(tests/test_parity_wan.py, tests/test_parity_video_families.py); the helpers below serve tests/test_video_tiling.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachebuild.families.video_vae import (
    encode_clip_raw,
    release_decoder,
    video_family,
)
from cachebuild.testing import TINY_VIDEO_VAES

SIZE = 32  # clip side, pixels


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def frames_for(kind: str) -> int:
    return 9 if kind == "ltx-2" else 5  # two latent frames: 8k+1 for LTX-2, 4k+1 for the others


def make_clip(frames: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """(F, H, W, 3) uint8: smooth colour gradients moving from frame to frame, plus noise, so every frame differs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    frames_ = []
    for f in range(frames):
        base = np.stack([np.sin(6 * xx + f), np.cos(5 * yy - f), np.sin(4 * (xx + yy) + 0.5 * f)], axis=-1)
        frames_.append(127.5 + 100 * base + rng.normal(0, 12, base.shape))
    return np.clip(np.stack(frames_), 0, 255).astype(np.uint8)


def pixels(clip: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (1, 3, F, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


@pytest.fixture
def tiny(tiny_video_vaes):
    return tiny_video_vaes


@pytest.mark.parametrize(
    ("kind", "channels", "space", "time", "fps"),
    [
        ("wan2.1", 4, 4, 4, 16.0),
        ("wan2.2-ti2v", 4, 8, 4, 16.0),  # x4 stages and 2x2 pixel patches
        ("hunyuanvideo-1.5", 4, 4, 4, 24.0),
        ("ltx-2", 4, 8, 8, 24.0),
    ],
)
def test_family_from_config(kind, channels, space, time, fps, tiny):
    _, family, vae = tiny[kind]
    assert (family.latent_channels, family.downsample, family.temporal_downsample) == (channels, space, time)
    assert (family.frame_modulus, family.default_fps) == (time, fps)
    if kind == "hunyuanvideo-1.5":
        assert family.scaling_factor == pytest.approx(1.03682) and family.normalization is None


def test_real_configs_give_the_published_factors():
    """The released configs (diffusers' conversion scripts): C, spatial, temporal, pixel multiple."""
    from cachebuild.families.video_vae import pixel_multiple
    from cachebuild.hub import ResolvedVae

    configs = {
        "wan2.1": {"_class_name": "AutoencoderKLWan"},  # every field at the class's default
        "ti2v": {"_class_name": "AutoencoderKLWan", "z_dim": 48, "is_residual": True, "patch_size": 2}
        | {"latents_mean": [0.0] * 48, "latents_std": [1.0] * 48},
        "hv15": {"_class_name": "AutoencoderKLHunyuanVideo15"},
    }
    got = {}
    for name, cfg in configs.items():
        f = video_family(ResolvedVae(name, None, None, cfg, ()))
        got[name] = (f.latent_channels, f.downsample, f.temporal_downsample, pixel_multiple(f))
    assert got == {"wan2.1": (16, 8, 4, 16), "ti2v": (48, 16, 4, 32), "hv15": (32, 16, 4, 16)}


def test_ltx2_without_its_statistics_fails_naming_the_fix(tmp_path):
    from cachebuild.errors import ModelLoadError
    from cachebuild.hub import ResolvedVae

    cfg = {"_class_name": "AutoencoderKLLTX2Video", "latent_channels": 4}
    with pytest.raises(ModelLoadError, match="per-channel statistics LTX-2 normalises with.*diffusers VAE folder"):
        video_family(ResolvedVae("x", tmp_path, None, cfg, ()))


@pytest.mark.parametrize("kind", TINY_VIDEO_VAES)
def test_a_frame_count_off_the_rule_is_refused(kind, tiny):
    """Wan's VAE would drop the extra frames silently, the others fail with a shape error: refused first."""
    _, family, vae = tiny[kind]
    frames = frames_for(kind) + 1
    with pytest.raises(ValueError, match=r"takes \d+k\+1 frames; \d+ is not \(nearest: "):
        encode_clip_raw(vae, family, pixels(make_clip(frames)), None)


@pytest.mark.parametrize("kind", TINY_VIDEO_VAES)
def test_release_decoder_keeps_the_encode(kind, tiny):
    import diffusers

    folder, family, vae = tiny[kind]
    clip = pixels(make_clip(1))
    want = encode_clip_raw(vae, family, clip, None)
    light = getattr(diffusers, family.cls).from_pretrained(folder).eval()
    freed = release_decoder(light)
    assert freed > 0 and light.decoder is None and release_decoder(light) == 0
    assert torch.equal(encode_clip_raw(light, family, clip, None), want)


def test_video_presets(tmp_path):
    """The hub ids the pipelines' docs name, each preset's text family detected from its name."""
    from cachebuild.config import PRESETS, TextFamily
    from cachebuild.families import text

    assert PRESETS["wan2.2-ti2v-5b"] == "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
    assert PRESETS["ltx-2"] == "Lightricks/LTX-2"
    hv = {"": "480p_t2v", "-720p": "720p_t2v", "-i2v": "480p_i2v", "-720p-i2v": "720p_i2v"}
    for suffix, variant in hv.items():
        assert PRESETS[f"hunyuanvideo-1.5{suffix}"] == f"hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-{variant}"
        assert text._detect_family(f"hunyuanvideo-1.5{suffix}", tmp_path) is TextFamily("hunyuanvideo-1.5")
    assert text._detect_family("wan2.2-ti2v-5b", tmp_path) is TextFamily("wan")
