"""kohya export of SD3 and Lumina 2: files loaded by sd-scripts' rules (strategy_sd3.py, strategy_lumina.py:
suffixes, multi-resolution keys, the keys is_disk_cached_*_expected requires) and values against the cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cachebuild.config import BucketConfig, DType, LatentsMode, TextencConfig
from cachebuild.consumers.export.kohya import export_kohya, kohya_crop_ltrb, kohya_text_arrays
from cachebuild.consumers.reader import open_cache
from cachebuild.errors import ConfigError
from cachebuild.jobs.latents import build_latents
from cachebuild.jobs.textenc import build_textenc
from cachebuild.testing import make_tiny_text_pipeline, make_tiny_vae
from tests.conftest import write_image
from tests.test_pipeline import make_cfg

BUCKETS = BucketConfig(resolution=(64, 64), min_reso=32, max_reso=128, steps=32)
SIZES = {"a": (80, 48), "b": (64, 64), "sub/c": (48, 80)}
SD3_TE_KEYS = {  # Sd3TextEncoderOutputsCachingStrategy.is_disk_cached_outputs_expected and its np.savez
    "lg_out", "lg_pooled", "t5_out", "clip_l_attn_mask", "clip_g_attn_mask", "t5_attn_mask",
    "apply_lg_attn_mask", "apply_t5_attn_mask",
}  # fmt: skip


def build(root: Path, factors: dict, text_family: str | None) -> tuple[Path, Path]:
    ds = root / "ds"
    for i, (key, size) in enumerate(SIZES.items()):
        write_image(ds / f"{key}.png", size, seed=i)
        (ds / f"{key}.txt").write_text(f"a photo number {i}", encoding="utf-8")
    out = root / "cache"
    build_latents(make_cfg(ds, out, make_tiny_vae(root / "vae", **factors), buckets=BUCKETS, latents=LatentsMode.MEAN))
    if text_family:
        pipe = make_tiny_text_pipeline(root / "pipe", text_family)
        build_textenc(TextencConfig(ds, out, model=str(pipe), device="cpu", dtype=DType.FP32, dtype_out=DType.FP32))
    return ds, out


def latent_file_check(ds: Path, reader, family: str, scaled: bool) -> None:
    """sd-scripts' get_latents_npz_path and multi-resolution keys (_default_load_latents_from_disk)."""
    paths = reader.source_paths()
    for key in reader:
        info = reader.info(key)
        (w, h), (bw, bh) = info["original_size"], info["bucket"]
        name = ds / f"{os.path.splitext(paths[key])[0]}_{w:04d}x{h:04d}_{family}.npz"
        z = reader.tensors(key)["latents"].float()
        res = f"_{z.shape[1]}x{z.shape[2]}"
        with np.load(name) as npz:
            assert sorted(npz.files) == sorted(f"{n}{res}" for n in ("latents", "original_size", "crop_ltrb"))
            want = (z - reader.shift_factor) * reader.scaling_factor if scaled else z
            assert npz["latents" + res].dtype == np.float32
            np.testing.assert_array_equal(npz["latents" + res], want.numpy())
            assert npz["original_size" + res].tolist() == [w, h]
            assert npz["crop_ltrb" + res].tolist() == list(kohya_crop_ltrb((bw, bh), (w, h)))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return build(root, dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609), "sd3")


def test_sd3_latents_and_text_follow_sd_scripts(sd3, tmp_path):
    ds = shutil.copytree(sd3[0], tmp_path / "ds")
    summary = export_kohya(sd3[1], ds)  # sd3 from the VAE's scaling factor
    assert summary.family == "sd3" and summary.written == 2 * len(SIZES) and not summary.skipped
    reader, text = open_cache(sd3[1], text=False), open_cache(sd3[1])
    latent_file_check(ds, reader, "sd3", scaled=False)  # raw: sd-scripts' SDVAE.encode samples, process_in trains
    paths = reader.source_paths()
    for key in text:
        rec, counts = text[key], text.token_counts(key)
        with np.load(ds / f"{os.path.splitext(paths[key])[0]}_sd3_te.npz") as npz:
            assert set(npz.files) == SD3_TE_KEYS
            np.testing.assert_array_equal(npz["lg_out"], torch.cat([rec["clip_l"], rec["clip_g"]], -1).numpy())
            pooled = torch.cat([rec["clip_l_pooled"], rec["clip_g_pooled"]], -1)
            np.testing.assert_array_equal(npz["lg_pooled"], pooled.numpy())
            np.testing.assert_array_equal(npz["t5_out"], rec["t5"].numpy())
            assert npz["t5_out"].shape[0] == 256  # sd-scripts' SD3 default --t5xxl_max_token_length
            assert npz["clip_l_attn_mask"].dtype == np.int64 and npz["clip_l_attn_mask"].sum() == counts["clip_l"]
            assert npz["clip_g_attn_mask"].shape == (rec["clip_g"].shape[0],)
            assert npz["t5_attn_mask"].sum() == counts["t5"]
            # sd-scripts compares these flags with its options: train without --apply_lg/t5_attn_mask
            assert npz["apply_lg_attn_mask"] == False and npz["apply_t5_attn_mask"] == False  # noqa: E712


def test_sd3_and_flux_families_do_not_mix(sd3, tmp_path):
    with pytest.raises(ConfigError, match="pass --family sd3"):
        export_kohya(sd3[1], sd3[0], family="flux")


def test_lumina_latents_are_flux_scaled_multi_resolution(tmp_path):
    ds, cache = build(tmp_path, dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159), None)
    assert export_kohya(cache, ds).family == "flux"  # the same VAE: Lumina must be named until its text says so
    summary = export_kohya(cache, ds, family="lumina")
    assert summary.written == len(SIZES)
    latent_file_check(ds, open_cache(cache), "lumina", scaled=True)  # sd-scripts' Flux AE encode: scaled


class _LuminaText:
    """The reader surface the Lumina text export reads: pipeline_inputs by the Lumina 2 pipeline's names."""

    text_fingerprint = {"family": "lumina2"}

    def __init__(self, inputs):
        self.inputs = inputs

    def pipeline_inputs(self, key, family=None):
        assert family == "lumina2"
        return self.inputs


def test_lumina_text_arrays_by_pipeline_names():
    embeds, mask = torch.randn(256, 8), (torch.arange(256) < 7).long()
    ids = torch.arange(256)
    got = kohya_text_arrays(
        _LuminaText({"prompt_embeds": embeds, "prompt_attention_mask": mask, "input_ids": ids}), "k", "lumina"
    )
    assert sorted(got) == ["attention_mask", "hidden_state", "input_ids"]  # LuminaTextEncoderOutputsCachingStrategy
    np.testing.assert_array_equal(got["hidden_state"], embeds.numpy())
    assert got["attention_mask"].sum() == 7 and got["input_ids"].dtype == np.int64
    with pytest.raises(ConfigError, match="input_ids"):
        kohya_text_arrays(_LuminaText({"prompt_embeds": embeds, "prompt_attention_mask": mask}), "k", "lumina")
