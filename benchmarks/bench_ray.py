"""``--engine ray`` against one process on this machine, side by side.

Generates N photo-like JPEGs (``bench_latents``' generator) and a tiny random VAE (or takes ``--vae``), then
prints in one run:

  (a) one process: ``build_latents`` on one device, the usual decode workers;
  (b) ``--engine ray`` on a local Ray cluster started for the run (every core of this machine, all on
      127.0.0.1): decode tasks, one encoder actor (the GPU's, or a one-thread CPU actor), one shard per task;
  (c) their ratio, end to end and from the first to the last shard, and whether the tensors equal those
      of a one-process run with the CPU actor's thread count.

    python benchmarks/bench_ray.py --n 96 --resolution 256            # tiny random VAE, this machine's CPU

On one machine Ray can only lose: the same cores run decode and encode, plus a Ray runtime (GCS, raylet,
object store copies) and model loads in the actor. What a cluster adds is in docs/scale.md#cluster---engine-ray.
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
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the local cluster names itself 127.0.0.1

from bench_latents import in_workdir, latents_config, model_args, prepare_inputs  # noqa: E402
from bench_pipeline import same_tensors  # noqa: E402


def main() -> None:
    in_workdir(parse_args(), run, "cachebuild-bench-ray-")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_args(p, 96, "256")
    p.set_defaults(dtype="fp32")
    p.add_argument("--batch-size", default="4", help="a number, or auto")
    p.add_argument("--shard-mb", type=float, default=2.0, help="shard size; Ray writes one shard per task")
    return p.parse_args()


def run(args: argparse.Namespace, work: Path) -> None:
    import torch

    from cachebuild.config import EngineKind
    from cachebuild.engines import ray_cluster
    from cachebuild.jobs.latents import build_latents

    images, vae = prepare_inputs(args, work)
    one_cfg = dataclasses.replace(latents_config(args, images, work / "one", vae), shard_mb=args.shard_mb)
    ray_cfg = dataclasses.replace(one_cfg, out=work / "ray", device=None, engine=EngineKind.RAY, ray_address=None)
    ref_cfg = dataclasses.replace(one_cfg, out=work / "ref", workers=0)

    results = {}
    for name, cfg in (("one", one_cfg), ("ray", ray_cfg)):
        shutil.rmtree(cfg.out, ignore_errors=True)
        ticks: list[tuple[float, int]] = []  # (time, items finished) after each batch or shard
        t = time.perf_counter()
        summary = build_latents(cfg, lambda p, ticks=ticks: ticks.append((time.perf_counter(), p.processed)))
        seconds = time.perf_counter() - t
        steady = (ticks[-1][1] - ticks[0][1]) / (ticks[-1][0] - ticks[0][0]) if len(ticks) > 1 else 0.0
        results[name] = (summary, seconds, steady)
    gpus = ray_cluster.cluster_gpus()
    before = torch.get_num_threads()
    if not gpus:
        torch.set_num_threads(ray_cluster.CPU_ACTOR_THREADS)  # the CPU actor's kernels, for bit equality
    try:
        shutil.rmtree(ref_cfg.out, ignore_errors=True)
        build_latents(ref_cfg)
    finally:
        torch.set_num_threads(before)

    (one, one_s, one_steady), (ray_sum, ray_s, ray_steady) = results["one"], results["ray"]
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    rows = [
        ("images (done one / ray)", f"{one.done} / {ray_sum.done}"),
        (
            "(a) one process",
            f"{one.done / one_s:8.2f} img/s  ({one_s:.1f} s; {one_cfg.workers} decode workers, {before} torch threads)",
        ),  # fmt: skip
        (
            "(b) --engine ray, local",
            f"{ray_sum.done / ray_s:8.2f} img/s  ({ray_s:.1f} s; {cpus} Ray CPUs, "
            f"{gpus or 'no'} GPU, {ray_sum.shards_written} shards; cluster start included)",
        ),  # fmt: skip
        ("(c) ratio ray / one", f"{(ray_sum.done / ray_s) / (one.done / one_s):8.3f}"),
        ("    first to last report", f"{one_steady:8.2f} vs {ray_steady:.2f} img/s"),
        ("    tensors equal", str(same_tensors(ray_cfg.out, ref_cfg.out))),
    ]
    ray.shutdown()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
