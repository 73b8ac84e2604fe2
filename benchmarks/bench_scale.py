"""Host memory at ten times the dataset: peak RSS of a build on N and 10 N items, captions or images.

Each build runs in a fresh subprocess, so one run's peak cannot hide the other's. The subprocess reports its
own kernel-measured peak (``ru_maxrss``: the main process, which plans, tokenizes, holds the models and the
shard being written); this process samples the subprocess's decode workers meanwhile (the largest one).
Models are the tiny random-weight ones from ``cachebuild.testing``; items are tiny (short captions, 16 px
images), so what grows, if anything, is what the job holds per item, not pixels or activations.

    python benchmarks/bench_scale.py text              # 2,000 vs 20,000 captions, tiny Flux text encoders
    python benchmarks/bench_scale.py images            # 10,000 vs 100,000 16 px PNGs, tiny VAE
    python benchmarks/bench_scale.py images --n 5000 --workdir /tmp/scale   # keep the files for a re-run

To compare with another checkout, put it first on PYTHONPATH: the builds run in subprocesses that inherit it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_latents import RssSampler, maxrss_bytes, run_parent_or_child

DEFAULT_N = {"text": 2000, "images": 10000}  # the small run; the large one has --factor times more
CAPTION_WORDS = (5, 15)  # short captions: the text itself stays small, so growth would be the job's own
IMAGE_SIDES = (16, 24, 32)  # pixels; three sides make several aspect buckets, as a real set has
SHARD_MB = 4.0  # small shards, so both runs rotate several: the open shard is the one buffer meant to grow
VOCABULARY = (  # caption words, split on spaces
    "a photo of the red blue green small large old young cat dog house tree river car sky night sunset "
    "mountain woman man child portrait painting street city forest beach snow light dark"
)


def main() -> None:
    run_parent_or_child(parse_args(), parent, child, "cachebuild-scale-")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("job", choices=("text", "images"))
    p.add_argument("--n", type=int, help="items in the small run (default 2000 captions or 10000 images)")
    p.add_argument("--factor", type=int, default=10, help="the large run has this many times more (default 10)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="decode processes for images (default 1)")
    p.add_argument("--workdir", help="keep the items, models and caches here (default: a temporary folder)")
    p.add_argument("--child", nargs=3, metavar=("DATASET", "OUT", "MODEL"), help=argparse.SUPPRESS)
    return p.parse_args()


def parent(args: argparse.Namespace, work: Path) -> None:
    n = args.n or DEFAULT_N[args.job]
    sizes = [n, n * args.factor]
    t = time.perf_counter()
    made = (write_captions if args.job == "text" else write_images)(work / "items", sizes[-1])
    print(f"{sizes[-1]} {args.job} items ({made} written in {time.perf_counter() - t:.1f} s)", file=sys.stderr)
    model = make_model(args.job, work / "model")
    results = []
    for size in sizes:
        dataset = subset(work / "items", work / f"items-{size}", size)
        out = work / f"cache-{size}"
        shutil.rmtree(out, ignore_errors=True)
        results.append(run_child(args, dataset, out, model))
    import cachebuild

    print(f"cachebuild from {Path(cachebuild.__file__).parent.parent}")
    print(f"{'items':>7}  {'seconds':>7}  {'shards':>6}  {'main peak':>10}  {'worker peak':>11}")
    for r in results:
        worker = f"{r['worker_bytes'] / 2**20:>7.0f} MiB" if r["worker_bytes"] else f"{'-':>11}"
        print(f"{r['done']:>7}  {r['seconds']:>7.1f}  {r['shards']:>6}  {r['self_bytes'] / 2**20:>6.0f} MiB  {worker}")
    small, large = results
    line = f"ratio {large['done']}/{small['done']} {args.job}: "
    line += f"main peak x{large['self_bytes'] / small['self_bytes']:.2f}"
    if small["worker_bytes"]:
        line += f", largest worker x{large['worker_bytes'] / small['worker_bytes']:.2f}"
    print(line + "  (goal <= 1.10)")


def write_captions(folder: Path, n: int) -> int:
    """``n`` caption files c0000000.txt ... of random short captions (kept when already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, made, vocabulary = random.Random(0), 0, VOCABULARY.split(" ")
    for i in range(n):
        words = rng.randint(*CAPTION_WORDS)
        text = " ".join(rng.choice(vocabulary) for _ in range(words))
        path = folder / f"c{i:07d}.txt"
        if not path.exists():
            path.write_text(text)
            made += 1
    return made


def write_images(folder: Path, n: int) -> int:
    """``n`` noise PNGs i0000000.png ... with sides from IMAGE_SIDES (kept when already there)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng, made = np.random.default_rng(0), 0
    for i in range(n):
        path = folder / f"i{i:07d}.png"
        if path.exists():
            continue
        w, h = (IMAGE_SIDES[j] for j in rng.integers(0, len(IMAGE_SIDES), 2))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path, compress_level=1)
        made += 1
    return made


def make_model(job: str, folder: Path) -> Path:
    from cachebuild.testing import make_tiny_text_pipeline, make_tiny_vae

    if not folder.exists():
        make_tiny_text_pipeline(folder, "flux") if job == "text" else make_tiny_vae(folder)
    return folder


def subset(source: Path, folder: Path, n: int) -> Path:
    """A dataset folder holding hard links to the first ``n`` items of ``source``."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in sorted(source.iterdir())[:n]:
        os.link(path, folder / path.name)
    return folder


def run_child(args: argparse.Namespace, dataset: Path, out: Path, model: Path) -> dict:
    cmd = [sys.executable, __file__, args.job, "--child", str(dataset), str(out), str(model)]
    cmd += ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    with RssSampler(proc.pid) as rss:
        stdout, _ = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"the run on {dataset} exited {proc.returncode}")
    result = json.loads(stdout)
    result["worker_bytes"] = rss.peak_child  # sampled: the largest decode worker (0 for text: none)
    return result


def child(args: argparse.Namespace) -> None:
    """One build in this process; prints its summary and this process's own peak as JSON."""
    dataset, out, model = (Path(p) for p in args.child)
    if args.job == "text":
        from cachebuild.config import DType, TextencConfig
        from cachebuild.jobs.textenc import build_textenc

        cfg = TextencConfig(
            source=dataset,
            out=out,
            model=str(model),
            device="cpu",
            dtype=DType.FP32,
            batch_size=args.batch_size,
            shard_mb=SHARD_MB,
        )
        summary = build_textenc(cfg)
    else:
        from cachebuild.config import BucketConfig, DType, LatentsConfig, ModelSpec
        from cachebuild.jobs.latents import build_latents

        buckets = BucketConfig(resolution=(24, 24), min_reso=8, max_reso=48, steps=8)
        cfg = LatentsConfig(
            dataset=dataset,
            out=out,
            model=ModelSpec(vae=str(model)),
            buckets=buckets,
            batch_size=args.batch_size,
            workers=args.workers,
            device="cpu",
            dtype=DType.FP32,
            shard_mb=SHARD_MB,
        )
        summary = build_latents(cfg)
    report = {
        "done": summary.done,
        "seconds": summary.seconds,
        "shards": summary.shards_written,
        "self_bytes": maxrss_bytes(resource.RUSAGE_SELF),  # exact, kernel-measured
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
