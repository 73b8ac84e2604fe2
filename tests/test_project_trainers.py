"""cachebuild build --from-musubi and --from-kohya on the dataset configs of those trainers' own docs (musubi-tuner
docs/dataset_config.md, sd-scripts docs/config_README-en.md; paths made local, resolutions scaled for tiny
models): the caches land in each trainer's layout, ignored keys are listed, unsupported ones refused by name."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from cachebuild.cli import cli
from cachebuild.consumers.reader import open_cache
from tests.conftest import write_image

MUSUBI_DOC = """\
# resolution, caption_extension, batch_size, num_repeats, enable_bucket, bucket_no_upscale should be set in either
# general or datasets
# otherwise, the default values will be used for each item

# general configurations
[general]
resolution = [96, 64]
caption_extension = ".txt"
batch_size = 1
enable_bucket = true
bucket_no_upscale = false

[[datasets]]
image_directory = "{images}"
cache_directory = "{cache}"
num_repeats = 1 # optional, default is 1. Number of times to repeat the dataset.
"""
MUSUBI_JSONL_DOC = """\
[general]
resolution = [96, 64]
batch_size = 1
enable_bucket = true
bucket_no_upscale = false

[[datasets]]
image_jsonl_file = "{images}/metadata.jsonl"
cache_directory = "{cache}" # required for metadata jsonl file
num_repeats = 1
"""
MUSUBI_VIDEO_DOC = """\
[general]
resolution = [96, 64]
caption_extension = ".txt"
batch_size = 1
enable_bucket = true
bucket_no_upscale = false

[[datasets]]
video_directory = "{images}"
cache_directory = "{cache}" # recommended to set cache directory
target_frames = [1, 25, 45]
frame_extraction = "head"
source_fps = 30.0 # optional, source fps for videos in the directory, decimal number
"""
KOHYA_DOC = """\
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 64
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{root}/hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = '{root}/fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{root}/reg'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{root}/piyo'
  metadata_file = '{root}/piyo/piyo_md.json'
"""
SIZES = [(96, 64), (64, 96), (80, 80)]


def images_with_captions(folder, n=3):
    for i in range(n):
        write_image(folder / f"im{i}.png", SIZES[i % len(SIZES)], seed=i)
        (folder / f"im{i}.txt").write_text(f"a photo of a red house number {i}")
    return folder


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from cachebuild.testing import make_tiny_text_pipeline

    return make_tiny_text_pipeline(tmp_path_factory.mktemp("models") / "qwen-image", "qwen-image")


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from cachebuild.testing import make_tiny_text_pipeline, make_tiny_vae

    path = make_tiny_text_pipeline(tmp_path_factory.mktemp("models") / "sdxl", "sdxl")
    make_tiny_vae(path / "vae")  # scaling factor 0.13025: an SDXL VAE to the kohya export
    return path


def build(*args):
    return CliRunner().invoke(cli, ["build", *map(str, args), "--device", "cpu", "--json"])


def test_musubi_docs_image_example_lands_in_cache_directory_as_musubi_names_it(tmp_path, tiny_qwen):
    images, cache = images_with_captions(tmp_path / "image_dir"), tmp_path / "cache_directory"
    config = tmp_path / "dataset.toml"
    config.write_text(MUSUBI_DOC.format(images=images, cache=cache))
    result = build("--from-musubi", config, "--arch", "qi", "--model", tiny_qwen, "--out", tmp_path / "cb")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["notes"] == ["ignored batch_size, num_repeats: training-time settings, nothing a cache stores"]
    names = sorted(p.name for p in cache.iterdir())
    assert names == [
        "im0_0096x0064_qi.safetensors",
        "im0_qi_te.safetensors",
        "im1_0064x0096_qi.safetensors",
        "im1_qi_te.safetensors",
        "im2_0080x0080_qi.safetensors",
        "im2_qi_te.safetensors",
    ]
    with safe_open(str(cache / "im0_0096x0064_qi.safetensors"), "pt") as f:
        assert list(f.keys())[0].startswith("latents_1x") and f.keys()[0].endswith("_bfloat16")
        assert f.metadata()["architecture"] == "qwen_image"
    with safe_open(str(cache / "im0_qi_te.safetensors"), "pt") as f:
        assert f.metadata()["caption1"] == "a photo of a red house number 0"
    fp = open_cache(tmp_path / "cb" / "musubi-qi" / "1-image_dir").fingerprint
    assert fp["buckets"]["rule"] == "musubi" and fp["latents"] == "mean" and fp["exif"] == "ignore"


MUSUBI_REFUSED = [  # (config, edit, the key named, its line)
    (MUSUBI_JSONL_DOC, None, "'image_jsonl_file'", 8),
    (MUSUBI_VIDEO_DOC, None, "'video_directory'", 9),
    (MUSUBI_DOC, ("enable_bucket = true", "enable_bucket = false"), "'enable_bucket'", 10),
    (MUSUBI_DOC, ('caption_extension = ".txt"\n', ""), "'caption_extension'", 12),
    (MUSUBI_DOC, ("bucket_no_upscale", "bucket_no_upscal"), "unknown key 'bucket_no_upscal'", 11),
]


@pytest.mark.parametrize("text, edit, named, line", MUSUBI_REFUSED, ids=[r[2] for r in MUSUBI_REFUSED])
def test_musubi_keys_cachebuild_cannot_honour_are_refused_by_name(tmp_path, text, edit, named, line):
    images = images_with_captions(tmp_path / "image_dir", 1)
    text = text.format(images=images, cache=tmp_path / "cache")
    config = tmp_path / "dataset.toml"
    config.write_text(text.replace(*edit) if edit else text)
    result = build("--from-musubi", config, "--arch", "qi")
    assert result.exit_code == 2, result.output
    assert named in result.output and f"dataset.toml:{line}:" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "cachebuild-cache").exists()


def test_musubi_arch_without_a_layout_is_refused(tmp_path):
    config = tmp_path / "dataset.toml"
    config.write_text(MUSUBI_DOC.format(images=tmp_path, cache=tmp_path / "cache"))
    result = build("--from-musubi", config, "--arch", "wan")
    assert result.exit_code == 2 and "--arch" in result.output and "wan is not one of them" in result.output


def test_kohya_docs_example_caches_beside_the_images(tmp_path, tiny_sdxl):
    for name in ("hoge", "fuga", "reg"):
        images_with_captions(tmp_path / name, 2)
    config = tmp_path / "dataset_config.toml"
    config.write_text(KOHYA_DOC.format(root=tmp_path))
    result = build("--from-kohya", config, "--model", tiny_sdxl)
    assert result.exit_code == 2, result.output  # the docs' fine-tuning dataset: metadata is not caption files
    assert "dataset_config.toml:35: 'metadata_file'" in result.output

    config.write_text(KOHYA_DOC.split("# This is a fine-tuning dataset")[0].format(root=tmp_path))
    result = build("--from-kohya", config, "--model", tiny_sdxl)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for name in ("hoge", "fuga", "reg"):
        assert sorted(p.name for p in (tmp_path / name).glob("*.npz")) == [
            "im0_0096x0064_sdxl.npz",  # resolution 64 without buckets: one 64x64 bucket, named by the image's size
            "im1_0064x0096_sdxl.npz",
        ]
    notes = " ".join(summary["notes"])
    assert "text outputs not cached (shuffle_caption)" in notes  # sd-scripts refuses to cache them too
    assert "ignored keep_tokens" in notes and "ignored batch_size" in notes
    assert [e["summary"]["written"] for e in summary["exports"]] == [2, 2, 2]

    # the same subset without caption shuffling: its text outputs are cached too, in sd-scripts' file
    config.write_text(
        KOHYA_DOC.split("  [[datasets.subsets]]\n  image_dir = '{root}/fuga'")[0]
        .replace("shuffle_caption = true", "shuffle_caption = false")
        .format(root=tmp_path)
    )
    result = build("--from-kohya", config, "--model", tiny_sdxl)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "hoge").glob("*_te_outputs.npz")) == [
        "im0_te_outputs.npz",
        "im1_te_outputs.npz",
    ]


KOHYA_REFUSED = [  # (edit to the docs example's first dataset, the key named)
    ("keep_tokens = 2", "keep_tokens = 2\nrandom_crop = true", "'random_crop'"),
    ("keep_tokens = 2", "keep_tokens = 2\ncolor_aug = true", "'color_aug'"),
    ("keep_tokens = 2", "keep_tokens = 2\nresize_interpolation = 'area'", "'resize_interpolation'"),
    ("resolution = 64", "resolution = [64, 96]", "'enable_bucket'"),
    ("shuffle_caption = true", "shuffle_caption = false", "'class_tokens'"),  # an image with no caption file
    ("keep_tokens = 2", "keep_tokens = 2\nkeep_token = 2", "unknown key 'keep_token'"),
]


@pytest.mark.parametrize("old, new, named", KOHYA_REFUSED, ids=[r[2] for r in KOHYA_REFUSED])
def test_kohya_keys_cachebuild_cannot_honour_are_refused_by_name(tmp_path, old, new, named):
    for name in ("hoge", "fuga", "reg"):
        images_with_captions(tmp_path / name, 2)
    (tmp_path / "hoge" / "im1.txt").unlink()  # class_tokens would stand in for its caption
    config = tmp_path / "dataset_config.toml"
    config.write_text(KOHYA_DOC.split("# This is a fine-tuning dataset")[0].replace(old, new, 1).format(root=tmp_path))
    result = build("--from-kohya", config, "--model", "sdxl")
    assert result.exit_code == 2, result.output
    assert named in result.output and "dataset_config.toml:" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "cachebuild-cache").exists()
