"""--exif ignore: an EXIF-rotated image is read as stored (unrotated), as sd-scripts and musubi-tuner read it;
the loader, the fingerprint, decode workers, the kohya and musubi exports and the preview follow the mode."""

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
from cachebuild.config import BucketConfig, ExifMode, LatentsMode
from cachebuild.consumers.export.kohya import export_kohya, kohya_crop_ltrb
from cachebuild.consumers.export.musubi import export_musubi
from cachebuild.consumers.preview import PreviewSummary, _source_crop
from cachebuild.consumers.reader import open_cache
from cachebuild.errors import FingerprintMismatch
from cachebuild.images.load import decode, read_size
from cachebuild.images.musubi_buckets import musubi_bucket
from cachebuild.images.plan import ItemPlan
from cachebuild.jobs.latents import build_latents
from cachebuild.testing import make_tiny_vae
from tests.conftest import write_image
from tests.test_export_musubi import MUSUBI, items_of, musubi_load
from tests.test_pipeline import make_cfg

STORED = (96, 40)  # (W, H) of the pixels in the file; shown as 40x96 (orientation 6: rotate 90 degrees clockwise)
BUCKETS = BucketConfig(resolution=(64, 64), min_reso=32, max_reso=128, steps=16)  # 96x40 -> 96x32, 40x96 -> 32x96
MAX_PIXELS = 10**8


def cfg(dataset: Path, out: Path, vae: Path, **kw):
    return make_cfg(dataset, out, vae, **({"buckets": BUCKETS, "latents": LatentsMode.MEAN} | kw))


def write_rotated(path: Path) -> Path:
    """A noise JPEG stored landscape with EXIF orientation 6, so a viewer shows it portrait."""
    rng = np.random.default_rng(7)
    img = Image.fromarray(rng.integers(0, 256, (STORED[1], STORED[0], 3), dtype=np.uint8), "RGB")
    exif = img.getexif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, exif=exif, quality=95)
    return path


def stored_pixels(path: Path) -> np.ndarray:
    """The file's pixels as sd-scripts' load_image and musubi's Image.open + convert read them: unrotated."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    """(rotated, twin): the rotated JPEG and a plain PNG; the twin holds the JPEG's stored pixels as a PNG with no
    EXIF, so its latents are the encoding of the unrotated pixels."""
    root = tmp_path_factory.mktemp("exif")
    rot, twin = root / "rot", root / "twin"
    jpg = write_rotated(rot / "rotated.jpg")
    write_image(rot / "plain.png", (64, 64), seed=3)
    (rot / "rotated.txt").write_text("rotated", encoding="utf-8")
    twin.mkdir()
    Image.fromarray(stored_pixels(jpg), "RGB").save(twin / "rotated.png")
    shutil.copy(rot / "plain.png", twin / "plain.png")
    return rot, twin


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_vae, datasets) -> dict[str, Path]:
    """sdxl-type caches of the rotated dataset built with each mode, and of the unrotated twin."""
    root = tmp_path_factory.mktemp("exif-caches")
    rot, twin = datasets
    out = {name: root / name for name in ("ignore", "apply", "twin")}
    build_latents(cfg(rot, out["ignore"], tiny_vae, exif=ExifMode.IGNORE))
    build_latents(cfg(rot, out["apply"], tiny_vae))
    build_latents(cfg(twin, out["twin"], tiny_vae))
    return out


# -- the loader ---------------------------------------------------------------------------------------------


def test_read_size_and_decode_follow_the_mode(tmp_path):
    path = write_rotated(tmp_path / "r.jpg")
    assert read_size(str(path), MAX_PIXELS) == (40, 96)  # upright
    assert read_size(str(path), MAX_PIXELS, ExifMode.IGNORE) == STORED
    stored = stored_pixels(path)  # (40, 96, 3)
    ignored = decode(ItemPlan("r", str(path), STORED, STORED, STORED, (0, 0), ExifMode.IGNORE), MAX_PIXELS)
    np.testing.assert_array_equal(ignored, stored)
    applied = decode(ItemPlan("r", str(path), (40, 96), (40, 96), (40, 96), (0, 0)), MAX_PIXELS)
    np.testing.assert_array_equal(applied, np.rot90(stored, k=-1))  # orientation 6: 90 degrees clockwise


# -- the build ----------------------------------------------------------------------------------------------


def test_ignore_records_the_stored_size_and_encodes_the_unrotated_pixels(caches):
    ignore, twin = open_cache(caches["ignore"]), open_cache(caches["twin"])
    rec = ignore["rotated"]
    assert rec["original_size"] == STORED and rec["bucket"] == (96, 32) and rec["crop"] == (0, 4)  # as stored
    assert rec["original_size"] == twin["rotated"]["original_size"] and rec["bucket"] == twin["rotated"]["bucket"]
    assert torch.equal(rec["latents"], twin["rotated"]["latents"])  # the encoding of the unrotated pixels
    assert torch.equal(ignore["plain"]["latents"], twin["plain"]["latents"])  # untagged images: no change
    assert ignore.fingerprint["exif"] == "ignore"


def test_apply_is_unchanged_and_keeps_its_fingerprint(caches):
    apply = open_cache(caches["apply"])
    rec = apply["rotated"]
    assert rec["original_size"] == (40, 96) and rec["bucket"] == (32, 96)  # upright, portrait
    assert "exif" not in apply.fingerprint  # caches built before --exif existed still match
    ignore = open_cache(caches["ignore"]).fingerprint
    assert {k: v for k, v in ignore.items() if k != "exif"} == apply.fingerprint


def test_switching_the_mode_refuses_with_the_difference(caches, datasets, tiny_vae):
    with pytest.raises(FingerprintMismatch, match="exif"):
        build_latents(cfg(datasets[0], caches["apply"], tiny_vae, exif=ExifMode.IGNORE))


def test_decode_workers_read_the_same_way(caches, datasets, tiny_vae, tmp_path):
    out = tmp_path / "workers"
    build_latents(cfg(datasets[0], out, tiny_vae, exif=ExifMode.IGNORE, latents=LatentsMode.MEAN, workers=1))
    got, want = open_cache(out), open_cache(caches["ignore"])
    assert got["rotated"]["original_size"] == STORED
    for key in want:
        assert torch.equal(got[key]["latents"], want[key]["latents"])


def test_cli_option(tiny_vae, datasets, tmp_path):
    args = ["latents", str(datasets[0]), "--vae", str(tiny_vae), "--out", str(tmp_path / "c"), "--workers", "0"]
    args += ["--device", "cpu", "--resolution", "64", "--min-bucket-reso", "32", "--max-bucket-reso", "128"]
    args += ["--bucket-reso-steps", "16"]
    result = CliRunner().invoke(cli, [*args, "--exif", "ignore", "-q"])
    assert result.exit_code == 0, result.output
    assert open_cache(tmp_path / "c")["rotated"]["original_size"] == STORED
    bad = CliRunner().invoke(cli, [*args, "--exif", "sideways"])
    assert bad.exit_code == 2 and "apply" in bad.output and "Traceback" not in bad.output


# -- exports ------------------------------------------------------------------------------------------------


def test_kohya_exports_the_rotated_item_from_an_ignore_cache(caches, datasets, tmp_path):
    ds = shutil.copytree(datasets[0], tmp_path / "ds")
    summary = export_kohya(caches["ignore"], ds)
    assert not summary.skipped and summary.written == 2
    reader = open_cache(caches["ignore"])
    info = reader.info("rotated")
    with Image.open(ds / "rotated.jpg") as img:
        w, h = img.size  # what sd-scripts' get_image_size (imagesize) reports: the stored size
    assert (w, h) == STORED
    with np.load(ds / f"rotated_{w:04d}x{h:04d}_sdxl.npz") as npz:  # sd-scripts' name from the image's size
        bw, bh = info["bucket"]
        assert npz["latents"].shape == (4, bh // 2, bw // 2)
        np.testing.assert_array_equal(npz["latents"], reader.tensors("rotated")["latents"].float().numpy())
        assert npz["original_size"].tolist() == [w, h]
        assert npz["crop_ltrb"].tolist() == list(kohya_crop_ltrb((bw, bh), (w, h)))


def test_kohya_refuses_the_rotated_item_from_an_apply_cache(caches, datasets, tmp_path):
    ds = shutil.copytree(datasets[0], tmp_path / "ds")
    summary = export_kohya(caches["apply"], ds)
    assert [s["key"] for s in summary.skipped] == ["rotated"] and summary.written == 1
    reason = summary.skipped[0]["reason"]
    assert "EXIF" in reason and "--exif ignore" in reason
    assert not list(ds.glob("rotated_*.npz"))


@pytest.fixture(scope="module")
def zimage_caches(tmp_path_factory, datasets) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exif-zi")
    vae = make_tiny_vae(root / "vae", latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    out = {"ignore": root / "ignore", "apply": root / "apply"}
    kw = dict(buckets=MUSUBI)
    build_latents(cfg(datasets[0], out["ignore"], vae, exif=ExifMode.IGNORE, **kw))
    build_latents(cfg(datasets[0], out["apply"], vae, **kw))
    return out


def test_musubi_exports_the_rotated_item_from_an_ignore_cache(zimage_caches, tmp_path):
    summary = export_musubi(zimage_caches["ignore"], tmp_path, arch="zi")
    assert not [s for s in summary.skipped if "EXIF" in s["reason"]]
    loaded = items_of(musubi_load(tmp_path, "zi"))  # musubi's own name parsing and bucket recomputation
    assert sorted(loaded) == ["plain", "rotated"]
    reader = open_cache(zimage_caches["ignore"])
    item, info = loaded["rotated"], reader.info("rotated")
    assert item["size"] == STORED == tuple(info["original_size"])
    assert musubi_bucket(STORED, (64, 64), False) == tuple(info["bucket"])  # the bucket musubi recomputes
    assert torch.equal(item["latents"], reader.tensors("rotated")["latents"].float())


def test_musubi_refuses_the_rotated_item_from_an_apply_cache(zimage_caches, tmp_path):
    summary = export_musubi(zimage_caches["apply"], tmp_path, arch="zi")
    refused = {s["key"]: s["reason"] for s in summary.skipped if "caption" not in s["reason"]}
    assert list(refused) == ["rotated"] and "--exif ignore" in refused["rotated"]
    assert sorted(items_of(musubi_load(tmp_path, "zi"))) == ["plain"]


# -- preview ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ignore", "apply"])
def test_preview_source_crop_is_what_the_encoder_saw(caches, datasets, mode):
    reader = open_cache(caches[mode])
    exif = ExifMode.recorded(reader.fingerprint)
    assert exif is ExifMode(mode)
    info, rel = reader.info("rotated"), reader.source_paths()["rotated"]
    summary = PreviewSummary("x.png", ["rotated"], (1, 1))
    crop = np.asarray(_source_crop("rotated", info, rel, datasets[0], summary, exif))
    plan = ItemPlan(
        "rotated",
        os.fspath(datasets[0] / rel),
        tuple(info["original_size"]),
        tuple(info["bucket"]),
        tuple(info["resized"]),
        tuple(info["crop"]),
        ExifMode(mode),
    )
    assert not summary.missing_sources and crop.shape == (info["bucket"][1], info["bucket"][0], 3)
    np.testing.assert_array_equal(crop, decode(plan, MAX_PIXELS))
