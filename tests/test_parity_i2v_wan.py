"""Wan's image-to-video conditions through the CLI against ``WanImageToVideoPipeline`` itself: its ``__call__`` runs
(a tiny transformer, one step) on the condition image a cache used, and what ``prepare_latents`` returns
(``condition``; TI2V-5B's ``condition`` and ``first_frame_mask``) and ``encode_image`` returns (``image_embeds``) is
captured and compared with ``open_cache(out).pipeline_inputs(clip key)``, within 1e-5 in fp32. Wan 2.1 I2V (CLIP),
Wan 2.2 I2V A14B (no image encoder), TI2V-5B; the clip's first frame by default, ``--control`` images and
``--last-frame``. Zero latents in place of the encoded grey frames, a mask that marks every frame, the last layer of
CLIP, a frame of the clip other than its first or the latents left unnormalised all fail the comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.families.i2v import CONDITION_LATENTS
from cachebuild.keys import split_clip_key
from cachebuild.testing.i2v import make_tiny_i2v_pipeline
from cachebuild.testing.videos import clip_frames, write_video
from tests.conftest import write_image

TOLERANCE = 1e-5  # relative difference allowed against the pipeline, in fp32
WRONG = 1e-3  # a wrong frame, mask, layer or normalisation is far further off than this
SIZE = (32, 32)  # (W, H): a bucket of --resolution 32 in steps of 16, so frames are neither resized nor cut
VIDEOS = {"walk": 10, "run/fast": 6}  # key -> frames
CONTROLS = {"walk": (40, 24), "run/fast": (30, 50)}  # condition images of other sizes: the pipeline stretches them
CLIP_ARGS = ["--frames", "5,9", "--resolution", "32", "--min-bucket-reso", "16", "--bucket-reso-steps", "16"]
COMMON = ["--latents", "mean", "--workers", "0", "--device", "cpu", "--dtype", "fp32", "--dtype-out", "fp32", "-q"]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def build(root: Path, name: str, *extra: str, code: int = 0) -> tuple[Path, Path]:
    """(pipeline folder, cache) of the tiny ``name`` pipeline over the shared videos (and a still image)."""
    pipe = root / f"pipe-{name}"
    if not pipe.is_dir():
        make_tiny_i2v_pipeline(pipe, name)
    out = root / f"cache-{name}-{len(extra)}"
    args = ["latents", str(root / "data"), "--model", str(pipe), "--out", str(out), *CLIP_ARGS, *COMMON, *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    return pipe, out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("i2v-wan")
    for i, (key, n) in enumerate(VIDEOS.items()):
        write_video(root / "data" / f"{key}.mkv", clip_frames(n, SIZE, seed=i))
        write_image(root / "control" / f"{key}.png", CONTROLS[key], seed=10 + i)
    Image.fromarray(clip_frames(1, SIZE, seed=7)[0]).save(root / "data" / "still.png")
    write_image(root / "control" / "still.png", (20, 36), seed=17)
    return root


def frames_of(root: Path, key: str) -> np.ndarray:
    """The (F, H, W, 3) frames of clip ``key`` (or a still image), as written."""
    span = split_clip_key(key)
    if span is None:
        return clip_frames(1, SIZE, seed=7)
    video, start, n = span
    return clip_frames(VIDEOS[video], SIZE, seed=list(VIDEOS).index(video))[start : start + n]


def reference(pipe_folder: Path, image, frames: int, last_image=None, tiles=None, **config):
    """What ``WanImageToVideoPipeline.__call__`` hands its transformer for ``image``: (prepare_latents' outputs
    after the noise, encode_image's output or None); ``tiles`` (tile, stride) turns the VAE's own tiling on."""
    import diffusers
    import transformers

    vae = diffusers.AutoencoderKLWan.from_pretrained(pipe_folder / "vae").eval()
    if tiles is not None:
        vae.enable_tiling(tiles[0], tiles[0], tiles[1], tiles[1])
    encoder = processor = None
    if (pipe_folder / "image_encoder").is_dir():
        encoder = transformers.CLIPVisionModel.from_pretrained(pipe_folder / "image_encoder").eval()
        processor = transformers.CLIPImageProcessor.from_pretrained(pipe_folder / "image_processor")
    z = vae.config.z_dim
    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=z if config else 2 * z + 4,
        out_channels=z, text_dim=16, freq_dim=8, ffn_dim=16, num_layers=1,
        image_dim=32 if encoder is not None else None, added_kv_proj_dim=24 if encoder is not None else None,
        pos_embed_seq_len=2 * 5 if encoder is not None and last_image is not None else None,  # FLF2V: 2 images
    )  # fmt: skip
    pipe = diffusers.WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        image_processor=processor, image_encoder=encoder, transformer=transformer.eval(), **config,
    )  # fmt: skip
    seen = {}
    for name in ("prepare_latents", "encode_image"):
        original = getattr(pipe, name)
        setattr(pipe, name, lambda *a, _f=original, _n=name, **k: seen.setdefault(_n, _f(*a, **k)))
    with torch.no_grad():
        pipe(image=image, last_image=last_image, prompt_embeds=torch.zeros(1, 4, 16), height=SIZE[1], width=SIZE[0],
             num_frames=frames, num_inference_steps=1, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))  # fmt: skip
    return seen["prepare_latents"][1:], seen.get("encode_image")


@pytest.fixture(scope="module")
def wan21(data):
    return build(data, "wan2.1-i2v")


def test_wan21_first_frame_conditions_equal_the_pipelines(data, wan21):
    pipe, out = wan21
    cache = open_cache(out)
    assert cache.keys() == ["run/fast@00000-005", "still", "walk@00000-005", "walk@00000-009"]
    for key in cache:
        frames = frames_of(data, key)
        got = cache.pipeline_inputs(key, family="wan")
        (condition,), embeds = reference(pipe, Image.fromarray(frames[0]), len(frames))
        f = 1 + (len(frames) - 1) // 4
        assert got["condition"].shape == condition[0].shape == (8, f, 8, 8), key  # mask 4 + latents 4 (tiny)
        assert relative_difference(got["condition"], condition[0]) <= TOLERANCE, key
        assert got["image_embeds"].shape == embeds[0].shape == (5, 32)
        assert relative_difference(got["image_embeds"], embeds[0]) <= TOLERANCE, key
        assert got["latents"].shape == (4, f, 8, 8)
    report = json.loads(CliRunner().invoke(cli, ["verify", str(out), "--json"]).output)
    assert report["ok"] and "control" in report["stores"], report
    loader = torch.utils.data.DataLoader(cache.dataset(), batch_sampler=cache.bucket_sampler(batch_size=4))
    for batch in loader:  # a bucket's conditions stack as its latents do
        assert batch["condition_latents"].shape[:2] == (len(batch["key"]), 4) and batch["image_embeds"].ndim == 4


def test_grey_frames_the_mask_the_layer_the_frame_and_the_normalisation_are_each_checked(data, wan21):
    """Each deliberate fault, one at a time, is far outside the tolerance the cache meets."""
    from cachebuild.families.wan_i2v import condition_mask

    pipe, out = wan21
    cache = open_cache(out)
    key = "walk@00000-009"
    frames = frames_of(data, key)
    got = cache.pipeline_inputs(key, family="wan")
    (condition,), embeds = reference(pipe, Image.fromarray(frames[0]), 9)
    want = condition[0]
    assert relative_difference(got["condition"], want) <= TOLERANCE
    zero_latents = want.clone()
    zero_latents[4:, 1:] = 0  # the grey frames as zero latents
    assert relative_difference(zero_latents, want) > WRONG
    all_marked = torch.cat([torch.ones(4, 3, 8, 8), want[4:]])  # a mask marking every frame
    assert relative_difference(all_marked, want) > WRONG and torch.equal(want[:4], condition_mask(9, 8, 8, False))
    (later,), _ = reference(pipe, Image.fromarray(frames[1]), 9)  # the clip's second frame as the condition
    assert relative_difference(later[0], want) > WRONG
    raw = torch.cat([want[:4], cache.record(key)[CONDITION_LATENTS]])  # not normalised
    assert relative_difference(raw, want) > WRONG
    import transformers

    encoder = transformers.CLIPVisionModel.from_pretrained(pipe / "image_encoder").eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(pipe / "image_processor")
    with torch.no_grad():
        pixels = processor(images=Image.fromarray(frames[0]), return_tensors="pt")["pixel_values"]
        last_layer = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][0]
    assert relative_difference(last_layer, embeds[0]) > WRONG
    assert relative_difference(got["image_embeds"], embeds[0]) <= TOLERANCE


def test_control_images_and_the_last_frame(data, wan21):
    """``--control``: the image under the video's key (the still image's own), resized by the pipeline's processor;
    ``--last-frame``: the clip's last frame as ``last_image``, two CLIP embeddings."""
    pipe, _ = wan21
    _, out = build(data, "wan2.1-i2v", "--control", str(data / "control"), "--last-frame", code=3)
    cache = open_cache(out)
    assert cache.keys() == ["run/fast@00000-005", "walk@00000-005", "walk@00000-009"]  # the still: no last frame
    status = json.loads(CliRunner().invoke(cli, ["status", str(out), "--json"]).output)
    assert "no last frame" in {f["key"]: f["reason"] for f in status["failures"]}["still"]
    for key in ("run/fast@00000-005", "walk@00000-009"):
        video = split_clip_key(key)[0]
        frames = frames_of(data, key)
        image = Image.open(data / "control" / f"{video}.png").convert("RGB")
        (condition,), embeds = reference(pipe, image, len(frames), last_image=Image.fromarray(frames[-1]))
        got = cache.pipeline_inputs(key, family="wan")
        assert relative_difference(got["condition"], condition[0]) <= TOLERANCE, key
        assert got["image_embeds"].shape == embeds.shape == (2, 5, 32)
        assert relative_difference(got["image_embeds"], embeds) <= TOLERANCE, key
        assert got["condition"][:4, -1, 0, 0].tolist() == [0, 0, 0, 1]  # the last pixel frame is marked too
    (first_only,), _ = reference(pipe, Image.open(data / "control" / "walk.png").convert("RGB"), 9)
    assert (
        relative_difference(first_only[0], cache.pipeline_inputs("walk@00000-009", family="wan")["condition"]) > WRONG
    )


@pytest.mark.parametrize("name", ["wan2.2-i2v", "wan2.2-ti2v"])
def test_wan22_i2v_and_ti2v(data, name):
    pipe, out = build(data, name)
    cache = open_cache(out)
    ti2v = name == "wan2.2-ti2v"
    config = {"expand_timesteps": True} if ti2v else {}
    for key in ("still", "walk@00000-009"):
        frames = frames_of(data, key)
        want, embeds = reference(pipe, Image.fromarray(frames[0]), len(frames), **config)
        got = cache.pipeline_inputs(key, family="wan")
        assert embeds is None and "image_embeds" not in got  # no image encoder
        assert relative_difference(got["condition"], want[0][0]) <= TOLERANCE, key
        if ti2v:  # the first frame's latents alone, and the timestep mask
            assert got["condition"].shape == (4, 1, 4, 4) and torch.equal(got["first_frame_mask"], want[1][0])
            assert torch.allclose(got["condition"][:, 0], got["latents"][:, 0], atol=1e-5)  # causal: frame 0 alone
    fingerprint = cache.control_fingerprint
    assert fingerprint["condition"] == {"kind": "wan-ti2v" if ti2v else "wan-i2v", "image": "first-frame"}
    assert "image_encoder" not in fingerprint


def test_tiled_clips_get_their_conditions_in_the_same_tiles(data, wan21):
    """A cache whose clips were encoded in tiles encodes each condition clip in those tiles, as the pipeline does with
    its VAE's tiling on; recorded in the conditions' fingerprint."""
    pipe, _ = wan21
    _, out = build(data, "wan2.1-i2v", "--tiling", "on", "--tile-size", "16", "--tile-stride", "8")
    cache = open_cache(out)
    assert cache.control_fingerprint["tiling"] == {"tile": 16, "stride": 8} == cache.fingerprint["tiling"]
    image = Image.fromarray(frames_of(data, "walk@00000-009")[0])
    got = cache.pipeline_inputs("walk@00000-009", family="wan")["condition"]
    (tiled,), _ = reference(pipe, image, 9, tiles=(16, 8))
    (whole,), _ = reference(pipe, image, 9)
    assert relative_difference(got, tiled[0]) <= TOLERANCE < WRONG < relative_difference(got, whole[0])


@pytest.mark.gpu
def test_conditions_on_cuda_equal_the_cpus(data, wan21):
    """The same conditions built on a CUDA device (the VAE and CLIP there) as on the CPU, within fp32's kernel noise."""
    pipe, cpu = wan21
    out = data / "cache-cuda"
    args = ["latents", str(data / "data"), "--model", str(pipe), "--out", str(out), *CLIP_ARGS, "--latents", "mean"]
    args += ["--workers", "0", "--device", "cuda", "--dtype", "fp32", "--dtype-out", "fp32", "-q"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    a, b = open_cache(cpu), open_cache(out)
    for key in a:
        for name in ("condition", "image_embeds"):
            got, want = b.pipeline_inputs(key, family="wan")[name], a.pipeline_inputs(key, family="wan")[name]
            assert relative_difference(got, want) <= 1e-4, (key, name)
