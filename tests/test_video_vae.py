"""Fidelity of the video VAEs: ``encode_clip_raw`` + ``normalize_clip_latents`` on tiny random VAEs of each class
(saved and loaded as from a folder) equal what each pipeline's own encode path computes for the same clip, within
1e-5 in fp32, and the comparison is discriminating (wrong normalisation, a frame off by one, reversed frames, LTX-2's
statistics taken from the config instead of its weights all fail). The reference paths:

- Wan 2.1 and 2.2 TI2V-5B: ``WanVideoToVideoPipeline.prepare_latents`` with a scheduler that returns the clean
  latents;
- HunyuanVideo 1.5: no pipeline encodes a whole video (T2V draws noise; I2V encodes one image). A one-frame clip is
  compared with ``HunyuanVideo15ImageToVideoPipeline._get_image_latents``; longer clips with that method's own lines
  (``retrieve_latents(vae.encode(x), sample_mode="argmax") * vae.config.scaling_factor``) applied to the clip;
- LTX-2: ``LTX2ConditionPipeline.prepare_latents`` with the whole clip as a condition at latent index 0 (its clean
  latents, packed), and ``LTX2Pipeline._normalize_latents``, the path raw latents take into the denoiser.

The clips go in as the clip pipeline will hand them on: uint8 frames, ``x / 127.5 - 1``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachebuild.families.video_vae import (
    encode_clip_raw,
    normalize_clip_latents,
    pack_ltx2_latents,
    release_decoder,
    video_family,
)
from cachebuild.testing import TINY_VIDEO_VAES

TOLERANCE = 1e-5  # relative difference allowed against the pipeline, in fp32
WRONG = 1e-3  # a wrong normalisation, frame or order differs by far more than this (measured: 0.036 and up)
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


def vae_fingerprint(family) -> dict:
    """The cache fingerprint's ``vae`` object for ``family``, as the latents job writes it."""
    return {"class": family.cls, "scaling_factor": family.scaling_factor, "shift_factor": family.shift_factor} | (
        family.normalization or {}
    )


class CleanScheduler:
    """A scheduler whose add_noise hands the clean latents back: prepare_latents then returns them."""

    def add_noise(self, latents, noise, timestep):
        return latents


@pytest.fixture
def tiny(tiny_video_vaes):
    return tiny_video_vaes


_ENCODED: dict = {}  # (what, kind, clip bytes) -> tensor: the tests share encodes of the same clip


def once(what: str, kind: str, clip: np.ndarray, fn) -> torch.Tensor:
    key = (what, kind, clip.shape, clip.tobytes())
    if key not in _ENCODED:
        _ENCODED[key] = fn()
    return _ENCODED[key]


def raw_latents(kind: str, tiny, clip: np.ndarray) -> torch.Tensor:
    """The stored latents (the posterior mean) of ``encode_clip_raw``: (C, F', h, w)."""
    _, family, vae = tiny[kind]
    c = family.latent_channels
    return once("raw", kind, clip, lambda: encode_clip_raw(vae, family, pixels(clip), None)[0, :c])


def cached(kind: str, tiny, clip: np.ndarray) -> torch.Tensor:
    """What a cache hands on: the stored latents, normalised; (C, F', h, w)."""
    return normalize_clip_latents(raw_latents(kind, tiny, clip), vae_fingerprint(tiny[kind][1]))


def reference(kind: str, tiny, clip: np.ndarray) -> torch.Tensor:
    """The pipeline's own encode and normalisation of ``clip``: (C, F', h, w), or LTX-2's packed (F' h w, C)."""
    return once("reference", kind, clip, lambda: _reference(kind, tiny, clip))


def _reference(kind: str, tiny, clip: np.ndarray) -> torch.Tensor:
    import diffusers
    from diffusers.pipelines.hunyuan_video1_5 import pipeline_hunyuan_video1_5_image2video as hv15
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    _, family, vae = tiny[kind]
    frames, height, width = clip.shape[:3]
    with torch.no_grad():
        if kind.startswith("wan"):
            pipe = diffusers.WanVideoToVideoPipeline(None, None, None, vae, CleanScheduler())
            z = pipe.prepare_latents(pixels(clip), 1, family.latent_channels, height, width, torch.float32, "cpu")
            return z[0]
        if kind == "hunyuanvideo-1.5":
            if frames == 1:
                from PIL import Image

                processor = hv15.HunyuanVideo15ImageProcessor(vae_scale_factor=family.downsample, do_resize=False)
                image = Image.fromarray(clip[0])
                return hv15.HunyuanVideo15ImageToVideoPipeline._get_image_latents(
                    vae, processor, image, height, width, "cpu"
                )[0]
            return hv15.retrieve_latents(vae.encode(pixels(clip)), sample_mode="argmax")[0] * vae.config.scaling_factor
        pipe = diffusers.LTX2ConditionPipeline(None, vae, None, None, None, None, None, None)
        condition = LTX2VideoCondition(frames=clip, index=0, strength=1.0)
        _, _, clean, _ = pipe.prepare_latents(
            [condition], 1, family.latent_channels, height, width, frames, dtype=torch.float32, device="cpu"
        )
        return clean[0]  # (F' h w, C): the condition's clean latents fill every token


def as_pipeline_hands(kind: str, z: torch.Tensor) -> torch.Tensor:
    return pack_ltx2_latents(z) if kind == "ltx-2" else z


@pytest.mark.parametrize("kind", TINY_VIDEO_VAES)
def test_clip_latents_equal_the_pipelines(kind, tiny):
    clip = make_clip(frames_for(kind))
    got, want = as_pipeline_hands(kind, cached(kind, tiny, clip)), reference(kind, tiny, clip)
    assert got.shape == want.shape
    assert relative_difference(got, want) <= TOLERANCE


def test_one_frame_clip_equals_the_hunyuanvideo15_image_path(tiny):
    clip = make_clip(1, seed=3)
    got, want = cached("hunyuanvideo-1.5", tiny, clip), reference("hunyuanvideo-1.5", tiny, clip)
    assert got.shape == want.shape == (4, 1, 8, 8)
    assert relative_difference(got, want) <= TOLERANCE


def test_ltx2_raw_latents_take_the_denoisers_normalisation(tiny):
    """LTX2Pipeline._normalize_latents (scaling factor included) on the same raw latents."""
    import diffusers

    _, family, vae = tiny["ltx-2"]
    raw = raw_latents("ltx-2", tiny, make_clip(9))
    want = diffusers.LTX2Pipeline._normalize_latents(
        raw[None], vae.latents_mean, vae.latents_std, vae.config.scaling_factor
    )[0]
    assert relative_difference(normalize_clip_latents(raw, vae_fingerprint(family)), want) <= TOLERANCE


@pytest.mark.parametrize("kind", TINY_VIDEO_VAES)
def test_the_comparison_is_discriminating(kind, tiny):
    """A wrong normalisation (none at all), a clip one frame late, or its frames reversed, all fail."""
    frames = frames_for(kind)
    longer = make_clip(frames + 1)
    clip = longer[:frames]
    want = reference(kind, tiny, clip)
    wrong = {
        "no normalisation": raw_latents(kind, tiny, clip),
        "one frame late": cached(kind, tiny, longer[1:]),
        "frames reversed": cached(kind, tiny, clip[::-1].copy()),
    }
    for what, z in wrong.items():
        assert relative_difference(as_pipeline_hands(kind, z), want) > WRONG, what


def test_ltx2_statistics_come_from_the_weights(tiny):
    """Its config holds no statistics: taken from there (the class's zeros and ones) the latents fail."""
    folder, family, vae = tiny["ltx-2"]
    assert family.normalization["latents_mean"] == pytest.approx(vae.latents_mean.tolist())
    assert family.normalization["latents_std"] == pytest.approx(vae.latents_std.tolist())
    assert "latents_mean" not in (folder / "config.json").read_text()
    clip = make_clip(9)
    raw = raw_latents("ltx-2", tiny, clip)
    from_config = vae_fingerprint(family) | {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}
    got = pack_ltx2_latents(normalize_clip_latents(raw, from_config))
    assert relative_difference(got, reference("ltx-2", tiny, clip)) > WRONG


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
