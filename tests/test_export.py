"""kohya export: file names, keys, shapes, dtypes and values, per family; overwrite rules; skips; the CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cachebuild.cli import cli
from cachebuild.config import LatentsMode
from cachebuild.consumers.export.kohya import detect_family, export_kohya, kohya_crop_ltrb
from cachebuild.consumers.reader import open_cache
from cachebuild.errors import ConfigError
from cachebuild.jobs.latents import build_latents
from cachebuild.testing import make_tiny_vae
from tests.test_reader import small_cfg, small_dataset


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, tiny_vae) -> tuple[Path, Path]:
    """(dataset, cache) built with flip; the dataset also holds an EXIF-rotated JPEG."""
    root = tmp_path_factory.mktemp("export")
    ds = small_dataset(root / "ds")
    img = Image.new("RGB", (80, 48), (200, 30, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(ds / "rotated.jpg", exif=exif)
    build_latents(small_cfg(ds, root / "cache", tiny_vae, flip=True))
    return ds, root / "cache"


@pytest.fixture
def dataset(sdxl, tmp_path) -> Path:
    """A fresh copy of the dataset to export into."""
    shutil.copytree(sdxl[0], tmp_path / "ds")
    return tmp_path / "ds"


def test_sdxl_files_match_the_kohya_layout_key_by_key(sdxl, dataset):
    cache = sdxl[1]
    before = snapshot(dataset)
    summary = export_kohya(cache, dataset)
    reader = open_cache(cache)
    assert summary.family == "sdxl" and summary.written == len(reader) - 1 and not summary.conflicts
    assert [s["key"] for s in summary.skipped] == ["rotated"]
    assert "EXIF" in summary.skipped[0]["reason"]
    new = sorted(set(snapshot(dataset)) - set(before))
    paths = reader.source_paths()
    expected = []
    for key in reader:
        if key == "rotated":
            continue
        info = reader.info(key)
        w, h = info["original_size"]
        name = f"{os.path.splitext(paths[key])[0]}_{w:04d}x{h:04d}_sdxl.npz"
        expected.append(name)
        with np.load(dataset / name) as npz:
            assert sorted(npz.files) == ["crop_ltrb", "latents", "latents_flipped", "original_size"]
            bw, bh = info["bucket"]
            for field in ("latents", "latents_flipped"):
                assert npz[field].dtype == np.float32 and npz[field].shape == (4, bh // 2, bw // 2)
                stored = reader.tensors(key)[field].float().numpy()
                np.testing.assert_array_equal(npz[field], stored)  # raw, unscaled
            assert npz["original_size"].tolist() == [w, h] and npz["original_size"].dtype.kind == "i"
            assert npz["crop_ltrb"].tolist() == list(kohya_crop_ltrb((bw, bh), (w, h)))
    assert new == sorted(expected)  # nothing else written, nothing outside the dataset folder
    assert "sub/im1_0048x0080_sdxl.npz" in new


def test_crop_ltrb_is_sd_scripts_fit_inside_box():
    assert kohya_crop_ltrb((64, 64), (100, 60)) == (0, 12.0, 64, 50.4)  # image wider: width fills
    assert kohya_crop_ltrb((1216, 832), (800, 1200)) == (330.0, 0, 330.0 + 832 * 800 / 1200, 832)  # heights match
    assert kohya_crop_ltrb((1024, 1024), (500, 500)) == (0, 0, 1024, 1024)
    assert kohya_crop_ltrb((1216, 832), (1200, 800)) == (0, 10.0, 1216, 10.0 + 1216 / 1.5)  # docs/export.md


def test_rerun_skips_identical_files_and_refuses_to_overwrite_a_different_one(sdxl, dataset):
    cache = sdxl[1]
    first = export_kohya(cache, dataset)
    again = export_kohya(cache, dataset)
    assert (again.written, again.unchanged) == (0, first.written)
    target = dataset / "im2_0064x0064_sdxl.npz"
    with np.load(target) as npz:
        arrays = dict(npz)
    np.savez_compressed(target, **arrays)  # other bytes, same contents: still identical
    assert export_kohya(cache, dataset).unchanged == first.written
    np.savez(target, **(arrays | {"latents": arrays["latents"] + 1}))
    changed = target.read_bytes()
    refused = export_kohya(cache, dataset)
    assert refused.conflicts == ["im2_0064x0064_sdxl.npz"] and target.read_bytes() == changed
    forced = export_kohya(cache, dataset, overwrite=True)
    assert forced.written == 1 and not forced.conflicts
    with np.load(target) as npz:
        np.testing.assert_array_equal(npz["latents"], arrays["latents"])


def test_family_override_names_files_sd_and_missing_images_are_skipped(sdxl, dataset):
    (dataset / "im0.jpg").unlink()
    old = dataset / "im2.npz"
    old.write_bytes(b"an sd-scripts cache from before the size suffix")
    summary = export_kohya(sdxl[1], dataset, family="sd")
    assert (dataset / "im3_0100x0060_sd.npz").is_file() and not list(dataset.glob("*_sdxl.npz"))
    assert {"key": "im0", "reason": "image not found under --to; sd-scripts reads caches beside their images"} in (
        summary.skipped
    )
    assert summary.shadowed == ["im2.npz"] and "im2.npz" in summary.warnings[-1]
    with pytest.raises(ConfigError, match="16-channel"):
        export_kohya(sdxl[1], dataset, family="flux")
    with pytest.raises(ConfigError, match="16-channel"):
        export_kohya(sdxl[1], dataset, family="sd3")  # sd3 has a layout now; it still needs 16 channels
    with pytest.raises(ConfigError, match="--family must be one of"):
        export_kohya(sdxl[1], dataset, family="wan")


def test_flux_files_use_per_resolution_keys_and_scaled_latents(tmp_path):
    vae = make_tiny_vae(tmp_path / "flux-vae", latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    ds = small_dataset(tmp_path / "ds", n=2)
    build_latents(small_cfg(ds, tmp_path / "cache", vae))
    summary = export_kohya(tmp_path / "cache", ds)
    assert summary.family == "flux" and summary.written == 2
    reader = open_cache(tmp_path / "cache")
    with np.load(ds / "sub" / "im1_0048x0080_flux.npz") as npz:
        bw, bh = reader.info("sub/im1")["bucket"]
        res = f"_{bh // 2}x{bw // 2}"  # latent height x width
        assert sorted(npz.files) == sorted(f"{n}{res}" for n in ("latents", "original_size", "crop_ltrb"))
        z = reader.tensors("sub/im1")["latents"].float()
        np.testing.assert_allclose(npz[f"latents{res}"], ((z - 0.1159) * 0.3611).numpy(), rtol=1e-6)
        assert npz[f"latents{res}"].shape == (16, bh // 2, bw // 2) and npz[f"original_size{res}"].tolist() == [48, 80]
    assert any("downsamples by 2" in w for w in summary.warnings)


def test_moments_caches_export_one_fixed_sample(tmp_path, tiny_vae):
    ds = small_dataset(tmp_path / "ds", n=1)
    build_latents(small_cfg(ds, tmp_path / "cache", tiny_vae, latents=LatentsMode.MOMENTS))
    assert export_kohya(tmp_path / "cache", ds).written == 1
    assert export_kohya(tmp_path / "cache", ds).unchanged == 1  # the same draw again
    with np.load(ds / "im0_0080x0048_sdxl.npz") as npz:
        mean = open_cache(tmp_path / "cache").tensors("im0")["mean"].float()
        assert npz["latents"].shape == tuple(mean.shape) and not torch.equal(torch.from_numpy(npz["latents"]), mean)


@pytest.mark.parametrize(
    ("vae", "family"),
    [
        ({"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159}, "flux"),
        ({"latent_channels": 4, "scaling_factor": 0.13025, "shift_factor": None}, "sdxl"),
        ({"latent_channels": 4, "scaling_factor": 0.18215, "shift_factor": None}, "sd"),
    ],
)
def test_family_is_detected_from_the_fingerprint(vae, family):
    assert detect_family({"vae": vae}) == family


def test_families_without_a_kohya_layout_are_refused_with_the_way_out():
    sd3 = {"vae": {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609}}
    assert detect_family(sd3) == "sd3"  # SD3 has its kohya layout now (tests/test_export_kohya_sd3_lumina.py)
    flux_vae = {"vae": {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159}}
    assert detect_family(flux_vae) == "flux" and detect_family(flux_vae, "lumina2") == "lumina"
    with pytest.raises(ConfigError, match="--family"):
        detect_family({"vae": {"latent_channels": 8, "scaling_factor": 0.5, "shift_factor": None}})
    with pytest.raises(ConfigError, match="AutoencoderKLQwenImage.*--format musubi"):  # not Flux.1's latents
        detect_family({"vae": {"class": "AutoencoderKLQwenImage", "latent_channels": 16, "scaling_factor": 1.0}})


def test_cli_export_reports_and_exits_3_on_conflicts(sdxl, dataset):
    runner = CliRunner()
    ok = runner.invoke(cli, ["export", str(sdxl[1]), "--to", str(dataset)])
    assert ok.exit_code == 0, ok.output
    assert "wrote 6" in ok.output and "rotated" in ok.output
    target = dataset / "im2_0064x0064_sdxl.npz"
    target.write_bytes(b"something else")
    bad = runner.invoke(cli, ["export", str(sdxl[1]), "--to", str(dataset)])
    assert bad.exit_code == 3 and "--overwrite" in bad.output and "im2_0064x0064_sdxl.npz" in bad.output
    assert runner.invoke(cli, ["export", str(sdxl[1]), "--to", str(dataset), "--overwrite"]).exit_code == 0
    missing = runner.invoke(cli, ["export", str(sdxl[1]), "--to", str(dataset / "nope")])
    assert missing.exit_code == 2 and "not a folder" in missing.output
