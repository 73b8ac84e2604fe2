"""Pixel modes: the default reads files as convert("RGB") does; --color icc and --alpha white|black only where
set, and in the fingerprint only then; a cache built before the modes continues the old way and never mixes;
--alpha-mask stores each image's alpha at bucket size, read back as alpha_mask and checked by verify."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cachebuild.cache.manifest import Manifest
from cachebuild.cli import cli
from cachebuild.config import AlphaMode, ColorMode, DType, LatentsMode
from cachebuild.consumers.preview import PreviewSummary, _source_crop
from cachebuild.consumers.reader import open_cache
from cachebuild.consumers.verify import verify_cache
from cachebuild.errors import FingerprintMismatch
from cachebuild.images.load import LoadedBatch, join_batches
from cachebuild.images.pixels import BEFORE_MODES, REFERENCE, Pixels, recorded_pixels, run_pixels
from cachebuild.jobs.latents import build_latents
from tests.conftest import write_image
from tests.pixel_files import write_cmyk, write_icc_tagged, write_palette_transparent, write_rgba
from tests.test_pipeline import read_cache
from tests.test_reader import small_cfg

SIDE = (64, 64)  # a bucket of the small bucket set: decoded without a resize


def write_odd(root: Path, names=("rgba", "pal", "icc", "cmyk", "plain")) -> Path:
    writers = {
        "rgba": lambda: write_rgba(root / "rgba.png", SIDE),
        "pal": lambda: write_palette_transparent(root / "pal.png", SIDE),
        "icc": lambda: write_icc_tagged(root / "icc.png", SIDE),
        "cmyk": lambda: write_cmyk(root / "cmyk.jpg", SIDE),
        "plain": lambda: write_image(root / "plain.jpg", SIDE, seed=5),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        writers[name]()
    return root


def cfg(ds: Path, out: Path, vae: Path, **kw):
    return small_cfg(ds, out, vae, **({"latents": LatentsMode.MEAN, "dtype_out": DType.FP32} | kw))


def old_fingerprint(fp: dict) -> dict:
    """The fingerprint a cache built before the pixel modes holds: no pixel fields, loader_version 1."""
    return {k: v for k, v in fp.items() if k not in ("color", "alpha", "alpha_mask")} | {"loader_version": 1}


def build_pixel_caches(root: Path, vae: Path) -> dict[str, Path]:
    """The odd files, and caches of them: the defaults with alpha masks, and --color icc --alpha white (the rules of
    caches built before the modes). The ``pixel_caches`` fixture (conftest) builds them once per session."""
    ds = write_odd(root / "ds")
    out = {"ds": ds, "default": root / "default", "old_rules": root / "old_rules"}
    build_latents(cfg(ds, out["default"], vae, alpha_mask=True))
    build_latents(cfg(ds, out["old_rules"], vae, color=ColorMode.ICC, alpha=AlphaMode.WHITE))
    return out


@pytest.fixture
def built(pixel_caches) -> dict[str, Path]:
    return pixel_caches


def test_run_pixels_rules():
    old = {"loader_version": 1}
    assert run_pixels(None, None, False, None) == (REFERENCE, {})
    assert run_pixels(None, None, False, old) == (BEFORE_MODES, old)  # continues the old way, its fingerprint kept
    assert run_pixels(ColorMode.ICC, AlphaMode.WHITE, False, old) == (BEFORE_MODES, old)  # the same rules, asked for
    # other rules: the rest as --rebuild would take them, the current fingerprint, which differs from the old
    assert run_pixels(None, AlphaMode.DROP, False, old) == (REFERENCE, {})
    assert run_pixels(None, None, True, old) == (Pixels(alpha_mask=True), {"alpha_mask": True})
    assert run_pixels(ColorMode.NONE, None, False, old) == (REFERENCE, {})
    assert run_pixels(ColorMode.ICC, None, False, old) == (BEFORE_MODES, old)  # one of the old rules: kept
    black = Pixels(alpha=AlphaMode.BLACK)
    assert run_pixels(None, AlphaMode.BLACK, False, {"loader_version": 2}) == (black, {"alpha": "black"})
    assert recorded_pixels(old) == BEFORE_MODES and recorded_pixels({"loader_version": 2}) == REFERENCE
    recorded = recorded_pixels({"loader_version": 2, "color": "icc", "alpha_mask": True})
    assert recorded == Pixels(ColorMode.ICC, alpha_mask=True)


def test_fingerprint_names_the_modes_only_when_set(built):
    default, old_rules = open_cache(built["default"]).fingerprint, open_cache(built["old_rules"]).fingerprint
    assert default["loader_version"] == 2 and "color" not in default and "alpha" not in default
    assert default["alpha_mask"] is True
    assert old_rules["color"] == "icc" and old_rules["alpha"] == "white" and "alpha_mask" not in old_rules


def test_the_modes_change_only_the_files_they_concern(built):
    default, old_rules = read_cache(built["default"]), read_cache(built["old_rules"])
    for key in ("rgba", "pal", "icc"):  # transparency that hides colour; a profile that swaps red and blue
        assert (default[key]["latents"] - old_rules[key]["latents"]).abs().max() > 0.05, key
    for key in ("cmyk", "plain"):  # no profile, no transparency: the same pixels either way
        assert torch.equal(default[key]["latents"], old_rules[key]["latents"]), key


def test_alpha_mask_is_stored_read_back_and_verified(built):
    reader = open_cache(built["default"])
    with Image.open(built["ds"] / "rgba.png") as img:
        rgba_alpha = np.asarray(img)[..., 3]
    with Image.open(built["ds"] / "pal.png") as img:
        pal_alpha = np.asarray(img.convert("RGBA"))[..., 3]
    want = {"rgba": rgba_alpha, "pal": pal_alpha}
    for key in reader:
        stored = reader.tensors(key)["alpha_mask"]
        assert stored.dtype == torch.uint8 and stored.shape == (64, 64)  # (H, W), the bucket's pixels
        expected = want.get(key, np.full((64, 64), 255, np.uint8))  # no alpha: all ones, as sd-scripts
        np.testing.assert_array_equal(stored.numpy(), expected)
        mask = reader[key]["alpha_mask"]  # as sd-scripts hands it to its loss: float32 alpha / 255
        assert mask.dtype == torch.float32
        np.testing.assert_array_equal(mask.numpy(), expected.astype(np.float32) / 255.0)
    batch = next(iter(torch.utils.data.DataLoader(reader.dataset(), batch_size=2)))
    assert batch["alpha_mask"].shape == (2, 64, 64)
    assert verify_cache(built["default"]).ok
    assert "alpha_mask" not in read_cache(built["old_rules"])["rgba"]


def test_preview_reads_each_source_by_the_rules_of_its_cache(built):
    for name, white in (("default", False), ("old_rules", True)):
        reader = open_cache(built[name])
        summary = PreviewSummary("x.png", ["rgba"], (1, 1))
        info, rel = reader.info("rgba"), reader.source_paths()["rgba"]
        crop = np.asarray(
            _source_crop("rgba", info, rel, built["ds"], summary, pixels=recorded_pixels(reader.fingerprint))
        )
        assert crop.shape == (64, 64, 3) and bool((crop[:, :21] == 255).all()) is white  # the transparent third


def test_join_batches_keeps_each_alpha_with_its_item():
    items = [object(), object(), object()]
    parts = [
        LoadedBatch([items[i]], np.full((1, 2, 2, 3), i, np.uint8), [], np.full((1, 2, 2), 10 + i, np.uint8))
        for i in (0, 2)
    ]
    joined = join_batches(parts, [(items[1], "crashed")])
    assert joined.items == [items[0], items[2]] and joined.failures == [(items[1], "crashed")]
    assert joined.pixels[:, 0, 0, 0].tolist() == [0, 2] and joined.alpha[:, 0, 0].tolist() == [10, 12]


def cli_args(ds: Path, out: Path, vae: Path) -> list[str]:
    args = ["latents", str(ds), "--vae", str(vae), "--out", str(out), "--workers", "0", "--device", "cpu", "-q"]
    args += ["--resolution", "64", "--min-bucket-reso", "32", "--max-bucket-reso", "128", "--bucket-reso-steps", "32"]
    return [*args, "--latents", "mean", "--dtype-out", "fp32", "--dtype", "fp32", "--batch-size", "3"]


def test_a_cache_built_before_the_modes_continues_the_old_way(built, tiny_vae, tmp_path):
    """A cache as the code before the modes left it (its fingerprint, its pixels), continued by the CLI with no
    pixel option: nothing rebuilt, the new items read by the old rules; another rule refuses, --rebuild starts over."""
    ds = write_odd(tmp_path / "ds", names=("rgba", "plain"))
    out = tmp_path / "cache"
    build_latents(cfg(ds, out, tiny_vae, color=ColorMode.ICC, alpha=AlphaMode.WHITE))
    with Manifest.open(out, create=False) as m:
        before = old_fingerprint(m.fingerprint("latents"))
        m.set_fingerprint("latents", before)
    first = read_cache(out)
    for name in ("pal.png", "icc.png", "cmyk.jpg"):  # new files since
        shutil.copy(built["ds"] / name, ds / name)
    runner, args = CliRunner(), cli_args(ds, out, tiny_vae)
    done = runner.invoke(cli, args)
    assert done.exit_code == 0, done.output
    assert open_cache(out).fingerprint == before
    now, old_rules = read_cache(out), read_cache(built["old_rules"])
    for key in ("rgba", "plain"):
        assert torch.equal(now[key]["latents"], first[key]["latents"])  # kept, not encoded again
    for key in ("pal", "icc", "cmyk"):
        assert torch.equal(now[key]["latents"], old_rules[key]["latents"]), key  # the old rules, not the new
    refused = runner.invoke(cli, [*args, "--alpha", "drop"])
    assert refused.exit_code == 2 and "loader_version" in refused.output and "--rebuild" in refused.output
    with pytest.raises(FingerprintMismatch, match="alpha_mask"):
        build_latents(cfg(ds, out, tiny_vae, alpha_mask=True))  # the old items have no mask: never mixed
    rebuilt = runner.invoke(cli, [*args, "--rebuild"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert open_cache(out).fingerprint["loader_version"] == 2 and "alpha" not in open_cache(out).fingerprint
    default = read_cache(built["default"])
    for key in ("rgba", "pal", "icc", "cmyk", "plain"):
        assert torch.equal(read_cache(out)[key]["latents"], default[key]["latents"]), key


def test_cli_options(built, tiny_vae, tmp_path):
    args = cli_args(built["ds"], tmp_path / "c", tiny_vae)
    ok = CliRunner().invoke(cli, [*args, "--color", "icc", "--alpha", "black", "--alpha-mask"])
    assert ok.exit_code == 0, ok.output
    fp = open_cache(tmp_path / "c").fingerprint
    assert (fp["color"], fp["alpha"], fp["alpha_mask"]) == ("icc", "black", True)
    rgba = read_cache(tmp_path / "c")["rgba"]
    assert rgba["alpha_mask"].shape == (64, 64) and not torch.equal(
        rgba["latents"], read_cache(built["old_rules"])["rgba"]["latents"]
    )  # black, not white
    bad = CliRunner().invoke(cli, [*args, "--alpha", "grey"])
    assert bad.exit_code == 2 and "drop" in bad.output and "Traceback" not in bad.output
