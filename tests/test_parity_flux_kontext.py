"""FLUX.1 Kontext: ``cachebuild latents --control`` and ``cachebuild textenc`` through the CLI against
``FluxKontextPipeline`` itself: its ``__call__`` runs (a tiny transformer, one step) and ``prepare_latents``'s
``image_latents`` and ``image_ids`` are captured and compared with ``pipeline_inputs``; its ``encode_prompt`` with
the text. A condition image left at its own size, resized to the target's bucket, or stored unnormalised fails the
comparison. A missing or unreadable condition image fails its pair with the reason; a changed one re-encodes its
pair only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.families import flux_kontext
from cachebuild.testing import make_tiny_text_pipeline
from tests.conftest import write_image
from tests.test_parity_pipelines import INIT_SCALE, TOLERANCE, load, relative_difference, tokenizer

# the preferred resolutions at 1/16 of their size: the tiny VAE encodes a megapixel slowly on a CPU, and the rule
# (nearest aspect ratio, then floored to the packed grid: 4 pixels for the tiny VAE) is the same at any size
SMALL_RESOLUTIONS = [(w // 16, h // 16) for w, h in flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS]
IMAGES = {"a": (32, 32), "b": (48, 32), "c": (32, 48)}  # targets (W, H): bucket-sized
CONTROLS = {"a": (100, 60), "b": (39, 61), "c": (64, 64)}  # condition images of other sizes and aspect
# ratios; b's floored to the packed grid (36 x 60) is nearest another preferred resolution than its own
CAPTIONS = {"a": "make the cat red", "b": "put a hat on the dog", "c": "a photo of the sky"}
COMMON = ["--device", "cpu", "--dtype", "fp32", "--dtype-out", "fp32", "--quiet"]
BUCKETS = ["--buckets", "musubi", "--resolution", "32", "--workers", "0"]  # musubi's: the export tests read it


@pytest.fixture(scope="module", autouse=True)
def small_resolutions():
    from diffusers.pipelines.flux import pipeline_flux_kontext

    assert pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS == flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_flux_kontext, "PREFERRED_KONTEXT_RESOLUTIONS", SMALL_RESOLUTIONS)
        patch.setattr(flux_kontext, "PREFERRED_KONTEXT_RESOLUTIONS", SMALL_RESOLUTIONS)
        yield


def make_pairs(root: Path) -> tuple[Path, Path]:
    data, control = root / "data", root / "control"
    for i, key in enumerate(IMAGES):
        write_image(data / f"{key}.png", IMAGES[key], seed=i)
        (data / f"{key}.txt").write_text(CAPTIONS[key], encoding="utf-8")
        write_image(control / f"{key}.jpg", CONTROLS[key], seed=10 + i, quality=95)
    return data, control


def latents_args(data: Path, pipe: Path, out: Path, control: Path, *extra: str) -> list[str]:
    return ["latents", str(data), "--model", str(pipe), "--control", str(control), "--out", str(out), *BUCKETS,
            *COMMON, *extra]  # fmt: skip


def build_kontext_cache(root: Path) -> tuple[Path, Path, Path, Path]:
    """(tiny FluxKontextPipeline folder, dataset, condition folder, cache): latents (posterior mean, musubi's
    buckets) with their condition latents, and text. conftest's session fixture ``kontext_cache`` builds it once
    for this module and tests/test_export_musubi_pairs.py."""
    pipe = make_tiny_text_pipeline(root / "pipe", "flux-kontext", init_scale=INIT_SCALE)
    data, control = make_pairs(root)
    out = root / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flux_kontext, "PREFERRED_KONTEXT_RESOLUTIONS", SMALL_RESOLUTIONS)
        latents = latents_args(data, pipe, out, control, "--latents", "mean")
        for args in (latents, ["textenc", str(data), "--model", str(pipe), "--out", str(out), *COMMON]):
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 0, result.output
    return pipe, data, control, out


@pytest.fixture
def built(kontext_cache):
    return kontext_cache


def reference_pipeline(root: Path):
    """FluxKontextPipeline with the tiny pipeline's text encoders and VAE, a one-block transformer and a scheduler:
    enough for ``__call__`` to run to ``prepare_latents`` and one step."""
    import diffusers

    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    return diffusers.FluxKontextPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=diffusers.AutoencoderKL.from_pretrained(root / "vae").eval(),
        text_encoder=load(root / "text_encoder", "CLIPTextModel"), tokenizer=tokenizer(root / "tokenizer"),
        text_encoder_2=load(root / "text_encoder_2", "T5EncoderModel"), tokenizer_2=tokenizer(root / "tokenizer_2"),
        transformer=transformer.eval(),
    )  # fmt: skip


def prepared(pipe, image_path: Path, **call) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_latents (N, 64), image_ids (N, 3)) that ``prepare_latents`` returns inside ``__call__`` for the
    condition image at ``image_path``, loaded as the pipeline's users load it (``load_image``)."""
    from diffusers.utils import load_image

    seen = {}
    original = pipe.prepare_latents

    def capture(*args, **kwargs):
        seen["out"] = original(*args, **kwargs)
        return seen["out"]

    pipe.prepare_latents = capture
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        pipe(image=load_image(str(image_path)), prompt="a cat", height=16, width=16, max_area=16 * 16,
             num_inference_steps=1, output_type="latent", generator=generator, **call)  # fmt: skip
    pipe.prepare_latents = original
    _, image_latents, _, image_ids = seen["out"]
    return image_latents[0], image_ids


def test_condition_latents_equal_prepare_latents(built):
    pipe_folder, _, control, out = built
    pipe, cache = reference_pipeline(pipe_folder), open_cache(out)
    for key in IMAGES:
        got = cache.pipeline_inputs(key)
        want_latents, want_ids = prepared(pipe, control / f"{key}.jpg")
        assert got["image_latents"].shape == want_latents.shape, key
        assert relative_difference(got["image_latents"], want_latents) <= TOLERANCE, key
        assert torch.equal(got["image_ids"], want_ids.float()), key
        record = cache.record(key)
        w, h = record["control_size"]
        assert record["control_latents"].shape == (16, h // 2, w // 2)
        assert flux_kontext.condition_size(*CONTROLS[key], 4) == (w, h)
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(CAPTIONS[key], None, device=torch.device("cpu"))
        assert relative_difference(got["prompt_embeds"], embeds[0]) <= TOLERANCE
        assert relative_difference(got["pooled_prompt_embeds"], pooled[0]) <= TOLERANCE
    result = CliRunner().invoke(cli, ["verify", str(out), "--json"])
    assert result.exit_code == 0 and "control" in json.loads(result.output)["stores"], result.output
    sampler = cache.bucket_sampler(batch_size=3, shuffle=False)  # one target bucket, three condition sizes
    loader = torch.utils.data.DataLoader(cache.dataset(scale=True), batch_sampler=sampler)
    batches = list(loader)  # each condition size its own batch, so the default collate stacks them
    assert len(batches) == 3 and all(b["control_latents"].shape[0] == 1 for b in batches)
    first = next(b for b in batches if b["key"] == ["a"])
    assert torch.equal(first["control_size"][0], torch.tensor(cache.record("a")["control_size"]))


def test_no_snap_the_targets_bucket_or_no_normalisation_would_fail(built):
    pipe_folder, _, control, out = built
    pipe, cache = reference_pipeline(pipe_folder), open_cache(out)
    got = cache.pipeline_inputs("a")["image_latents"]
    own_size, _ = prepared(pipe, control / "a.jpg", _auto_resize=False)  # no snap: the image's own size
    assert own_size.shape != got.shape
    tw, th = IMAGES["a"]  # the target's bucket, as musubi's own caching resizes a control image
    pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(_rgb(control / "a.jpg"), th, tw), th, tw)
    with torch.no_grad():
        bucket = pipe.vae.encode(pixels).latent_dist.mode()
    assert flux_kontext.flux.pack_latents(bucket)[0].shape != got.shape
    raw = flux_kontext.flux.pack_latents(cache.record("a")["control_latents"][None].float())[0]  # unnormalised
    assert relative_difference(raw, got) > 0.1


def _rgb(path: Path):
    from diffusers.utils import load_image

    return load_image(str(path))


def test_missing_unreadable_and_changed_conditions(built, tmp_path):
    """A pair without its condition image, or with an unreadable one, fails with the reason and its target is not
    encoded; a changed condition image re-encodes that pair alone."""
    pipe, data, control, _ = built
    control2, out = tmp_path / "control", tmp_path / "cache"
    control2.mkdir()
    for key in ("a", "c"):
        (control2 / f"{key}.jpg").write_bytes((control / f"{key}.jpg").read_bytes())
    (control2 / "c.jpg").write_bytes(b"not a jpeg")  # unreadable
    result = CliRunner().invoke(cli, latents_args(data, pipe, out, control2, "--json"))
    assert result.exit_code == 3, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    reasons = {f["key"]: f["reason"] for f in summary["failures"]}
    status = json.loads(CliRunner().invoke(cli, ["status", str(out), "--json"]).output)
    failed = {f["key"]: f["reason"] for f in status["failures"]}
    assert set(failed) == {"b", "c"} and "no condition image" in failed["b"] and "cannot be used" in failed["c"]
    assert "c" in reasons and status["items"]["done"] == 1 and status["control"]["items"]["done"] == 1
    write_image(control2 / "c.jpg", CONTROLS["c"], seed=3, quality=95)  # fixed: the pair is pending again
    write_image(control2 / "b.png", CONTROLS["b"], seed=4)  # added
    result = CliRunner().invoke(cli, latents_args(data, pipe, out, control2, "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{") :])["encoded"] == 2  # b and c; a untouched
    before = open_cache(out).record("a")["control_latents"]
    write_image(control2 / "a.jpg", (64, 40), seed=5, quality=95)  # changed
    result = CliRunner().invoke(cli, latents_args(data, pipe, out, control2, "--json"))
    assert json.loads(result.output[result.output.index("{") :])["encoded"] == 1, result.output
    after = open_cache(out).record("a")["control_latents"]
    assert not torch.equal(after, before)  # the new image encoded
    again = json.loads(CliRunner().invoke(cli, latents_args(data, pipe, out, control2, "--json")).output)
    assert again["nothing_to_do"] and not again["model_loaded"]  # finished: no model loaded, for either store
    without = CliRunner().invoke(cli, ["latents", str(data), "--model", str(pipe), "--out", str(out), *BUCKETS,
                                       *COMMON])  # fmt: skip
    assert without.exit_code == 2 and "control" in without.output  # the pairs' cache refuses plain images
    for path in out.glob("manifest.sqlite*"):  # the manifest lost: rebuilt from the shards, the control store too
        path.unlink()
    assert CliRunner().invoke(cli, ["rebuild-manifest", str(out)]).exit_code == 0
    assert torch.equal(open_cache(out).record("a")["control_latents"], after)


def test_control_is_refused_where_it_has_no_meaning(built, tmp_path):
    from cachebuild.testing import make_tiny_vae

    _, data, control, _ = built
    vae = make_tiny_vae(tmp_path / "vae", 16, 0.3611, 0.1159)
    args = ["latents", str(data), "--vae", str(vae), "--control", str(control), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, [*args, *BUCKETS, *COMMON])
    assert result.exit_code == 2 and "flux-kontext" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
