"""Spatial tiling of video VAEs, and what a clip costs in device memory with and without it.

Wan's encoder runs a clip in causal chunks of 4 frames, so its device memory hardly grows with the frame count;
HunyuanVideo 1.5 and LTX-2 take the whole clip at once, so theirs grows with frames x area (HunyuanVideo 1.5's
mid-block attention also builds a mask of (latent cells)^2). Each VAE's own ``enable_tiling`` encodes overlapping
spatial tiles and blends the seams: memory then follows the tile, not the frame, and the latents change near the
seams (``benchmarks/bench_video_tiling.py`` measures by how much). So tiling is a recorded setting: a ``Tiling``
enters the cache fingerprint (``tiling_fingerprint``), untiled caches record nothing.

Tile sizes are image pixels. The VAEs take them as their own ``tile_sample_min_*``/``tile_sample_stride_*``
(HunyuanVideo 1.5: a tile and an overlap factor); Wan 2.2 TI2V-5B tiles its 2x2-patchified pixels, so its numbers
are halved on the way in (and diffusers tests whether to tile against the unpatched side: a clip wider than half
a tile is tiled).
"""

from __future__ import annotations

from cachebuild.config import TilingMode
from cachebuild.errors import ConfigError
from cachebuild.families.vae import VaeFamily
from cachebuild.families.video_vae import HUNYUAN15, LTX2, VIDEO_CLASSES, WAN, Tiling, _overlap, _patch

GIB = 2**30


def default_tiling(family: VaeFamily, config: dict) -> Tiling:
    """The VAE's own tile and stride as ``enable_tiling()`` sets them (Wan 2.2 TI2V-5B's in image pixels)."""
    spec = VIDEO_CLASSES[family.cls]
    patch = _patch(family, config)
    return Tiling(spec.tile * patch, spec.stride * patch)


def make_tiling(family: VaeFamily, config: dict, tile: int | None = None, stride: int | None = None) -> Tiling:
    """The VAE's tiles with ``tile``/``stride`` where given (the stride keeps the VAE's share of the tile).

    Raises:
        ConfigError: sizes this VAE cannot tile with; the message names sizes it can.
    """
    base = default_tiling(family, config)
    tile = tile or base.tile
    stride = stride or (base.stride if tile == base.tile else tile * base.stride // base.tile)
    step = family.downsample  # a tile must cut the latent grid at whole cells (TI2V-5B: its patch too)
    fix = f"use multiples of {step}, such as --tile-size {max(step * 2, base.tile // step * step)}"
    if tile % step or stride % step or stride >= tile or stride < step:
        raise ConfigError(f"{family.cls} cannot tile {tile} px tiles every {stride} px; {fix} with a smaller stride")
    if family.cls == HUNYUAN15 and int(tile * (1 - _overlap(tile, stride))) != stride:
        raise ConfigError(
            f"{family.cls} takes an overlap factor that cannot give a {stride} px stride on {tile}; {fix}"
        )
    return Tiling(tile, stride)


def tile_grid(
    family: VaeFamily, config: dict, tiling: Tiling | None, height: int, width: int
) -> tuple[int, tuple[int, int]]:
    """How the VAE cuts a ``height`` x ``width`` clip: (number of tiles, the largest tile's (h, w) in image pixels),
    as its ``_encode``/``tiled_encode`` decide. (1, (height, width)) when it does not tile."""
    if tiling is None:
        return 1, (height, width)
    p = _patch(family, config)
    t, s = tiling.tile // p, tiling.stride // p
    if width <= t and height <= t:  # the gate compares the unpatched sides (see the module docstring)
        return 1, (height, width)
    hp, wp = height // p, width // p
    rows, cols = len(range(0, hp, s)), len(range(0, wp, s))
    return rows * cols, (min(t, hp) * p, min(t, wp) * p)


def tiling_fingerprint(tiling: Tiling | None) -> dict:
    """The fingerprint entry of a run's tiling: nothing when untiled, so untiled caches keep matching."""
    return {} if tiling is None else {"tiling": {"tile": tiling.tile, "stride": tiling.stride}}


def tiling_of_fingerprint(fingerprint: dict) -> Tiling | None:
    entry = fingerprint.get("tiling")
    return None if entry is None else Tiling(int(entry["tile"]), int(entry["stride"]))


def resolve_tiling(
    mode: TilingMode,
    family: VaeFamily,
    config: dict,
    largest: tuple[int, int, int],
    budget: int | None,
    dtype_bytes: int = 2,
    size: tuple[int | None, int | None] = (None, None),
    existing: dict | None = None,
) -> Tiling | None:
    """The tiling one run encodes every clip with: a pure function of the settings, the VAE and (auto, for a new
    cache) the budget, so a run's bytes never depend on which batch or device encoded a clip.

    Args:
        mode: ``--tiling``. off: None; on: the VAE's tiles (or ``size``).
        family, config: the VAE's family and its config (the memory estimate reads its widths).
        largest: (frames, height, width) of the largest clip the run may encode (the longest ``--frames`` at the
            bucket resolution).
        budget: device bytes a clip may use at batch 1 (``--vram-budget``); None where memory is not measured.
        size: ``(--tile-size, --tile-stride)``, None where not given.
        existing: the fingerprint of the cache being finished, if any: auto keeps what it was started with.

    Returns:
        auto: untiled when ``largest`` fits ``budget`` untiled at batch 1 (or there is no budget), else tiled.
    """
    if mode is TilingMode.OFF:
        return None
    if mode is TilingMode.ON:
        return make_tiling(family, config, *size)
    if existing is not None:
        return tiling_of_fingerprint(existing)
    tiled = make_tiling(family, config, *size)
    if budget is None:
        return None
    untiled = estimate_clip_bytes(family, config, *largest, dtype_bytes=dtype_bytes) + weight_bytes(config, dtype_bytes)
    return None if untiled <= budget else tiled


# Activation bytes per image pixel of the encoded area (untiled: the frame; tiled: the largest tile), per value of
# the compute dtype, for the released configs, measured by benchmarks/bench_video_memory.py --cpu (a trace of the
# real-width encoders on fake tensors at 720p: storage bytes alive at the peak, the weights and the input left out).
# Wan: per pixel of a 4-frame chunk (it does not grow with frames); the others: per pixel and frame.
ACTIVATION_VALUES = {WAN: 3700.0, HUNYUAN15: 0.0, LTX2: 0.0}
REFERENCE_WIDTH = {WAN: 96, HUNYUAN15: 128, LTX2: 256}  # first-stage channels of the released configs (TI2V-5B: 160)


def estimate_clip_bytes(
    family: VaeFamily,
    config: dict,
    frames: int,
    height: int,
    width: int,
    batch: int = 1,
    dtype_bytes: int = 2,
    tiling: Tiling | None = None,
) -> int:
    """Peak device bytes of encoding ``batch`` clips of ``frames`` x ``height`` x ``width``, beyond the weights
    (add ``weight_bytes``): the input clip, the encoder's activations on the largest tile, the outputs.

    An estimate for planning (``--batch-size auto``'s first guess, ``resolve_tiling``, the message of a clip that
    cannot fit); the batch-size search measures the real peak on the device.
    """
    _, (th, tw) = tile_grid(family, config, tiling, height, width)
    per_frame = 1 if VIDEO_CLASSES[family.cls].whole_clip else 0
    scale = _width(family, config) / REFERENCE_WIDTH[family.cls]
    area = ACTIVATION_VALUES[family.cls] * scale * th * tw * (frames if per_frame else 1)
    latent_frames = 1 + (frames - 1) // family.temporal_downsample
    cells = latent_frames * (height // family.downsample) * (width // family.downsample)
    values = 3 * frames * height * width + area  # the input clip stays on the device throughout
    if family.cls == HUNYUAN15:  # the causal attention mask over the tile's latent cells, L x L
        values += (latent_frames * (th // family.downsample) * (tw // family.downsample)) ** 2
    return int(batch * (values * dtype_bytes + 2 * family.latent_channels * cells * 4))  # + float32 moments


def weight_bytes(config: dict, dtype_bytes: int = 2) -> int:
    """The VAE's parameter bytes at the compute dtype, from the parameter count its config implies (built on the
    meta device: no memory, no weights read)."""
    import diffusers
    import torch

    with torch.device("meta"):
        model = getattr(diffusers, config["_class_name"]).from_config(config)
    return sum(p.numel() for p in model.parameters()) * dtype_bytes


def too_large_reason(family: VaeFamily, needed: int, budget: int, tiling: Tiling | None, shape) -> str:
    """The failure reason of a clip that does not fit at batch 1: what it needs, and the fix."""
    frames, height, width = shape
    how = "untiled" if tiling is None else f"in {tiling.tile} px tiles"
    fix = "pass --tiling on" if tiling is None else "lower --tile-size, use shorter --frames or a lower --resolution"
    return (
        f"a {frames}x{height}x{width} clip needs about {needed / GIB:.1f} GiB of device memory {how} at batch 1, "
        f"over the {budget / GIB:.1f} GiB budget; {fix}"
    )


def _width(family: VaeFamily, config: dict) -> int:
    if family.cls == WAN:
        return int(config.get("base_dim", 96))
    return int(config.get("block_out_channels", (REFERENCE_WIDTH[family.cls],))[0])
