"""Video clips: host memory flat in the number of clips, and decode + encode against the bare VAE.

It writes H.264 videos of moving, photo-like frames (one clip's worth of frames per clip: --extract chunk) and
measures, side by side in one run:

* memory: peak RSS of a build on N clips and on FACTOR x N clips, each in a fresh subprocess (main process and
  its decode workers added up, sampled), so the ratio shows whether host memory grows with the clips;
* throughput: clips/s of ``build_latents`` end to end (probe, decode in workers, encode, shards) against the bare
  VAE encoding the same clips already in memory (decoded once beforehand, so only the encoder is timed), and the
  decode speed of one process (one core): decode cores one device needs = bare encode rate / decode rate per core.

    python benchmarks/bench_video.py                 # 10 vs 100 clips of 9 frames at 64x48, tiny Wan VAE, CPU
    python benchmarks/bench_video.py --vae ./wan-vae --device cuda --size 832x480 --frames 33 --n 20
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_latents import RssSampler, in_workdir, maxrss_bytes
from bench_memory import subset


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    in_workdir(args, parent, "cachebuild-video-")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10, help="clips in the small run (default 10)")
    p.add_argument("--factor", type=int, default=10, help="the large run has this many times more (default 10)")
    p.add_argument("--frames", type=int, default=9, help="frames per clip, 4k+1 (default 9)")
    p.add_argument("--size", default="64x48", help="frame size WxH, also the bucket (default 64x48)")
    p.add_argument("--clips-per-video", type=int, default=5, help="clips cut from each video (default 5)")
    p.add_argument("--vae", help="AutoencoderKLWan folder (default: a tiny random-weight one)")
    p.add_argument("--device", default="cpu", help="device for the encoder (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--workers", type=int, default=1, help="decode processes (default 1)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--shard-mb", type=float, default=0.01, help="shard size, MiB (default 0.01: many shards per run)")
    p.add_argument("--workdir", help="keep videos and caches here (default: a temporary folder, removed)")
    p.add_argument("--child", nargs=3, metavar=("DATASET", "OUT", "VAE"), help=argparse.SUPPRESS)
    return p.parse_args()


def parent(args: argparse.Namespace, work: Path) -> None:
    from cachebuild.testing import make_tiny_wan_vae

    w, h = (int(v) for v in args.size.split("x"))
    vae = Path(args.vae) if args.vae else work / "tiny-wan-vae"
    if not (vae / "config.json").exists():
        make_tiny_wan_vae(vae)
    sizes = [args.n, args.n * args.factor]
    videos = -(-sizes[-1] // args.clips_per_video)
    t = time.perf_counter()
    for i in range(videos):
        path = work / "videos" / f"v{i:04d}.mp4"
        if not path.exists():
            write_moving_video(path, args.frames * args.clips_per_video, (w, h), seed=i)
    print(f"{videos} videos of {args.frames * args.clips_per_video} frames, {w}x{h} "
          f"({time.perf_counter() - t:.1f} s)", file=sys.stderr)  # fmt: skip
    results = []
    for n in sizes:
        dataset = subset(work / "videos", work / f"videos-{n}", -(-n // args.clips_per_video), "*.mp4")
        out = work / f"cache-{n}"
        shutil.rmtree(out, ignore_errors=True)
        results.append(run_child(args, dataset, out, vae))
    print(f"{'clips':>6}  {'seconds':>7}  {'shards':>6}  {'main peak':>10}  {'worker peak':>11}  {'main+workers':>12}")
    for r in results:
        print(f"{r['done']:>6}  {r['seconds']:>7.1f}  {r['shards']:>6}  {r['self_bytes'] / 2**20:>6.0f} MiB  "
              f"{r['worker_bytes'] / 2**20:>7.0f} MiB  {r['total_bytes'] / 2**20:>8.0f} MiB")  # fmt: skip
    small, large = results
    print(f"ratio {large['done']}/{small['done']} clips: main peak x{large['self_bytes'] / small['self_bytes']:.2f}, "
          f"main+workers x{large['total_bytes'] / small['total_bytes']:.2f} (1.00 = no growth)")  # fmt: skip
    throughput(args, work / f"videos-{sizes[0]}", work / f"cache-{sizes[0]}", vae, small)


def throughput(args: argparse.Namespace, dataset: Path, cache: Path, vae: Path, small: dict) -> None:
    """The small run's clips/s against the bare VAE and the decode rate of one process, on the same clips."""
    import torch

    from cachebuild import open_cache
    from cachebuild.cache.manifest import Manifest
    from cachebuild.config import DType, LatentsMode
    from cachebuild.families.vae import VaeEncoder, family_of, load_vae
    from cachebuild.video.plan import plan_from_record
    from cachebuild.video.probe import HEADER_META, VideoHeader

    reader = open_cache(cache)
    paths = reader.source_paths()
    with Manifest.open(cache, read_only=True) as m:
        headers = {p: VideoHeader.from_json(m.get_meta(HEADER_META + p)["header"]) for p in set(paths.values())}
    clips_fp = reader.fingerprint["clips"]
    plans = [plan_from_record(k, str(dataset / paths[k]), reader.info(k), headers[paths[k]], clips_fp) for k in reader]
    start = time.perf_counter()
    clips = [p.decode(10**9) for p in plans]
    decode_rate = len(clips) / (time.perf_counter() - start)
    resolved = resolve_vae_spec(vae)
    family = family_of(resolved, None)
    device = torch.device(args.device)
    dtype = DType(args.dtype)
    model = load_vae(resolved, family, dtype.torch, device)
    encoder = VaeEncoder(model, family, device, dtype, LatentsMode.MEAN, False, 0)
    batches = [
        torch.from_numpy(np.stack(clips[i : i + args.batch_size])) for i in range(0, len(clips), args.batch_size)
    ]
    encoder.encode_raw(batches[0])  # warm-up, not timed
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        for out in encoder.encode_raw(batch):
            {k: v.cpu() for k, v in out.items()}
    sync(device)
    bare = len(clips) / (time.perf_counter() - start)
    pipeline = small["done"] / small["seconds"]
    setup = f"{args.size}, {args.device} {args.dtype}, {args.workers} worker(s)"
    print(f"\n{len(clips)} clips of {args.frames} frames at {setup}")
    print(f"(a) build_latents end to end      {pipeline:8.2f} clips/s  (model loading, probing and shards included)")
    print(f"(b) bare VAE on decoded clips     {bare:8.2f} clips/s")
    print(f"(c) ratio (a)/(b)                 {pipeline / bare:8.2f}")
    print(f"(d) decode, one process           {decode_rate:8.2f} clips/s")
    print(f"(e) decode cores per device       {bare / decode_rate:8.2f}  (= (b) / (d): workers that keep it fed)")


def resolve_vae_spec(vae: Path):
    from cachebuild.config import ModelSpec
    from cachebuild.hub import resolve_vae

    return resolve_vae(ModelSpec(vae=str(vae)))


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_moving_video(path: Path, n: int, size: tuple[int, int], seed: int) -> None:
    """H.264 frames of a soft gradient with a bright square crossing it: cheap to make, realistic to decode."""
    from cachebuild.testing.videos import write_video

    w, h = size
    rng = np.random.default_rng(seed)
    base = np.linspace(rng.uniform(20, 120), rng.uniform(120, 240), w, dtype=np.float32)[None, :, None]
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        frame = np.broadcast_to(base, (h, w, 3)).copy()
        x, y = (i * 3) % max(1, w - 16), (i * 2) % max(1, h - 16)
        frame[y : y + 16, x : x + 16] = 255
        frames[i] = (frame + rng.normal(0, 4, frame.shape)).clip(0, 255)
    write_video(path, frames, codec="libx264", options={"g": "16", "bf": "2"})


def run_child(args: argparse.Namespace, dataset: Path, out: Path, vae: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(dataset), str(out), str(vae), "--frames", str(args.frames)]
    cmd += ["--size", args.size, "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
    cmd += ["--shard-mb", str(args.shard_mb), "--device", args.device, "--dtype", args.dtype]
    cmd += ["--clips-per-video", str(args.clips_per_video)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    with RssSampler(proc.pid) as rss:
        stdout, _ = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"the run on {dataset} exited {proc.returncode}")
    result = json.loads(stdout)
    result["worker_bytes"], result["total_bytes"] = rss.peak_child, rss.peak_total
    return result


def child(args: argparse.Namespace) -> None:
    """One build in this fresh process; prints its summary and peak as JSON."""
    from cachebuild.config import BucketConfig, ClipConfig, DType, ExtractMode, LatentsConfig, LatentsMode, ModelSpec
    from cachebuild.jobs.latents import build_latents

    dataset, out, vae = args.child
    w, h = (int(v) for v in args.size.split("x"))
    cfg = LatentsConfig(
        dataset=Path(dataset),
        out=Path(out),
        model=ModelSpec(vae=vae),
        buckets=BucketConfig((w, h), 16, 4096, 16, no_upscale=True),
        latents=LatentsMode.MEAN,
        dtype=DType(args.dtype),
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        shard_mb=args.shard_mb,
        clips=ClipConfig(frames=(args.frames,), extract=ExtractMode.CHUNK),
    )
    summary = build_latents(cfg)
    print(json.dumps({"done": summary.done, "seconds": summary.seconds, "shards": summary.shards_written,
                      "self_bytes": maxrss_bytes(resource.RUSAGE_SELF)}))  # fmt: skip


if __name__ == "__main__":
    main()
