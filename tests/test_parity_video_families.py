"""Fidelity of Wan 2.2 TI2V-5B, HunyuanVideo 1.5 and LTX-2 clips: after ``cachebuild latents --frames ...`` (through
the CLI) on a lossless synthetic video and a still image, with tiny random VAEs of each class,
``open_cache(out).pipeline_inputs(clip key)`` equals what each pipeline's own path computes from the same frames,
within 1e-5 in fp32:

- TI2V-5B: ``WanVideoToVideoPipeline.prepare_latents`` (its ``video_processor``, a scheduler that hands the clean
  latents back), as for Wan 2.1 (tests/test_parity_wan.py);
- HunyuanVideo 1.5: no pipeline encodes a whole video (text-to-video draws noise, image-to-video encodes one image):
  a still (a one-frame clip) is compared with ``HunyuanVideo15ImageToVideoPipeline._get_image_latents``, clips with
  that method's own lines (``retrieve_latents(vae.encode(x), "argmax") * vae.config.scaling_factor``) on the clip;
  beside them the zero condition, mask and image embeds ``HunyuanVideo15Pipeline`` builds, and the video's text;
- LTX-2: ``LTX2ConditionPipeline.prepare_latents`` with the whole clip as the condition at frame 0 (its clean
  latents, packed into tokens), and ``LTX2Pipeline._normalize_latents`` / ``_unpack_latents`` for the layout and
  the arguments its transformer takes.

Discriminating: a clip one frame late, its frames reversed, the normalisation left out, and LTX-2's statistics
taken from the config instead of the weights' buffers each fail the comparison.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.keys import split_clip_key
from cachebuild.testing import make_tiny_text_pipeline, make_tiny_video_vae
from cachebuild.testing.videos import clip_frames, write_video

TOLERANCE = 1e-5  # relative difference allowed against the pipeline, in fp32
WRONG = 1e-3  # a wrong frame, order or normalisation is far past this (the smallest measured: 0.036)
SIZE = (32, 32)  # (W, H): a bucket of --resolution 32 in steps of 16, so the frames are neither resized nor cut
VIDEO_FRAMES = 18  # chunk: 5-frame clips at 0, 5, 10 and 9-frame ones at 0, 9; LTX-2: 9 at 0, 9 and 17 at 0
CLIPS = {"wan2.2-ti2v": "5,9", "hunyuanvideo-1.5": "5,9", "ltx-2": "9,17"}  # kind -> --frames (LTX-2: 8k+1)
FAMILY = {"wan2.2-ti2v": "wan", "hunyuanvideo-1.5": "hunyuanvideo-1.5", "ltx-2": "ltx-2"}
CAPTIONS = {"walk": 'a person walking past a sign saying "open"', "still": "a still photo"}
HV15_CHANNELS = 32  # HunyuanVideo 1.5's real latent channels: the cache the musubi export test reads too


def latents_args(data: Path, vae: Path, out: Path, frames: str) -> list[str]:
    return [
        "latents", str(data), "--vae", str(vae), "--out", str(out), "--latents", "mean", "--workers", "0",
        "--resolution", "32", "--min-bucket-reso", "16", "--bucket-reso-steps", "16", "--frames", frames,
        "--extract", "chunk", "--device", "cpu", "--dtype", "fp32", "--dtype-out", "fp32", "--quiet",
    ]  # fmt: skip


def build_video_family_caches(root: Path) -> dict[str, SimpleNamespace]:
    """{kind: (vae folder, cache, the source frames by video key, the dataset)}: one video and one still, a cache per
    VAE class through the CLI, and HunyuanVideo 1.5's text beside its latents."""
    data = root / "data"
    frames = {"walk": clip_frames(VIDEO_FRAMES, SIZE, seed=0), "still": clip_frames(1, SIZE, seed=1)}
    write_video(data / "walk.mkv", frames["walk"])
    Image.fromarray(frames["still"][0]).save(data / "still.png")
    for key, text in CAPTIONS.items():
        (data / f"{key}.txt").write_text(text)
    built = {}
    for kind, counts in CLIPS.items():
        channels = HV15_CHANNELS if kind == "hunyuanvideo-1.5" else 4
        vae = make_tiny_video_vae(root / "vae" / kind, kind, latent_channels=channels)
        cache = root / kind
        result = CliRunner().invoke(cli, latents_args(data, vae, cache, counts))
        assert result.exit_code == 0, result.output
        built[kind] = SimpleNamespace(vae=vae, cache=cache, frames=frames, data=data, args=latents_args)
    pipe = make_tiny_text_pipeline(root / "pipe", "hunyuanvideo-1.5")
    text = ["textenc", str(data), "--model", str(pipe), "--out", str(built["hunyuanvideo-1.5"].cache)]
    result = CliRunner().invoke(cli, [*text, "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    return built


class CleanScheduler:
    """Hands ``prepare_latents`` its clean latents back: ``add_noise(x, noise, t) = x``."""

    def add_noise(self, original, noise, timestep):
        return original


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@functools.cache
def load_vae(folder: Path):
    import diffusers

    from cachebuild.config import ModelSpec
    from cachebuild.families.vae import family_of
    from cachebuild.hub import resolve_vae

    family = family_of(resolve_vae(ModelSpec(vae=str(folder))), None)
    return getattr(diffusers, family.cls).from_pretrained(folder).eval()


def pixels(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (1, 3, F, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


def reference(kind: str, folder: Path, frames: np.ndarray) -> torch.Tensor:
    """What the family's pipeline computes for (F, H, W, 3) uint8 ``frames``: (C, F', h, w); LTX-2's (F' h w, C)."""
    import diffusers
    from diffusers.pipelines.hunyuan_video1_5 import pipeline_hunyuan_video1_5_image2video as hv15
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    vae = load_vae(folder)
    n, h, w = frames.shape[:3]
    with torch.no_grad():
        if kind == "wan2.2-ti2v":
            pipe = diffusers.WanVideoToVideoPipeline(None, None, None, vae, CleanScheduler())
            video = pipe.video_processor.preprocess_video([Image.fromarray(f) for f in frames], height=h, width=w)
            return pipe.prepare_latents(video, 1, vae.config.z_dim, h, w, torch.float32, "cpu")[0]
        if kind == "hunyuanvideo-1.5" and n == 1:
            processor = hv15.HunyuanVideo15ImageProcessor(
                vae_scale_factor=vae.spatial_compression_ratio, do_resize=False
            )
            image = Image.fromarray(frames[0])
            return hv15.HunyuanVideo15ImageToVideoPipeline._get_image_latents(vae, processor, image, h, w, "cpu")[0]
        if kind == "hunyuanvideo-1.5":
            return (
                hv15.retrieve_latents(vae.encode(pixels(frames)), sample_mode="argmax")[0] * vae.config.scaling_factor
            )
        pipe = diffusers.LTX2ConditionPipeline(None, vae, None, None, None, None, None, None)
        condition = LTX2VideoCondition(frames=frames, index=0, strength=1.0)
        channels = vae.config.latent_channels
        _, _, clean, _ = pipe.prepare_latents([condition], 1, channels, h, w, n, dtype=torch.float32, device="cpu")
        return clean[0]  # (F' h w, C): the condition's clean latents fill every token


def source_frames(built: SimpleNamespace, key: str) -> np.ndarray:
    parts = split_clip_key(key)
    if parts is None:
        return built.frames[key]
    video, start, n = parts
    return built.frames[video][start : start + n]


@pytest.mark.parametrize("kind", list(CLIPS))
def test_every_clip_equals_its_pipelines_path(kind, video_family_caches):
    built = video_family_caches[kind]
    cache = open_cache(built.cache, text=False)
    starts = {"5,9": ["00000-005", "00000-009", "00005-005", "00009-009", "00010-005"], "9,17": []}[CLIPS[kind]]
    starts = starts or ["00000-009", "00000-017", "00009-009"]
    assert cache.keys() == ["still"] + [f"walk@{s}" for s in starts]
    for key in cache:
        if kind == "ltx-2" and key == "still":
            continue  # the condition pipeline re-compresses a one-frame condition with H.264 first (image-to-video's
            # keyframe), which a still's training latents are not: it is the one-frame clip the others start like
        got = cache.pipeline_inputs(key, family=FAMILY[kind])["latents"]
        want = reference(kind, built.vae, source_frames(built, key))
        assert got.shape == want.shape, key
        assert relative_difference(got, want) <= TOLERANCE, key
        rec = cache[key]
        assert rec["bucket"] == SIZE and cache.bucket(key) == (*SIZE, rec["frames"])


@pytest.mark.parametrize("kind", list(CLIPS))
def test_a_frame_late_the_frames_reversed_or_no_normalisation_would_fail(kind, video_family_caches):
    built = video_family_caches[kind]
    cache = open_cache(built.cache, text=False)
    key = "walk@00000-009" if kind == "ltx-2" else "walk@00005-005"
    video, start, n = split_clip_key(key)
    got = cache.pipeline_inputs(key, family=FAMILY[kind])["latents"]
    frames = built.frames[video]
    assert relative_difference(got, reference(kind, built.vae, frames[start : start + n])) <= TOLERANCE
    late = reference(kind, built.vae, frames[start + 1 : start + n + 1])
    reversed_ = reference(kind, built.vae, frames[start : start + n][::-1])
    raw = cache[key]["latents"]
    raw = raw.flatten(1).transpose(0, 1) if kind == "ltx-2" else raw  # packed as LTX-2's tokens are
    want = reference(kind, built.vae, frames[start : start + n])
    for what, wrong in {"one frame late": late, "frames reversed": reversed_}.items():
        assert relative_difference(got, wrong) > WRONG, what
    assert relative_difference(raw, want) > WRONG, "not normalised"


def test_ltx2_statistics_come_from_the_weights(video_family_caches):
    """The fingerprint holds the VAE's buffers (its config holds none); LTX2Pipeline's denoiser-side normalisation of
    the raw latents gives pipeline_inputs' tokens; normalised with the class's zeros and ones instead, they fail."""
    import diffusers

    from cachebuild.families.ltx2 import pipeline_inputs

    built = video_family_caches["ltx-2"]
    vae = load_vae(built.vae)
    cache = open_cache(built.cache, text=False)
    stats = cache.fingerprint["vae"]
    assert stats["latents_mean"] == pytest.approx(vae.latents_mean.tolist())
    assert stats["latents_std"] == pytest.approx(vae.latents_std.tolist())
    assert "latents_mean" not in (built.vae / "config.json").read_text()
    rec = cache["walk@00000-017"]
    got = cache.pipeline_inputs("walk@00000-017", family="ltx-2")
    z = diffusers.LTX2Pipeline._normalize_latents(rec["latents"][None], vae.latents_mean, vae.latents_std, 1.0)
    frames, height, width = z.shape[2:]
    assert (got["latent_num_frames"], got["latent_height"], got["latent_width"]) == (frames, height, width)
    assert got["frame_rate"] == 16.0  # the clip's (the source's, no --fps): the transformer's fps
    assert torch.allclose(diffusers.LTX2Pipeline._pack_latents(z)[0], got["latents"], rtol=1e-6, atol=1e-6)
    unpacked = diffusers.LTX2Pipeline._unpack_latents(got["latents"][None], frames, height, width)
    assert torch.allclose(unpacked, z, rtol=1e-6, atol=1e-6)
    from_config = stats | {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}
    wrong = pipeline_inputs(rec, from_config)["latents"]
    want = reference("ltx-2", built.vae, built.frames["walk"][:17])
    assert relative_difference(got["latents"], want) <= TOLERANCE < WRONG < relative_difference(wrong, want)


def test_hunyuanvideo15_clips_carry_the_text_to_video_condition_and_their_videos_text(video_family_caches):
    """The zero condition and mask the pipeline concatenates to the latents (65 channels for the real 32) and its zero
    image embeds; each clip joined with its video's caption, encoded once."""
    import diffusers

    built = video_family_caches["hunyuanvideo-1.5"]
    cache = open_cache(built.cache)
    assert cache.unmatched == {"latents_only": [], "text_only": []}
    got = cache.pipeline_inputs("walk@00000-009")  # the family from the text cache
    z = got["latents"]
    cond, mask = diffusers.HunyuanVideo15Pipeline.prepare_cond_latents_and_mask(None, z[None], torch.float32, "cpu")
    assert torch.equal(got["cond_latents_concat"], cond[0]) and torch.equal(got["mask_concat"], mask[0])
    assert torch.cat([z, got["cond_latents_concat"], got["mask_concat"]]).shape == (2 * HV15_CHANNELS + 1, 3, 8, 8)
    assert got["image_embeds"].shape == (729, 1152) and not got["image_embeds"].any()
    other = cache.pipeline_inputs("walk@00005-005")
    for name in ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2"):
        assert torch.equal(got[name], other[name]), name
    assert got["prompt_embeds"].shape[0] == 1000 and got["prompt_embeds_2"].shape[0] == 256
    assert got["prompt_embeds_mask_2"].any()  # the caption quotes "open": ByT5 rows
    assert not torch.equal(cache.pipeline_inputs("still")["prompt_embeds"], got["prompt_embeds"])
    assert cache.caption("walk@00010-005") == CAPTIONS["walk"]


def test_each_family_is_refused_what_its_vae_cannot_take_before_any_work(video_family_caches, tmp_path):
    """LTX-2's frame rule is 8k+1; TI2V-5B's sides are multiples of its 16x VAE's cell times the transformer's 2x2
    patch (tiny: 8 x 2). Both refused in one line, nothing written."""
    ltx2, ti2v = video_family_caches["ltx-2"], video_family_caches["wan2.2-ti2v"]
    refused = CliRunner().invoke(cli, latents_args(ltx2.data, ltx2.vae, tmp_path / "a", "5,9"))
    assert refused.exit_code == 2, refused.output
    assert "--frames 5 breaks AutoencoderKLLTX2Video's frame rule (8k+1 frames); 5: use 1 or 9" in refused.output
    args = [*latents_args(ti2v.data, ti2v.vae, tmp_path / "b", "5"), "--bucket-reso-steps", "8"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 2 and "(16 pixels); use a multiple such as 128" in refused.output, refused.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
