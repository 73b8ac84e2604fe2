"""Device memory of encoding one clip with each video VAE, against the frame count, tiled and untiled.

The VAEs are the released configs with random weights (``cachebuild.testing.build_video_vae``): memory depends on
widths, depths and shapes, not on the weights' values. For each VAE, 17, 33 and 81 frames at 720p (LTX-2: 1280x704,
its sides being multiples of 32), untiled and in the VAE's own tiles, batch 1, bf16:

    python benchmarks/bench_video_memory.py                  # on the GPU: torch.cuda.max_memory_allocated
    python benchmarks/bench_video_memory.py --cpu            # no GPU: a trace on fake tensors (nothing computed)
    python benchmarks/bench_video_memory.py --kinds ltx-2 --frames 17,33 --size 704x1280

Each line: the peak beyond the weights (GiB), the estimate ``families.video_tiling.estimate_clip_bytes`` makes for
the same clip, and their ratio; the weights (whole VAE, and encoder alone) once per VAE. The GPU numbers are the
truth; the CPU trace counts tensor storage alive at once (no allocator rounding or cuDNN workspace, and attention
counted as flash attention allocates it), which is what the estimate's coefficients were fitted to.
"""

from __future__ import annotations

import argparse
import sys
import time

KINDS = ("wan2.1", "wan2.2-ti2v", "hunyuanvideo-1.5", "ltx-2")
GIB = 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    p.add_argument("--frames", default="17,33,81", help="frame counts (LTX-2 takes the nearest 8k+1 below)")
    p.add_argument("--size", default="720x1280", help="HxW (LTX-2: rounded down to multiples of 32)")
    p.add_argument("--tiling", default="off,on", help="off, on, or both (off,on)")
    p.add_argument("--cpu", action="store_true", help="trace on fake tensors instead of measuring a GPU")
    args = p.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: pass --cpu for the fake-tensor trace")
    height, width = (int(v) for v in args.size.split("x"))
    print(f"device: {'fake tensors (CPU trace)' if args.cpu else torch.cuda.get_device_name()}, bf16, batch 1")
    print(f"{'VAE':18} {'tiles':>9} {'frames':>6} {'size':>9} {'peak-w GiB':>10} {'estimate':>9} {'ratio':>6} {'s':>6}")
    for kind in args.kinds.split(","):
        run_kind(kind, [int(f) for f in args.frames.split(",")], height, width, args.tiling.split(","), args.cpu)


def run_kind(kind: str, frame_counts: list[int], height: int, width: int, tilings: list[str], cpu: bool) -> None:
    import torch

    from cachebuild.families.video_tiling import default_tiling, estimate_clip_bytes
    from cachebuild.testing import VIDEO_VAE_CONFIGS

    family, config = family_of(kind)
    if family.cls == "AutoencoderKLLTX2Video":
        height, width = height // 32 * 32, width // 32 * 32
    weights, encoder = weight_counts(config)
    print(f"{kind}: weights {weights * 2 / GIB:.2f} GiB in bf16, {encoder * 2 / GIB:.2f} GiB of them the encoder's")
    for tiling_name in tilings:
        tiling = default_tiling(family, config) if tiling_name == "on" else None
        label = "untiled" if tiling is None else f"{tiling.tile}/{tiling.stride}"
        for frames in frame_counts:
            frames = (frames - 1) // family.frame_modulus * family.frame_modulus + 1
            start = time.perf_counter()
            peak = (
                trace_peak(kind, family, frames, height, width, tiling)
                if cpu
                else gpu_peak(kind, family, frames, height, width, tiling)
            )
            took = time.perf_counter() - start
            estimate = estimate_clip_bytes(family, dict(VIDEO_VAE_CONFIGS[kind]), frames, height, width, 1, 2, tiling)
            shown = "OOM" if peak is None else f"{peak / GIB:.2f}"
            ratio = "" if peak is None else f"{peak / estimate:.2f}"
            print(f"{kind:18} {label:>9} {frames:>6} {height}x{width:<4} {shown:>10} {estimate / GIB:>9.2f} "
                  f"{ratio:>6} {took:>6.1f}", flush=True)  # fmt: skip
        if not cpu:
            torch.cuda.empty_cache()


def family_of(kind: str):
    from cachebuild.testing import VIDEO_VAE_CONFIGS, video_vae_family

    return video_vae_family(kind), dict(VIDEO_VAE_CONFIGS[kind])


def weight_counts(config: dict) -> tuple[int, int]:
    """(all parameters, the encoder side's), counted on the meta device."""
    import diffusers
    import torch

    with torch.device("meta"):
        model = getattr(diffusers, config["_class_name"]).from_config(config)
    decoder = ("decoder", "post_quant_conv")
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for n, p in model.named_parameters() if not n.startswith(decoder))


def gpu_peak(kind: str, family, frames: int, height: int, width: int, tiling) -> int | None:
    """max_memory_allocated of one encode, less the weights and the input (the input is in the estimate)."""
    import torch

    from cachebuild.encode import is_out_of_memory
    from cachebuild.families.video_vae import encode_clip_raw
    from cachebuild.testing import build_video_vae

    vae = build_video_vae(kind, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        x = torch.zeros(1, 3, frames, height, width, dtype=torch.bfloat16, device="cuda")
        out = encode_clip_raw(vae, family, x, tiling)
        del x, out
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        peak = None
    del vae
    torch.cuda.empty_cache()
    return peak


def trace_peak(kind: str, family, frames: int, height: int, width: int, tiling) -> int:
    """The same encode on fake tensors: storage bytes alive at the peak, the input included, the weights not."""
    import diffusers
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cachebuild.families.video_vae import encode_clip_raw
    from cachebuild.testing import VIDEO_VAE_CONFIGS
    from cachebuild.testing.memory import PeakBytes, sdpa_outputs_only

    cfg = dict(VIDEO_VAE_CONFIGS[kind])
    cls = getattr(diffusers, cfg.pop("_class_name"))
    with FakeTensorMode(), sdpa_outputs_only():
        torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: fake parameters cannot be cast in place
        try:
            vae = cls(**cfg).eval()
        finally:
            torch.set_default_dtype(torch.float32)
        x = torch.zeros(1, 3, frames, height, width, dtype=torch.bfloat16)
        with PeakBytes(x, *vae.parameters(), *vae.buffers()) as counter:
            out = encode_clip_raw(vae, family, x, tiling)
            del out
        return counter.peak + x.numel() * x.element_size()


if __name__ == "__main__":
    main()
