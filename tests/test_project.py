"""cachebuild build on a project file: caches of one dataset decoded once and equal to separate runs, a stop
between batches that the next build resumes, models kept between builds, and every bad key or value refused in
one line that names it and its line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachebuild.cli import cli
from cachebuild.consumers.reader import open_cache
from cachebuild.jobs.latents import build_latents
from cachebuild.keep import ModelKeeper
from cachebuild.project.build import build_project
from cachebuild.project.shared import Interrupted
from cachebuild.project.spec import load_project
from tests.conftest import write_image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

PROJECT = """\
workers = 0
device = "cpu"

[[dataset]]
name = "photos"
path = "{dataset}"
resolution = 64
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
alpha_mask = true

[[target]]
name = "mean"
vae = "{vae}"
latents = "mean"

[[target]]
name = "sample"
vae = "{vae}"
flip_aug = true
seed = 3
"""


def write_project(folder: Path, dataset: Path, vae: Path, text: str = PROJECT) -> Path:
    path = folder / "cachebuild.toml"
    path.write_text(text.format(dataset=dataset, vae=vae))
    return path


def assert_same_tensors(a: Path, b: Path) -> None:
    ra, rb = open_cache(a), open_cache(b)
    assert ra.keys() == rb.keys()
    for key in ra:
        ta, tb = ra.tensors(key), rb.tensors(key)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[name], tb[name]) for name in ta), key


def test_two_targets_decode_each_image_once_and_equal_separate_runs(tmp_path, tiny_vae, dataset):
    write_image(dataset / "img000.png", (160, 96), seed=0, mode="RGBA")  # alpha masks travel with their pixels
    project_file = write_project(tmp_path, dataset, tiny_vae)
    result = CliRunner().invoke(cli, ["build", str(project_file), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["shared"] == [{"caches": ["mean/photos", "sample/photos"], "decoded": 8, "fed": 16}]
    assert "alpha_mask" in open_cache(tmp_path / "cache" / "mean" / "photos").tensors("img000")
    project = load_project(project_file)
    alone = [dataclasses.replace(c.latents, out=tmp_path / "alone" / c.target) for c in project.caches]
    for cfg, cache in zip(alone, project.caches, strict=True):
        build_latents(cfg)
        assert_same_tensors(cache.out, cfg.out)

    # pending items that differ: "mean" already has new1, both need new2; each gets exactly its own
    write_image(dataset / "new1.png", (96, 64), seed=21)
    build_latents(project.caches[0].latents)
    write_image(dataset / "new2.png", (64, 96), seed=22)
    summary = build_project(project)
    assert summary.shared == [{"caches": ["mean/photos", "sample/photos"], "decoded": 2, "fed": 3}]
    assert [c.latents.encoded for c in summary.caches] == [1, 2]
    for cfg, cache in zip(alone, project.caches, strict=True):
        build_latents(cfg)
        assert_same_tensors(cache.out, cfg.out)


def test_a_stop_between_batches_keeps_committed_work_and_the_next_build_finishes(tmp_path, tiny_vae, dataset):
    project = load_project(write_project(tmp_path, dataset, tiny_vae, PROJECT))
    project = dataclasses.replace(
        project,
        caches=tuple(
            dataclasses.replace(c, latents=dataclasses.replace(c.latents, batch_size=1, shard_mb=1e-6))
            for c in project.caches
        ),
    )  # one image per batch and per shard: a stop after three batches leaves three committed
    calls = []
    with pytest.raises(Interrupted):
        build_project(project, stop=lambda: calls.append(1) or len(calls) >= 3)
    done = [open_cache(c.out).keys() for c in project.caches]
    assert all(0 < len(keys) < 8 for keys in done), done
    summary = build_project(project)
    assert [c.latents.encoded for c in summary.caches] == [8 - len(k) for k in done]
    reference = dataclasses.replace(project.caches[1].latents, out=tmp_path / "reference")
    build_latents(reference)
    assert_same_tensors(project.caches[1].out, reference.out)


def test_kept_models_load_once_across_builds(tmp_path, tiny_vae, dataset):
    project = load_project(write_project(tmp_path, dataset, tiny_vae))
    keeper = ModelKeeper(budget_bytes=2**30)
    build_project(project, keeper=keeper)
    write_image(dataset / "late.png", (80, 80), seed=5)
    summary = build_project(project, keeper=keeper)
    assert [c.latents.encoded for c in summary.caches] == [1, 1]
    assert keeper.loads == 2 and len(keeper) == 2  # one VAE per target, loaded by the first build only
    assert keeper.release_idle(3600.0) == 0 and keeper.release_all() == 2
    fresh = tuple(
        dataclasses.replace(c, latents=dataclasses.replace(c.latents, out=tmp_path / "fresh" / c.target))
        for c in project.caches
    )
    tiny = ModelKeeper(budget_bytes=1)  # no room: each model loaded releases the one before
    build_project(dataclasses.replace(project, caches=fresh), keeper=tiny)
    assert tiny.loads == 2 and len(tiny) == 1


BAD = [  # (edit to the project file, line, words the message must hold)
    (("resolution = 64", "resolutoin = 64"), 7, ["unknown key 'resolutoin'", "did you mean 'resolution'"]),
    (("resolution = 64", 'resolution = "64px"'), 7, ["'resolution' takes a whole number", '"64px"']),
    (('latents = "mean"', 'latents = "meen"'), 16, ["'latents' takes one of", '"mean"']),
    (("bucket_reso_steps = 32", "bucket_reso_steps = 48"), 8, ["min_bucket_reso", "bucket_reso_steps (48)"]),
    (('[[target]]\nname = "sample"', '[[targte]]\nname = "sample"'), 18, ["unknown key 'targte'"]),
    (("seed = 3", "seed = 3\n[target.text]\nbatch_sise = 2"), 24, ["unknown key 'batch_sise' in [target.text]"]),
    (("workers = 0", "workers = -1"), 1, ["workers must be 0"]),
]


@pytest.mark.parametrize("edit, line, words", BAD, ids=[b[2][0][:30] for b in BAD])
def test_bad_keys_and_values_are_refused_in_one_line_naming_the_key_and_its_line(
    tmp_path, tiny_vae, dataset, edit, line, words
):
    text = PROJECT.replace(*edit)
    project_file = write_project(tmp_path, dataset, tiny_vae, text)
    result = CliRunner().invoke(cli, ["build", str(project_file)])
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.count("\n") == 0 and "Traceback" not in message, message
    assert f"cachebuild.toml:{line}:" in message, message
    assert all(w in message for w in words), message
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_the_documented_example_builds_on_examples(tmp_path):
    """examples/cachebuild.toml, with the tiny models its comments say to make, next to examples/dataset."""
    from cachebuild.testing import make_tiny_text_pipeline, make_tiny_vae

    shutil.copy(EXAMPLES / "cachebuild.toml", tmp_path)
    (tmp_path / "dataset").symlink_to(EXAMPLES / "dataset")
    make_tiny_vae(tmp_path / "tiny-vae")
    make_tiny_text_pipeline(tmp_path / "tiny-sdxl", "sdxl")
    make_tiny_text_pipeline(tmp_path / "tiny-qwen-image", "qwen-image")
    result = CliRunner().invoke(cli, ["build", str(tmp_path / "cachebuild.toml"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["shared"][0]["decoded"] == 12 and summary["shared"][0]["fed"] == 24
    assert [e["format"] for e in summary["exports"]] == ["musubi", "webdataset"]
    assert (tmp_path / "cache" / "musubi" / "photos" / "lake-640x480_0640x0480_qi.safetensors").is_file()
    assert summary["notes"] == []


@pytest.mark.gpu
def test_shared_decode_on_a_gpu_equals_separate_runs_and_leaves_no_model_behind(tmp_path, tiny_vae, dataset):
    text = PROJECT.replace('device = "cpu"', 'device = "cuda"').replace("workers = 0", "workers = 0\nbatch_size = 4")
    project = load_project(write_project(tmp_path, dataset, tiny_vae, text))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    summary = build_project(project)
    assert summary.shared == [{"caches": ["mean/photos", "sample/photos"], "decoded": 8, "fed": 16}]
    assert torch.cuda.memory_allocated() == before  # both VAEs and the staged batches are gone
    for cache in project.caches:  # the same batches as alone (one batch size for both): the same tensors
        alone = dataclasses.replace(cache.latents, out=tmp_path / "alone" / cache.target)
        build_latents(alone)
        assert_same_tensors(cache.out, alone.out)
