"""Exported latents of files that the reading decides (RGBA hiding colour, a palette with transparency, a
non-identity ICC profile, CMYK) equal what the trainer's own loading code encodes from the file, restated here
as tests/test_export*.py restate their loaders; the alpha mask is sd-scripts' own; caches read otherwise warn.

The files are bucket-sized, so neither trainer resizes them: the comparison is of the pixel path alone (the
resampling differs, see docs/export.md)."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cachebuild.config import DType, LatentsMode
from cachebuild.consumers.export.kohya import export_kohya
from cachebuild.consumers.export.musubi import export_musubi
from cachebuild.consumers.reader import open_cache
from cachebuild.images.load import decode
from cachebuild.images.pixels import BEFORE_MODES
from cachebuild.images.plan import ItemPlan
from cachebuild.jobs.latents import build_latents
from cachebuild.testing import make_tiny_vae
from tests.test_export_musubi import MUSUBI, items_of, musubi_load
from tests.test_pixels import SIDE
from tests.test_reader import small_cfg

pytestmark = pytest.mark.filterwarnings("ignore:Palette images with Transparency")  # the trainers' own convert
KEYS = ("rgba", "pal", "icc", "cmyk", "plain")
FILES = {"rgba": "rgba.png", "pal": "pal.png", "icc": "icc.png", "cmyk": "cmyk.jpg", "plain": "plain.jpg"}
TOL = {"rtol": 1e-4, "atol": 1e-5}  # float32 on the CPU: the two ways to [-1, 1] differ in the last bit


def sd_scripts_pixels(path: Path, alpha_mask: bool) -> tuple[torch.Tensor, np.ndarray | None]:
    """sd-scripts' pixels for a latent it caches, restated (library/train_util.py): ``load_image(path, alpha)``
    opens the file and converts it to RGB (RGBA with --alpha_mask), nothing more; ``trim_and_resize_if_required``
    leaves a bucket-sized image alone; ``load_images_and_masks_for_caching`` takes ``alpha / 255`` as the mask,
    keeps channels :3 and applies IMAGE_TRANSFORMS (ToTensor, Normalize([0.5], [0.5])). (3, H, W), [-1, 1]."""
    with Image.open(path) as image:
        if alpha_mask:
            if image.mode != "RGBA":
                image = image.convert("RGBA")
        elif image.mode != "RGB":
            image = image.convert("RGB")
        img = np.array(image, np.uint8)
    mask = img[:, :, 3].astype(np.float32) / 255.0 if alpha_mask else None
    x = torch.from_numpy(img[:, :, :3].copy()).permute(2, 0, 1).float() / 255.0  # ToTensor
    return (x - 0.5) / 0.5, mask  # Normalize


def musubi_pixels(path: Path) -> torch.Tensor:
    """musubi-tuner's pixels for a zi latent, restated: datasources' ``Image.open`` and ``convert("RGB")`` unless
    RGB or RGBA; ``resize_image_to_bucket`` hands a bucket-sized image on as ``np.array``;
    ``preprocess_contents_zimage`` drops an alpha channel and maps to [-1, 1] by ``/ 127.5 - 1``. (3, H, W)."""
    img = Image.open(path)
    if img.mode != "RGB" and img.mode != "RGBA":
        img = img.convert("RGB")
    content = torch.from_numpy(np.array(img))
    if content.shape[-1] == 4:
        content = content[..., :3]
    return content.permute(2, 0, 1).float() / 127.5 - 1.0


@functools.cache
def load_vae(path: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(path).eval()


def encode_mean(vae_path: Path, x: torch.Tensor) -> torch.Tensor:
    """The posterior mean (musubi's mode; what a --latents mean cache holds) of (B, 3, H, W) pixels in [-1, 1]."""
    with torch.no_grad():
        return load_vae(vae_path).encode(x).latent_dist.mean


def old_rules_pixels(path: Path) -> torch.Tensor:
    """What a cache built before the pixel modes encoded: ICC to sRGB, transparency over white."""
    item = ItemPlan(path.stem, str(path), SIDE, SIDE, SIDE, (0, 0), pixels=BEFORE_MODES)
    return torch.from_numpy(decode(item, 10**8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_vae, pixel_caches) -> dict[str, Path]:
    """The odd files' caches (conftest's ``pixel_caches``: ``sdxl`` with alpha masks, ``old_rules``), and a Z-Image
    type one with musubi's buckets and alpha masks."""
    root = tmp_path_factory.mktemp("export-pixels")
    zi_vae = make_tiny_vae(root / "zi-vae", latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    out = {"ds": pixel_caches["ds"], "vae": tiny_vae, "zi_vae": zi_vae, "zi": root / "zi"}
    out |= {"sdxl": pixel_caches["default"], "old_rules": pixel_caches["old_rules"]}
    kw = {"latents": LatentsMode.MEAN, "dtype_out": DType.FP32, "alpha_mask": True, "buckets": MUSUBI}
    build_latents(small_cfg(out["ds"], out["zi"], zi_vae, **kw))
    return out


def test_kohya_latents_and_alpha_masks_are_what_sd_scripts_caches(caches, tmp_path):
    ds = shutil.copytree(caches["ds"], tmp_path / "ds")
    summary = export_kohya(caches["sdxl"], ds)
    assert summary.written == len(KEYS) and not summary.skipped
    assert not [w for w in summary.warnings if "exported item" in w]  # read as sd-scripts reads them
    pixels, masks = {}, {}
    for key in KEYS:
        pixels[key], masks[key] = sd_scripts_pixels(ds / FILES[key], alpha_mask=True)
        assert torch.equal(sd_scripts_pixels(ds / FILES[key], alpha_mask=False)[0], pixels[key])  # either way
    changed = ("rgba", "pal", "icc")  # the files whose pixels the old rules change
    want = encode_mean(caches["vae"], torch.stack([pixels[k] for k in KEYS]))  # (5, C, h, w)
    old = encode_mean(caches["vae"], torch.stack([old_rules_pixels(ds / FILES[k]) for k in changed]))
    for i, key in enumerate(KEYS):
        with np.load(ds / f"{key}_0064x0064_sdxl.npz") as npz:
            assert sorted(npz.files) == ["alpha_mask", "crop_ltrb", "latents", "original_size"]
            torch.testing.assert_close(torch.from_numpy(npz["latents"]), want[i], **TOL, msg=key)
            assert npz["alpha_mask"].dtype == np.float32 and npz["alpha_mask"].shape == (64, 64)
            np.testing.assert_array_equal(npz["alpha_mask"], masks[key])  # alpha / 255, ones without alpha
    for j, key in enumerate(changed):  # the old rules would fail the comparison, far past the tolerance
        assert (old[j] - want[KEYS.index(key)]).abs().max() > 1e-2, key
    assert (masks["rgba"] < 1).any() and (masks["pal"] < 1).any() and (masks["icc"] == 1).all()


def test_flux_layout_suffixes_the_alpha_mask_too(caches, tmp_path):
    ds = shutil.copytree(caches["ds"], tmp_path / "ds")
    export_kohya(caches["zi"], ds, family="flux")  # a 16-channel Flux.1-type VAE: sd-scripts' flux layout
    with np.load(ds / "rgba_0064x0064_flux.npz") as npz:
        res = "_32x32"  # latent height x width for the tiny VAE (downsampling 2)
        assert f"alpha_mask{res}" in npz.files and npz[f"alpha_mask{res}"].shape == (64, 64)
        _, mask = sd_scripts_pixels(ds / "rgba.png", alpha_mask=True)
        np.testing.assert_array_equal(npz[f"alpha_mask{res}"], mask)


def test_musubi_latents_are_what_musubi_caches_and_masks_are_said_to_stay(caches, tmp_path):
    summary = export_musubi(caches["zi"], tmp_path, arch="zi")
    assert any("alpha masks are not exported" in w for w in summary.warnings)
    loaded = items_of(musubi_load(tmp_path, "zi"))  # musubi's own name parsing and collation
    assert sorted(loaded) == sorted(KEYS)
    want = encode_mean(caches["zi_vae"], torch.stack([musubi_pixels(caches["ds"] / FILES[k]) for k in KEYS]))
    for i, key in enumerate(KEYS):
        assert not any("mask" in name for name in loaded[key])
        torch.testing.assert_close(loaded[key]["latents"], want[i], **TOL, msg=key)


def test_caches_read_otherwise_warn_with_the_items_and_the_fix(caches, tmp_path):
    ds = shutil.copytree(caches["ds"], tmp_path / "ds")
    warnings = [w for w in export_kohya(caches["old_rules"], ds).warnings if "exported item" in w]
    assert len(warnings) == 1
    assert warnings[0].startswith("3 exported item(s) have an ICC profile or transparency")
    assert "--color icc --alpha white" in warnings[0] and "--rebuild" in warnings[0] and "e.g. icc" in warnings[0]
    reader = open_cache(caches["old_rules"])
    with np.load(ds / "cmyk_0064x0064_sdxl.npz") as npz:  # a file the rules do not touch is still exported
        np.testing.assert_array_equal(npz["latents"], reader.tensors("cmyk")["latents"].numpy())
