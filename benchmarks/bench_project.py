"""Decode once, encode for each: several latent caches of one dataset built together against one after another.

Generates N photo-like JPEGs (``bench_latents``' generator) and K cache configs that differ only in what the
encoder stores (posterior sample, mean, a flipped copy...) and so share every decode setting, then prints in one
run:

  (a) one after another: ``build_latents`` for each config on a fresh cache (what K ``cachebuild latents``
      commands do): wall time, images decoded (K x N);
  (b) together: ``project.shared.build_together`` over the same configs on fresh caches (what ``cachebuild
      build`` does for them): wall time, images decoded (N) and fed to the VAEs (K x N);
  (c) the ratio (a) / (b), and whether every cache's tensors are equal between (a) and (b).

The decodes saved are exact ((K - 1) x N); the wall time they buy depends on what bounds the run: decoding (large
JPEGs, few decode workers) or encoding. With a real VAE on a GPU the saving is the decode time of the passes that
no longer happen, which shows where the decode workers cannot keep the device fed.

    python benchmarks/bench_project.py --n 48 --targets 2 --resolution 512          # tiny random VAE, CPU
    python benchmarks/bench_project.py --model sdxl --device cuda --targets 3 --n 500
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latents import in_workdir, latents_config, model_args, prepare_inputs  # noqa: E402

MODES = ("sample", "mean", "moments")  # what each target stores: a cycle of these (with flip from the fourth)


def main() -> None:
    in_workdir(parse_args(), run, "cachebuild-bench-project-")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_args(p, 48, "512")
    p.add_argument("--targets", type=int, default=2, help="caches sharing the decode (default 2)")
    p.add_argument("--batch-size", type=int, default=4, help="images per encoder call (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of each, alternating; medians (default 3)")
    return p.parse_args()


def run(args: argparse.Namespace, work: Path) -> None:
    from cachebuild.config import LatentsMode

    images, vae = prepare_inputs(args, work)
    base = latents_config(args, images, work / "unused", vae)
    cfgs = [
        dataclasses.replace(base, latents=LatentsMode(MODES[i % len(MODES)]), flip=i >= len(MODES))
        for i in range(args.targets)
    ]
    separate = [dataclasses.replace(c, out=work / f"separate-{i}") for i, c in enumerate(cfgs)]
    together = [dataclasses.replace(c, out=work / f"together-{i}") for i, c in enumerate(cfgs)]
    warm_up(base, work)
    times: dict[str, list[float]] = {"separate": [], "together": []}
    for round_ in range(args.rounds):  # alternating which goes first: a slow start or a busy neighbour hits both
        order = ("separate", "together") if round_ % 2 == 0 else ("together", "separate")
        for name in order:
            seconds, count = time_builds(separate if name == "separate" else together, name)
            times[name].append(seconds)
            if name == "together":
                decoded, fed = count.decoded, count.fed
    one_by_one, shared = statistics.median(times["separate"]), statistics.median(times["together"])
    n = args.n
    print(
        f"images {n}, caches {args.targets}, resolution {args.resolution}, workers {args.workers}, "
        f"median of {args.rounds} rounds"
    )
    print(
        f"(a) one after another  {one_by_one:8.2f} s   decoded {args.targets * n:6d}   "
        f"rounds {_list(times['separate'])}"
    )
    print(f"(b) together           {shared:8.2f} s   decoded {decoded:6d}   rounds {_list(times['together'])}")
    print(f"    fed to the VAEs {fed}")
    print(f"(c) ratio (a) / (b): {one_by_one / shared:.2f}; tensors equal: {all_equal(separate, together)}")


def time_builds(cfgs, name: str):
    """Seconds to build ``cfgs`` on fresh caches, one after another or together; the group's DecodeCount."""
    from cachebuild.jobs.latents import build_latents
    from cachebuild.project.shared import build_together

    for cfg in cfgs:
        shutil.rmtree(cfg.out, ignore_errors=True)
    start = time.perf_counter()
    count = None
    if name == "separate":
        for cfg in cfgs:
            build_latents(cfg)
    else:
        _, count = build_together(cfgs)
    return time.perf_counter() - start, count


def warm_up(base, work: Path) -> None:
    """One small build first, so that neither timed run pays for first imports and first kernels alone."""
    from cachebuild.jobs.latents import build_latents

    sample = work / "warm-up"
    sample.mkdir(exist_ok=True)
    for path in sorted(base.dataset.iterdir())[:2]:
        shutil.copy(path, sample / path.name)
    shutil.rmtree(work / "warm-up-cache", ignore_errors=True)
    build_latents(dataclasses.replace(base, dataset=sample, out=work / "warm-up-cache"))


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def all_equal(left, right) -> bool:
    import torch

    from cachebuild.consumers.reader import open_cache

    for a, b in zip(left, right, strict=True):
        ra, rb = open_cache(a.out), open_cache(b.out)
        if ra.keys() != rb.keys():
            return False
        for key in ra:
            ta, tb = ra.tensors(key), rb.tensors(key)
            if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
                return False
    return True


if __name__ == "__main__":
    main()
