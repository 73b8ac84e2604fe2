"""Host memory does not grow with the number of images: peak RSS of build_latents on N and K*N images.

Each run is a fresh subprocess (so one run's peak cannot hide the other's) that builds a cache with the tiny
random-weight VAE; this process samples the memory of the subprocess and its decode workers meanwhile, and
the subprocess reports its own kernel-measured peak (ru_maxrss) when it finishes. "main" is the process that
holds the model and the shard being written; the workers only decode. Small images and small
shards keep the runs short while both runs still rotate many shards, which is what bounds memory.

    python benchmarks/bench_memory.py                       # 100 vs 1000 images
    python benchmarks/bench_memory.py --n 200 --factor 5 --shard-mb 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_latents import RssSampler, generate_images, maxrss_bytes, run_parent_or_child

SMALL_LONG_SIDE = (256, 512)  # pixels; small images keep 1000 of them quick to make and to encode on a CPU


def main() -> None:
    run_parent_or_child(parse_args(), parent, child, "cachebuild-mem-")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100, help="images in the small run (default 100)")
    p.add_argument("--factor", type=int, default=10, help="the large run has this many times more (default 10)")
    p.add_argument("--resolution", type=int, default=256, help="bucket side (default 256)")
    p.add_argument("--shard-mb", type=float, default=4.0, help="shard size, MiB (default 4: many shards per run)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: as the CLI)")
    p.add_argument("--workdir", help="keep images and caches here (default: a temporary folder, removed)")
    p.add_argument("--child", nargs=3, metavar=("DATASET", "OUT", "VAE"), help=argparse.SUPPRESS)
    return p.parse_args()


def parent(args: argparse.Namespace, work: Path) -> None:
    from cachebuild.testing import make_tiny_vae

    sizes = [args.n, args.n * args.factor]
    t = time.perf_counter()
    made = generate_images(work / "images", sizes[-1], SMALL_LONG_SIDE)
    print(f"{sizes[-1]} images ({made} generated in {time.perf_counter() - t:.1f} s)", file=sys.stderr)
    vae = work / "tiny-vae"
    if not (vae / "config.json").exists():
        make_tiny_vae(vae)
    results = []
    for n in sizes:
        dataset = subset(work / "images", work / f"images-{n}", n)
        out = work / f"cache-{n}"
        shutil.rmtree(out, ignore_errors=True)
        results.append(run_child(args, dataset, out, vae))
    print(f"{'images':>7}  {'seconds':>7}  {'shards':>6}  {'main peak':>10}  {'worker peak':>11}  {'main+workers':>12}")
    for r in results:
        print(
            f"{r['done']:>7}  {r['seconds']:>7.1f}  {r['shards']:>6}  {r['self_bytes'] / 2**20:>6.0f} MiB  "
            f"{r['worker_bytes'] / 2**20:>7.0f} MiB  {r['total_bytes'] / 2**20:>8.0f} MiB"
        )
    small, large = results
    print(
        f"ratio {large['done']}/{small['done']} images: main peak x{large['self_bytes'] / small['self_bytes']:.2f}, "
        f"main+workers x{large['total_bytes'] / small['total_bytes']:.2f} (1.00 = no growth)"
    )


def subset(source: Path, folder: Path, n: int, pattern: str = "*.jpg") -> Path:
    """A dataset folder holding hard links to the first ``n`` files of ``source`` that match ``pattern``."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in sorted(source.glob(pattern))[:n]:
        os.link(path, folder / path.name)
    return folder


def run_child(args: argparse.Namespace, dataset: Path, out: Path, vae: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(dataset), str(out), str(vae)]
    cmd += [
        "--resolution",
        str(args.resolution),
        "--shard-mb",
        str(args.shard_mb),
        "--batch-size",
        str(args.batch_size),
    ]
    cmd += ["--workers", str(args.workers)] if args.workers is not None else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    with RssSampler(proc.pid) as rss:
        stdout, _ = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"the run on {dataset} exited {proc.returncode}")
    result = json.loads(stdout)
    result["worker_bytes"] = rss.peak_child  # sampled: the largest decode worker
    result["total_bytes"] = rss.peak_total  # sampled: the child and its workers added up
    return result


def child(args: argparse.Namespace) -> None:
    """One build in this process; prints the summary and this process's own peaks as JSON."""
    from cachebuild.config import BucketConfig, LatentsConfig, ModelSpec, default_workers
    from cachebuild.jobs.latents import build_latents

    dataset, out, vae = args.child
    cfg = LatentsConfig(
        dataset=Path(dataset),
        out=Path(out),
        model=ModelSpec(vae=vae),
        buckets=BucketConfig(resolution=(args.resolution, args.resolution), min_reso=64, steps=64),
        batch_size=args.batch_size,
        workers=default_workers() if args.workers is None else args.workers,
        device="cpu",
        shard_mb=args.shard_mb,
    )
    summary = build_latents(cfg)
    report = {
        "done": summary.done,
        "seconds": summary.seconds,
        "shards": summary.shards_written,
        "self_bytes": maxrss_bytes(resource.RUSAGE_SELF),  # exact; RUSAGE_CHILDREN is not used for the
        # workers because a child's peak can include pages it shared with this process at its start
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
