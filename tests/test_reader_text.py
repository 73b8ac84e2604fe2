"""Text-encoder outputs through the reader and the kohya export: join by key, T5 padding, sd-scripts files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cachebuild.config import DType, TextencConfig
from cachebuild.consumers.export.kohya import export_kohya
from cachebuild.consumers.reader import open_cache
from cachebuild.errors import CacheError, ConfigError
from cachebuild.jobs.latents import build_latents
from cachebuild.jobs.textenc import build_textenc
from cachebuild.testing import make_tiny_text_pipeline, make_tiny_vae
from tests.test_reader import small_cfg, small_dataset

CAPTIONS = {"im0": "a photo of a cat", "sub/im1": "red car near the river", "im2": "a photo of a cat", "orphan": "dog"}


def build_both(root: Path, family: str, **text_options) -> tuple[Path, Path]:
    """(dataset, cache): latents for im0..im3 and captions for im0, sub/im1, im2 and orphan."""
    ds = small_dataset(root / "ds", n=4)
    captions = root / "captions"
    for key, text in CAPTIONS.items():
        (captions / key).parent.mkdir(parents=True, exist_ok=True)
        (captions / f"{key}.txt").write_text(text)
    if family == "flux":
        vae = make_tiny_vae(root / "vae", latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    else:
        vae = make_tiny_vae(root / "vae")
    out = root / "cache"
    build_latents(small_cfg(ds, out, vae))
    pipe = make_tiny_text_pipeline(root / "pipe", family)
    build_textenc(
        TextencConfig(
            captions, out, model=str(pipe), device="cpu", dtype=DType.FP32, dtype_out=DType.FP32, **text_options
        )
    )
    return ds, out


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> tuple[Path, Path]:
    return build_both(tmp_path_factory.mktemp("flux"), "flux")


@pytest.fixture(scope="module")
def flux_masked(tmp_path_factory) -> tuple[Path, Path]:
    return build_both(tmp_path_factory.mktemp("flux-masked"), "flux", t5_mask=True)


def test_latents_and_text_join_by_key_and_one_sided_items_are_reported(flux):
    cache = open_cache(flux[1])
    assert cache.keys() == ["im0", "im2", "sub/im1"]
    assert cache.unmatched == {"latents_only": ["im3"], "text_only": ["orphan"]}
    assert len(open_cache(flux[1], text=False)) == 4 and "t5" not in open_cache(flux[1], text=False)["im0"]


def test_unmasked_t5_comes_back_whole_with_a_mask_of_its_real_tokens(flux):
    cache = open_cache(flux[1])
    rec = cache["sub/im1"]
    assert rec["t5"].shape[0] == 512 and rec["t5_mask"].shape == (512,)  # the Flux.1 pipeline's length
    n = int(rec["t5_mask"].sum())
    assert n == 6 and rec["t5_mask"][:n].all() and not rec["t5_mask"][n:].any()
    assert rec["t5"][n:].abs().sum() > 0  # padding rows are real encoder outputs, not zeros
    with pytest.raises(ConfigError, match="--t5-mask"):
        cache.dataset(t5_max_length=16)[0]


def test_masked_t5_comes_back_padded_to_max_length_with_its_mask(flux_masked):
    cache = open_cache(flux_masked[1])
    t5_len = next(e["max_length"] for e in cache.text_fingerprint["encoders"] if e["name"] == "t5")
    rec = cache["sub/im1"]
    assert rec["t5"].shape[0] == t5_len and rec["t5_mask"].shape == (t5_len,)
    n = int(rec["t5_mask"].sum())
    assert n == 6  # five words and </s>
    assert rec["t5_mask"][:n].all() and not rec["t5_mask"][n:].any()
    assert rec["t5"][:n].abs().sum() > 0 and torch.equal(rec["t5"][n:], torch.zeros_like(rec["t5"][n:]))
    assert rec["clip_l_pooled"].ndim == 1 and rec["latents"].shape[0] == 16
    assert torch.equal(cache["im0"]["t5"], cache["im2"]["t5"])  # the same caption, stored once
    short = cache.dataset(t5_max_length=16)[2]
    assert short["t5"].shape[0] == 16 and torch.equal(short["t5"][:n], rec["t5"][:n].float())
    loader = torch.utils.data.DataLoader(cache.dataset(t5_max_length=16), batch_size=2)
    batch = next(iter(loader))
    assert batch["t5"].shape[:2] == (2, 16) and batch["t5_mask"].shape == (2, 16)


def test_text_required_but_absent_names_the_command(tmp_path, tiny_vae):
    build_latents(small_cfg(small_dataset(tmp_path / "ds", n=1), tmp_path / "c", tiny_vae))
    with pytest.raises(CacheError, match="cachebuild textenc"):
        open_cache(tmp_path / "c", text=True)


def test_flux_text_outputs_export_as_sd_scripts_flux_te_files(flux):
    ds, out = flux
    summary = export_kohya(out, ds)
    cache = open_cache(out)
    for key in cache:
        with np.load(ds / f"{key}_flux_te.npz") as npz:
            assert sorted(npz.files) == ["apply_t5_attn_mask", "l_pooled", "t5_attn_mask", "t5_out", "txt_ids"]
            rec = cache[key]
            t5_len = rec["t5"].shape[0]
            np.testing.assert_array_equal(npz["t5_out"], rec["t5"].float().numpy())
            assert npz["t5_out"].dtype == np.float32 and npz["t5_out"].shape == (t5_len, rec["t5"].shape[1])
            np.testing.assert_array_equal(npz["t5_attn_mask"], rec["t5_mask"].numpy())
            assert npz["txt_ids"].shape == (t5_len, 3) and not npz["txt_ids"].any()
            np.testing.assert_array_equal(npz["l_pooled"], rec["clip_l_pooled"].numpy())
            assert bool(npz["apply_t5_attn_mask"]) is False  # unmasked, as the pipeline: train without the flag
    assert not (ds / "im3_flux_te.npz").exists()  # no caption
    assert {
        "key": "orphan",
        "reason": "caption with no image in the latent cache: no place to put its text outputs",
    } in (summary.skipped)
    again = export_kohya(out, ds)
    assert again.written == 0 and again.unchanged == summary.written


def test_masked_flux_text_exports_with_apply_t5_attn_mask(flux_masked):
    ds, out = flux_masked
    export_kohya(out, ds)
    with np.load(ds / "im0_flux_te.npz") as npz:
        assert bool(npz["apply_t5_attn_mask"]) is True


def test_sdxl_text_outputs_export_as_te_outputs_files(tmp_path):
    ds, out = build_both(tmp_path, "sdxl")
    export_kohya(out, ds)
    cache = open_cache(out)
    with np.load(ds / "sub" / "im1_te_outputs.npz") as npz:
        assert sorted(npz.files) == ["hidden_state1", "hidden_state2", "pool2"]
        rec = cache["sub/im1"]
        np.testing.assert_array_equal(npz["hidden_state1"], rec["clip_l"].numpy())
        np.testing.assert_array_equal(npz["hidden_state2"], rec["clip_g"].numpy())
        np.testing.assert_array_equal(npz["pool2"], rec["clip_g_pooled"].numpy())
        assert npz["hidden_state1"].shape == (77, 32) and npz["hidden_state2"].shape == (77, 40)
    assert (ds / "sub" / "im1_0048x0080_sdxl.npz").is_file()


def test_verify_checks_text_shards_and_names_every_item_sharing_a_caption(flux, tmp_path):
    import shutil

    from cachebuild.consumers.verify import verify_cache

    out = tmp_path / "cache"
    shutil.copytree(flux[1], out)
    report = verify_cache(out)
    assert report.ok and report.stores == ["latents", "textenc"], report.problems
    shard = open_cache(out)._text["im0"][0]
    path = out / "textenc" / shard
    path.write_bytes(path.read_bytes()[:-8])
    damaged = verify_cache(out).damaged_keys["textenc"]
    assert {"im0", "im2"} <= set(damaged)  # one stored caption, two items
