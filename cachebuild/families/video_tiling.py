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
from cachebuild.families.vae_family import VaeFamily
from cachebuild.families.video_vae import (
    HUNYUAN15,
    LTX2,
    VIDEO_CLASSES,
    WAN,
    Tiling,
    _config_value,
    _overlap,
    _patch,
)

GIB = 2**30


def default_tiling(family: VaeFamily, config: dict) -> Tiling:
    """The VAE's own tile and stride as ``enable_tiling()`` sets them (Wan 2.2 TI2V-5B's in image pixels)."""
    spec = VIDEO_CLASSES[family.cls]
    patch = _patch(family, config)
    return Tiling(spec.tile * patch, spec.stride * patch)


def make_tiling(family: VaeFamily, config: dict, tile: int | None = None, stride: int | None = None) -> Tiling:
    """The VAE's tiles with ``tile``/``stride`` where given (an unset stride keeps the VAE's share of the tile).

    Raises:
        ConfigError: sizes this VAE cannot tile with; the message says which it can.
    """
    base = default_tiling(family, config)
    step = family.downsample  # tiles must cut the latent grid at whole cells (TI2V-5B: its 2x2 patches included)
    tile = tile or base.tile
    stride = stride or (base.stride if tile == base.tile else tile * base.stride // base.tile // step * step)
    fits = tile % step == 0 and stride % step == 0 and step <= stride < tile
    if fits and family.cls == HUNYUAN15:  # it takes an overlap factor and tiles every int(tile * (1 - factor))
        fits = int(tile * (1 - _overlap(tile, stride))) == stride
    if not fits:
        raise ConfigError(
            f"{family.cls} cannot tile in {tile} px tiles every {stride} px: both must be multiples of {step} px "
            f"(its latent cell) with the stride below the tile, such as --tile-size {base.tile} --tile-stride "
            f"{base.stride} (its own)"
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


AUTO_MIN_TILE_PX = 128  # auto halves the VAE's own tile until the largest clip fits, down to this: below it most
# latent cells sit near a seam or a tile border (measured by benchmarks/bench_video_tiling.py)


def resolve_tiling(
    mode: TilingMode,
    family: VaeFamily,
    config: dict,
    largest: tuple[int, int, int],
    budget: int | None,
    dtype_bytes: int = 2,
    size: tuple[int | None, int | None] = (None, None),
    existing: dict | None = None,
    weights: int | None = None,
) -> Tiling | None:
    """The tiling one run encodes every clip with: a pure function of the settings, the VAE and (auto, for a new
    cache) the budget, so a run's bytes never depend on which batch or device encoded a clip.

    Args:
        mode: ``--tiling``. off: None; on: the VAE's tiles (or ``size``).
        family, config: the VAE's family and its config (the memory estimate reads its widths).
        largest: (frames, height, width) of the largest clip the run may encode (the longest ``--frames`` at the
            largest bucket).
        budget: device bytes for the model and one clip (``--vram-budget``); None where memory is not measured.
        size: ``(--tile-size, --tile-stride)``, None where not given.
        existing: the fingerprint of the cache being finished, if any: auto keeps what it was started with.
        weights: the model's bytes on the device (default: the whole VAE's at ``dtype_bytes``).

    Returns:
        auto: None (untiled, exact) when there is no budget or ``largest`` fits it untiled at batch 1; else the
        VAE's own tiles (or ``size``), halved while the clip does not fit, down to ``AUTO_MIN_TILE_PX``.

    Example:
        >>> resolve_tiling(TilingMode.AUTO, family, vae.config, (81, 720, 1280), budget=10 * GIB)  # HunyuanVideo 1.5
        Tiling(tile=128, stride=96)
    """
    if mode is TilingMode.OFF:
        return None
    if mode is TilingMode.ON:
        return make_tiling(family, config, *size)
    if existing is not None:
        return tiling_of_fingerprint(existing)
    candidates = [make_tiling(family, config, *size)]  # checked even when unused: a bad --tile-size fails first
    if budget is None:
        return None
    weights = weight_bytes(config, dtype_bytes) if weights is None else weights

    def fits(tiling: Tiling | None) -> bool:
        return weights + estimate_clip_bytes(family, config, *largest, 1, dtype_bytes, tiling) <= budget

    if fits(None):
        return None
    while size[0] is None and candidates[-1].tile // 2 >= max(AUTO_MIN_TILE_PX, 2 * family.downsample):
        candidates.append(make_tiling(family, config, candidates[-1].tile // 2))
    return next((t for t in candidates if fits(t)), candidates[-1])  # none fits: the smallest, and the clips
    # that cannot fit at batch 1 fail alone with too_large_reason


# Activation values per image pixel of the encoded area (untiled: the frame; tiled: the largest tile) for the
# released configs, fitted to benchmarks/bench_video_memory.py --cpu (real widths on fake tensors at 720p: storage
# alive at the peak beyond the weights, the input and the outputs; flash attention's allocation). Wan: per pixel of
# its 4-frame chunk, which does not grow with frames; HunyuanVideo 1.5 and LTX-2: per pixel and frame. The second
# number is the first stage's width they were measured at: another width scales them.
ACTIVATIONS = {
    (WAN, 1): (3717.0, 96),  # Wan 2.1 / 2.2 A14B, base_dim 96
    (WAN, 2): (1890.0, 160),  # Wan 2.2 TI2V-5B, base_dim 160 on 2x2-patchified pixels
    (HUNYUAN15, 1): (898.0, 128),  # block_out_channels[0] 128, full resolution: the heaviest per pixel
    (LTX2, 1): (41.0, 256),  # 4x4-patchified first, so light per pixel
}


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
    (``weight_bytes``): the input clip (Wan with patches: and its patchified copy), the encoder's activations on
    the largest tile, HunyuanVideo 1.5's attention mask, the moments (in the compute dtype, then float32).

    An estimate for planning (``resolve_tiling``, the reason a clip cannot fit, a first batch size); the batch-size
    search measures the real peak on the device. ``benchmarks/bench_video_memory.py`` prints it beside a GPU's.
    """
    _, (th, tw) = tile_grid(family, config, tiling, height, width)
    patch = _patch(family, config)
    values_per_px, reference = ACTIVATIONS[(family.cls, min(patch, 2))]
    activations = values_per_px * _width(family, config) / reference * th * tw
    if VIDEO_CLASSES[family.cls].whole_clip:
        activations *= frames
    latent_frames = 1 + (frames - 1) // family.temporal_downsample
    if family.cls == HUNYUAN15:  # its mid-block mask: (latent cells of a tile)^2 in the compute dtype
        activations += (latent_frames * (th // family.downsample) * (tw // family.downsample)) ** 2
    inputs = 3 * frames * height * width * (2 if patch > 1 else 1)
    cells = latent_frames * (height // family.downsample) * (width // family.downsample)
    moments = 2 * family.latent_channels * cells * (2 if tiling is not None else 1)  # tiled: every tile's, then
    # the blended result
    return int(batch * ((activations + inputs + moments) * dtype_bytes + 2 * family.latent_channels * cells * 4))


def weight_bytes(config: dict, dtype_bytes: int = 2, encoder_only: bool = False) -> int:
    """The VAE's parameter bytes at the compute dtype, from the parameter count its config implies (built on the
    meta device: no memory, no weights read); ``encoder_only``: without the decoder, as a VAE loaded for caching
    holds it (``video_vae.release_decoder``)."""
    import diffusers
    import torch

    with torch.device("meta"):
        model = getattr(diffusers, config["_class_name"]).from_config(config)
    params = model.named_parameters()
    return sum(p.numel() for name, p in params if not (encoder_only and name.startswith("decoder."))) * dtype_bytes


def too_large_reason(family: VaeFamily, needed: int, budget: int | None, tiling: Tiling | None, shape) -> str:
    """The failure reason of a clip that does not fit at batch 1: what it needs, and the fix. ``budget`` None: the
    device's memory was not measured (the clip ran out of it)."""
    frames, height, width = shape
    how = "untiled" if tiling is None else f"in {tiling.tile} px tiles"
    fix = (
        "encode in tiles (--tiling on, with a new --out or --rebuild)"
        if tiling is None
        else ("lower --tile-size, use shorter --frames or a lower --resolution")
    )
    limit = "more than the device had free" if budget is None else f"over the {_size(budget)} budget"
    need = f"a {frames}x{height}x{width} clip needs about {_size(needed)} of device memory {how} at batch 1"
    return f"{need}, {limit}; {fix}"


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.0f} MiB"


def _width(family: VaeFamily, config: dict) -> int:
    """The first stage's channels: ``base_dim`` (Wan), ``block_out_channels[0]`` (the class default if unset)."""
    name = "base_dim" if family.cls == WAN else "block_out_channels"
    value = config[name] if name in config else _config_value({}, family.cls, name)
    return int(value if family.cls == WAN else value[0])
