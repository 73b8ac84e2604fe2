"""examples/train_tiny.py runs end to end on a fresh cache: DataLoader workers, bucket batches, several epochs."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

from cachebuild.jobs.latents import build_latents
from tests.test_reader import small_cfg, small_dataset

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_tiny.py"


def test_example_trains_for_a_few_steps_across_epochs(tmp_path, tiny_vae):
    out = tmp_path / "cache"
    build_latents(small_cfg(small_dataset(tmp_path / "ds"), out, tiny_vae, flip=True))
    steps = 7  # 6 items in batches of 2 over 2 buckets: 3 or 4 batches an epoch, so this crosses an epoch
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), str(out), "--steps", str(steps), "--batch-size", "2", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHONPATH": str(EXAMPLE.parents[1])},  # this checkout's cachebuild, however installed
    )
    assert run.returncode == 0, run.stderr
    lines = re.findall(r"step (\d+) epoch (\d+) bucket (\d+)x(\d+) batch (\d+) loss (\S+)", run.stdout)
    assert [int(s) for s, *_ in lines] == list(range(1, steps + 1))
    assert {int(e) for _, e, *_ in lines} >= {0, 1}
    assert {(int(w), int(h)) for _, _, w, h, *_ in lines} <= {(64, 64), (32, 96)}
    assert all(math.isfinite(float(loss)) for *_, loss in lines)
