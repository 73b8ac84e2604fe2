"""How long opening a large cache takes: the reader's index comes from the manifest alone.

Builds a manifest of N done items (no shard files; opening must not need them), then times, in one run,
``open_cache``, building the bucket sampler and one epoch of its batches; median of --repeat runs.

    python benchmarks/bench_open.py --n 100000
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="items in the cache (default 100000)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    from cachebuild import open_cache
    from cachebuild.testing import make_synthetic_manifest

    root = Path(tempfile.mkdtemp(prefix="cachebuild-bench-open-"))
    try:
        make_synthetic_manifest(root, args.n)
        opens, samplers, epochs = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            cache = open_cache(root)
            t1 = time.perf_counter()
            sampler = cache.bucket_sampler(batch_size=8, seed=0)
            t2 = time.perf_counter()
            batches = sum(1 for _ in sampler)
            t3 = time.perf_counter()
            opens.append(t1 - t0)
            samplers.append(t2 - t1)
            epochs.append(t3 - t2)
        print(f"items {len(cache)}, batches per epoch {batches}, median of {args.repeat}")
        print(f"open_cache            {statistics.median(opens) * 1000:8.1f} ms")
        print(f"bucket_sampler        {statistics.median(samplers) * 1000:8.1f} ms")
        print(f"one epoch of batches  {statistics.median(epochs) * 1000:8.1f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
