"""Datasets and caches on object storage: a real S3 endpoint (moto's server) on 127.0.0.1, nothing else.

Each test gets its own bucket on one server started for the module. The endpoint reaches s3fs (here and in
every subprocess and decode worker) through ``AWS_ENDPOINT_URL``, as it would for any S3-compatible store.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from cachebuild.cache.manifest import MANIFEST_NAME, Manifest  # noqa: E402
from cachebuild.config import BucketConfig, CropMode, DType, LatentsConfig, ModelSpec, TextencConfig  # noqa: E402
from cachebuild.consumers.reader import open_cache  # noqa: E402
from cachebuild.consumers.status import cache_status  # noqa: E402
from cachebuild.errors import ConfigError, StorageError  # noqa: E402
from cachebuild.jobs.latents import build_latents  # noqa: E402
from cachebuild.jobs.textenc import build_textenc  # noqa: E402
from cachebuild.sources.captions import scan_captions  # noqa: E402
from cachebuild.storage import UrlPath  # noqa: E402
from cachebuild.testing import make_tiny_text_pipeline  # noqa: E402
from tests.conftest import done_count, write_image  # noqa: E402

BUCKETS = BucketConfig(resolution=(128, 128), min_reso=64, max_reso=256, steps=64)
KILL_WAIT_SECONDS = 120  # a run that never reaches its kill point fails the test instead of hanging it


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 and a free port; dummy credentials; restored afterwards."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # an instance made before would point at another endpoint
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any connection from this process to an address other than the loopback fails the test."""
    real = socket.socket.connect

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a connection to {address} was attempted; tests reach 127.0.0.1 only")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def bucket(s3_endpoint, tmp_path, monkeypatch):
    """A fresh bucket name, its filesystem, and the user cache folder moved into tmp_path."""
    import s3fs

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    name = f"b{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    return name, fs


def upload(fs, local: Path, url_path: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{url_path}/{p.relative_to(local).as_posix()}")


def make_cfg(dataset, out, vae: Path, **kw) -> LatentsConfig:
    base = dict(model=ModelSpec(vae=str(vae)), buckets=BUCKETS, workers=0, dtype=DType.FP32, batch_size=3, device="cpu")
    return LatentsConfig(dataset=dataset, out=out, **(base | kw))


def tensors_of(cache) -> dict[str, dict[str, torch.Tensor]]:
    return {k: cache.tensors(k) for k in cache}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert sorted(a[key]) == sorted(b[key]), key
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}/{name} differs"


def test_s3_dataset_to_s3_cache_equals_a_local_run(tmp_path, tiny_vae, dataset, bucket):
    name, fs = bucket
    upload(fs, dataset, f"{name}/images")
    fs.pipe(f"{name}/images/.hidden.png", b"not scanned")
    local = build_latents(make_cfg(dataset, tmp_path / "local", tiny_vae))
    out = UrlPath(f"s3://{name}/cache")
    remote = build_latents(make_cfg(UrlPath(f"s3://{name}/images"), out, tiny_vae, workers=1))  # a worker reads S3
    assert remote.done == local.done == 8 and remote.failed == 0

    names = fs.ls(f"{name}/cache/latents")
    assert names and not [n for n in names if n.endswith(".tmp")]
    assert fs.exists(f"{name}/cache/{MANIFEST_NAME}")
    assert not list((tmp_path / "user-cache" / "cachebuild" / "manifests").rglob("shard-*"))  # uploaded, gone
    assert_same(tensors_of(open_cache(f"s3://{name}/cache")), tensors_of(open_cache(tmp_path / "local")))

    status = cache_status(out)
    assert status["items"]["done"] == 8 and status["cache"] == f"s3://{name}/cache"
    assert status["bytes"] == sum(fs.size(n) for n in names)
    shown = subprocess.run(_cli("status", f"s3://{name}/cache"), capture_output=True, text=True)
    assert shown.returncode == 0 and "latents: 8 done, 0 failed, 0 pending" in shown.stdout, shown.stderr


def test_a_dataloader_with_workers_reads_a_remote_cache(tmp_path, tiny_vae, dataset, bucket):
    name, fs = bucket
    upload(fs, dataset, f"{name}/images")
    build_latents(make_cfg(UrlPath(f"s3://{name}/images"), UrlPath(f"s3://{name}/cache"), tiny_vae, shard_mb=0.001))
    cache = open_cache(f"s3://{name}/cache")
    first = cache[cache.keys()[0]]["latents"]  # the parent fetches a shard and uses the store before forking
    ctx = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
    loader = torch.utils.data.DataLoader(
        cache.dataset(),
        batch_sampler=cache.bucket_sampler(batch_size=2, seed=0),
        num_workers=2,
        multiprocessing_context=ctx,
    )
    seen = sum(len(batch["key"]) for batch in loader)
    assert seen == 8 and torch.equal(cache[cache.keys()[0]]["latents"], first)


def test_rerun_of_a_finished_s3_job_uploads_nothing(tmp_path, tiny_vae, dataset, bucket):
    name, fs = bucket
    upload(fs, dataset, f"{name}/images")
    cfg = make_cfg(UrlPath(f"s3://{name}/images"), UrlPath(f"s3://{name}/cache"), tiny_vae)
    build_latents(cfg)
    before = fs.info(f"{name}/cache/{MANIFEST_NAME}")["ETag"], sorted(fs.ls(f"{name}/cache/latents"))
    fs.invalidate_cache()
    again = build_latents(cfg)
    assert again.nothing_to_do and not again.model_loaded
    fs.invalidate_cache()
    assert (fs.info(f"{name}/cache/{MANIFEST_NAME}")["ETag"], sorted(fs.ls(f"{name}/cache/latents"))) == before


def test_changed_remote_file_is_reencoded_and_a_lost_manifest_restarts_from_the_snapshot(
    tmp_path, tiny_vae, dataset, bucket
):
    name, fs = bucket
    upload(fs, dataset, f"{name}/images")
    mdir = tmp_path / "m"
    cfg = make_cfg(UrlPath(f"s3://{name}/images"), UrlPath(f"s3://{name}/cache"), tiny_vae, manifest_dir=mdir)
    build_latents(cfg)
    write_image(tmp_path / "new.png", (96, 96), seed=99)
    fs.put_file(str(tmp_path / "new.png"), f"{name}/images/img000.png")  # same key, other bytes
    fs.invalidate_cache()
    second = build_latents(cfg)
    assert second.changed == 1 and second.encoded == 1 and second.done == 8

    for p in mdir.iterdir():  # a new machine: nothing local
        p.unlink() if p.is_file() else None
    third = build_latents(cfg)
    assert third.nothing_to_do and third.done == 8
    assert open_cache(f"s3://{name}/cache")["img000"]["original_size"] == (96, 96)


def test_a_shard_uploaded_but_never_committed_is_removed_and_its_items_encoded(
    tmp_path, tiny_vae, dataset, bucket, monkeypatch
):
    name, fs = bucket
    upload(fs, dataset, f"{name}/images")
    mdir = tmp_path / "m"
    cfg = make_cfg(UrlPath(f"s3://{name}/images"), UrlPath(f"s3://{name}/cache"), tiny_vae, manifest_dir=mdir)
    cfg = replace(cfg, shard_mb=0.001)  # a shard per batch
    real, calls = Manifest.commit_shard, []

    def dies_on_the_second_commit(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process ends between the upload and the commit
        return real(self, *args)

    monkeypatch.setattr(Manifest, "commit_shard", dies_on_the_second_commit)
    with pytest.raises(KeyboardInterrupt):
        build_latents(cfg)
    monkeypatch.setattr(Manifest, "commit_shard", real)
    fs.invalidate_cache()
    uploaded = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{name}/cache/latents")}
    with Manifest.open(mdir, create=False, read_only=True) as m:
        committed = {s["name"] for s in m.shards("latents")}
    assert len(uploaded - committed) == 1  # the orphan
    snap = tmp_path / "snap"
    snap.mkdir()
    fs.get_file(f"{name}/cache/{MANIFEST_NAME}", str(snap / MANIFEST_NAME))
    with Manifest.open(snap, create=False, read_only=True) as m:
        assert {s["name"] for s in m.shards("latents")} <= uploaded

    assert build_latents(cfg).done == 8
    fs.invalidate_cache()
    with Manifest.open(mdir, create=False, read_only=True) as m:
        committed = {s["name"] for s in m.shards("latents")}
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(f"{name}/cache/latents")} == committed
    build_latents(make_cfg(dataset, tmp_path / "local", tiny_vae))
    assert_same(tensors_of(open_cache(f"s3://{name}/cache")), tensors_of(open_cache(tmp_path / "local")))


def test_a_second_local_manifest_for_the_same_url_is_refused(tmp_path, tiny_vae, dataset, bucket):
    name, fs = bucket
    upload(fs, dataset, f"{name}/images")
    src, out = UrlPath(f"s3://{name}/images"), UrlPath(f"s3://{name}/cache")
    build_latents(make_cfg(src, out, tiny_vae, manifest_dir=tmp_path / "a"))
    build_latents(make_cfg(src, out, tiny_vae, manifest_dir=tmp_path / "b"))  # starts from the snapshot: fine
    fs.rm(f"{name}/images/img000.png")
    fs.invalidate_cache()
    assert build_latents(make_cfg(src, out, tiny_vae, manifest_dir=tmp_path / "b")).removed == 1  # b publishes
    with pytest.raises(ConfigError, match="published from another local manifest"):
        build_latents(make_cfg(src, out, tiny_vae, manifest_dir=tmp_path / "a"))  # a is behind: refused


def test_snapshots_are_rate_limited_and_always_published_at_the_end(tmp_path, tiny_vae, dataset, bucket, monkeypatch):
    from cachebuild.cache import remote

    name, fs = bucket
    upload(fs, dataset, f"{name}/images")
    published = []
    real = remote.RemoteOutput.publish
    monkeypatch.setattr(remote.RemoteOutput, "publish", lambda self: published.append(1) or real(self))
    src = UrlPath(f"s3://{name}/images")
    summary = build_latents(make_cfg(src, UrlPath(f"s3://{name}/a"), tiny_vae, shard_mb=0.001))
    assert summary.shards_written >= 3 and len(published) == 2  # the first commit's, and the end's
    published.clear()
    monkeypatch.setattr(remote, "SNAPSHOT_MIN_SECONDS", 0.0)
    monkeypatch.setattr(remote, "SNAPSHOT_TIME_SHARE", float("inf"))  # no limit: one per commit
    summary = build_latents(make_cfg(src, UrlPath(f"s3://{name}/b"), tiny_vae, shard_mb=0.001))
    # one per commit, and the end's, which holds the run's closed claim on shard names (cache.claims)
    assert len(published) == summary.shards_written + 1


def test_a_store_failing_mid_run_stops_it_and_the_same_command_finishes(tmp_path, tiny_vae, dataset, bucket):
    name, fs = bucket
    upload(fs, dataset, f"{name}/images")
    cfg = make_cfg(UrlPath(f"s3://{name}/images"), UrlPath(f"s3://{name}/cache"), tiny_vae, batch_size=2)
    cfg = replace(cfg, shard_mb=0.001)
    real, reads = fs.cat_file, []

    def reset_after_four(path, *args, **kwargs):  # fsspec hands every URL of this store the same instance
        reads.append(path)
        if len(reads) > 4:
            raise ConnectionResetError("connection reset by peer")
        return real(path, *args, **kwargs)

    fs.cat_file = reset_after_four
    try:
        with pytest.raises(StorageError, match="run the same command again"):
            build_latents(cfg)
    finally:
        del fs.cat_file
    second = build_latents(cfg)
    assert second.done == 8 and second.failed == 0 and 0 < second.encoded < 8  # the first batches were kept


def test_remote_captions_are_scanned_from_files_and_metadata(bucket):
    name, fs = bucket
    fs.pipe(f"{name}/caps/a.txt", b"a cat\n")
    fs.pipe(f"{name}/caps/sub/b.txt", "\ufeffa dog".encode())
    fs.pipe(f"{name}/caps/.hidden.txt", b"no")
    scan = scan_captions(UrlPath(f"s3://{name}/caps"))
    assert scan.texts == {"a": "a cat", "sub/b": "a dog"}
    fs.pipe(f"{name}/meta/metadata.jsonl", b'{"file_name": "x.png", "text": "an owl"}\n')
    assert scan_captions(UrlPath(f"s3://{name}/meta")).texts == {"x": "an owl"}


def test_textenc_from_s3_captions_to_s3_joins_with_latents_there(tmp_path, tiny_vae, dataset, bucket):
    name, fs = bucket
    upload(fs, dataset, f"{name}/images")
    captions = {"img000": "a photo of a cat", "sub/img007": "red car", "img001": "a photo of a cat"}
    for key, text in captions.items():
        fs.pipe(f"{name}/images/{key}.txt", text.encode())
    pipe = make_tiny_text_pipeline(tmp_path / "pipe", "sd15")
    out = UrlPath(f"s3://{name}/cache")
    build_latents(make_cfg(UrlPath(f"s3://{name}/images"), out, tiny_vae))
    text_cfg = dict(model=str(pipe), device="cpu", dtype=DType.FP32, dtype_out=DType.FP32)
    remote = build_textenc(TextencConfig(UrlPath(f"s3://{name}/images"), out, **text_cfg))
    assert remote.done == 3 and remote.failed == 0
    for key, text in captions.items():
        (tmp_path / "caps" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "caps" / f"{key}.txt").write_text(text)
    build_latents(make_cfg(dataset, tmp_path / "local", tiny_vae))
    build_textenc(TextencConfig(tmp_path / "caps", tmp_path / "local", **text_cfg))

    cache, reference = open_cache(f"s3://{name}/cache"), open_cache(tmp_path / "local")
    assert sorted(cache.keys()) == sorted(captions) == sorted(reference.keys())
    for key in captions:
        a, b = cache[key], reference[key]
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[n], b[n]) for n in a if isinstance(a[n], torch.Tensor)), key
    assert cache_status(out)["textenc"]["items"]["done"] == 3


def test_any_fsspec_url_works_and_local_and_remote_mix(tmp_path, tiny_vae, dataset, monkeypatch):
    """fsspec's in-memory store (no ETag: identity from the creation time) stands for gs://, hf://...;
    a remote dataset into a local cache, and a local dataset into a remote cache."""
    import fsspec

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    mem = fsspec.filesystem("memory")
    root = f"/ds-{uuid.uuid4().hex[:8]}"
    upload(mem, dataset, root)
    try:
        reference = tensors_of(open_cache_after(build_latents(make_cfg(dataset, tmp_path / "local", tiny_vae))))
        into_local = build_latents(make_cfg(UrlPath(f"memory://{root}"), tmp_path / "from-mem", tiny_vae))
        assert into_local.done == 8
        assert_same(tensors_of(open_cache(tmp_path / "from-mem")), reference)
        into_mem = build_latents(make_cfg(dataset, UrlPath(f"memory://{root}-cache"), tiny_vae))
        assert into_mem.done == 8 and mem.exists(f"{root}-cache/manifest.sqlite")
        assert_same(tensors_of(open_cache(f"memory://{root}-cache")), reference)
        assert build_latents(make_cfg(UrlPath(f"memory://{root}"), tmp_path / "from-mem", tiny_vae)).nothing_to_do
    finally:
        mem.rm(root, recursive=True)
        if mem.exists(f"{root}-cache"):
            mem.rm(f"{root}-cache", recursive=True)


def open_cache_after(summary):
    return open_cache(summary.out)


def test_missing_remote_dataset_and_cache_fail_with_one_line(tmp_path, tiny_vae, bucket):
    name, _ = bucket
    with pytest.raises(ConfigError, match="does not exist"):
        make_cfg(UrlPath(f"s3://{name}/nothing-here"), tmp_path / "out", tiny_vae)
    proc = subprocess.run(_cli("status", f"s3://{name}/nothing-here"), capture_output=True, text=True)
    assert proc.returncode == 2 and "holds no published manifest" in proc.stderr and "Traceback" not in proc.stderr


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cachebuild", *args]


@pytest.mark.slow
def test_sigkill_of_an_s3_run_then_the_same_command_equals_a_local_run(tmp_path, tiny_vae, bucket):
    name, fs = bucket
    root = tmp_path / "ds"
    for i in range(24):
        write_image(root / f"im{i:02d}.png", [(128, 128), (160, 96), (96, 160)][i % 3], seed=i)
    upload(fs, root, f"{name}/images")
    build_latents(make_cfg(root, tmp_path / "local", tiny_vae, batch_size=4, crop=CropMode.RANDOM, flip=True))
    args = ["--vae", str(tiny_vae), "--resolution", "128", "--min-bucket-reso", "64", "--max-bucket-reso", "256"]
    args += ["--dtype", "fp32", "--batch-size", "2", "--shard-mb", "0.02", "-q", "--workers", "0", "--device", "cpu"]
    args += ["--random-crop", "--flip-aug"]

    mdir = tmp_path / "manifest"
    cmd = _cli("latents", f"s3://{name}/images", *args, "--out", f"s3://{name}/cache", "--manifest-dir", str(mdir))
    kills = 0
    for target in (4, 12):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        while proc.poll() is None and done_count(mdir) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=KILL_WAIT_SECONDS)
    assert kills >= 1 and done_count(mdir) < 24
    # whatever the kill left, the published snapshot names only shards that are there
    fs.invalidate_cache()
    if fs.exists(f"{name}/cache/{MANIFEST_NAME}"):
        snap = tmp_path / "snap"
        snap.mkdir()
        fs.get_file(f"{name}/cache/{MANIFEST_NAME}", str(snap / MANIFEST_NAME))
        with Manifest.open(snap, create=False, read_only=True) as m:
            named = {s["name"] for s in m.shards("latents")}
        assert named <= {p.rsplit("/", 1)[-1] for p in fs.ls(f"{name}/cache/latents")}

    final = subprocess.run(cmd, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    fs.invalidate_cache()
    assert not [p for p in fs.find(f"{name}/cache") if p.endswith(".tmp")]
    assert_same(tensors_of(open_cache(f"s3://{name}/cache")), tensors_of(open_cache(tmp_path / "local")))
    assert cache_status(UrlPath(f"s3://{name}/cache"))["items"]["done"] == 24


def test_several_devices_or_ray_with_a_url_out_are_refused_in_one_line(tmp_path, tiny_vae, dataset, bucket):
    name, _ = bucket
    cfg = make_cfg(dataset, UrlPath(f"s3://{name}/cache"), tiny_vae, device=None, devices=("cpu", "cpu"))
    with pytest.raises(ConfigError, match="--devices with a URL --out"):
        build_latents(cfg)
    pytest.importorskip("ray")
    from cachebuild.config import EngineKind

    cfg = make_cfg(dataset, UrlPath(f"s3://{name}/cache"), tiny_vae, device=None, engine=EngineKind.RAY)
    with pytest.raises(ConfigError, match="--engine ray with a URL --out"):
        build_latents(cfg)


def test_shards_without_any_manifest_are_refused_and_unnamed_ones_kept(tmp_path, tiny_vae, dataset, bucket):
    from cachebuild.errors import CacheError

    name, fs = bucket
    out, mdir = UrlPath(f"s3://{name}/cache"), tmp_path / "m"
    cfg = make_cfg(dataset, out, tiny_vae, manifest_dir=mdir)
    assert build_latents(cfg).done == 8
    fs.pipe(f"{name}/cache/latents/shard-00050.safetensors", b"no run of this manifest wrote it")
    write_image(dataset / "new.png", (64, 64), seed=99)
    assert build_latents(cfg).done == 9  # its crash clean-up keeps the unnamed shard, and names pass it
    fs.invalidate_cache()
    assert fs.cat_file(f"{name}/cache/latents/shard-00050.safetensors") == b"no run of this manifest wrote it"
    with Manifest.open(mdir, create=False, read_only=True) as m:
        assert {r.key: r.shard for r in m.items("latents", "done")}["new"] == "shard-00051.safetensors"
    shards = sorted(fs.ls(f"{name}/cache/latents"))
    fs.rm_file(f"{name}/cache/{MANIFEST_NAME}")  # no snapshot, and no local manifest either
    (mdir / MANIFEST_NAME).unlink()
    with pytest.raises(CacheError, match="no manifest.sqlite.*--manifest-dir.*rebuild-manifest"):
        build_latents(cfg)
    fs.invalidate_cache()
    assert sorted(fs.ls(f"{name}/cache/latents")) == shards
