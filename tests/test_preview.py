"""preview: a PNG grid of the expected size, source crops as the encoder saw them, decoded latents beside them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cachebuild.cli import cli
from cachebuild.config import ModelSpec
from cachebuild.consumers.preview import BACKGROUND, PAD, PLACEHOLDER, grid_size, preview_cache, tile_array
from cachebuild.consumers.reader import open_cache
from cachebuild.errors import ConfigError
from cachebuild.images.load import decode
from cachebuild.images.plan import ItemPlan
from cachebuild.jobs.latents import build_latents
from cachebuild.testing import make_tiny_vae
from tests.test_reader import small_cfg, small_dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_vae) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("preview")
    ds = small_dataset(root / "ds")
    build_latents(small_cfg(ds, root / "cache", tiny_vae))
    return ds, root / "cache"


def test_png_has_the_grid_size_and_source_tiles_match_the_loader(built, tiny_vae, tmp_path):
    ds, cache = built
    out = tmp_path / "preview.png"
    summary = preview_cache(cache, ModelSpec(vae=str(tiny_vae)), out, n=4, seed=1, dataset=ds, tile=48)
    assert summary.size == grid_size(4, 48) == (2 * (2 * 48 + 3 * PAD) + PAD, 2 * (48 + PAD) + PAD)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == summary.size and img.mode == "RGB"
        grid = np.asarray(img)
    assert len(summary.keys) == 4 and summary.keys == sorted(summary.keys) and not summary.missing_sources
    reader = open_cache(cache)
    key, info = summary.keys[0], reader.info(summary.keys[0])
    plan = ItemPlan(
        key,
        str(ds / reader.source_paths()[key]),
        tuple(info["original_size"]),
        tuple(info["bucket"]),
        tuple(info["resized"]),
        tuple(info["crop"]),
    )
    expected = tile_array(Image.fromarray(decode(plan, 10**9)), 48)
    np.testing.assert_array_equal(grid[PAD : PAD + 48, PAD : PAD + 48], expected)  # first cell, left tile
    decoded = grid[PAD : PAD + 48, PAD + 48 + PAD : PAD + 2 * 48 + PAD]
    assert (decoded != np.array(BACKGROUND, dtype=np.uint8)).any()  # something was drawn on the right


def test_same_seed_same_items_and_n_is_capped_at_the_cache_size(built, tiny_vae, tmp_path):
    ds, cache = built
    spec = ModelSpec(vae=str(tiny_vae))
    a = preview_cache(cache, spec, tmp_path / "a.png", n=3, seed=5, tile=16)
    b = preview_cache(cache, spec, tmp_path / "b.png", n=3, seed=5, tile=16)
    assert a.keys == b.keys and (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    everything = preview_cache(cache, spec, tmp_path / "c.png", n=100, tile=16)
    assert len(everything.keys) == 6 and everything.size == grid_size(6, 16)


def test_without_a_dataset_the_recorded_folder_is_used(built, tiny_vae, tmp_path):
    ds, cache = built
    spec = ModelSpec(vae=str(tiny_vae))
    preview_cache(cache, spec, tmp_path / "given.png", n=2, tile=32, dataset=ds)
    preview_cache(cache, spec, tmp_path / "recorded.png", n=2, tile=32)
    assert (tmp_path / "given.png").read_bytes() == (tmp_path / "recorded.png").read_bytes()


def test_a_moved_dataset_gives_placeholder_source_tiles(tiny_vae, tmp_path):
    ds = small_dataset(tmp_path / "ds")
    build_latents(small_cfg(ds, tmp_path / "cache", tiny_vae))
    ds.rename(tmp_path / "moved")
    preview_cache(tmp_path / "cache", ModelSpec(vae=str(tiny_vae)), tmp_path / "p.png", n=1, tile=32)
    with Image.open(tmp_path / "p.png") as img:
        left = np.asarray(img)[PAD : PAD + 32, PAD : PAD + 32].reshape(-1, 3)
    assert {tuple(p) for p in left} <= {PLACEHOLDER, BACKGROUND}


def test_a_vae_that_cannot_decode_the_cache_is_refused(built, tmp_path):
    other = make_tiny_vae(tmp_path / "vae16", latent_channels=16)
    with pytest.raises(ConfigError, match="latent_channels"):
        preview_cache(built[1], ModelSpec(vae=str(other)), tmp_path / "x.png")
    with pytest.raises(ConfigError, match="does not exist"):
        preview_cache(built[1], ModelSpec(vae=str(other)), tmp_path / "nope" / "x.png")


def test_cli_preview_writes_the_png(built, tiny_vae, tmp_path):
    ds, cache = built
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(
        cli, ["preview", str(cache), "--vae", str(tiny_vae), "-n", "2", "-o", str(out), "--dataset", str(ds)]
    )
    assert result.exit_code == 0, result.output
    with Image.open(out) as img:
        assert img.size == grid_size(2)
