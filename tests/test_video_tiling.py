"""Spatial tiling of the video VAEs (families.video_tiling): the VAE's own tiles, equal to the untiled encode where
the clip fits one tile, different by the measured amount where it does not, cut as ``tile_grid`` says, lower peak
memory (counted on the CPU), a recorded setting, chosen under a budget; and the memory estimate's shape."""

from __future__ import annotations

import pytest
import torch

from cachebuild.config import LatentsConfig, ModelSpec, TilingMode
from cachebuild.errors import ConfigError
from cachebuild.families.video_tiling import (
    GIB,
    default_tiling,
    estimate_clip_bytes,
    make_tiling,
    resolve_tiling,
    tile_grid,
    tiling_fingerprint,
    tiling_of_fingerprint,
)
from cachebuild.families.video_vae import Tiling, encode_clip_raw
from cachebuild.testing import TINY_VIDEO_VAES, VIDEO_VAE_CONFIGS, video_vae_family
from cachebuild.testing.memory import PeakBytes
from tests.test_video_vae import frames_for, make_clip, pixels, relative_difference


@pytest.fixture
def tiny(tiny_video_vaes):
    return tiny_video_vaes


TILES = Tiling(32, 24)  # tiny tiles: 48 px clips take 2 x 2 of them
# relative difference of the stored means, tiled against untiled, measured on these tiny VAEs and 48 px clips
# (make_clip, seed 0): the tiles are 6 to 8 latent cells wide, so every cell is near a seam or a tile border
MEASURED = {"wan2.1": 0.1025, "wan2.2-ti2v": 0.1986, "hunyuanvideo-1.5": 0.1882, "ltx-2": 0.6483}


def encode(tiny, kind: str, size: int, tiling: Tiling | None) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """(stored means, shapes of every encoder call's input) of a ``size`` px clip."""
    _, family, vae = tiny[kind]
    calls = []
    hook = vae.encoder.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    try:
        out = encode_clip_raw(vae, family, pixels(make_clip(frames_for(kind), size=size)), tiling)
    finally:
        hook.remove()
    return out[:, : family.latent_channels], calls


@pytest.mark.parametrize("kind", TINY_VIDEO_VAES)
def test_default_tiles_are_the_vaes_own(kind, tiny):
    folder, family, vae = tiny[kind]
    tiling = default_tiling(family, vae.config)
    patch = vae.config.get("patch_size") or 1 if kind.startswith("wan") else 1
    assert tiling.tile == vae.tile_sample_min_height * patch
    if kind == "hunyuanvideo-1.5":  # a tile and an overlap factor
        assert tiling.stride == int(vae.tile_sample_min_height * (1 - vae.tile_overlap_factor))
    else:
        assert tiling.stride == vae.tile_sample_stride_height * patch


@pytest.mark.parametrize("kind", TINY_VIDEO_VAES)
def test_a_clip_within_one_tile_is_not_tiled(kind, tiny):
    whole, _ = encode(tiny, kind, 32, None)
    tiled, calls = encode(tiny, kind, 32, Tiling(64, 48))
    assert torch.equal(tiled, whole)
    assert tile_grid(tiny[kind][1], tiny[kind][2].config, Tiling(64, 48), 32, 32) == (1, (32, 32))


@pytest.mark.parametrize("kind", TINY_VIDEO_VAES)
def test_tiles_change_the_latents_by_the_measured_amount(kind, tiny):
    _, family, vae = tiny[kind]
    whole, untiled_calls = encode(tiny, kind, 48, None)
    tiled, calls = encode(tiny, kind, 48, TILES)
    assert relative_difference(tiled, whole) == pytest.approx(MEASURED[kind], rel=0.05)
    n, (th, tw) = tile_grid(family, vae.config, TILES, 48, 48)
    assert n == 4 and len(calls) == n * len(untiled_calls)  # Wan: every tile runs the clip's causal chunks
    patch = vae.config.get("patch_size") or 1 if kind.startswith("wan") else 1
    assert max(c[-2] for c in calls) * patch == th and max(c[-1] for c in calls) * patch == tw


@pytest.mark.parametrize("kind", TINY_VIDEO_VAES)
def test_tiles_lower_peak_memory(kind, tiny):
    """Counted on the CPU: tensor storage alive at the peak of a 64 px frame's encode, 9 tiles against none (one
    frame: tiles are spatial, and the count's dispatch per operator is slow)."""
    _, family, vae = tiny[kind]
    x = pixels(make_clip(1, size=64))
    peaks = []
    for tiling in (None, TILES):
        with PeakBytes(x, *vae.parameters(), *vae.buffers()) as counter:
            encode_clip_raw(vae, family, x, tiling)
        peaks.append(counter.peak)
    assert peaks[1] < 0.5 * peaks[0]  # measured: 0.26 (Wan 2.1, HunyuanVideo 1.5, LTX-2), 0.35 (TI2V-5B)


def test_tiling_is_recorded_only_where_used():
    assert tiling_fingerprint(None) == {}
    fp = tiling_fingerprint(Tiling(256, 192))
    assert fp == {"tiling": {"tile": 256, "stride": 192}}
    assert tiling_of_fingerprint(fp) == Tiling(256, 192) and tiling_of_fingerprint({}) is None


@pytest.mark.parametrize(
    ("kind", "tile", "stride"),
    [
        ("wan2.1", 100, None),
        ("ltx-2", 512, 500),
        ("hunyuanvideo-1.5", 256, 256),
        ("hunyuanvideo-1.5", 96, 16),  # its overlap factor 5/6 tiles every int(96 * (1 - 5/6)) = 15 px
        ("wan2.2-ti2v", 520, None),
    ],
)
def test_tiles_the_vae_cannot_take_are_refused_naming_its_own(kind, tile, stride):
    family = video_vae_family(kind)
    with pytest.raises(ConfigError, match=r"must be multiples of \d+ px .* such as --tile-size \d+ --tile-stride"):
        make_tiling(family, VIDEO_VAE_CONFIGS[kind], tile, stride)


def test_released_vaes_tile_as_diffusers_sets_them():
    """Image pixels: Wan 2.1 and HunyuanVideo 1.5 256/192, LTX-2 512/448, TI2V-5B 512/384 (256/192 patchified)."""
    got = {k: default_tiling(video_vae_family(k), VIDEO_VAE_CONFIGS[k]) for k in VIDEO_VAE_CONFIGS}
    assert got == {
        "wan2.1": Tiling(256, 192),
        "wan2.2-ti2v": Tiling(512, 384),
        "hunyuanvideo-1.5": Tiling(256, 192),
        "ltx-2": Tiling(512, 448),
    }
    family = video_vae_family("hunyuanvideo-1.5")
    assert make_tiling(family, {}, 384) == Tiling(384, 288)  # the VAE's 1/4 overlap kept


def test_auto_tiles_only_what_does_not_fit():
    kind = "hunyuanvideo-1.5"
    family, config = video_vae_family(kind), VIDEO_VAE_CONFIGS[kind]
    largest = (81, 720, 1280)
    own = default_tiling(family, config)
    assert resolve_tiling(TilingMode.OFF, family, config, largest, budget=1) is None
    assert resolve_tiling(TilingMode.ON, family, config, largest, budget=None) == own
    assert resolve_tiling(TilingMode.AUTO, family, config, largest, budget=None) is None  # nothing measured: exact
    assert resolve_tiling(TilingMode.AUTO, family, config, largest, budget=14 * GIB) == own  # about 11.7 GiB
    halved = Tiling(128, 96)  # its own tiles need about 11.7 GiB at 81 frames of 720p: a 10 GiB budget halves them
    assert resolve_tiling(TilingMode.AUTO, family, config, largest, budget=10 * GIB) == halved
    assert resolve_tiling(TilingMode.AUTO, family, config, largest, budget=1 * GIB) == halved  # the smallest
    assert resolve_tiling(TilingMode.AUTO, family, config, (17, 256, 256), budget=10 * GIB) is None
    on = resolve_tiling(TilingMode.ON, family, config, largest, None, size=(384, None))
    assert on == Tiling(384, 288)
    finishing = {"tiling": {"tile": 384, "stride": 288}}  # a cache started tiled stays tiled, and untiled untiled
    assert resolve_tiling(TilingMode.AUTO, family, config, largest, 1000 * GIB, existing=finishing) == on
    assert resolve_tiling(TilingMode.AUTO, family, config, largest, 1 * GIB, existing={"vae": {}}) is None


@pytest.mark.parametrize("kind", list(VIDEO_VAE_CONFIGS))
def test_estimate_follows_each_encoder(kind):
    """Wan's memory is flat in frames; the whole-clip encoders' grows with them; tiles lower it at 720p."""
    family, config = video_vae_family(kind), VIDEO_VAE_CONFIGS[kind]
    side = (704, 1280) if kind == "ltx-2" else (720, 1280)
    untiled = [estimate_clip_bytes(family, config, f, *side) for f in (17, 81)]
    tiled = estimate_clip_bytes(family, config, 81, *side, tiling=default_tiling(family, config))
    input_growth = 3 * (81 - 17) * side[0] * side[1] * 2 * (2 if kind == "wan2.2-ti2v" else 1)
    if kind.startswith("wan"):
        assert untiled[1] - untiled[0] < 1.05 * input_growth + 50 * 2**20  # the input, the outputs: nothing more
    else:
        assert untiled[1] > 3 * untiled[0]
    assert tiled < untiled[1] and estimate_clip_bytes(family, config, 17, *side, batch=2) == 2 * untiled[0]


def test_tile_options_that_cannot_apply_are_refused(tmp_path):
    base = {"dataset": tmp_path, "out": tmp_path / "out", "model": ModelSpec(vae="x")}
    with pytest.raises(ConfigError, match="drop them with --tiling off"):
        LatentsConfig(**base, tiling=TilingMode.OFF, tile_size=256)
    with pytest.raises(ConfigError, match=r"--tile-stride \(256\) must be below --tile-size \(256\)"):
        LatentsConfig(**base, tile_size=256, tile_stride=256)
    assert LatentsConfig(**base, tiling=TilingMode.ON, tile_size=384).tile_size == 384


def test_cli_refuses_tiles_with_tiling_off(tmp_path):
    from click.testing import CliRunner

    from cachebuild.cli import cli

    args = ["latents", str(tmp_path), "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, [*args, "--tiling", "off", "--tile-size", "256"])
    assert result.exit_code == 2 and "drop them with --tiling off" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(VIDEO_VAE_CONFIGS))
def test_device_memory_against_frames(kind):
    """The released configs (random weights, bf16) at 17, 33 and 81 frames of 320x512: torch.cuda's peak beyond the
    weights is flat in frames for Wan and grows with them for the whole-clip encoders; the VAE's own tiles lower it;
    the planning estimate stays within a factor of two. benchmarks/bench_video_memory.py prints the same at 720p."""
    from cachebuild.encode import is_out_of_memory
    from cachebuild.testing import build_video_vae

    family, config = video_vae_family(kind), VIDEO_VAE_CONFIGS[kind]
    vae = build_video_vae(kind, torch.bfloat16, "cuda")
    peaks: dict[tuple[bool, int], int | None] = {}
    for tiled in (False, True):
        tiling = default_tiling(family, config) if tiled else None
        for frames in (17, 33, 81):
            frames = (frames - 1) // family.frame_modulus * family.frame_modulus + 1
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            try:
                x = torch.zeros(1, 3, frames, 320, 512, dtype=torch.bfloat16, device="cuda")
                encode_clip_raw(vae, family, x, tiling)
                del x
                torch.cuda.synchronize()
                peaks[(tiled, frames)] = torch.cuda.max_memory_allocated() - base
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                peaks[(tiled, frames)] = None
            torch.cuda.empty_cache()
            measured = peaks[(tiled, frames)]
            if measured is not None:
                estimate = estimate_clip_bytes(family, config, frames, 320, 512, tiling=tiling)
                assert 0.5 < measured / estimate < 2.0, (tiled, frames, measured, estimate)
    longest = max(f for _, f in peaks)
    shortest = min(f for _, f in peaks)
    tiled_long = peaks[(True, longest)]
    assert tiled_long is not None
    untiled_long, untiled_short = peaks[(False, longest)], peaks[(False, shortest)]
    if kind.startswith("wan"):
        assert untiled_long < 1.5 * untiled_short
    else:
        assert untiled_long is None or untiled_long > 2 * untiled_short
        assert untiled_long is None or tiled_long < untiled_long
