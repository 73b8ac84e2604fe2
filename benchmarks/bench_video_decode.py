"""Decoding one clip: seeking to the keyframe before it against decoding the video from its start, per clip and
per frame, and the host memory a decode holds.

It writes one H.264 video (--seconds long, --size, a keyframe every --gop frames, B-frames) and decodes the
clip of --frames frames at the end of it through ``video.decode`` (seeked), and the same frames by decoding
every frame from the start (what a reader without seek points does), in this process, one core.

    python benchmarks/bench_video_decode.py                          # 60 s at 1280x720, a 33-frame clip
    python benchmarks/bench_video_decode.py --seconds 600 --size 1920x1080 --frames 81
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="video length (default 60)")
    p.add_argument("--size", default="1280x720", help="WxH (default 1280x720)")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--gop", type=int, default=48, help="frames between keyframes (default 48: 3 s)")
    p.add_argument("--frames", type=int, default=33, help="clip length (default 33)")
    p.add_argument("--workdir", help="keep the video here (default: a temporary folder)")
    args = p.parse_args()
    import av

    from cachebuild.config import BucketConfig, CropMode
    from cachebuild.images.plan import BucketPlan
    from cachebuild.video.plan import plan_clip
    from cachebuild.video.probe import VIDEO, probe

    w, h = (int(v) for v in args.size.split("x"))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cachebuild-decode-"))
    path = work / f"long-{args.size}-{args.seconds:g}s.mp4"
    n = int(args.seconds * args.fps)
    if not path.exists():
        write_long_video(path, n, (w, h), args.fps, args.gop)
    start = time.perf_counter()
    header = probe(str(path), VIDEO, None, None, 10**10)
    probed = time.perf_counter() - start
    buckets = BucketPlan(BucketConfig((w, h), 16, 8192, 16, no_upscale=True))
    first = header.frames - args.frames
    plan = plan_clip(buckets, "k", str(path), header, (first, args.frames), CropMode.CENTER, 0, (None, None))
    rss_before = maxrss()
    start = time.perf_counter()
    clip = plan.decode(10**10)
    seeked = time.perf_counter() - start
    rss_seek = maxrss()
    start = time.perf_counter()
    with av.open(str(path)) as container:
        container.streams.video[0].codec_context.thread_count = 1  # one core, as a decode worker
        frames = [f for i, f in enumerate(container.decode(video=0)) if i >= first]
        whole = np.stack([f.to_ndarray(format="rgb24", threads=1) for f in frames])
    from_start = time.perf_counter() - start
    assert np.array_equal(clip, whole), "the seeked clip differs from the frames decoded from the start"
    print(f"{n} frames of {w}x{h} at {args.fps} fps, keyframe every {args.gop}; clip of {args.frames} at frame {first}")
    print(f"probe (packets only, once per file)   {probed:8.3f} s   ({len(header.seek)} seek points)")
    print(f"clip, seeked to its keyframe          {seeked:8.3f} s   {seeked / args.frames * 1000:6.1f} ms/frame")
    print(f"the same frames from the start        {from_start:8.3f} s   x{from_start / seeked:.1f} the seeked time")
    print(f"peak RSS growth while decoding        {(rss_seek - rss_before) / 2**20:8.1f} MiB "
          f"(the clip itself: {clip.nbytes / 2**20:.1f} MiB)")  # fmt: skip


def write_long_video(path: Path, n: int, size: tuple[int, int], fps: int, gop: int) -> None:
    """H.264 of a moving gradient, written frame by frame (never held whole)."""
    import av

    w, h = size
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"g": str(gop), "bf": "2", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            rgb = np.stack([(x + i * 3) % 256 + 0 * y, (y + i * 2) % 256 + 0 * x, (x + y + i) % 256], -1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb.astype(np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB)", file=sys.stderr)


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


if __name__ == "__main__":
    main()
