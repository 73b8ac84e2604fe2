"""Faults in the decode workers, with real processes: a worker killed while decoding one file, and a run
killed (SIGKILL, Ctrl-C) while its workers are busy. Every wait here is bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from cachebuild.cache.manifest import Manifest
from cachebuild.config import BucketConfig, CropMode
from cachebuild.images.load import iter_batches, read_size
from cachebuild.images.plan import BucketPlan, batch_by_bucket, plan_item
from cachebuild.jobs.latents import build_latents
from tests.conftest import done_count, write_image
from tests.test_pipeline import make_cfg

MAX_PIXELS = 178_956_970
CRASH_ON = "crash-me.png"
# Loaded by every Python process started with the hook's folder first on PYTHONPATH, spawned decode workers
# included: their decoder kills its own process (as the OOM killer or a codec segfault would) on one file.
# Nothing in the package knows about it.
CRASH_HOOK = f"""
import os, signal
from cachebuild.images import load

_decode = load.decode


def decode(item, max_pixels):
    if os.path.basename(item.path) == {CRASH_ON!r}:
        os.kill(os.getpid(), signal.SIGKILL)
    return _decode(item, max_pixels)


load.decode = decode
"""


@pytest.fixture
def crash_hook(tmp_path, monkeypatch):
    """Processes spawned from now on SIGKILL themselves when they decode a file named ``crash-me.png``."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p))


def _dataset(root: Path, n: int, crash_at: int | None = None) -> Path:
    for i in range(n):
        name = CRASH_ON if i == crash_at else f"im{i:03d}.png"
        write_image(root / name, [(96, 64), (64, 96), (64, 64)][i % 3], seed=i)
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_a_file_that_kills_its_worker_fails_alone_and_the_run_finishes(tmp_path, tiny_vae, crash_hook, workers):
    ds = _dataset(tmp_path / "ds", 9, crash_at=4)
    summary = build_latents(make_cfg(ds, tmp_path / "out", tiny_vae, workers=workers, batch_size=2))
    assert (summary.done, summary.failed) == (8, 1)
    with Manifest.open(tmp_path / "out", create=False) as m:
        failed = m.items("latents", "failed")
    assert [r.key for r in failed] == ["crash-me"]
    assert "the decoder crashed on this file (worker process died: signal 9 (SIGKILL))" in failed[0].reason


def test_after_a_worker_dies_batches_keep_their_order_and_pixels(tmp_path, crash_hook):
    ds = _dataset(tmp_path / "ds", 12, crash_at=5)
    plan = BucketPlan(BucketConfig(resolution=(64, 64), min_reso=32, max_reso=128, steps=32))
    items = []
    for path in sorted(ds.iterdir()):
        items.append(plan_item(plan, path.stem, str(path), read_size(str(path), MAX_PIXELS), CropMode.CENTER, 0))
    batches = list(batch_by_bucket(items, 2))
    serial = list(iter_batches(batches, workers=0, max_pixels=MAX_PIXELS))  # in this process: no hook
    parallel = list(iter_batches(batches, workers=2, max_pixels=MAX_PIXELS))
    assert len(parallel) == len(batches)
    for s, p in zip(serial, parallel, strict=True):
        keep = [k for k, i in enumerate(s.items) if i.key != "crash-me"]
        assert [i.key for i in p.items] == [s.items[k].key for k in keep]
        if keep:
            np.testing.assert_array_equal(p.pixels, s.pixels[keep])
    failed = [(i.key, r) for b in parallel for i, r in b.failures]
    assert [k for k, _ in failed] == ["crash-me"] and "decoder crashed" in failed[0][1]


# -- the run dies: its workers go with it ------------------------------------------------------------------


def _latents_cmd(ds: Path, out: Path, vae: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "cachebuild", "latents", str(ds), "--vae", str(vae), "--out", str(out)),
        *("--resolution", "64", "--min-bucket-reso", "32", "--max-bucket-reso", "128", "--bucket-reso-steps", "32"),
        *("--dtype", "fp32", "--batch-size", "1", "--workers", "2", "--device", "cpu", "-q"),
    ]


def _start_and_wait_for_workers(cmd: list[str], stderr=subprocess.DEVNULL) -> tuple[subprocess.Popen, list]:
    """Start ``cmd`` in its own process group; once its two decode workers run, return it and every process
    below it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        children = psutil.Process(proc.pid).children(recursive=True)
        if sum("spawn_main" in " ".join(_cmdline(p)) for p in children) >= 2:
            time.sleep(0.5)  # mid-run: the workers are decoding
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted; give it more images"
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 3, children  # two decode workers and the resource tracker
    return proc, children


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _survivors(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _running(proc: psutil.Process) -> bool:
    try:  # an orphan that exited stays a zombie until its new parent reaps it: that is gone too
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def busy_dataset(tmp_path_factory) -> Path:
    """Enough images that a run is still decoding when it is signalled (one dataset for the module)."""
    return _dataset(tmp_path_factory.mktemp("busy") / "ds", 240)


@pytest.mark.slow
def test_sigkill_of_the_run_leaves_no_decode_worker_behind(tmp_path, tiny_vae, busy_dataset):
    proc, children = _start_and_wait_for_workers(_latents_cmd(busy_dataset, tmp_path / "out", tiny_vae))
    proc.kill()
    proc.wait(10)
    survivors = _survivors(children, seconds=5)
    for p in survivors:  # clean up before failing, so a regression does not leave them for the next test
        p.kill()
    assert not survivors, [_cmdline(p) for p in survivors]


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"])
def test_ctrl_c_and_sigterm_end_in_one_line_with_no_child_left(tmp_path, tiny_vae, busy_dataset, sig, code):
    """What a terminal's Ctrl-C does (SIGINT to the whole foreground group), and what systemd and SLURM do
    (SIGTERM to every process of the job): one line, its exit code, no traceback or leaked semaphore from any
    process, no child left, the committed items kept."""
    out = tmp_path / "out"
    cmd = _latents_cmd(busy_dataset, out, tiny_vae) + ["--shard-mb", "0.001"]  # a shard per batch: commits early
    proc, children = _start_and_wait_for_workers(cmd, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while done_count(out) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=30)  # stderr's end: the resource tracker, last to go, has it too
    finally:
        survivors = _survivors([*children, psutil.Process(proc.pid)] if proc.poll() is None else children, 5)
        for p in survivors:
            p.kill()
    assert not survivors, [_cmdline(p) for p in survivors]
    assert proc.returncode == code, err
    committed = done_count(out)
    assert committed > 0
    assert err.decode() == f"interrupted: {committed} items committed; run the same command to continue\n"


@pytest.mark.slow
def test_sigterm_of_a_project_build_ends_in_one_line(tmp_path, tiny_vae, busy_dataset):
    """`cachebuild build` answers SIGTERM as `latents` does: one line with the items its caches committed, 143."""
    project = tmp_path / "cachebuild.toml"
    project.write_text(
        'device = "cpu"\nworkers = 2\nbatch_size = 1\ndtype = "fp32"\nshard_mb = 0.001\n'
        f'[[dataset]]\nname = "busy"\npath = "{busy_dataset}"\nresolution = 64\nmin_bucket_reso = 32\n'
        "max_bucket_reso = 128\nbucket_reso_steps = 32\n"
        f'[[target]]\nname = "t"\nvae = "{tiny_vae}"\nout = "{tmp_path / "out"}"\n'
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cachebuild", "build", str(project), "-q"]
    proc, children = _start_and_wait_for_workers(cmd, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while done_count(out) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        survivors = _survivors([*children, psutil.Process(proc.pid)] if proc.poll() is None else children, 5)
        for p in survivors:
            p.kill()
    assert not survivors, [_cmdline(p) for p in survivors]
    assert proc.returncode == 143, err
    committed = done_count(out)
    assert committed > 0
    assert err.decode() == f"interrupted: {committed} items committed; run the same command to continue\n"
