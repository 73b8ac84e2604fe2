"""engines.ray_cluster: a real two-node Ray cluster on 127.0.0.1, checked against a single-process run.

The cluster (a head and one more node, one CPU each) is started once for the module with
``ray.cluster_utils.Cluster``, which runs real raylet, GCS and worker processes and stops exactly those at
the end. Every test compares each tensor with a one-process run of the same images.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from cachebuild.config import EngineKind
from cachebuild.errors import ConfigError
from cachebuild.jobs.latents import build_latents
from tests.conftest import done_count, torch_threads, write_mixed_dataset
from tests.test_pipeline import assert_same_cache, make_cfg, read_cache

ray = pytest.importorskip("ray")

CLUSTER_START_SECONDS = 60  # both nodes up, or the module fails instead of hanging
RUN_SECONDS = 120  # one small job on the cluster, model loads included


@pytest.fixture(scope="module")
def cluster():
    """A head and one worker node on 127.0.0.1, one CPU each; this process is connected as a driver."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="cbray-", dir="/tmp")  # short: Ray's socket paths live under it
    os.makedirs(os.path.join(temp, "ray"))
    env = {
        "RAY_TMPDIR": temp,  # Ray's files (and the driver subprocesses') here, not in the shared /tmp/ray
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every node, driver and worker names itself 127.0.0.1
    }  # (Ray otherwise asks the network for a route and advertises the machine's address)
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from ray._private import ray_constants

    was_cluster, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False  # read at import here
    started = time.monotonic()
    c = Cluster()
    try:
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False)
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        c.wait_for_nodes(timeout=CLUSTER_START_SECONDS - (time.monotonic() - started))
        yield c
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        c.shutdown()  # the raylets, GCS and workers this fixture started, and nothing else
        ray_constants.ENABLE_RAY_CLUSTER = was_cluster
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _bounded():
    """A Ray call that hangs ends the test process with every thread's stack instead of hanging the suite."""
    faulthandler.dump_traceback_later(RUN_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _one_thread():
    """The CPU encoder actor runs torch on one thread (CPU_ACTOR_THREADS); so does the reference run."""
    return torch_threads(1)


def _reference(tmp_path, ds, tiny_vae):
    with _one_thread():
        build_latents(make_cfg(ds, tmp_path / "one", tiny_vae, batch_size=2))
    return read_cache(tmp_path / "one")


def _ray_cfg(ds, out, tiny_vae, address, **kw):
    return make_cfg(ds, out, tiny_vae, batch_size=2, device=None, engine=EngineKind.RAY, ray_address=address, **kw)


@pytest.mark.slow
def test_a_ray_run_gives_the_tensors_of_one_process(tmp_path, tiny_vae, cluster):
    ds = write_mixed_dataset(tmp_path / "ds", 12)
    seen = []
    summary = build_latents(_ray_cfg(ds, tmp_path / "ray", tiny_vae, cluster.address, shard_mb=0.02), seen.append)
    assert summary.done == 12 and summary.failed == 0 and summary.pending == 0
    assert seen[-1].processed == 12 and seen[-1].devices[0].name == "ray:cpu#0"
    assert_same_cache(read_cache(tmp_path / "ray"), _reference(tmp_path, ds, tiny_vae))
    names = sorted(p.name for p in (tmp_path / "ray" / "latents").iterdir())
    assert len(names) == summary.shards_written > 1  # one shard per task, no leftover file
    again = build_latents(_ray_cfg(ds, tmp_path / "ray", tiny_vae, cluster.address))
    assert again.nothing_to_do and not again.model_loaded


@pytest.mark.slow
def test_killing_the_encoder_actor_finishes_on_its_restart(tmp_path, tiny_vae, cluster, caplog):
    ds = write_mixed_dataset(tmp_path / "ds", 12)
    killed = []

    def kill_actor(p) -> None:  # SIGKILL the encoder actor's worker process after its first shard
        if not killed and p.devices and p.devices[0].pid:
            os.kill(p.devices[0].pid, signal.SIGKILL)
            killed.append(p.devices[0].pid)

    cfg = _ray_cfg(ds, tmp_path / "ray", tiny_vae, cluster.address, shard_mb=0.001)
    summary = build_latents(cfg, kill_actor)
    assert killed and summary.done == 12 and summary.failed == 0 and summary.pending == 0
    assert_same_cache(read_cache(tmp_path / "ray"), _reference(tmp_path, ds, tiny_vae))
    names = sorted(p.name for p in (tmp_path / "ray" / "latents").iterdir())
    assert len(names) == summary.shards_written  # a retried task's shard is committed once, no orphan left


@pytest.mark.slow
def test_a_killed_ray_driver_resumes_to_the_same_tensors(tmp_path, tiny_vae, cluster):
    ds = write_mixed_dataset(tmp_path / "ds", 24)
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "cachebuild", "latents", str(ds), "--vae", str(tiny_vae), "--out", str(out)]
    cmd += ["--resolution", "128", "--min-bucket-reso", "64", "--max-bucket-reso", "256", "--dtype", "fp32"]
    cmd += ["--batch-size", "2", "--shard-mb", "0.001", "--workers", "0", "-q"]
    cmd += ["--engine", "ray", "--ray-address", cluster.address]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + RUN_SECONDS
    while proc.poll() is None and done_count(out) < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert 4 <= done_count(out) < 24
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_SECONDS)
    assert final.returncode == 0, final.stderr
    assert_same_cache(read_cache(out), _reference(tmp_path, ds, tiny_vae))


def test_ray_options_fail_before_any_work(tmp_path, tiny_vae, dataset):
    with pytest.raises(ConfigError, match="--ray-address is for --engine ray"):
        make_cfg(dataset, tmp_path / "c", tiny_vae, ray_address="auto")
    with pytest.raises(ConfigError, match="drop --device"):
        make_cfg(dataset, tmp_path / "c", tiny_vae, engine=EngineKind.RAY)


def test_engine_ray_without_ray_names_the_extra(tmp_path, tiny_vae, dataset, monkeypatch):
    import cachebuild.config

    monkeypatch.setattr(cachebuild.config.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'cachebuild\[ray\]'"):
        make_cfg(dataset, tmp_path / "c", tiny_vae, device=None, engine=EngineKind.RAY)


def test_cli_ray_address_without_the_engine_exits_2(tmp_path, tiny_vae, dataset):
    from click.testing import CliRunner

    from cachebuild.cli import cli
    from tests.test_cli import latents_args

    out = tmp_path / "cache"
    result = CliRunner().invoke(cli, latents_args(dataset, out, tiny_vae, "--ray-address", "auto"))
    assert result.exit_code == 2 and "--ray-address is for --engine ray" in result.output
    assert not (out / "latents").exists()


@pytest.mark.slow
def test_textenc_on_ray_gives_the_tensors_of_one_process_once_each_caption(tmp_path, cluster):
    """``textenc --engine ray``: the encoder actor reads each encoder once for all its tasks (one per chunk), the
    driver commits, a repeated caption is stored once, and the tensors are those of one process."""
    from cachebuild.jobs.textenc import build_textenc
    from cachebuild.testing import make_tiny_text_pipeline
    from tests.test_textenc_engines import assert_same_text_cache, cfg_for, stored_captions, write_captions

    pipe = make_tiny_text_pipeline(tmp_path / "flux", "flux")
    source = write_captions(tmp_path / "caps", 15)
    with _one_thread():
        build_textenc(cfg_for(source, tmp_path / "one", pipe))
    ray_cfg = {"device": None, "engine": EngineKind.RAY, "ray_address": cluster.address, "shard_mb": 0.01}
    summary = build_textenc(cfg_for(source, tmp_path / "ray", pipe, **ray_cfg))  # tasks of about 2 captions
    assert (summary.done, summary.failed, summary.pending) == (15, 0, 0)
    assert summary.model_loads == 2 and summary.shards_written > 4  # CLIP-L and T5 once, for every task
    assert_same_text_cache(tmp_path / "ray", tmp_path / "one")
    assert stored_captions(tmp_path / "ray") == 13  # 15 items, 13 captions


@pytest.mark.slow
def test_clips_on_ray_give_the_tensors_of_one_process(tmp_path, tiny_wan_vae, cluster):
    """A video dataset on the cluster: its clips decode in Ray tasks (a clip's plan decodes itself) and encode in
    the actor, equal to one process."""
    from cachebuild.config import BucketConfig, ClipConfig, ExtractMode, LatentsMode
    from cachebuild.testing.videos import clip_frames, write_video

    ds = tmp_path / "clips"
    write_video(ds / "a.mkv", clip_frames(14, (32, 16), seed=3))
    write_video(ds / "b.mkv", clip_frames(9, (32, 32), seed=4))
    video = dict(
        clips=ClipConfig(frames=(5,), extract=ExtractMode.CHUNK),
        buckets=BucketConfig(resolution=(32, 32), min_reso=16, steps=16, no_upscale=True),
        latents=LatentsMode.MEAN,
    )
    summary = build_latents(_ray_cfg(ds, tmp_path / "ray", tiny_wan_vae, cluster.address, **video))
    assert summary.done == 3 and summary.failed == 0
    with _one_thread():
        build_latents(make_cfg(ds, tmp_path / "one", tiny_wan_vae, batch_size=2, **video))
    assert_same_cache(read_cache(tmp_path / "ray"), read_cache(tmp_path / "one"))
