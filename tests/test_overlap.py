"""The one-device loop: no cache flush on the hot path, the memory budget, staging on the CPU."""

from __future__ import annotations

import numpy as np
import torch

import cachebuild.encode
from cachebuild.engines.device import DeviceStreams, trim_if_over
from cachebuild.jobs.latents import build_latents
from tests.conftest import write_image
from tests.test_pipeline import make_cfg


def test_no_cache_flush_per_batch_or_bucket(tmp_path, tiny_vae, monkeypatch):
    root = tmp_path / "ds"
    for i in range(9):  # three bucket shapes, interleaved
        write_image(root / f"im{i}.png", [(128, 128), (160, 96), (96, 160)][i % 3], seed=i)
    calls = []
    monkeypatch.setattr(cachebuild.encode, "free_device_memory", lambda device: calls.append(device))
    summary = build_latents(make_cfg(root, tmp_path / "c", tiny_vae, batch_size=1))
    assert summary.done == 9
    assert len(calls) == 1  # the end of the run only, not 9 batches nor 3 shapes


def test_trim_only_past_the_budget(monkeypatch):
    calls = []
    monkeypatch.setattr("cachebuild.engines.device.reserved_bytes", lambda device: 5_000)
    assert not trim_if_over(torch.device("cuda"), 6_000, calls.append)
    assert not trim_if_over(torch.device("cuda"), None, calls.append)
    assert trim_if_over(torch.device("cuda"), 4_000, calls.append) and len(calls) == 1


def test_cpu_staging_and_copy_out_are_plain_and_synchronous():
    streams = DeviceStreams(torch.device("cpu"))
    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    staged = streams.stage(pixels)
    assert staged.event is None and torch.equal(staged.wait(), torch.from_numpy(pixels))
    values = [{"a": torch.ones(2)}, "a reason"]
    assert streams.to_host(values).ready() == values
