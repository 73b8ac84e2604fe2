"""What the reader's shard checks cost: one epoch over a realistic latent cache, checked and unchecked.

Writes a cache of N SDXL-1024-sized items (raw latents (4, 128, 128) fp16, 128 KiB each) in 64 MiB shards
with the store's own writer and manifest, no encoder needed, then reads every item once in key order, in one
run and side by side (the shard files in the page cache for all three, so disk speed does not enter):

  unchecked       open_cache(..., checksums=False)
  first check     open_cache(...) with nothing remembered: each shard's SHA-256 on its first open
  remembered      open_cache(...) again, as a DataLoader worker, a later epoch or a later run opens it

Median of --repeat runs; ratios are against the unchecked epoch of the same run.

    python benchmarks/bench_checksums.py --n 8192
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

LATENT_SHAPE = (4, 128, 128)  # SDXL at 1024x1024: (C, H/8, W/8)


def build(root: Path, n: int, shard_mb: float) -> int:
    """A latent cache of ``n`` random items; returns its shard bytes."""
    import torch

    from cachebuild.cache.manifest import LATENTS, Manifest, ScanResult, SourceFile
    from cachebuild.cache.store import RunSummary, ShardSink, open_store

    fingerprint = {"vae": {"latent_channels": 4, "downsample": 8, "scaling_factor": 0.13025}, "dtype_out": "fp16"}
    files = [SourceFile(f"img{i:06d}", f"img{i:06d}.jpg", 1, 0) for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    with Manifest.open(root) as manifest:
        open_store(manifest, LATENTS, fingerprint, ScanResult(files, {}), False, False)
        summary = RunSummary(LATENTS, str(root))
        with ShardSink(manifest, LATENTS, "safetensors", int(shard_mb * 2**20), {"store": LATENTS}, summary) as sink:
            for f in files:
                z = torch.randn(LATENT_SHAPE, generator=gen).half()
                meta = {"original_size": [1024, 1024], "bucket": [1024, 1024], "resized": [1024, 1024], "crop": [0, 0]}
                sink.add(f.key, {"latents": z}, meta, [(f.key, "1024x1024", meta)])
        return sum(s["bytes"] for s in manifest.shards(LATENTS))


def epoch(root: Path, checksums: bool) -> float:
    from cachebuild import open_cache

    start = time.perf_counter()
    cache = open_cache(root, checksums=checksums)
    for key in cache:
        cache.tensors(key)
    return time.perf_counter() - start


def warm(root: Path) -> None:
    """Every shard once into the page cache."""
    for path in sorted((root / "latents").iterdir()):
        with open(path, "rb") as fh:
            while fh.read(8 << 20):
                pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8192, help="items (default 8192: 1 GiB of latents)")
    p.add_argument("--shard-mb", type=float, default=64.0)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cachebuild-bench-checksums-"))
    os.environ["XDG_CACHE_HOME"] = str(work / "user-cache")  # where passed checks are remembered
    try:
        size = build(work / "cache", args.n, args.shard_mb)
        times: dict[str, list[float]] = {"unchecked": [], "first check": [], "remembered": []}
        for _ in range(args.repeat):
            shutil.rmtree(work / "user-cache", ignore_errors=True)
            warm(work / "cache")
            times["unchecked"].append(epoch(work / "cache", checksums=False))
            times["first check"].append(epoch(work / "cache", checksums=True))
            times["remembered"].append(epoch(work / "cache", checksums=True))
        base = statistics.median(times["unchecked"])
        gib = size / 2**30
        print(f"{args.n} items, {gib:.2f} GiB in {args.shard_mb:g} MiB shards; one epoch, median of {args.repeat}")
        for name, values in times.items():
            t = statistics.median(values)
            print(f"{name:12s} {t:7.2f} s  {gib / t:6.2f} GiB/s  x{t / base:5.2f}")
        extra = statistics.median(times["first check"]) - base
        print(f"first check adds {extra:.2f} s, {extra / gib:.2f} s per GiB of shards, once per unchanged file")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
