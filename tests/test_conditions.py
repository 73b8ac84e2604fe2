"""Image-to-video conditions as a store: a missing or unreadable condition image fails its clips (in both stores,
with the reason), a changed one re-encodes its clips only, a finished run loads nothing, a run stopped half way
through the conditions finishes to the same tensors, a lost manifest comes back with them; and the options that
make no sense with them are refused before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.jobs import condition_models
from cachebuild.testing.i2v import make_tiny_i2v_pipeline
from cachebuild.testing.videos import clip_frames, write_video
from tests.conftest import write_image

VIDEOS = ("a", "b", "sub/c")
ARGS = ["--frames", "5", "--extract", "chunk", "--resolution", "32", "--min-bucket-reso", "16"]
ARGS += ["--bucket-reso-steps", "16", "--latents", "mean", "--workers", "0", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(tiny Wan 2.2 I2V pipeline, dataset of three 10-frame videos: two 5-frame clips each, condition images)."""
    root = tmp_path_factory.mktemp("conditions")
    pipe = make_tiny_i2v_pipeline(root / "pipe", "wan2.2-i2v")
    for i, key in enumerate(VIDEOS):
        write_video(root / "data" / f"{key}.mkv", clip_frames(10, (32, 32), seed=i))
        write_image(root / "control" / f"{key}.png", (40, 30), seed=20 + i)
    return pipe, root / "data", root / "control"


def run(pipe: Path, data: Path, out: Path, *extra: str) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, ["latents", str(data), "--model", str(pipe), "--out", str(out), *ARGS, *extra,
                                      "--json"])  # fmt: skip
    assert "Traceback" not in result.output, result.output
    text = result.output
    return result.exit_code, (json.loads(text[text.index("{") :]) if "{" in text else {"output": text})


def status(out: Path) -> dict:
    return json.loads(CliRunner().invoke(cli, ["status", str(out), "--json"]).output)


def test_missing_unreadable_and_changed_condition_images(setup, tmp_path):
    pipe, data, control = setup
    images = tmp_path / "control"
    shutil.copytree(control, images)
    (images / "b.png").unlink()  # missing
    (images / "sub" / "c.png").write_bytes(b"not a png")  # unreadable
    out = tmp_path / "cache"
    code, summary = run(pipe, data, out, "--control", str(images))
    assert code == 3 and summary["done"] == 2, summary
    failed = {f["key"]: f["reason"] for f in status(out)["failures"]}
    assert sorted(failed) == ["b@00000-005", "b@00005-005", "sub/c@00000-005", "sub/c@00005-005"]
    assert "no condition image with this key" in failed["b@00000-005"]
    assert "cannot be used" in failed["sub/c@00000-005"] and "sub/c.png" in failed["sub/c@00000-005"]
    conditions = status(out)["control"]
    assert conditions["items"]["done"] == 2 and conditions["items"]["failed"] == 4
    assert open_cache(out).keys() == ["a@00000-005", "a@00005-005"]  # no clip without its condition
    write_image(images / "sub" / "c.png", (40, 30), seed=22)  # repaired: its two clips come back
    code, summary = run(pipe, data, out, "--control", str(images))
    assert code == 3 and summary["encoded"] == 2 and summary["done"] == 4, summary
    before = open_cache(out).record("a@00005-005")["condition_latents"]
    write_image(images / "a.png", (36, 44), seed=5)  # changed: a's clips again, nothing else
    code, summary = run(pipe, data, out, "--control", str(images))
    assert summary["encoded"] == 2, summary
    after = open_cache(out).record("a@00005-005")
    assert not torch.equal(after["condition_latents"], before)
    code, summary = run(pipe, data, out, "--control", str(images))
    assert summary["nothing_to_do"] and not summary["model_loaded"] and summary["model_loads"] == 0, summary


def test_a_run_stopped_in_the_conditions_finishes_to_the_same_tensors(setup, tmp_path, monkeypatch):
    pipe, data, _ = setup
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert run(pipe, data, whole)[0] == 0
    real, calls = condition_models.ConditionModels.encode, []

    def stop_at_the_third(self, *args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C half way through the conditions
        return real(self, *args)

    monkeypatch.setattr(condition_models.ConditionModels, "encode", stop_at_the_third)
    assert run(pipe, data, stopped)[0] != 0
    monkeypatch.undo()
    assert status(stopped)["control"]["items"]["pending"] == 6  # the first page was never committed
    code, summary = run(pipe, data, stopped)
    assert code == 0 and summary["encoded"] == 0 and summary["model_loaded"], summary  # the conditions alone
    a, b = open_cache(whole), open_cache(stopped)
    assert a.keys() == b.keys() and len(a.keys()) == 6
    for key in a:
        assert torch.equal(a.record(key)["condition_latents"], b.record(key)["condition_latents"]), key
    for path in stopped.glob("manifest.sqlite*"):  # the manifest lost: the shards give the conditions back
        path.unlink()
    assert CliRunner().invoke(cli, ["rebuild-manifest", str(stopped)]).exit_code == 0
    rebuilt = open_cache(stopped)
    assert rebuilt.control_fingerprint == a.control_fingerprint
    assert torch.equal(rebuilt.pipeline_inputs("b@00005-005", family="wan")["condition"],
                       a.pipeline_inputs("b@00005-005", family="wan")["condition"])  # fmt: skip
    assert CliRunner().invoke(cli, ["verify", str(stopped)]).exit_code == 0


def test_options_that_cannot_apply_are_refused(setup, tmp_path, tiny_wan_vae):
    pipe, data, control = setup
    out = tmp_path / "o"
    refusals = {
        "--last-frame": ["--vae", str(tiny_wan_vae), "--last-frame"],  # no image-to-video model
        "--control": ["--vae", str(tiny_wan_vae), "--control", str(control)],
        "--flip-aug": ["--model", str(pipe), "--flip-aug"],
        "ray": ["--model", str(pipe), "--engine", "ray"],
    }
    for word, extra in refusals.items():
        result = CliRunner().invoke(cli, ["latents", str(data), "--out", str(out), *ARGS, *extra])
        assert result.exit_code == 2 and word in result.output and "Traceback" not in result.output, result.output
        assert not out.exists()
    ti2v = make_tiny_i2v_pipeline(tmp_path / "ti2v", "wan2.2-ti2v")
    result = CliRunner().invoke(cli, ["latents", str(data), "--model", str(ti2v), "--out", str(out), *ARGS,
                                      "--last-frame"])  # fmt: skip
    assert result.exit_code == 2 and "no last frame" in result.output


def test_stored_sizes_at_the_real_model_sizes():
    """What README and docs/format.md say a clip's conditions take, from the released VAEs' and image encoders'
    configs (CLIP-ViT-H/14 at 224, SigLIP so400m-patch14 at 384): the shapes verify expects, in fp16."""
    from cachebuild.families import hunyuanvideo15_i2v, i2v, wan_i2v
    from cachebuild.testing import video_vae_family

    clip = wan_i2v.encoder_tokens({"vision_config": {"image_size": 224, "patch_size": 14, "hidden_size": 1280}})
    siglip = hunyuanvideo15_i2v.encoder_tokens({"image_size": 384, "patch_size": 14, "hidden_size": 1152})
    assert clip == (257, 1280) and siglip == (729, 1152)
    cases = {  # (kind, VAE, (W, H, F), image encoder tokens) -> KiB per clip of each tensor
        ("wan-i2v", "wan2.1", (832, 480, 81), clip): {"condition_latents": 4095.0, "image_embeds": 642.5},
        ("wan-i2v", "wan2.1", (1280, 720, 81), clip): {"condition_latents": 9450.0, "image_embeds": 642.5},
        ("wan-ti2v", "wan2.2-ti2v", (1280, 704, 121), None): {"condition_latents": 330.0},
        ("hunyuanvideo-1.5-i2v", "hunyuanvideo-1.5", (848, 480, 121), siglip): {
            "condition_latents": 99.375, "image_embeds": 1640.25},
        ("hunyuanvideo-1.5-i2v", "hunyuanvideo-1.5", (1280, 720, 121), siglip): {
            "condition_latents": 225.0, "image_embeds": 1640.25},
        ("ltx-2-i2v", "ltx-2", (768, 512, 121), None): {"condition_latents": 96.0},
        ("ltx-2-i2v", "ltx-2", (1280, 704, 121), None): {"condition_latents": 220.0},
    }  # fmt: skip
    for (kind, vae, (w, h, frames), tokens), want in cases.items():
        family = video_vae_family(vae)
        fingerprint = {
            "vae": {"latent_channels": family.latent_channels, "downsample": family.downsample,
                    "temporal_downsample": family.temporal_downsample},
            "condition": {"kind": kind},
        } | ({"image_encoder": {"tokens": list(tokens)}} if tokens else {})  # fmt: skip
        shapes = i2v.expected_shapes(fingerprint, {"bucket": [w, h], "frames": frames})
        assert {name: torch.Size(s).numel() * 2 / 1024 for name, s in shapes.items()} == want, (kind, w, h)
