"""Qwen-Image-Edit: `cachebuild textenc --control` against QwenImageEditPipeline.encode_prompt, in fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.families import qwenimage_edit as edit
from cachebuild.testing import make_tiny_qwen_edit_pipeline
from tests.conftest import write_image

CAPTIONS = {"a": "make the cat red", "b": "add a {hat}", "c": "make the cat red", "d": "make the cat red"}
IMAGES = {"a": ((40, 56), 0), "b": ((64, 48), 1), "c": ((40, 56), 2), "d": ((40, 56), 0)}  # (size, seed): c is
# a's caption with another image, d a's caption and image
INIT_SCALE = 10.0
TOLERANCE = 1e-5
CPU = torch.device("cpu")
PIPELINE_AREA = edit.CONDITION_AREA  # 1024 * 1024; the tests resize to TEST_AREA: the tiny VAE on a megapixel
TEST_AREA = 96 * 96  # image takes a minute on a CPU, and the steps are the same at any area


@pytest.fixture(scope="module", autouse=True)
def small_condition_area():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(edit, "CONDITION_AREA", TEST_AREA)
        yield


def calculate_dimensions(width: int, height: int) -> tuple[int, int]:
    """The pipeline's own function at the tests' area: (width, height)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    w, h, _ = calculate_dimensions(TEST_AREA, width / height)
    return w, h


def test_the_condition_size_is_the_pipelines():
    import inspect

    from diffusers import QwenImageEditPipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions as pipeline_dimensions

    assert PIPELINE_AREA == 1024 * 1024
    assert "calculate_dimensions(1024 * 1024, image_size[0] / image_size[1])" in inspect.getsource(
        QwenImageEditPipeline.__call__
    )
    for size in [(1920, 1080), (40, 56), (1000, 1000), (512, 2048)]:
        assert edit.condition_size(*size) == calculate_dimensions(*size)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(edit, "CONDITION_AREA", PIPELINE_AREA)
            assert edit.condition_size(*size) == pipeline_dimensions(PIPELINE_AREA, size[0] / size[1])[:2]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def reference_pipeline(root: Path):
    """QwenImageEditPipeline with its text encoder, tokenizer and processor (the processor as cachebuild loads
    it: ``Qwen2VLProcessor.from_pretrained`` needs torchvision for its video half)."""
    import diffusers
    import transformers

    return diffusers.QwenImageEditPipeline(
        scheduler=None,
        vae=None,
        text_encoder=transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder").eval(),
        tokenizer=transformers.Qwen2Tokenizer.from_pretrained(root / "tokenizer"),
        processor=edit.load_processor(root / "processor"),
        transformer=None,
    )


def encode_prompt(pipe, text: str, image_path: Path | None) -> torch.Tensor:
    """(T, D): the pipeline's prompt_embeds for one caption, the image resized as ``__call__`` resizes it."""
    from PIL import Image

    image = None
    if image_path is not None:
        img = Image.open(image_path).convert("RGB")
        w, h = calculate_dimensions(*img.size)
        image = pipe.image_processor.resize(img, h, w)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(text, image=image, device=CPU)
    assert mask is None  # one prompt: nothing padded
    return embeds[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-image-edit")
    pipe = make_tiny_qwen_edit_pipeline(root / "pipe", init_scale=INIT_SCALE)
    data, control, out = root / "data", root / "control", root / "cache"
    data.mkdir()
    for key, text in CAPTIONS.items():
        (data / f"{key}.txt").write_text(text, encoding="utf-8")
        size, seed = IMAGES[key]
        write_image(control / f"{key}.png", size, seed=seed)
    result = CliRunner().invoke(cli, textenc_args(data, pipe, out, control))
    assert result.exit_code == 0, result.output
    # the reader opens a cache by its latents store; these are the control images' (not checked here)
    latents = ["latents", str(control), "--model", str(pipe), "--out", str(out), "--device", "cpu", "--quiet"]
    latents += ["--resolution", "64", "--min-bucket-reso", "32", "--bucket-reso-steps", "16", "--workers", "0"]
    result = CliRunner().invoke(cli, latents)
    assert result.exit_code == 0, result.output
    return pipe, data, control, out


def textenc_args(data, pipe, out, control) -> list[str]:
    args = ["textenc", str(data), "--model", str(pipe), "--out", str(out), "--device", "cpu"]
    return args + ["--control", str(control), "--dtype", "fp32", "--dtype-out", "fp32", "--quiet"]


def test_pipeline_inputs_equal_the_edit_pipeline(built):
    pipe_folder, _, control, out = built
    pipe = reference_pipeline(pipe_folder)
    cache = open_cache(out)
    for key, text in CAPTIONS.items():
        got = cache.pipeline_inputs(key)
        want = encode_prompt(pipe, text, control / f"{key}.png")
        assert got["prompt_embeds"].shape == want.shape, key
        assert want.shape[0] > 100  # the image's tokens are in the rows
        assert relative_difference(got["prompt_embeds"], want) <= TOLERANCE, key
        assert torch.equal(got["prompt_embeds_mask"], torch.ones(want.shape[0], dtype=torch.long))


def test_a_missing_image_or_a_wrong_drop_would_fail(built):
    pipe_folder, _, control, out = built
    pipe = reference_pipeline(pipe_folder)
    got = open_cache(out).pipeline_inputs("a")["prompt_embeds"]
    other = encode_prompt(pipe, CAPTIONS["a"], control / "c.png")  # same caption, another image
    assert relative_difference(got, other) > 1e-2
    processor = edit.load_processor(pipe_folder / "processor")
    with pytest.raises(ValueError, match="no images"):  # the template's image slot cannot go without an image
        processor(text=[edit.TEMPLATE.format(CAPTIONS["a"])], images=None, padding=True, return_tensors="pt")
    image = edit.condition_image(control / "a.png")
    full = edit.encode(pipe.text_encoder, processor, CAPTIONS["a"], image, CPU)
    assert torch.allclose(full, got, rtol=1e-5, atol=1e-6)
    inputs = processor(text=[edit.TEMPLATE.format(CAPTIONS["a"])], images=image, return_tensors="pt")
    with torch.no_grad():
        names = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
        h = pipe.text_encoder(**{k: inputs[k] for k in names}, output_hidden_states=True).hidden_states[-1][0]
    assert torch.allclose(h[64:], full, rtol=1e-5, atol=1e-6)
    assert h[34:].shape != got.shape  # Qwen-Image's drop of 34 keeps 30 more template rows


def test_identical_pairs_dedupe_and_a_changed_image_reencodes(built, tmp_path):
    pipe_folder, data, control, out = built
    cache = open_cache(out)
    ids = {k: cache._text[k][1] for k in CAPTIONS}  # (shard, text id, tokens)
    assert ids["a"] == ids["d"] and len(set(ids.values())) == 3  # a and c: one caption, two images
    write_image(control / "b.png", (64, 48), seed=7)
    result = CliRunner().invoke(cli, [*textenc_args(data, pipe_folder, out, control), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["changed"] == 1
    want = encode_prompt(reference_pipeline(pipe_folder), CAPTIONS["b"], control / "b.png")
    assert relative_difference(open_cache(out).pipeline_inputs("b")["prompt_embeds"], want) <= TOLERANCE


def test_no_control_folder_is_one_clear_error(built, tmp_path):
    pipe_folder, data, _, _ = built
    args = ["textenc", str(data), "--model", str(pipe_folder), "--out", str(tmp_path / "c"), "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "--control" in result.output


def test_found_by_preset_and_class_stored_in_bf16_with_its_fields(built, tmp_path):
    from cachebuild.cache.manifest import Manifest
    from cachebuild.config import PRESETS, DType, TextFamily
    from cachebuild.families.text import _detect_family, stored_dtype

    pipe_folder, data, control, _ = built
    assert PRESETS["qwen-image-edit"] == "Qwen/Qwen-Image-Edit"
    assert _detect_family("qwen-image-edit", pipe_folder) is TextFamily.QWENIMAGE_EDIT
    assert _detect_family(str(pipe_folder), pipe_folder) is TextFamily.QWENIMAGE_EDIT  # model_index.json's class
    assert stored_dtype(TextFamily.QWENIMAGE_EDIT) is DType.BF16
    out = tmp_path / "cache"
    args = ["textenc", str(data), "--model", str(pipe_folder), "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--control", str(control), "--dtype", "fp32", "--quiet"])
    assert result.exit_code == 0, result.output
    with Manifest.open(out, create=False) as manifest:
        fingerprint = manifest.fingerprint("textenc")
    assert fingerprint["dtype_out"] == "bf16" and fingerprint["family"] == "qwen-image-edit"
    (encoder,) = fingerprint["encoders"]
    assert encoder["prompt_template"] == edit.TEMPLATE and encoder["drop_rows"] == edit.DROP == 64
    assert encoder["attention_mask"] and not encoder["trim"] and encoder["max_length"] == 0
    assert fingerprint["control_image"]["area"] == TEST_AREA and fingerprint["control_image"]["multiple"] == 32
    assert len(fingerprint["control_image"]["vae_weights_sha256"]) == 64
    assert fingerprint["extra_tensors"] == ["control_latents"]


def test_an_item_without_its_condition_image_fails_with_the_reason(built, tmp_path):
    from cachebuild.cache.manifest import Manifest

    pipe_folder, data, control, _ = built
    partial = tmp_path / "control"
    partial.mkdir()
    (partial / "a.png").write_bytes((control / "a.png").read_bytes())
    out = tmp_path / "cache"
    result = CliRunner().invoke(cli, textenc_args(data, pipe_folder, out, partial))
    with Manifest.open(out, create=False) as manifest:
        failed = {row.key: row.reason for row in manifest.items("textenc", "failed")}
        done = [row.key for row in manifest.items("textenc", "done")]
    assert done == ["a"], result.output
    assert set(failed) == {"b", "c", "d"} and all("--control" in why for why in failed.values())


def test_image_latents_equal_the_pipelines(built):
    """``image_latents`` as ``__call__`` makes them: resize to calculate_dimensions, preprocess, one frame,
    ``_encode_vae_image``; packed by prepare_latents into the tokens the transformer gets."""
    import diffusers
    from PIL import Image

    from cachebuild.families.qwenimage import pack_latents

    pipe_folder, _, control, out = built
    vae = diffusers.AutoencoderKLQwenImage.from_pretrained(pipe_folder / "vae").eval()
    pipe = diffusers.QwenImageEditPipeline(
        scheduler=None, vae=vae, text_encoder=None, tokenizer=None, processor=None, transformer=None
    )
    cache = open_cache(out)
    for key in CAPTIONS:
        img = Image.open(control / f"{key}.png").convert("RGB")
        w, h = calculate_dimensions(*img.size)
        image = pipe.image_processor.preprocess(pipe.image_processor.resize(img, h, w), h, w).unsqueeze(2)
        with torch.no_grad():
            want = pipe._encode_vae_image(image, generator=None)[0]  # (C, 1, h/8, w/8)
            _, packed = pipe.prepare_latents(image, 1, 4, h, w, torch.float32, CPU, None)
        got = cache.pipeline_inputs(key)["image_latents"]
        factor = pipe.vae_scale_factor  # 2 for the tiny VAE, 8 for the real one
        assert got.shape == want.shape == (4, 1, h // factor, w // factor), key
        assert relative_difference(got, want) <= TOLERANCE, key
        assert relative_difference(pack_latents(got.transpose(0, 1)[None]), packed) <= TOLERANCE


def test_verify_accepts_the_cache(built):
    pipe_folder, _, _, out = built
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 0, result.output
    from cachebuild.consumers.verify import _expected

    with_rows = _expected("textenc", {"encoders": [{"name": "qwen25vl", "hidden": True, "max_length": 0}],
                                      "extra_tensors": ["control_latents"]}, {"tokens": {"qwen25vl": 308}})  # fmt: skip
    assert with_rows["qwen25vl"][0] == 308 and with_rows["control_latents"] is None


def test_control_with_another_family_is_one_clear_error(tmp_path):
    from cachebuild.testing import make_tiny_text_pipeline

    pipe = make_tiny_text_pipeline(tmp_path / "pipe", "qwen-image")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("a cat")
    (tmp_path / "control").mkdir()
    result = CliRunner().invoke(cli, textenc_args(tmp_path / "data", pipe, tmp_path / "out", tmp_path / "control"))
    assert result.exit_code == 2
    assert "--control is for the qwen-image-edit families" in result.output


def test_an_undecodable_condition_image_fails_its_item(built, tmp_path):
    from cachebuild.cache.manifest import Manifest

    pipe_folder, data, control, _ = built
    broken = tmp_path / "control"
    broken.mkdir()
    for key in CAPTIONS:
        (broken / f"{key}.png").write_bytes((control / f"{key}.png").read_bytes() if key != "b" else b"not a png")
    out = tmp_path / "cache"
    CliRunner().invoke(cli, textenc_args(data, pipe_folder, out, broken))
    with Manifest.open(out, create=False) as manifest:
        failed = {row.key: row.reason for row in manifest.items("textenc", "failed")}
    assert list(failed) == ["b"] and "condition image" in failed["b"] and "cannot be read" in failed["b"]


def test_out_of_memory_on_one_pair_fails_that_pair_with_the_fix(built, tmp_path, monkeypatch):
    """One (caption, image) pair is the smallest unit: running out of memory on it fails its items with the
    option that helps, and the run goes on with the others."""
    from cachebuild.cache.manifest import Manifest
    from cachebuild.families import qwenimage_edit

    pipe_folder, data, control, _ = built
    real = qwenimage_edit.encode

    def short_of_memory(model, processor, text, *args, **kwargs):
        if "hat" in text:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, processor, text, *args, **kwargs)

    monkeypatch.setattr(qwenimage_edit, "encode", short_of_memory)
    out = tmp_path / "cache"
    result = CliRunner().invoke(cli, textenc_args(data, pipe_folder, out, control))
    assert result.exit_code == 3, result.output  # some items failed
    with Manifest.open(out, create=False) as manifest:
        failed = {row.key: row.reason for row in manifest.items("textenc", "failed")}
        done = sorted(row.key for row in manifest.items("textenc", "done"))
    assert done == ["a", "c", "d"] and list(failed) == ["b"] and "--offload always" in failed["b"]


def test_the_encoder_is_read_once_however_many_pages(built, tmp_path, monkeypatch):
    """One page per caption: the encoder (and the VAE) are still read from disk once for the run."""
    from cachebuild.jobs import textenc
    from tests.test_textenc import count_loads

    pipe_folder, data, control, _ = built
    few = tmp_path / "data"
    few.mkdir()
    for key in ("a", "b", "d"):  # a and d: one caption and image, encoded once
        (few / f"{key}.txt").write_text(CAPTIONS[key], encoding="utf-8")
    monkeypatch.setattr(textenc, "TEXT_CHUNK_CAPTIONS", 1)
    loads = count_loads(monkeypatch)
    result = CliRunner().invoke(cli, [*textenc_args(few, pipe_folder, tmp_path / "c", control), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["done"] == 3 and summary["model_loads"] == 2 and loads == ["text_encoder"]
