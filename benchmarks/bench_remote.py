"""Throughput of ``build_latents`` with the dataset and the cache on S3, against the same run on local disk.

Starts moto's S3 server on 127.0.0.1 in a process of its own (nothing else is contacted), generates N noise
images of mixed aspect ratios, uploads them, then times in one process, same VAE and settings:

  (a) local dataset -> local cache;
  (b) s3:// dataset -> s3:// cache (listing, header reads and decode reads through fsspec, each shard
      uploaded under a temporary name and moved, the manifest snapshot published);
  (c) reading every item back with ``open_cache`` from each (the S3 one fetches its shards first).

    pip install -e '.[dev]' && python benchmarks/bench_remote.py --n 200 --size 512

moto is an in-process Python server, far slower per request than S3 itself and with no network between:
the ratio measures cachebuild's own per-request and per-shard overhead, not an S3 link's bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16))  # W:H of the generated images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="images (default 200)")
    p.add_argument("--size", type=int, default=512, help="long side of each image, px (default 512)")
    p.add_argument("--resolution", type=int, default=256, help="bucket resolution (default 256)")
    p.add_argument("--workers", type=int, default=2, help="decode processes (default 2)")
    p.add_argument("--shard-mb", type=float, default=4.0, help="shard size, MiB (default 4)")
    args = p.parse_args()

    # the server runs in its own process: in this one it would compete with the job for the GIL
    host, port = "127.0.0.1", _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for(host, port)
    work = Path(tempfile.mkdtemp(prefix="cachebuild-bench-remote-"))
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        XDG_CACHE_HOME=str(work / "user-cache"),
    )
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        server.terminate()
        server.wait()


def run(args: argparse.Namespace, work: Path) -> None:
    import s3fs

    from cachebuild.config import BucketConfig, DType, LatentsConfig, ModelSpec
    from cachebuild.consumers.reader import open_cache
    from cachebuild.jobs.latents import build_latents
    from cachebuild.storage import UrlPath
    from cachebuild.testing import make_tiny_vae

    data = work / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.n):
        aw, ah = ASPECTS[i % len(ASPECTS)]
        scale = args.size / max(aw, ah)
        w, h = int(aw * scale), int(ah * scale)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(data / f"{i:05d}.jpg", quality=90)
    vae = make_tiny_vae(work / "vae")
    fs = s3fs.S3FileSystem()
    bucket = f"bench{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    t = time.monotonic()
    fs.put(str(data) + "/", f"{bucket}/images/", recursive=True)
    upload_s = time.monotonic() - t
    nbytes = sum(p.stat().st_size for p in data.iterdir())

    def cfg(dataset, out) -> LatentsConfig:
        side = args.resolution
        buckets = BucketConfig(resolution=(side, side), min_reso=side // 2, max_reso=side * 2)
        return LatentsConfig(
            dataset=dataset,
            out=out,
            model=ModelSpec(vae=str(vae)),
            buckets=buckets,
            dtype=DType.FP32,
            device="cpu",
            workers=args.workers,
            shard_mb=args.shard_mb,
        )

    results = {}
    for label, dataset, out, read in (
        ("local", data, work / "cache", work / "cache"),
        ("s3", UrlPath(f"s3://{bucket}/images"), UrlPath(f"s3://{bucket}/cache"), f"s3://{bucket}/cache"),
    ):
        summary = build_latents(cfg(dataset, out))
        assert summary.done == args.n, summary
        t = time.monotonic()
        cache = open_cache(read)
        for key in cache:
            cache.tensors(key)
        results[label] = (summary.seconds, summary.shards_written, time.monotonic() - t)

    print(f"{args.n} images, {nbytes / 2**20:.1f} MiB of JPEG (long side {args.size} px), upload {upload_s:.1f} s")
    for label, (seconds, shards, read_s) in results.items():
        print(
            f"{label:>5}: build {seconds:6.1f} s = {args.n / seconds:6.1f} img/s ({shards} shards); "
            f"read back {read_s:5.2f} s"
        )
    print(f"s3 / local build throughput: {results['local'][0] / results['s3'][0]:.2f}")
    snapshot = fs.size(f"{bucket}/cache/manifest.sqlite")
    print(f"published manifest snapshot: {snapshot / 1024:.0f} KiB, {snapshot / args.n:.0f} bytes per item")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(host: str, port: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.1)
    raise SystemExit(f"moto's server did not start on {host}:{port}")


if __name__ == "__main__":
    main()
