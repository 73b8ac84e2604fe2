"""cachebuild watch in a subprocess: files added, changed, deleted and half-written are encoded or dropped, a
vanished folder empties nothing, a kill and a restart converge on the cache a fresh build makes, and SIGTERM
stops it cleanly. Every wait is bounded."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cachebuild.config import BucketConfig, LatentsConfig, LatentsMode, ModelSpec
from cachebuild.consumers.reader import open_cache
from cachebuild.jobs.latents import build_latents
from tests.conftest import write_image

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 120  # the longest any one wait may take: a start imports torch on a busy 2-core machine
SETTLE_S = 1.0  # --settle: a file that keeps its size and time this long is read
WRITE_PAUSE_S = 0.4  # the half-written file's pause between its halves: shorter than SETTLE_S, longer than a tick
PROJECT = """\
workers = 0
device = "cpu"

[[dataset]]
name = "ds"
path = "{dataset}"
resolution = 64
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32

[[target]]
name = "t"
vae = "{vae}"
latents = "mean"
"""


class Watch:
    """A ``cachebuild watch --json`` process and the events it printed, read by a thread."""

    def __init__(self, project_file: Path):
        cmd = [sys.executable, "-m", "cachebuild", "watch", str(project_file), "--json", "--settle", str(SETTLE_S)]
        cmd += ["--poll", "3600", "--idle-timeout", "3600"]
        env = os.environ | {"PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.events: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout, self.events.put), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr.append), daemon=True).start()

    def wait_for(self, *wanted: dict) -> None:
        """Until an event matching each of ``wanted`` (all its items) has been printed, at most WAIT_S."""
        deadline = time.monotonic() + WAIT_S
        missing = list(wanted)
        while missing:
            missing = [w for w in missing if not any(w.items() <= e.items() for e in self.seen)]
            if not missing:
                return
            try:
                self.seen.append(self.events.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"no {missing} in {WAIT_S} s; saw {self.seen}; {''.join(self.stderr)}") from None

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=WAIT_S)

    @staticmethod
    def _read(stream, put) -> None:
        for line in stream:
            put(json.loads(line) if line.startswith("{") else line)


def png_bytes(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_watch_follows_files_and_survives_a_kill(tmp_path, tiny_vae):
    pytest.importorskip("watchfiles")  # without it the watch polls, every --poll seconds
    ds = tmp_path / "ds"
    for i in range(12):  # more than the removal guard lets go without --prune
        write_image(ds / f"im{i:02d}.png", [(64, 64), (96, 64), (64, 96)][i % 3], seed=i)
    project_file = tmp_path / "cachebuild.toml"
    project_file.write_text(PROJECT.format(dataset=ds, vae=tiny_vae))
    watch = Watch(project_file)
    try:
        watch.wait_for({"event": "ready"})
        assert {"event": "cache", "encoded": 12}.items() <= watch.seen[0].items()

        write_image(ds / "new.png", (64, 64), seed=40)  # added, changed and deleted at once
        write_image(ds / "im00.png", (96, 64), seed=41)
        (ds / "im01.png").unlink()
        watch.wait_for(*({"event": e, "key": k} for e, k in [("done", "new"), ("done", "im00"), ("removed", "im01")]))

        data = png_bytes((64, 96), seed=42)  # written in two halves: read only once whole
        with open(ds / "half.png", "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(WRITE_PAUSE_S)
            f.write(data[len(data) // 2 :])
        watch.wait_for({"event": "done", "key": "half"})
        assert not [e for e in watch.seen if e.get("event") == "failed"], watch.seen

        aside = tmp_path / "aside"  # the folder empties (an unmounted disk): refused, the cache keeps its items
        aside.mkdir()
        for f in sorted(ds.iterdir()):
            f.rename(aside / f.name)
        watch.wait_for({"event": "error"})
        assert "--prune" in [e for e in watch.seen if e.get("event") == "error"][0]["message"]
        for f in sorted(aside.iterdir()):  # back as they were (same size and time): nothing to encode again
            f.rename(ds / f.name)
        write_image(ds / "back.png", (64, 64), seed=43)
        watch.wait_for({"event": "done", "key": "back"})
        after_error = watch.seen[[e.get("event") for e in watch.seen].index("error") :]
        assert [e["key"] for e in after_error if e.get("event") in ("done", "removed")] == ["back"]
    finally:
        watch.proc.kill()
        watch.proc.wait(timeout=WAIT_S)

    write_image(ds / "late.png", (96, 64), seed=44)  # arrives while nothing watches
    watch = Watch(project_file)
    try:
        watch.wait_for({"event": "ready"})
        assert {"event": "cache", "encoded": 1}.items() <= watch.seen[0].items()  # the restart caught up
        assert watch.stop(signal.SIGTERM) == 128 + signal.SIGTERM
        assert "interrupted: SIGTERM" in "".join(watch.stderr)
    finally:
        watch.proc.kill()
        watch.proc.wait(timeout=WAIT_S)

    fresh = tmp_path / "fresh"  # converged: what one build of the folder as it is now makes
    cfg = LatentsConfig(
        ds, fresh, ModelSpec(vae=str(tiny_vae)), BucketConfig((64, 64), 32, 128, 32), latents=LatentsMode.MEAN,
        workers=0, device="cpu",
    )  # fmt: skip
    build_latents(cfg)
    watched, built = open_cache(tmp_path / "cache" / "t" / "ds"), open_cache(fresh)
    assert watched.keys() == built.keys() == sorted(p.stem for p in ds.iterdir())
    for key in built:  # items encoded one by one as they came, against batches of four: within kernel noise
        torch.testing.assert_close(watched.tensors(key)["latents"], built.tensors(key)["latents"], rtol=1e-3, atol=1e-3)
