"""Qwen-Image-Edit-2509: `cachebuild textenc --control` against QwenImageEditPlusPipeline, in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.families import qwenimage_edit as edit
from cachebuild.families import qwenimage_edit_plus as plus
from cachebuild.testing import make_tiny_qwen_edit_pipeline
from tests.conftest import write_image
from tests.test_parity_qwenimage_edit import relative_difference, textenc_args

CAPTIONS = {"a": "make the cat red", "b": "add a {hat}"}
IMAGES = {"a": ((40, 56), 0), "b": ((64, 48), 1)}
INIT_SCALE = 10.0
TOLERANCE = 1e-5
CPU = torch.device("cpu")
AREAS = (plus.CONDITION_AREA, plus.VAE_AREA)  # 384 * 384 and 1024 * 1024; the tests use smaller ones, the
TEST_AREAS = (48 * 48, 96 * 96)  # processor's picture smaller than the VAE's as in the pipeline


@pytest.fixture(scope="module", autouse=True)
def small_areas():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plus, "CONDITION_AREA", TEST_AREAS[0])
        patch.setattr(plus, "VAE_AREA", TEST_AREAS[1])
        yield


def reference_pipeline(root: Path):
    import diffusers
    import transformers

    return diffusers.QwenImageEditPlusPipeline(
        scheduler=None,
        vae=diffusers.AutoencoderKLQwenImage.from_pretrained(root / "vae").eval(),
        text_encoder=transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder").eval(),
        tokenizer=transformers.Qwen2Tokenizer.from_pretrained(root / "tokenizer"),
        processor=edit.load_processor(root / "processor"),
        transformer=None,
    )


def reference(pipe, text: str, image_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (T, D), image_latents packed (tokens, 4C)) as ``__call__`` builds them for one image."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
    from PIL import Image

    img = Image.open(image_path).convert("RGB")
    cw, ch = calculate_dimensions(TEST_AREAS[0], img.size[0] / img.size[1])
    vw, vh = calculate_dimensions(TEST_AREAS[1], img.size[0] / img.size[1])
    condition_images = [pipe.image_processor.resize(img, ch, cw)]
    vae_images = [pipe.image_processor.preprocess(img, vh, vw).unsqueeze(2)]
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(text, image=condition_images, device=CPU)
        _, packed = pipe.prepare_latents(vae_images, 1, 4, vh, vw, torch.float32, CPU, None)
    assert mask is None
    return embeds[0], packed[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-image-edit-plus")
    pipe = make_tiny_qwen_edit_pipeline(root / "pipe", init_scale=INIT_SCALE, cls="QwenImageEditPlusPipeline")
    data, control, out = root / "data", root / "control", root / "cache"
    data.mkdir()
    for key, text in CAPTIONS.items():
        (data / f"{key}.txt").write_text(text, encoding="utf-8")
        write_image(control / f"{key}.png", IMAGES[key][0], seed=IMAGES[key][1])
    result = CliRunner().invoke(cli, textenc_args(data, pipe, out, control))
    assert result.exit_code == 0, result.output
    latents = ["latents", str(control), "--model", str(pipe), "--out", str(out), "--device", "cpu", "--quiet"]
    latents += ["--resolution", "64", "--min-bucket-reso", "32", "--bucket-reso-steps", "16", "--workers", "0"]
    result = CliRunner().invoke(cli, latents)  # the reader opens a cache by its latents store
    assert result.exit_code == 0, result.output
    return pipe, control, out


def test_prompt_embeds_and_image_latents_equal_the_plus_pipeline(built):
    from cachebuild.families.qwenimage import pack_latents

    pipe_folder, control, out = built
    pipe = reference_pipeline(pipe_folder)
    cache = open_cache(out)
    for key, text in CAPTIONS.items():
        got = cache.pipeline_inputs(key)
        embeds, packed = reference(pipe, text, control / f"{key}.png")
        assert got["prompt_embeds"].shape == embeds.shape and embeds.shape[0] > 30, key
        assert relative_difference(got["prompt_embeds"], embeds) <= TOLERANCE, key
        tokens = pack_latents(got["image_latents"].transpose(0, 1)[None])[0]
        assert tokens.shape == packed.shape, key
        assert relative_difference(tokens, packed) <= TOLERANCE, key


def test_the_edit_pipelines_template_or_sizes_would_fail(built):
    pipe_folder, control, out = built
    pipe = reference_pipeline(pipe_folder)
    got = open_cache(out).pipeline_inputs("a")
    processor = edit.load_processor(pipe_folder / "processor")
    vl, pixels = plus.pictures(control / "a.png")
    as_edit = edit.encode(pipe.text_encoder, processor, CAPTIONS["a"], vl, CPU)  # no "Picture 1: " prefix
    assert as_edit.shape != got["prompt_embeds"].shape or relative_difference(as_edit, got["prompt_embeds"]) > 1e-2
    edit_vl, edit_pixels = edit.pictures(control / "a.png")  # one size for both (monkeypatched edit area unset)
    assert edit_vl.size != vl.size and edit_pixels.shape != pixels.shape


def test_found_by_preset_and_class_with_its_fields(built, tmp_path):
    from cachebuild.cache.manifest import Manifest
    from cachebuild.config import PRESETS, DType, TextFamily
    from cachebuild.families.text import _detect_family, stored_dtype

    pipe_folder, _, out = built
    assert AREAS == (384 * 384, 1024 * 1024)
    assert PRESETS["qwen-image-edit-2509"] == "Qwen/Qwen-Image-Edit-2509"
    assert _detect_family("qwen-image-edit-2509", pipe_folder) is TextFamily.QWENIMAGE_EDIT_PLUS
    assert _detect_family(str(pipe_folder), pipe_folder) is TextFamily.QWENIMAGE_EDIT_PLUS
    assert stored_dtype(TextFamily.QWENIMAGE_EDIT_PLUS) is DType.BF16
    with Manifest.open(out, create=False) as manifest:
        fingerprint = manifest.fingerprint("textenc")
    (encoder,) = fingerprint["encoders"]
    assert encoder["prompt_template"] == plus.TEMPLATE and "Picture 1: <|vision_start|>" in plus.TEMPLATE
    assert fingerprint["control_image"]["area"] == TEST_AREAS[0]
    assert fingerprint["control_image"]["vae_area"] == TEST_AREAS[1]
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code == 0
