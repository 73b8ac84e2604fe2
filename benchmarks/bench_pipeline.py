"""The overlapped pipeline against the bare model, where the time goes, and two devices against one.

Generates N photo-like JPEGs (``bench_latents``' generator), then prints in one run:

  (a) end-to-end images/s of ``build_latents`` on one device, and the bare model's images/s on the same
      device, bucket shapes and batches (``bench_latents.time_bare_model``), and their ratio;
  (b) the per-image time split of the device loop: waiting for decoded batches, staging the copy in,
      encoding, queuing the copy out, the writer thread's work (its own thread: it overlaps the rest), and
      the loop's waits on a full writer queue;
  (c) ``--devices cpu,cpu`` against one CPU device, each CPU device with half the cores' threads (the
      one-device run too, so the comparison is about processes, not threads), and whether the tensors of
      the two runs are equal.

    python benchmarks/bench_pipeline.py --n 64 --resolution 512                  # tiny random VAE, CPU
    python benchmarks/bench_pipeline.py --vae ./sdxl-vae --device cuda --dtype bf16 --no-devices
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latents import (  # noqa: E402
    bucket_counts,
    in_workdir,
    latents_config,
    model_args,
    prepare_inputs,
    time_bare_model,
)


def main() -> None:
    in_workdir(parse_args(), run, "cachebuild-bench-pipe-")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_args(p, 64, "512")
    p.add_argument("--batch-size", default="auto", help="a number, or auto (default)")
    p.add_argument("--no-devices", action="store_true", help="skip (c), the two-CPU-device comparison")
    return p.parse_args()


def run(args: argparse.Namespace, work: Path) -> None:
    import torch

    from cachebuild.encode import pick_device, resolve_dtype
    from cachebuild.engines.base import StageTimes
    from cachebuild.jobs.latents import build_latents

    images, vae = prepare_inputs(args, work)
    cfg = latents_config(args, images, work / "one", vae)
    device = pick_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)

    shutil.rmtree(cfg.out, ignore_errors=True)
    times = StageTimes()
    t = time.perf_counter()
    summary = build_latents(cfg, times=times)
    e2e_seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    buckets = bucket_counts(cfg.out)
    sizes = batch_sizes(cfg, buckets)
    bare_images = bare_seconds = 0
    for size in sorted(set(sizes.values())):  # the bare model at the batch each shape ran with
        shapes = {b: c for b, c in buckets.items() if sizes[b] == size}
        got = time_bare_model(dataclasses.replace(cfg, batch_size=size), shapes, device, dtype)
        bare_images, bare_seconds = bare_images + got[0], bare_seconds + got[1]
    e2e, bare = summary.done / e2e_seconds, bare_images / bare_seconds
    n = max(1, times.images)
    name = f"{device} / {dtype.value}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    rows = [
        ("device / compute dtype", name),
        ("images (done / failed)", f"{summary.done} / {summary.failed}"),
        ("batch size / workers / threads", f"{args.batch_size or 'auto'} / {cfg.workers} / {torch.get_num_threads()}"),
        ("(a) pipeline, end to end", f"{e2e:8.2f} img/s  ({e2e_seconds:.1f} s, model load and scan included)"),
        ("    bare model, same shapes", f"{bare:8.2f} img/s"),
        ("    ratio pipeline / bare", f"{e2e / bare:8.3f}"),
        ("    batch per shape", ", ".join(f"{b}: {n}" for b, n in sorted(sizes.items()))),
        ("(b) per image: decode wait", f"{1000 * times.decode / n:8.2f} ms"),
        ("    copy in (host side)", f"{1000 * times.copy_in / n:8.2f} ms"),
        ("    encode", f"{1000 * times.encode / n:8.2f} ms"),
        ("    copy out (queuing)", f"{1000 * times.copy_out / n:8.2f} ms"),
        ("    write (writer thread)", f"{1000 * times.write / n:8.2f} ms  (overlaps the above)"),
        ("    waits on the writer", f"{1000 * times.write_wait / n:8.2f} ms"),
    ]
    if peak is not None:
        rows.append(("    peak device memory", f"{peak / 2**30:8.2f} GiB  (torch max_memory_allocated)"))
    if device.type == "cuda" and args.batch_size is None:  # the auto size against the old fixed 4
        four = dataclasses.replace(cfg, out=work / "batch4", batch_size=4)
        shutil.rmtree(four.out, ignore_errors=True)
        t = time.perf_counter()
        done = build_latents(four).done
        rows.append(("    pipeline at batch 4", f"{done / (time.perf_counter() - t):8.2f} img/s"))
    if not args.no_devices:
        rows += compare_devices(args, images, vae, work)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"ratio: {e2e / bare:.3f}")


def compare_devices(args: argparse.Namespace, images: Path, vae: str | None, work: Path) -> list[tuple[str, str]]:
    """One CPU device with half the threads against ``--devices cpu,cpu`` (half the threads each)."""
    import torch

    from cachebuild.jobs.latents import build_latents

    half = max(1, (os.cpu_count() or 1) // 2)
    one_cfg = dataclasses.replace(latents_config(args, images, work / "cpu1", vae), device="cpu")
    two_cfg = dataclasses.replace(one_cfg, out=work / "cpu2", device=None, devices=("cpu", "cpu"))
    before = torch.get_num_threads()
    torch.set_num_threads(half)
    try:
        seconds, steady = [], []
        for cfg in (one_cfg, two_cfg):
            shutil.rmtree(cfg.out, ignore_errors=True)
            ticks: list[tuple[float, int]] = []  # (time, items finished) after each batch
            t = time.perf_counter()
            done = build_latents(cfg, lambda p, ticks=ticks: ticks.append((time.perf_counter(), p.processed))).done
            seconds.append(time.perf_counter() - t)
            steady.append((ticks[-1][1] - ticks[0][1]) / (ticks[-1][0] - ticks[0][0]) if len(ticks) > 1 else 0.0)
    finally:
        torch.set_num_threads(before)
    one, two = done / seconds[0], done / seconds[1]
    return [
        ("(c) one CPU device", f"{one:8.2f} img/s  ({half} threads, {one_cfg.workers} workers)"),
        ("    --devices cpu,cpu", f"{two:8.2f} img/s  ({half} threads and half the workers each)"),
        ("    ratio two / one", f"{two / one:8.3f}  (process start and model loads included)"),
        ("    first to last batch", f"{steady[0]:8.2f} vs {steady[1]:.2f} img/s, ratio {steady[1] / steady[0]:.3f}"),
        ("    tensors equal", str(same_tensors(one_cfg.out, two_cfg.out))),
    ]


def same_tensors(a: Path, b: Path) -> bool:
    from cachebuild.consumers.reader import open_cache

    left, right = open_cache(a), open_cache(b)
    keys = sorted(left.keys())
    if keys != sorted(right.keys()):
        return False
    import torch

    for key in keys:
        x, y = left[key], right[key]
        if sorted(x) != sorted(y):
            return False
        if not all(not isinstance(x[k], torch.Tensor) or torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def batch_sizes(cfg, buckets: dict[str, int]) -> dict[str, int]:
    """'WxH' -> the batch the run used: the fixed size, or what --batch-size auto found (the manifest meta)."""
    from cachebuild.cache.manifest import Manifest
    from cachebuild.engines.batchsize import CPU_AUTO_BATCH

    if cfg.batch_size:
        return dict.fromkeys(buckets, cfg.batch_size)
    with Manifest.open(cfg.out, create=False, read_only=True) as m:
        found = m.get_meta("auto_batch:latents") or {}
    by_shape = {key.rsplit("|", 1)[1]: v["batch"] for key, v in found.items()}
    return {b: by_shape.get(b, CPU_AUTO_BATCH) for b in buckets}


if __name__ == "__main__":
    main()
