"""engines.devices: several encoder processes (``--devices cpu,cpu`` here), one manifest writer."""

from __future__ import annotations

import os
import signal

import pytest

from cachebuild.engines.devices import parse_devices
from cachebuild.errors import ConfigError
from cachebuild.jobs.latents import build_latents
from tests.conftest import torch_threads, write_mixed_dataset
from tests.test_pipeline import assert_same_cache, make_cfg, read_cache


def _threads_of_one_of_two_cpu_devices():
    """The one-device reference runs with the threads each of two CPU device processes gets: half the cores."""
    return torch_threads((os.cpu_count() or 1) // 2)


@pytest.mark.slow  # two spawned processes each import torch and diffusers: about 40 s on two busy cores
def test_two_cpu_devices_give_the_tensors_of_one(tmp_path, tiny_vae):
    ds = write_mixed_dataset(tmp_path / "ds", 12)
    with _threads_of_one_of_two_cpu_devices():
        one = build_latents(make_cfg(ds, tmp_path / "one", tiny_vae, batch_size=2, flip=True))
    seen = []
    cfg = make_cfg(ds, tmp_path / "two", tiny_vae, batch_size=2, flip=True, device=None, devices=("cpu", "cpu"))
    two = build_latents(cfg, seen.append)
    assert one.done == two.done == 12 and two.failed == 0
    assert_same_cache(read_cache(tmp_path / "two"), read_cache(tmp_path / "one"))
    last = seen[-1]
    assert last.processed == 12 and [d.name for d in last.devices] == ["cpu#0", "cpu#1"]
    names = sorted(p.name for p in (tmp_path / "two" / "latents").iterdir())
    assert len(names) == len(set(names)) == two.shards_written  # striped names: no clash, no leftover


@pytest.mark.slow
def test_losing_one_device_process_finishes_on_the_other(tmp_path, tiny_vae, caplog):
    ds = write_mixed_dataset(tmp_path / "ds", 18)
    with _threads_of_one_of_two_cpu_devices():
        build_latents(make_cfg(ds, tmp_path / "one", tiny_vae, batch_size=1))
    killed, seen = [], []

    def kill_one(p) -> None:  # SIGKILL the second device's process once the run is under way
        seen.append(p)
        if not killed and p.processed >= 2 and len(p.devices) == 2:
            victim = p.devices[1]
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.pid)

    cfg = make_cfg(ds, tmp_path / "two", tiny_vae, batch_size=1, shard_mb=0.001, device=None, devices=("cpu", "cpu"))
    with caplog.at_level("WARNING", logger="cachebuild.engines.devices"):
        summary = build_latents(cfg, kill_one)
    assert killed and summary.done == 18 and summary.failed == 0 and summary.pending == 0
    assert "died (signal 9 (SIGKILL))" in caplog.text and not seen[-1].devices[1].alive
    assert_same_cache(read_cache(tmp_path / "two"), read_cache(tmp_path / "one"))


def test_parse_devices():
    assert parse_devices("cpu,cpu") == ("cpu", "cpu")
    assert parse_devices("cuda:0, cuda:1") == ("cuda:0", "cuda:1")
    with pytest.raises(ConfigError, match="--devices"):
        parse_devices("cpu,,gpu")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--batch-size", "many"], "--batch-size"),
        (["--batch-size", "0"], "--batch-size"),
        (["--vram-budget", "0"], "--vram-budget"),
        (["--devices", "cpu,cpu"], "--device and --devices"),  # latents_args passes --device cpu
    ],
)
def test_bad_device_arguments_fail_before_any_work(tmp_path, tiny_vae, dataset, extra, needle):
    from click.testing import CliRunner

    from cachebuild.cli import cli
    from tests.test_cli import latents_args

    out = tmp_path / "cache"
    result = CliRunner().invoke(cli, latents_args(dataset, out, tiny_vae, *extra))
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not (out / "latents").exists()


@pytest.mark.slow
def test_a_killed_several_device_run_resumes_to_the_same_tensors(tmp_path, tiny_vae):
    import subprocess
    import sys

    from tests.conftest import done_count, kill_while_running

    ds = write_mixed_dataset(tmp_path / "ds", 24)
    with _threads_of_one_of_two_cpu_devices():
        build_latents(make_cfg(ds, tmp_path / "one", tiny_vae, batch_size=2))
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "cachebuild", "latents", str(ds), "--vae", str(tiny_vae), "--out", str(out)]
    cmd += ["--resolution", "128", "--min-bucket-reso", "64", "--max-bucket-reso", "256", "--dtype", "fp32"]
    cmd += ["--batch-size", "2", "--shard-mb", "0.01", "--workers", "0", "--devices", "cpu,cpu", "-q"]
    assert kill_while_running(cmd, out, (4,)) == 1, "the run finished before it could be killed"
    assert done_count(out) < 24
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert_same_cache(read_cache(out), read_cache(tmp_path / "one"))


def test_a_device_killed_between_two_looks_loses_its_batch_to_the_others_not_the_run():
    """A device process can die after the dispatcher last looked at it: the send then fails with a broken pipe,
    which counts as that device's loss (its batch handed to another), not as the run's failure."""
    from types import SimpleNamespace

    from cachebuild.engines.devices import _Device, _Dispatcher
    from cachebuild.images.plan import ItemPlan

    class Gone:
        def send(self, msg):
            raise BrokenPipeError(32, "Broken pipe")

    class Alive:
        def __init__(self):
            self.sent = []

        def send(self, msg):
            self.sent.append(msg)

    proc = SimpleNamespace(join=lambda timeout=None: None, exitcode=-9, pid=1, sentinel=None)
    dead, alive = _Device("cpu#0", proc, Gone(), ahead=1), _Device("cpu#1", proc, Alive(), ahead=2)
    batch = [ItemPlan("k", "k.png", (64, 64), (64, 64), (64, 64), (0, 0))]
    run = SimpleNamespace(report=lambda *a: None)
    dispatcher = _Dispatcher([dead, alive], iter([batch]), 1, SimpleNamespace(store="latents"), run)
    dispatcher._hand_out(sorted([dead, alive], key=lambda d: d.name))
    assert not dead.alive and not dead.outstanding
    dispatcher._hand_out([alive])
    assert alive.conn.sent == [batch] and list(alive.outstanding) == ["k"]
