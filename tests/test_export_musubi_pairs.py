"""musubi export of the image-pair architectures: FLUX.1 Kontext (``fk``: latents and condition latents from
``cachebuild latents --control``, Flux.1 text) and Qwen-Image-Edit (``qie``: the condition latents kept with its
text). The files load by musubi-tuner's rules (tests/test_export_musubi.py restates them, its collation too) and
hold the pipeline's tensors under musubi's names and dtypes; what musubi's trainer would read differently is
refused."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from cachebuild import open_cache
from cachebuild.cache.manifest import CONTROL, Manifest
from cachebuild.cli import cli
from cachebuild.consumers.export.musubi import ARCHS, export_musubi
from cachebuild.consumers.export.musubi_pairs import check_pairs
from cachebuild.errors import ConfigError
from cachebuild.families import flux_kontext
from cachebuild.families import qwenimage_edit as edit
from cachebuild.testing import make_tiny_qwen_edit_pipeline
from tests.conftest import write_image
from tests.test_export_musubi import items_of, musubi_load
from tests.test_parity_flux_kontext import IMAGES

SIZES = {"a": (32, 32), "b": (32, 32), "c": (16, 64)}  # Qwen-Image-Edit's targets: their own buckets
CONTROLS = {"a": (48, 32), "b": (32, 40), "c": (40, 40)}
COMMON = ["--device", "cpu", "--dtype", "fp32", "--quiet"]
MUSUBI = ["--buckets", "musubi", "--resolution", "32", "--workers", "0"]


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def test_kontext_files_load_by_musubis_rules_and_hold_the_pipelines_tensors(kontext_cache, tmp_path):
    _, _, _, cache = kontext_cache
    folder = tmp_path / "musubi"
    summary = export_musubi(cache, folder)  # fk: told by the cache
    assert summary.family == "fk" and summary.written == 6 and not summary.skipped, summary
    assert any("posterior mean" in w and "sample" in w for w in summary.warnings)  # --latents mean: said
    assert any("condition latents are the pipeline's" in w for w in summary.warnings)
    reader = open_cache(cache)
    loaded = items_of(musubi_load(folder, "fk", resolution=(32, 32)))
    assert sorted(loaded) == sorted(IMAGES)
    for key, item in loaded.items():
        want = reader.pipeline_inputs(key)
        c, h, w = want["latents"].shape
        assert item["latents:key"] == f"latents_1x{h}x{w}_float32" and torch.equal(item["latents"], want["latents"])
        control = item["latents_control"]  # (16, h', w'), normalised: packed it is the pipeline's image_latents
        assert item["latents_control:key"] == f"latents_control_1x{control.shape[1]}x{control.shape[2]}_float32"
        assert torch.equal(flux_kontext.flux.pack_latents(control[None])[0], want["image_latents"])
        assert item["t5_vec:key"] == "t5_vec_bfloat16" and item["t5_vec"].shape == (512, 32)  # all 512 rows
        assert torch.equal(item["t5_vec"], want["prompt_embeds"].to(torch.bfloat16))
        assert torch.equal(item["clip_l_pooler"], want["pooled_prompt_embeds"].to(torch.bfloat16))
        assert item["meta"][f"{key}_fk_te.safetensors"]["architecture"] == "flux_kontext"
    assert len(musubi_load(folder, "fk", resolution=(32, 32))) == 3  # one target bucket, split by condition shape


def test_kontext_refuses_a_pair_without_condition(kontext_cache, tmp_path):
    _, data, _, cache = kontext_cache
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    with Manifest.open(copy) as m:  # the condition of "b" queued again, as verify --repair does with a damaged one
        m.requeue_items(CONTROL, ["b"])
    summary = export_musubi(copy, tmp_path / "one", images=data)
    assert [s["key"] for s in summary.skipped] == ["b"] and summary.written == 4
    assert "no condition latents" in summary.skipped[0]["reason"]


def test_kontext_refuses_a_masked_or_shortened_t5_and_warns_by_latents_mode():
    """musubi's Kontext trainer reads all 512 unmasked T5 rows; a sample cache matches musubi's own caching."""
    t5 = {"name": "t5", "trim": False, "max_length": 512}
    for bad in ({"trim": True}, {"max_length": 256}):
        with pytest.raises(ConfigError, match="unmasked over 512"):
            check_pairs(ARCHS["fk"], _Cache("mean", {"family": "flux-kontext", "encoders": [t5 | bad]}))
    sampled = check_pairs(ARCHS["fk"], _Cache("sample", {"family": "flux", "encoders": [t5]}))
    assert not any("posterior mean" in w for w in sampled) and any("condition latents" in w for w in sampled)
    other = check_pairs(ARCHS["fk"], _Cache("sample", {"family": "sd3", "encoders": [t5 | {"trim": True}]}))
    assert other  # another family's text is not exported (a warning says so), so its T5 is not refused


class _Cache:
    """The reader surface check_pairs reads."""

    def __init__(self, mode: str, text: dict):
        self.latents_mode, self.text_fingerprint = mode, text


def make_pairs(root):
    data, control = root / "data", root / "control"
    for i, (key, size) in enumerate(SIZES.items()):
        write_image(data / f"{key}.png", size, seed=i)
        (data / f"{key}.txt").write_text(f"make the {key} red", encoding="utf-8")
        write_image(control / f"{key}.png", CONTROLS[key], seed=10 + i)
    return data, control


@pytest.fixture(scope="module")
def qwen_edit(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(edit, "CONDITION_AREA", 32 * 32)  # the pipeline's 1024 * 1024 takes the tiny VAE minutes
        root = tmp_path_factory.mktemp("qie")
        pipe = make_tiny_qwen_edit_pipeline(root / "pipe")
        data, control = make_pairs(root)
        out = root / "cache"
        run("latents", data, "--model", pipe, "--latents", "mean", "--out", out, *MUSUBI, *COMMON)
        run("textenc", data, "--model", pipe, "--control", control, "--out", out, *COMMON)
        yield root, out


def test_qwen_image_edit_files_load_by_musubis_rules(qwen_edit, tmp_path):
    _, cache = qwen_edit
    folder = tmp_path / "musubi"
    summary = export_musubi(cache, folder)  # qie: told by the text cache
    assert summary.family == "qie" and summary.written == 6 and not summary.skipped, summary
    reader, latents = open_cache(cache), open_cache(cache, text=False)
    loaded = items_of(musubi_load(folder, "qie", resolution=(32, 32)))
    assert sorted(loaded) == sorted(SIZES)
    for key, item in loaded.items():
        want = reader.pipeline_inputs(key)
        target = latents.pipeline_inputs(key, family="qwen-image")["latents"].transpose(0, 1)  # (C, 1, h, w)
        _, _, h, w = target.shape
        assert item["latents:key"] == f"latents_1x{h}x{w}_bfloat16"
        assert torch.equal(item["latents"], target.to(torch.bfloat16))
        control = item["latents_control_0"]  # the pipeline's image_latents, (C, 1, h', w')
        assert item["latents_control_0:key"] == f"latents_control_0_1x{control.shape[2]}x{control.shape[3]}_bfloat16"
        assert torch.equal(control, want["image_latents"].to(torch.bfloat16))
        assert item["vl_embed:key"] == f"varlen_vl_embed_{str(want['prompt_embeds'].dtype).split('.')[-1]}"
        assert torch.equal(item["vl_embed"], want["prompt_embeds"])
        with safe_open(str(next(folder.glob(f"{key}_*_qie.safetensors"))), framework="pt") as f:
            assert f.metadata()["architecture"] == "qwen_image"  # what musubi's Qwen-Image savers write for qie


def test_an_arch_the_cache_does_not_fit_is_refused(qwen_edit, tmp_path):
    root, cache = qwen_edit
    result = CliRunner().invoke(cli, ["export", str(cache), "--format", "musubi", "--arch", "fk", "--to",
                                      str(tmp_path / "x"), "--quiet"])  # fmt: skip
    assert result.exit_code == 2 and "AutoencoderKL" in result.output
