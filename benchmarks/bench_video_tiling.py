"""How much spatial tiling changes a video VAE's latents: tiled against untiled on the same clip, side by side.

    python benchmarks/bench_video_tiling.py                        # tiny VAEs, 48x48 clips, 32 px tiles
    python benchmarks/bench_video_tiling.py --real --size 320x320  # released configs, random weights, own tiles
    python benchmarks/bench_video_tiling.py --vae ./wan-vae --size 480x832 --frames 17 --device cuda

For each VAE: the relative L2 difference of the posterior means (what a cache stores), the largest difference in
units of the untiled latents' standard deviation, the share of latent cells that moved by more than a tenth of
that deviation, and how many tiles the clip was cut into. The clip is smooth moving colour with grain (no file
needed). Random weights say how the tiles' seams and borders propagate through the real architecture, not how a
trained VAE's latents move: ``--vae`` with the released weights answers that.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

KINDS = ("wan2.1", "wan2.2-ti2v", "hunyuanvideo-1.5", "ltx-2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    p.add_argument("--real", action="store_true", help="the released configs with random weights, their own tiles")
    p.add_argument("--vae", help="a diffusers VAE folder (real weights) instead of --kinds")
    p.add_argument("--size", default=None, help="HxW of the clip (default: 48x48 tiny, 320x320 --real/--vae)")
    p.add_argument("--frames", type=int, default=None, help="frames (default: 5; LTX-2: 9)")
    p.add_argument("--tile", type=int, default=None, help="tile side, pixels (default: 32 tiny, the VAE's own else)")
    p.add_argument("--stride", type=int, default=None, help="pixels between tiles (default: the VAE's share)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    size = args.size or ("48x48" if not (args.real or args.vae) else "320x320")
    height, width = (int(v) for v in size.split("x"))
    print(f"{'VAE':24} {'tiles':>9} {'n':>3} {'clip':>12} {'rel L2':>8} {'max/std':>8} {'moved':>7} {'s':>6}")
    targets = [args.vae] if args.vae else args.kinds.split(",")
    for target in targets:
        compare(target, args, height, width)


def compare(target: str, args, height: int, width: int) -> None:
    import torch

    from cachebuild.families.video_tiling import make_tiling, tile_grid
    from cachebuild.families.video_vae import encode_clip_raw

    vae, family, config, name = load(target, args)
    frames = args.frames or (9 if family.frame_modulus == 8 else 5)
    tiling = make_tiling(family, config, args.tile or (None if args.real or args.vae else 32), args.stride)
    n, _ = tile_grid(family, config, tiling, height, width)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    x = clip(frames, height, width).to(args.device, dtype)
    start = time.perf_counter()
    c = family.latent_channels
    whole = encode_clip_raw(vae, family, x, None)[:, :c].float().cpu()
    tiled = encode_clip_raw(vae, family, x, tiling)[:, :c].float().cpu()
    took = time.perf_counter() - start
    diff = (tiled - whole).abs()
    rel = float(diff.norm() / whole.norm())
    std = float(whole.std())
    moved = float((diff > 0.1 * std).float().mean())
    shape = f"{frames}x{height}x{width}"
    worst = float(diff.max()) / std
    tiles = f"{tiling.tile}/{tiling.stride}"
    print(f"{name:24} {tiles:>9} {n:>3} {shape:>12} {rel:>8.4f} {worst:>8.3f} {moved:>7.1%} {took:>6.1f}", flush=True)


def load(target: str, args):
    """(model, family, config, label) for a tiny kind, a released config (--real) or a VAE folder (--vae)."""
    import tempfile
    from pathlib import Path

    import diffusers
    import torch

    from cachebuild.config import ModelSpec
    from cachebuild.families.video_vae import video_family
    from cachebuild.hub import resolve_vae
    from cachebuild.testing import VIDEO_VAE_CONFIGS, build_video_vae, make_tiny_video_vae, video_vae_family

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.vae:
        resolved = resolve_vae(ModelSpec(vae=args.vae))
        family = video_family(resolved)
        model = getattr(diffusers, family.cls).from_pretrained(resolved.folder, torch_dtype=dtype).eval()
        return model.to(args.device), family, resolved.config, Path(args.vae).name
    if args.real:
        model = build_video_vae(target, dtype, args.device)
        return model, video_vae_family(target), dict(VIDEO_VAE_CONFIGS[target]), target
    folder = make_tiny_video_vae(Path(tempfile.mkdtemp(prefix="tiny-video-vae-")) / target, target)
    resolved = resolve_vae(ModelSpec(vae=str(folder)))
    model = getattr(diffusers, resolved.config["_class_name"]).from_pretrained(folder, torch_dtype=dtype).eval()
    return model.to(args.device), video_family(resolved), resolved.config, f"tiny {target}"


def clip(frames: int, height: int, width: int):
    """(1, 3, F, H, W) float32 in [-1, 1]: smooth colour moving from frame to frame, with grain."""
    import torch

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    yy, xx = yy / 64.0, xx / 64.0
    out = []
    for f in range(frames):
        base = np.stack([np.sin(xx + 0.3 * f), np.cos(yy - 0.2 * f), np.sin(0.7 * (xx + yy) + 0.1 * f)])
        out.append(0.8 * base + rng.normal(0, 0.1, base.shape))
    return torch.from_numpy(np.clip(np.stack(out, axis=1), -1, 1)).float()[None]


if __name__ == "__main__":
    main()
