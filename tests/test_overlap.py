"""The one-device loop: no cache flush on the hot path, the memory budget and its margin, staging in its own
thread, outputs out of pinned memory, the allocator setting, and nothing of the model left after a run."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cachebuild.encode
from cachebuild.cli import cli
from cachebuild.engines.device import (
    ALLOC_CONF,
    ALLOC_CONF_VARIABLES,
    DeviceStreams,
    HostOutputs,
    Stager,
    prefer_expandable_segments,
    trim_if_over,
)
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


def test_trim_only_past_the_budget_and_its_margin(monkeypatch):
    from cachebuild.engines.device import TRIM_MARGIN_MIN_BYTES, TRIM_MARGIN_SHARE

    held = {"bytes": 0}
    monkeypatch.setattr("cachebuild.engines.device.reserved_bytes", lambda device: held["bytes"])
    calls, cuda, budget = [], torch.device("cuda"), 40 << 30
    margin = max(TRIM_MARGIN_MIN_BYTES, int(TRIM_MARGIN_SHARE * budget))
    for over in (0, 1 << 20, margin):  # a batch sized close to the budget: the cached blocks stay
        held["bytes"] = budget + over
        assert not trim_if_over(cuda, budget, calls.append)
    assert not trim_if_over(cuda, None, calls.append)
    held["bytes"] = budget + margin + 1
    assert trim_if_over(cuda, budget, calls.append) and len(calls) == 1


def test_cpu_staging_and_copy_out_are_plain_and_synchronous():
    streams = DeviceStreams(torch.device("cpu"))
    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    staged = streams.stage(pixels)
    assert staged.event is None and torch.equal(staged.wait(), torch.from_numpy(pixels))
    values = [{"a": torch.ones(2)}, "a reason"]
    assert streams.to_host(values).ready() == values


def test_copy_out_leaves_the_pinned_buffers_before_the_writer_keeps_the_tensors():
    """Outputs land in pinned buffers; ``ready`` hands the writer pageable copies, so a shard does not keep pinned
    memory for its whole life. (On the CPU nothing is pinned: an event stands in for a copy still landing.)"""

    class Landed:
        def synchronize(self):
            pass

    buf = torch.arange(6.0).reshape(2, 3)
    outputs = HostOutputs([{"latents": buf}, "a reason"], Landed())
    values = outputs.ready()
    assert values[1] == "a reason" and torch.equal(values[0]["latents"], buf)
    assert values[0]["latents"].untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()
    assert outputs.ready() is values  # copied once


def test_staging_runs_in_its_own_thread_on_cuda_and_inline_on_the_cpu(monkeypatch):
    import threading

    cpu = Stager(DeviceStreams(torch.device("cpu")))
    loaded = SimpleNamespace(pixels=np.zeros((1, 2, 2, 3), np.uint8))
    got, staged = cpu.submit(loaded).result()
    assert got is loaded and staged.event is None
    assert cpu.submit(SimpleNamespace(pixels=None)).result()[1] is None  # every image failed to decode

    threads, current = [], []
    streams = SimpleNamespace(cuda=True, device=torch.device("cuda:1"))
    streams.stage = lambda pixels: threads.append(threading.current_thread().name) or "staged"
    monkeypatch.setattr(torch.cuda, "set_device", current.append)  # what the staging thread starts with
    with Stager(streams) as stager:
        futures = [stager.submit(SimpleNamespace(pixels=i)) for i in range(3)]
        assert [f.result()[1] for f in futures] == ["staged"] * 3
    assert set(threads) != {threading.current_thread().name} and len(set(threads)) == 1
    assert current == [torch.device("cuda:1")]


@pytest.mark.parametrize(
    ("version", "name"),
    [("2.8.0+cu128", "PYTORCH_CUDA_ALLOC_CONF"), ("2.10.1", "PYTORCH_CUDA_ALLOC_CONF"),
     ("2.11.0+cu130", "PYTORCH_ALLOC_CONF"), ("3.0.0", "PYTORCH_ALLOC_CONF")],
)  # fmt: skip
def test_expandable_segments_are_asked_for_in_the_variable_the_installed_torch_reads(monkeypatch, version, name):
    for var in ALLOC_CONF_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    prefer_expandable_segments()
    assert {var: os.environ.get(var) for var in ALLOC_CONF_VARIABLES} == {
        var: ALLOC_CONF if var == name else None for var in ALLOC_CONF_VARIABLES
    }


@pytest.mark.parametrize("users", ALLOC_CONF_VARIABLES)
def test_a_users_own_allocator_setting_is_kept_whichever_name_it_uses(monkeypatch, users):
    for var in ALLOC_CONF_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(users, "max_split_size_mb:512")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    prefer_expandable_segments()
    assert {var: os.environ.get(var) for var in ALLOC_CONF_VARIABLES} == {
        var: "max_split_size_mb:512" if var == users else None for var in ALLOC_CONF_VARIABLES
    }


@pytest.mark.parametrize("batch_size", [2, None], ids=["fixed", "auto"])
def test_nothing_holds_the_model_at_the_runs_last_trim(tmp_path, tiny_vae, monkeypatch, batch_size):
    """The model must be gone when the run's last trim gives the device's cached blocks back (else on a GPU its
    weights stay allocated, or stay reserved), not whenever Python's garbage collector next runs: with the
    collector off, a reference the run keeps (the batch sizer's, through the encoder's ``peak``) or a reference
    cycle (the guard's forward back to the encoder) would keep it."""
    import gc
    import weakref

    from cachebuild.jobs import latents

    models, alive_at_trim = [], []

    def load_vae(*args):
        model = original_load(*args)
        models.append(weakref.ref(model))
        return model

    def free_device_memory(device):
        original_free(device)
        alive_at_trim.append([ref() is not None for ref in models])

    original_load, original_free = latents.load_vae, cachebuild.encode.free_device_memory
    monkeypatch.setattr(latents, "load_vae", load_vae)
    monkeypatch.setattr(cachebuild.encode, "free_device_memory", free_device_memory)
    root = tmp_path / "ds"
    for i in range(4):
        write_image(root / f"im{i}.png", (128, 128), seed=i)
    gc.collect()
    gc.disable()
    try:
        summary = build_latents(make_cfg(root, tmp_path / "c", tiny_vae, batch_size=batch_size))
        alive_after = [ref() is not None for ref in models]
    finally:
        gc.enable()
    assert summary.done == 4 and alive_at_trim[-1] == alive_after == [False]


def test_an_fp16_overflow_through_the_cli_is_redone_and_counted_in_json(tmp_path, tiny_vae):
    """The user's view of the fp32 redo on a VAE whose fp16 activations overflow (its first conv scaled): every
    image is done, the redos and the one conversion of the weights to fp32 are in ``--json``, as are the trims."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e5)
    vae.save_pretrained(tmp_path / "hot-vae")
    root = tmp_path / "ds"
    for i in range(4):
        write_image(root / f"im{i}.png", (64, 64), seed=i)
    args = ["latents", str(root), "--vae", str(tmp_path / "hot-vae"), "--out", str(tmp_path / "c"), "--json",
            "--resolution", "64", "--min-bucket-reso", "64", "--workers", "0", "--device", "cpu", "--dtype", "fp16",
            "--batch-size", "2"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["done"] == 4 and summary["fp32_redos"] == 4
    assert summary["fp32_conversions"] == 1 and summary["allocator_trims"] == 0
