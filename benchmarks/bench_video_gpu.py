"""Device memory of one clip against its frame count (17, 33, 81 by default), on a CUDA device.

For each count, the peak device memory (``torch.cuda.max_memory_allocated``) of encoding one clip of zeros of
that shape through ``VaeEncoder`` (the uint8 clip on the device, its float copy in [-1, 1], Wan's chunked causal
encode, the moments) above the model's own weights, and the seconds per clip. Wan's encoder runs the first frame,
then 4 at a time, with a feature cache: its working memory stays flat in F while the clip's own pixels (F x H x
W x 3 bytes, then F x H x W x 3 x 4 as floats) grow with it, which the last column shows.

    python benchmarks/bench_video_gpu.py --vae ./Wan2.1-T2V-14B-Diffusers/vae --size 832x480 --dtype bf16
    python benchmarks/bench_video_gpu.py                      # a tiny random-weight Wan VAE: the code path only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", help="AutoencoderKLWan folder (default: a tiny random-weight one)")
    p.add_argument("--size", default="832x480", help="WxH of the clip (default 832x480, Wan's 480p)")
    p.add_argument("--frames", default="17,33,81", help="frame counts, 4k+1 (default 17,33,81)")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device: device memory is measured by the CUDA allocator")
    for row in measure(args.vae, tuple(int(v) for v in args.size.split("x")), args.frames, args.dtype, args.device):
        print(row)


def measure(vae: str | None, size: tuple[int, int], frames: str, dtype: str, device: str) -> list[str]:
    """The table's lines: frames, peak above the weights, seconds per clip, the clip's float pixels."""
    import torch

    from cachebuild.config import DType, LatentsMode, ModelSpec
    from cachebuild.families.vae import VaeEncoder, family_of, load_vae
    from cachebuild.hub import resolve_vae
    from cachebuild.testing import make_tiny_wan_vae

    folder = vae or str(make_tiny_wan_vae(Path(tempfile.mkdtemp(prefix="cachebuild-wan-")) / "vae"))
    resolved = resolve_vae(ModelSpec(vae=folder))
    family = family_of(resolved, None)
    dev, dt = torch.device(device), DType(dtype)
    encoder = VaeEncoder(load_vae(resolved, family, dt.torch, dev), family, dev, dt, LatentsMode.MEAN, False, 0)
    torch.cuda.synchronize(dev)
    weights = torch.cuda.memory_allocated(dev)
    w, h = size
    card = torch.cuda.get_device_name(dev)
    lines = [f"{family.cls} at {w}x{h}, {dtype}; weights {weights / 2**30:.2f} GiB on {card}"]
    lines.append(f"{'frames':>6}  {'peak above weights':>18}  {'s/clip':>7}  {'clip as fp32':>12}")
    for n in (int(v) for v in frames.split(",")):
        encoder.peak(1, (w, h, n))  # warm-up: kernels chosen, allocator grown
        peak = encoder.peak(1, (w, h, n))
        start = time.perf_counter()
        encoder.encode_raw(torch.zeros((1, n, h, w, 3), dtype=torch.uint8))
        torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        above = "out of memory" if peak is None else f"{(peak - weights) / 2**30:14.2f} GiB"
        lines.append(f"{n:>6}  {above:>18}  {seconds:7.2f}  {n * h * w * 3 * 4 / 2**30:8.2f} GiB")
        torch.cuda.empty_cache()
    return lines


if __name__ == "__main__":
    main()
