"""Throughput of ``build_latents`` against the bare VAE, peak memory, and the no-op re-run.

Generates N photo-like JPEGs (mixed aspect ratios, 800-2000 px on the long side), then measures in one run:

  (a) end-to-end images/s of ``cachebuild.jobs.latents.build_latents`` (scan, plan, decode workers, encode,
      shards, manifest), with a config built the way the CLI builds it;
  (b) bare-model images/s: the same VAE, loaded the same way, encoding ready uint8 tensors of the same bucket
      shapes in the same batch composition (read back from the run's manifest), results moved to the CPU;
  (c) the ratio (a) / (b): how much of the model's own speed the pipeline delivers;
  (d) peak RSS of this process, of the largest decode worker and of both together;
  (e) the wall time of a no-op re-run, as a library call and as the ``cachebuild latents`` command.

    python benchmarks/bench_latents.py --n 200                         # tiny random VAE, best device
    python benchmarks/bench_latents.py --vae ./sdxl-vae --device cuda --dtype bf16 --batch-size 8
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

LONG_SIDE = (800, 2000)  # pixels; the range of the long side of generated images
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 3 / 4, 2 / 3, 9 / 16, 1 / 2)  # W / H
JPEG_QUALITY = 90
RSS_POLL_SECONDS = 0.05  # how often the memory sampler looks; short peaks between looks are missed


def main() -> None:
    in_workdir(parse_args(), run, "cachebuild-bench-")


def in_workdir(args: argparse.Namespace, run, prefix: str) -> None:
    """``run(args, work)`` in ``--workdir``, or in a temporary folder removed afterwards."""
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix=prefix))
    try:
        run(args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def model_args(p: argparse.ArgumentParser, n: int, resolution: str) -> None:
    """The options every latents benchmark takes: images, work folder, model, device, dtype, workers, size."""
    from cachebuild.config import default_workers

    p.add_argument("--n", type=int, default=n, help=f"images to generate and encode (default {n})")
    p.add_argument("--workdir", help="keep images, model and caches here (default: a temporary folder, removed)")
    p.add_argument("--vae", help="VAE folder, file or hub id (default: a tiny random-weight VAE)")
    p.add_argument("--model", help="or a preset / pipeline (sd15, sdxl, ...) whose VAE is used")
    p.add_argument("--device", help="cuda, cpu, mps (default: the best available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="compute dtype")
    p.add_argument("--workers", type=int, default=default_workers(), help="decode processes (in all)")
    p.add_argument("--resolution", default=resolution, help=f"bucket area as one side, or W,H (default {resolution})")


def prepare_inputs(args: argparse.Namespace, work: Path) -> tuple[Path, str | None]:
    """(images folder, VAE) for a run: ``--n`` generated images, and a tiny random VAE unless ``--vae`` or
    ``--model`` names one; ``--batch-size auto`` becomes None."""
    images = work / "images"
    generate_images(images, args.n)
    vae = args.vae
    if vae is None and args.model is None:
        from cachebuild.testing import make_tiny_vae

        vae = str(work / "tiny-vae")
        if not Path(vae, "config.json").exists():
            make_tiny_vae(Path(vae))
    if isinstance(args.batch_size, str):
        args.batch_size = None if args.batch_size == "auto" else int(args.batch_size)
    return images, vae


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_args(p, 200, "1024")
    p.add_argument("--batch-size", type=int, default=4)
    return p.parse_args()


def run(args: argparse.Namespace, work: Path) -> None:
    import torch

    from cachebuild.encode import pick_device, resolve_dtype
    from cachebuild.jobs.latents import build_latents

    images, cache = work / "images", work / "cache"
    t = time.perf_counter()
    made = generate_images(images, args.n)
    print(f"images: {args.n} in {images} ({made} generated in {time.perf_counter() - t:.1f} s)", file=sys.stderr)
    vae_source = args.vae
    if vae_source is None and args.model is None:
        from cachebuild.testing import make_tiny_vae

        vae_source = str(work / "tiny-vae")
        if not Path(vae_source, "config.json").exists():
            make_tiny_vae(Path(vae_source))
    shutil.rmtree(cache, ignore_errors=True)
    cfg = latents_config(args, images, cache, vae_source)
    device = pick_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)

    ticks: list[tuple[float, int]] = []  # (time, items processed) after each batch
    with RssSampler(os.getpid()) as rss:
        t = time.perf_counter()
        summary = build_latents(cfg, lambda p: ticks.append((time.perf_counter(), p.processed)))
        e2e_seconds = time.perf_counter() - t
    rss_self_after_run = maxrss_bytes(resource.RUSAGE_SELF)
    if summary.failed:
        print(f"warning: {summary.failed} items failed: {summary.failures[:3]}", file=sys.stderr)
    steady = (ticks[-1][1] - ticks[0][1]) / (ticks[-1][0] - ticks[0][0]) if len(ticks) > 1 else float("nan")

    buckets = bucket_counts(cache)
    bare_images, bare_seconds = time_bare_model(cfg, buckets, device, dtype)

    t = time.perf_counter()
    again = build_latents(cfg)
    noop_lib = time.perf_counter() - t
    if not again.nothing_to_do or again.model_loaded:
        print(f"warning: the re-run was not a no-op: {again}", file=sys.stderr)
    noop_cli = time_cli_rerun(args, images, cache, vae_source, dtype.value)

    e2e = summary.done / e2e_seconds
    bare = bare_images / bare_seconds
    rows = [
        (
            "device / compute dtype",
            f"{device} / {dtype.value}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        ),
        ("images (done / failed)", f"{summary.done} / {summary.failed}"),
        ("batch size / workers", f"{cfg.batch_size} / {cfg.workers}"),
        ("buckets", ", ".join(f"{b} ({n})" for b, n in sorted(buckets.items()))),
        ("(a) end-to-end build_latents", f"{e2e:8.2f} img/s  ({e2e_seconds:.1f} s, model load and scan included)"),
        ("    first to last batch", f"{steady:8.2f} img/s"),
        ("(b) bare model, same shapes", f"{bare:8.2f} img/s  ({bare_seconds:.1f} s of encode + copy to CPU)"),
        ("(c) ratio (a) / (b)", f"{e2e / bare:8.3f}    (target >= 0.95 on a GPU)"),
        ("(d) peak RSS, this process", f"{rss_self_after_run / 2**20:8.0f} MiB  (ru_maxrss over the build)"),
        ("    largest decode worker", f"{rss.peak_child / 2**20:8.0f} MiB  (sampled every {RSS_POLL_SECONDS} s)"),
        ("    process + workers together", f"{rss.peak_total / 2**20:8.0f} MiB  (sampled)"),
        ("(e) no-op re-run, library", f"{noop_lib:8.3f} s"),
        ("    no-op re-run, CLI", f"{noop_cli:8.3f} s  (process start and imports included)"),
        ("shards / bytes written", f"{summary.shards_written} / {summary.bytes_written / 2**20:.1f} MiB"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"ratio: {e2e / bare:.3f}")


def latents_config(args: argparse.Namespace, images: Path, cache: Path, vae: str | None):
    """The LatentsConfig that ``cachebuild latents`` builds for the same options."""
    from cachebuild.config import BucketConfig, DType, LatentsConfig, ModelSpec

    return LatentsConfig(
        dataset=images,
        out=cache,
        model=ModelSpec(model=args.model, vae=vae),
        buckets=BucketConfig(resolution=parse_resolution(args.resolution)),
        dtype=DType(args.dtype),
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
    )


def parse_resolution(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def bucket_counts(cache: Path) -> dict[str, int]:
    """'WxH' -> number of done items, from the run's manifest."""
    import sqlite3

    with sqlite3.connect(cache / "manifest.sqlite") as conn:
        rows = conn.execute("SELECT bucket FROM items WHERE store='latents' AND status='done'").fetchall()
    return dict(Counter(r[0] for r in rows))


def time_bare_model(cfg, buckets: dict[str, int], device, dtype) -> tuple[int, float]:
    """Encode random uint8 batches of the run's bucket shapes and batch sizes; seconds spent encoding.

    Each batch is made before its timer starts; the timed part is what any caching loop must do: move the
    pixels to the device, scale them to [-1, 1], encode, and bring the result back to the CPU.
    """
    import torch

    from cachebuild.encode import free_device_memory
    from cachebuild.families.vae import family_of, load_vae
    from cachebuild.hub import resolve_vae

    vae_src = resolve_vae(cfg.model)
    family = family_of(vae_src, cfg.model.preset)
    vae = load_vae(vae_src, family, dtype.torch, device)
    batches = []
    for bucket, n in sorted(buckets.items()):
        w, h = (int(x) for x in bucket.split("x"))
        batches += [(min(cfg.batch_size, n - i), h, w) for i in range(0, n, cfg.batch_size)]
    gen = torch.Generator().manual_seed(0)

    def encode(b: int, h: int, w: int) -> float:
        pixels = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=gen)  # (B, 3, H, W)
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            x = pixels.to(device).to(dtype.torch).div_(127.5).sub_(1.0)
            enc = vae.encode(x)
            out = enc.latent_dist.parameters if family.has_posterior else enc.latents
            out.float().cpu()
        return time.perf_counter() - t

    encode(*batches[0])  # warm-up (kernel selection, allocator); build_latents pays this too, untimed here
    seconds = 0.0
    for shape in batches:  # no cache flush between shapes: the pipeline flushes only past its memory budget
        seconds += encode(*shape)
    free_device_memory(device)
    return sum(b for b, _, _ in batches), seconds


def time_cli_rerun(args, images: Path, cache: Path, vae: str | None, dtype: str) -> float:
    """Wall time of ``cachebuild latents`` on the finished cache, in a fresh process."""
    cmd = [sys.executable, "-m", "cachebuild", "latents", str(images), "--out", str(cache), "-q"]
    cmd += ["--vae", vae] if vae else ["--model", args.model]
    cmd += ["--resolution", args.resolution, "--dtype", dtype, "--batch-size", str(args.batch_size)]
    cmd += ["--device", args.device] if args.device else []
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0 or "nothing left to do" not in proc.stderr:
        print(f"warning: CLI re-run exited {proc.returncode}: {proc.stderr.strip()}", file=sys.stderr)
    return seconds


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RssSampler:
    """Polls the resident memory of a process and its descendants in a thread; keeps the peaks (bytes).

    ``peak_self``: the process itself; ``peak_child``: the largest single descendant (a decode worker);
    ``peak_total``: the process and all descendants added up, i.e. the host memory the run holds.
    """

    def __init__(self, pid: int, interval: float = RSS_POLL_SECONDS):
        import psutil

        self.proc, self.interval = psutil.Process(pid), interval
        self.peak_self = self.peak_child = self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        import psutil

        while True:
            try:
                own = self.proc.memory_info().rss
                kids = []
                for child in self.proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):  # exited between the listing and the look
                        kids.append(child.memory_info().rss)
            except psutil.Error:  # the process itself has exited
                return
            self.peak_self = max(self.peak_self, own)
            self.peak_child = max([self.peak_child, *kids])
            self.peak_total = max(self.peak_total, own + sum(kids))
            if self._stop.wait(self.interval):
                return


def run_parent_or_child(args: argparse.Namespace, parent, child, prefix: str) -> None:
    """The entry point of the memory benchmarks: a ``--child`` run builds one cache in this fresh process;
    otherwise ``parent`` runs the children in ``--workdir`` (or a temporary folder, removed afterwards)."""
    if args.child:
        child(args)
        return
    in_workdir(args, parent, prefix)


def maxrss_bytes(who: int) -> int:
    """Peak resident set size; Linux reports KiB, macOS bytes."""
    peak = resource.getrusage(who).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# -- photo-like test images -----------------------------------------------------------------------------------
def generate_images(folder: Path, n: int, long_side: tuple[int, int] = LONG_SIDE) -> int:
    """Write ``n`` JPEGs named img00000.jpg ... into ``folder`` (kept when already there); returns how many
    were written."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(n) if not (folder / f"img{i:05d}.jpg").exists()]
    with ProcessPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(write_photo, [folder] * len(todo), todo, [long_side] * len(todo), chunksize=8))
    return len(todo)


def write_photo(folder: Path, index: int, long_side: tuple[int, int]) -> None:
    """A seeded photo-like image: sky-to-ground gradient, soft texture, blurred shapes, a little grain."""
    rng = np.random.default_rng(index)
    aspect = ASPECTS[index % len(ASPECTS)]
    side = int(rng.integers(long_side[0], long_side[1] + 1))
    w, h = (side, max(1, int(side / aspect))) if aspect >= 1 else (max(1, int(side * aspect)), side)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    top, bottom = rng.uniform(40, 240, 3).astype(np.float32), rng.uniform(10, 200, 3).astype(np.float32)
    base = (1 - t) * top + t * bottom  # (H, 1, 3)
    coarse = rng.random((6, 6, 3)).astype(np.float32)
    texture = np.asarray(
        Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC), np.float32
    )
    pixels = base * 0.7 + texture * 0.3  # (H, W, 3)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        x1, y1 = x0 + rng.uniform(0.05, 0.4) * w, y0 + rng.uniform(0.05, 0.4) * h
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(2))
    grain = rng.normal(0.0, 4.0, (h, w, 1)).astype(np.float32)
    img = Image.fromarray(np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8))
    img.save(folder / f"img{index:05d}.jpg", quality=JPEG_QUALITY)


if __name__ == "__main__":
    main()
