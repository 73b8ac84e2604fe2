"""A file whose open() blocks (a stalled NFS or FUSE mount, simulated with a kernel lease that another process
holds: the kernel makes every other opener wait up to /proc/sys/fs/lease-break-time, 45 s by default): the item
fails after --read-timeout and the run goes on, and Ctrl-C ends the run at once whatever the read is doing. Every
wait here is bounded."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachebuild.cache.manifest import Manifest
from cachebuild.images.load import load_batch
from cachebuild.images.plan import ItemPlan
from tests.conftest import write_image

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import fcntl, os, signal, sys
signal.signal(signal.SIGIO, lambda *_: print("opened", flush=True))  # someone opened the file: the lease breaks
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
except OSError as exc:
    print(f"no lease: {exc}", flush=True)
    sys.exit(0)
print("ready", flush=True)
sys.stdin.read()  # held until the test closes stdin
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
"""
WAIT_SECONDS = 60  # every wait on a process: a hang fails the test instead of holding the suite


class Lease:
    """A write lease on ``path`` held by another process: every open() of the file blocks while it is held."""

    def __init__(self, path: Path):
        if sys.platform != "linux":
            pytest.skip("kernel leases are Linux's")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.line()
        if line != "ready":
            self.release()
            pytest.skip(f"this file system gives no lease ({line})")

    def line(self) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], WAIT_SECONDS)
        assert ready, "the lease holder said nothing"
        return self.proc.stdout.readline().strip()

    def wait_for_an_opener(self) -> None:
        assert self.line() == "opened"

    def release(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(WAIT_SECONDS)


@pytest.fixture
def locked(tmp_path):
    """A dataset of three images, one of them (``locked.png``) under a lease for the test's duration."""
    root = tmp_path / "ds"
    for name in ("a.png", "b.png", "locked.png"):
        write_image(root / name, (64, 64), seed=len(name))
    lease = Lease(root / "locked.png")
    yield root, lease
    lease.release()


def latents_cmd(ds: Path, out: Path, vae: Path, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "cachebuild", "latents", str(ds), "--vae", str(vae), "--out", str(out)),
        *("--resolution", "64", "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--workers", "0"),
        *("--device", "cpu", "-q", *extra),
    ]


def env() -> dict:
    return os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}


def test_a_read_that_blocks_fails_after_read_timeout_and_the_run_goes_on(tmp_path, tiny_vae, locked):
    ds, lease = locked
    out = tmp_path / "cache"
    run = subprocess.run(
        latents_cmd(ds, out, tiny_vae, "--read-timeout", "1"),
        env=env(),
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
    )  # fmt: skip  (without the limit the run waits for the lease: 45 s, past the lease of a test)
    assert run.returncode == 3, run.stderr
    with Manifest.open(out, create=False) as m:
        rows = {r.key: r for r in m.items("latents")}
    assert rows["a"].status == rows["b"].status == "done"
    assert rows["locked"].status == "failed"
    assert rows["locked"].reason.startswith("reading the file took longer than --read-timeout 1 s"), rows["locked"]


def test_ctrl_c_ends_the_run_at_once_while_a_read_blocks(tmp_path, tiny_vae, locked):
    ds, lease = locked
    proc = subprocess.Popen(
        latents_cmd(ds, tmp_path / "cache", tiny_vae),  # the default --read-timeout (60 s) is far off
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        lease.wait_for_an_opener()  # the run's header read is now blocked in open()
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
        start = time.monotonic()
        _, err = proc.communicate(timeout=WAIT_SECONDS)
        waited = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err == "interrupted: 0 items committed; run the same command to continue\n"
    assert waited < 30, waited  # a hang bound, not a timing: held by the read, it would wait out the lease (45 s)


def test_a_decode_read_that_blocks_fails_the_item(tmp_path, locked):
    ds, lease = locked
    item = ItemPlan("locked", str(ds / "locked.png"), (64, 64), (64, 64), (64, 64), (0, 0), read_timeout=0.5)
    loaded = load_batch([item], max_pixels=10**6)  # in a decode worker, once its header was read in time
    assert loaded.pixels is None
    assert loaded.failures[0][1].startswith("reading the file took longer than --read-timeout 0.5 s")


def test_a_video_whose_header_read_blocks_fails_alone(tmp_path, tiny_wan_vae):
    """A video's header is probed within --read-timeout too: the stalled one fails with the reason, the other
    video's clips are encoded."""
    import numpy as np

    from cachebuild.testing.videos import write_video

    ds = tmp_path / "clips"
    frames = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    for name in ("a.mkv", "locked.mkv"):
        write_video(ds / name, frames)
    lease = Lease(ds / "locked.mkv")
    try:
        out = tmp_path / "cache"
        cmd = [sys.executable, "-m", "cachebuild", "latents", str(ds), "--vae", str(tiny_wan_vae), "--out", str(out)]
        cmd += ["--frames", "5", "--resolution", "32", "--min-bucket-reso", "16", "--bucket-reso-steps", "16"]
        cmd += ["--workers", "0", "--device", "cpu", "-q", "--read-timeout", "1"]
        run = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=WAIT_SECONDS)
    finally:
        lease.release()
    assert run.returncode == 3, run.stderr
    with Manifest.open(out, create=False) as m:
        rows = list(m.items("latents"))
    failed = [r for r in rows if r.status == "failed"]
    assert [r.key for r in rows if r.status == "done"] == ["a@00000-005"]
    assert [r.key for r in failed] == ["locked"], rows
    assert failed[0].reason.startswith("reading the file took longer than --read-timeout 1 s"), failed[0].reason
