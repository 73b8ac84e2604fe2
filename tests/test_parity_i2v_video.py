"""HunyuanVideo 1.5 and LTX-2 image-to-video conditions through the CLI, against each pipeline's own code on the
image a cache used: ``HunyuanVideo15ImageToVideoPipeline`` (``__call__``'s crop resize, ``encode_image``,
``prepare_latents``, ``prepare_cond_latents_and_mask``) and ``LTX2ImageToVideoPipeline`` (``__call__``'s H.264
round trip and ``video_processor.preprocess``, ``prepare_latents``), within 1e-5 in fp32. The image latents left
unscaled (HunyuanVideo 1.5) or scaled (LTX-2: the image path leaves ``scaling_factor`` out; the tiny VAE's is 0.7),
the image stretched instead of cropped, SigLIP's pre-norm states, the H.264 round trip left out, a mask on
another frame and the clip's second frame as the image each fail the comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.testing.i2v import LTX2_TINY_SCALING, make_tiny_i2v_pipeline
from cachebuild.testing.videos import clip_frames, write_video
from tests.conftest import write_image

TOLERANCE = 1e-5  # relative difference allowed against the pipeline, in fp32
WRONG = 1e-3  # each deliberate fault is far further off than this
SIZE = (32, 32)  # (W, H): the bucket, so the clip's own frames are neither resized nor cut
FRAMES = {"hunyuanvideo-1.5-i2v": "5", "ltx-2-i2v": "9"}  # 4k+1; LTX-2 8k+1
CONTROL = (48, 24)  # a condition image of another aspect ratio: HunyuanVideo 1.5 crops it, LTX-2 stretches it
ARGS = ["--resolution", "32", "--min-bucket-reso", "16", "--bucket-reso-steps", "16", "--latents", "mean"]
ARGS += ["--workers", "0", "--device", "cpu", "--dtype", "fp32", "--dtype-out", "fp32", "--quiet"]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """{name: (pipeline, cache of the clips' first frames, cache of --control images)}, and the dataset."""
    root = tmp_path_factory.mktemp("i2v-video")
    write_video(root / "data" / "walk.mkv", clip_frames(10, SIZE, seed=0))
    write_image(root / "control" / "walk.png", CONTROL, seed=1)
    out = {}
    for name, frames in FRAMES.items():
        pipe = make_tiny_i2v_pipeline(root / f"pipe-{name}", name)
        caches = []
        for extra in ([], ["--control", str(root / "control")]):
            cache = root / f"{name}-{len(extra)}"
            args = ["latents", str(root / "data"), "--model", str(pipe), "--out", str(cache), "--frames", frames]
            result = CliRunner().invoke(cli, [*args, *ARGS, *extra])
            assert result.exit_code == 0, result.output
            caches.append(cache)
        out[name] = (pipe, *caches)
    out["root"] = root
    return out


def hv15_reference(pipe_folder: Path, image, frames: int) -> dict[str, torch.Tensor]:
    """``HunyuanVideo15ImageToVideoPipeline.__call__``'s steps 1, 3, 6: the crop resize of the image to the video's
    size, ``encode_image`` and ``prepare_cond_latents_and_mask`` beside ``prepare_latents``' noise."""
    import diffusers
    import transformers

    pipe = diffusers.HunyuanVideo15ImageToVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=None, scheduler=None, text_encoder_2=None, tokenizer_2=None,
        guider=None, vae=diffusers.AutoencoderKLHunyuanVideo15.from_pretrained(pipe_folder / "vae").eval(),
        image_encoder=transformers.SiglipVisionModel.from_pretrained(pipe_folder / "image_encoder").eval(),
        feature_extractor=transformers.SiglipImageProcessor.from_pretrained(pipe_folder / "feature_extractor"),
    )  # fmt: skip
    w, h = SIZE
    cpu = torch.device("cpu")
    with torch.no_grad():
        image = pipe.video_processor.resize(image, height=h, width=w, resize_mode="crop")
        embeds = pipe.encode_image(image=image, batch_size=1, device=cpu, dtype=torch.float32)
        latents = pipe.prepare_latents(1, pipe.num_channels_latents, h, w, frames, torch.float32, cpu)
        cond, mask = pipe.prepare_cond_latents_and_mask(latents, image, 1, h, w, torch.float32, cpu)
    return {"cond_latents_concat": cond[0], "mask_concat": mask[0], "image_embeds": embeds[0]}


def ltx2_reference(pipe_folder: Path, image, frames: int, crf: int | None = None) -> dict[str, torch.Tensor]:
    """``LTX2ImageToVideoPipeline.__call__``'s H.264 round trip (the default CRF of its Gemma 3 generation) and
    preprocessing, then ``prepare_latents``: its packed latents (the image's at latent frame 0's tokens, noise after)
    and conditioning mask."""
    import diffusers
    from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf, resolve_default_image_crf

    vae = diffusers.AutoencoderKLLTX2Video.from_pretrained(pipe_folder / "vae").eval()
    pipe = diffusers.LTX2ImageToVideoPipeline(None, vae, None, None, None, None, None, None)
    w, h = SIZE
    crf = resolve_default_image_crf(None) if crf is None else crf
    if crf:
        image = Image.fromarray(apply_image_conditioning_crf(np.array(image.convert("RGB")), crf))
    pixels = pipe.video_processor.preprocess(image, height=h, width=w)
    with torch.no_grad():
        latents, mask = pipe.prepare_latents(pixels, 1, vae.config.latent_channels, h, w, frames, 0.0, torch.float32,
                                             torch.device("cpu"), torch.Generator().manual_seed(0))  # fmt: skip
    return {"latents": latents[0], "conditioning_mask": mask[0]}


def first_frame(frames: int = 1) -> Image.Image:
    return Image.fromarray(clip_frames(10, SIZE, seed=0)[frames - 1])


@pytest.mark.parametrize("which", [1, 2])  # the clip's first frame; a --control image
def test_hunyuanvideo15_conditions_equal_the_pipelines(built, which):
    pipe, cache = built["hunyuanvideo-1.5-i2v"][0], built["hunyuanvideo-1.5-i2v"][which]
    image = first_frame() if which == 1 else Image.open(built["root"] / "control" / "walk.png").convert("RGB")
    got = open_cache(cache).pipeline_inputs("walk@00000-005", family="hunyuanvideo-1.5")
    want = hv15_reference(pipe, image, 5)
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape, name
        assert relative_difference(got[name], tensor) <= TOLERANCE, name
    assert got["cond_latents_concat"].shape == (4, 2, 8, 8) and got["image_embeds"].shape == (4, 32)  # tiny


def test_hunyuanvideo15_faults_fail(built):
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    pipe, first, controlled = built["hunyuanvideo-1.5-i2v"]
    got = open_cache(first).pipeline_inputs("walk@00000-005", family="hunyuanvideo-1.5")
    want = hv15_reference(pipe, first_frame(), 5)
    unscaled = open_cache(first).record("walk@00000-005")["condition_latents"][:, 0]
    assert relative_difference(unscaled, want["cond_latents_concat"][:, 0]) > WRONG  # no * scaling_factor
    second = hv15_reference(pipe, first_frame(2), 5)["cond_latents_concat"]  # the clip's second frame
    assert relative_difference(second, got["cond_latents_concat"]) > WRONG
    every_frame = torch.ones_like(want["mask_concat"])
    assert relative_difference(every_frame, got["mask_concat"]) > WRONG
    import transformers

    siglip = transformers.SiglipVisionModel.from_pretrained(pipe / "image_encoder").eval()
    processor = transformers.SiglipImageProcessor.from_pretrained(pipe / "feature_extractor")
    with torch.no_grad():
        pixels = processor.preprocess(images=first_frame(), do_resize=True, return_tensors="pt")["pixel_values"]
        pre_norm = siglip(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][0]
    assert relative_difference(pre_norm, got["image_embeds"]) > WRONG  # before the post-layernorm
    image = Image.open(built["root"] / "control" / "walk.png").convert("RGB")
    stretched = HunyuanVideo15ImageProcessor(vae_scale_factor=16).resize(image, height=SIZE[1], width=SIZE[0])
    got = open_cache(controlled).pipeline_inputs("walk@00000-005", family="hunyuanvideo-1.5")
    assert relative_difference(hv15_reference(pipe, stretched, 5)["image_embeds"], got["image_embeds"]) > WRONG


@pytest.mark.parametrize("which", [1, 2])
def test_ltx2_conditions_equal_the_pipelines(built, which):
    pipe, cache = built["ltx-2-i2v"][0], built["ltx-2-i2v"][which]
    image = first_frame() if which == 1 else Image.open(built["root"] / "control" / "walk.png").convert("RGB")
    got = open_cache(cache).pipeline_inputs("walk@00000-009", family="ltx-2")
    want = ltx2_reference(pipe, image, 9)
    tokens = got["conditioning_mask"].sum().int()  # latent frame 0's: h * w
    assert torch.equal(got["conditioning_mask"], want["conditioning_mask"]) and tokens == 16
    assert got["init_latents"].shape == got["latents"].shape == (2 * 16, 4)  # packed like the clip's latents
    assert relative_difference(got["init_latents"][:tokens], want["latents"][:tokens]) <= TOLERANCE
    assert torch.equal(got["init_latents"][:tokens], got["init_latents"][tokens:])  # repeated over frames


def test_ltx2_faults_fail(built):
    from cachebuild.families.video_vae import normalize_clip_latents, pack_ltx2_latents

    pipe, first, _ = built["ltx-2-i2v"]
    cache = open_cache(first)
    got = cache.pipeline_inputs("walk@00000-009", family="ltx-2")["init_latents"][:16]
    want = ltx2_reference(pipe, first_frame(), 9)["latents"][:16]
    assert relative_difference(got, want) <= TOLERANCE
    scaled = pack_ltx2_latents(normalize_clip_latents(cache.record("walk@00000-009")["condition_latents"],
                                                      cache.fingerprint["vae"]))  # fmt: skip
    assert cache.fingerprint["vae"]["scaling_factor"] == LTX2_TINY_SCALING
    assert relative_difference(scaled, want) > WRONG  # the text-to-video normalisation, scaling_factor applied
    assert relative_difference(ltx2_reference(pipe, first_frame(), 9, crf=0)["latents"][:16], got) > WRONG  # no H.264
    assert relative_difference(ltx2_reference(pipe, first_frame(2), 9)["latents"][:16], got) > WRONG
