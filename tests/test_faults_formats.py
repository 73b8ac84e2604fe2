"""Image formats past Pillow's own, through the CLI: HEIC/HEIF (pillow-heif) and AVIF become items, decoded or
failed with the line that installs their plugin; floating-point pixels are scaled by their range or failed with
it, never clipped to black."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cachebuild import open_cache
from cachebuild.cache.manifest import Manifest
from cachebuild.cli import cli
from cachebuild.images import formats
from tests.test_cli import latents_args


def gradient(size=(96, 64)) -> Image.Image:
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.full((h, w, 1), 90.0)], 2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def build(root, out, vae):
    result = CliRunner().invoke(cli, latents_args(root, out, vae, "--latents", "mean", "-q"))
    with Manifest.open(out, create=False) as m:
        return result, {r.key: r for r in m.items("latents")}


@pytest.fixture
def no_plugins(monkeypatch):
    """As on a machine without pillow-heif, pillow-avif-plugin, and with a Pillow that has no AVIF."""
    for name in ("pillow_heif", "pillow_avif"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    monkeypatch.setattr(formats.features, "check", lambda name: False)
    formats.plugin_ready.cache_clear()
    yield
    formats.plugin_ready.cache_clear()


def test_heic_and_avif_become_items_and_float_pixels_keep_their_values(tmp_path, tiny_vae):
    pytest.importorskip("pillow_heif").register_heif_opener()
    root = tmp_path / "ds"
    root.mkdir()
    gradient().save(root / "phone.heic", quality=95)
    gradient().save(root / "web.avif", quality=95)
    Image.fromarray(np.full((64, 64), 0.5, np.float32), "F").save(root / "half.tif")  # 32-bit float TIFF
    Image.fromarray(np.full((64, 64), 128, np.uint8), "L").save(root / "grey.png")  # the same picture in 8 bits
    Image.fromarray(np.full((64, 64), 128.0, np.float32), "F").save(root / "eight.tif")  # 8-bit values as floats
    Image.fromarray(np.linspace(0, 4, 64 * 64, dtype=np.float32).reshape(64, 64), "F").save(root / "hdr.tif")
    out = tmp_path / "cache"
    result, rows = build(root, out, tiny_vae)
    assert result.exit_code == 3, result.output  # hdr fails, with its range
    assert {k: r.status for k, r in rows.items()} == {
        "phone": "done", "web": "done", "half": "done", "grey": "done", "eight": "done", "hdr": "failed"
    }  # fmt: skip
    assert "range from 0 to 4, neither 0..1 nor whole numbers in 0..255" in rows["hdr"].reason
    cache = open_cache(out)
    assert torch.equal(cache["half"]["latents"], cache["grey"]["latents"])  # 0.5 is mid-grey, not black
    assert torch.equal(cache["eight"]["latents"], cache["grey"]["latents"])
    assert cache["phone"]["original_size"] == cache["web"]["original_size"] == (96, 64)


def test_without_their_plugins_heic_and_avif_fail_with_the_install_line(tmp_path, tiny_vae, no_plugins):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")  # never opened: the plugin is missing
    (root / "web.avif").write_bytes(b"\x00\x00\x00\x18ftypavif")
    gradient().save(root / "ok.png")
    result, rows = build(root, tmp_path / "cache", tiny_vae)
    assert result.exit_code == 3, result.output
    assert rows["ok"].status == "done"
    assert rows["phone"].reason == "HEIC/HEIF images need pillow-heif: pip install 'cachebuild[heif]'"
    assert "pip install -U 'pillow>=11.3', or pip install 'cachebuild[avif]'" in rows["web"].reason
