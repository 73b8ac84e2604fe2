"""musubi export of the text caches cachebuild builds for Qwen-Image and Flux.2 ([dev] and [klein]): the files
load by musubi-tuner's rules (tests/test_export_musubi.py restates them) and hold what the cache stored, as
musubi's own caching would have written it."""

from __future__ import annotations

import os

import pytest
import torch

from cachebuild.consumers.export.musubi import export_musubi
from cachebuild.consumers.reader import open_cache
from cachebuild.testing import make_tiny_flux2_vae, make_tiny_text_pipeline
from tests.test_export_musubi import build, items_of, musubi_load

CASES = {  # musubi arch: (cachebuild family, text key musubi reads, the tiny pipeline's VAE maker or None)
    "qi": ("qwen-image", "vl_embed", None),  # the tiny Qwen-Image pipeline carries its own vae/
    "f2d": ("flux2", "ctx_vec", make_tiny_flux2_vae),
    "f2k4b": ("flux2-klein", "ctx_vec", make_tiny_flux2_vae),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    arch = request.param
    family, text_key, make_vae = CASES[arch]
    root = tmp_path_factory.mktemp(arch)
    pipe = make_tiny_text_pipeline(root / "pipe", family)
    vae = make_vae(root / "vae") if make_vae else pipe / "vae"
    cache = build(root, vae, text=pipe)
    summary = export_musubi(cache, root / "musubi", arch=arch)
    return arch, text_key, cache, root / "musubi", summary


def test_text_files_hold_the_stored_rows_under_musubis_names(exported):
    arch, text_key, cache, folder, summary = exported
    assert not any("not exported" in w for w in summary.warnings), summary.warnings
    text = open_cache(cache)
    keys = {os.path.basename(k): k for k in text if k != "sub/a"}  # refused: a.png has its stem
    loaded = items_of(musubi_load(folder, arch))
    assert loaded and summary.written == 2 * len(loaded)
    for stem, item in loaded.items():
        rec = text.record(keys[stem])
        name = "qwen25vl" if arch == "qi" else ("mistral3" if arch == "f2d" else "qwen3")
        stored = rec[name][rec[f"{name}_mask"].bool()] if arch == "qi" else rec[name]
        got = item[text_key]
        dtype = str(stored.dtype).split(".")[-1]  # the stored dtype, under torch's name (this cache: fp32)
        assert item[f"{text_key}:key"] == f"{'varlen_' if arch == 'qi' else ''}{text_key}_{dtype}"
        assert torch.equal(got, stored)
        if arch != "qi":
            assert got.shape[0] == 512  # every row Flux.2's transformer reads, padding rows included
