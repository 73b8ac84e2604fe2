"""Faults of the disk and the manifest: a full disk, a read-only disk, an --out under a file, a damaged
manifest and its rebuild, reused shard names, leftover temporary files. Each ends in one clear line (exit 2)
and never loses what was committed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachebuild import open_cache
from cachebuild.cache import files
from cachebuild.cache.manifest import MANIFEST_NAME, Manifest
from cachebuild.cli import cli
from cachebuild.errors import CacheError
from tests.conftest import done_count, write_image
from tests.test_cli import latents_args

ITEM_COLUMNS = "store, key, path, source_fp, status, shard, bucket, info"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def build(dataset: Path, out: Path, vae: Path, *extra: str):
    return run(*latents_args(dataset, out, vae, "--latents", "mean", *extra))


def items_table(out: Path) -> list[tuple]:
    with sqlite3.connect(f"file:{out / MANIFEST_NAME}?mode=ro", uri=True) as conn:
        return conn.execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE status='done' ORDER BY store, key").fetchall()


def all_latents(out: Path) -> dict[str, torch.Tensor]:
    cache = open_cache(out)
    return {k: cache.tensors(k)["latents"] for k in cache}


def one_line_error(result, *words: str) -> None:
    """Exit 2 with one `Error: ...` line naming the fix, and no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]


@contextlib.contextmanager
def mount(args: list[str], target: Path):
    """Mount (as root) for the test's duration, or skip where this machine does not allow it."""
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here ({proc.stderr.strip() or 'not root'})")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def read_only_copy(src: Path, mnt: Path):
    """``src`` seen through a read-only bind mount at ``mnt``."""
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("read-only bind mounts need Linux and mount")
    stack = contextlib.ExitStack()
    stack.enter_context(mount(["--bind", str(src)], mnt))
    proc = subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        stack.close()
        pytest.skip(f"cannot remount read-only here ({proc.stderr.strip()})")
    return stack


# -- a full disk --------------------------------------------------------------------------------------------
def test_disk_full_at_a_shard_write_is_one_line_keeps_committed_shards_and_resumes(
    tmp_path, tiny_vae, dataset, monkeypatch
):
    reference = tmp_path / "ref"
    assert build(dataset, reference, tiny_vae).exit_code == 0
    out = tmp_path / "c"
    real_fsync, calls = os.fsync, []

    def full_after_two(fd):
        calls.append(fd)
        if len(calls) > 4:  # two fsyncs per shard (file, folder): two shards land, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", full_after_two)
    result = build(dataset, out, tiny_vae, "--shard-mb", "0.001")
    one_line_error(result, "no space left", "committed shards are kept", "run the same command again")
    kept = done_count(out)
    assert kept == 2  # one item per shard at this shard size: two committed, none lost
    assert not list((out / "latents").glob("*.tmp"))  # the half-written file is gone
    monkeypatch.setattr(files.os, "fsync", real_fsync)
    assert run("verify", out).exit_code == 0  # what is committed is whole
    assert build(dataset, out, tiny_vae, "--shard-mb", "0.001").exit_code == 0
    got, want = all_latents(out), all_latents(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_disk_full_in_the_manifest_commit_is_one_line(tmp_path, tiny_vae, dataset, monkeypatch):
    out = tmp_path / "c"
    real = Manifest.commit_shard

    def full_at_the_third(self, *args):  # SQLite's own error at the commit of a shard's transaction
        if len(self.shards("latents")) >= 2:
            with self.transaction():
                raise sqlite3.OperationalError("database or disk is full")
        real(self, *args)

    monkeypatch.setattr(Manifest, "commit_shard", full_at_the_third)
    one_line_error(build(dataset, out, tiny_vae, "--shard-mb", "0.001"), "no space left", "run the same command again")
    assert done_count(out) == 2
    monkeypatch.undo()
    assert run("verify", out).exit_code == 0  # the shard written but never committed is a leftover, not damage
    assert build(dataset, out, tiny_vae, "--shard-mb", "0.001").exit_code == 0
    assert done_count(out) == 8


def test_a_real_full_tmpfs_stops_with_one_line_and_a_re_run_finishes(tmp_path, tiny_vae):
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("tmpfs needs Linux and mount")
    dataset = tmp_path / "ds"
    for i in range(12):
        write_image(dataset / f"img{i:02d}.png", (128, 128), seed=i)
    reference = tmp_path / "ref"
    assert build(dataset, reference, tiny_vae).exit_code == 0
    with mount(["-t", "tmpfs", "-o", "size=200k", "tmpfs"], tmp_path / "disk") as disk:
        out = disk / "cache"
        cmd = [sys.executable, "-m", "cachebuild", *latents_args(dataset, out, tiny_vae, "--latents", "mean")]
        cmd += ["--shard-mb", "0.03", "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and "no space left" in proc.stderr, proc.stderr
        kept = done_count(out)
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        finished = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert finished.returncode == 0, finished.stderr
        assert done_count(out) == 12 >= kept
        got, want = all_latents(out), all_latents(reference)
        assert all(torch.equal(got[k], want[k]) for k in want)


# -- read-only and wrong output folders ----------------------------------------------------------------------
def test_a_finished_cache_opens_read_only_and_a_build_there_is_one_line(tmp_path, tiny_vae, dataset):
    out = tmp_path / "c"
    assert build(dataset, out, tiny_vae).exit_code == 0
    assert not (out / f"{MANIFEST_NAME}-wal").exists() or (out / f"{MANIFEST_NAME}-wal").stat().st_size == 0
    want = all_latents(out)
    with read_only_copy(out, tmp_path / "ro"):
        ro = tmp_path / "ro"
        status = run("status", ro, "--json")
        assert status.exit_code == 0, status.output
        assert json.loads(status.output)["items"]["done"] == len(want)
        assert run("verify", ro).exit_code == 0
        got = all_latents(ro)
        assert all(torch.equal(got[k], want[k]) for k in want)
        one_line_error(build(dataset, ro, tiny_vae), "read-only")


def test_out_under_a_regular_file_is_one_line(tmp_path, tiny_vae, dataset):
    (tmp_path / "file").write_text("not a folder")
    one_line_error(build(dataset, tmp_path / "file" / "cache", tiny_vae), "not a folder")


# -- a damaged manifest ---------------------------------------------------------------------------------------
def test_a_damaged_manifest_is_one_line_and_rebuilds_from_the_shards(tmp_path, tiny_vae, dataset):
    out = tmp_path / "c"
    assert build(dataset, out, tiny_vae, "--shard-mb", "0.01").exit_code == 0
    captions = dataset
    for key in ("img000", "img001", "sub/img007"):
        (captions / f"{key}.txt").write_text(f"a caption for {key}", encoding="utf-8")
    before = items_table(out)
    (out / MANIFEST_NAME).write_bytes(b"this is not a database" * 100)
    for command in (["status", out], ["verify", out], latents_args(dataset, out, tiny_vae, "--latents", "mean")):
        one_line_error(run(*command), "damaged", "cachebuild rebuild-manifest")
    with pytest.raises(CacheError, match="rebuild-manifest"):
        open_cache(out)
    rebuilt = run("rebuild-manifest", out)
    assert rebuilt.exit_code == 0, rebuilt.output
    assert list(out.glob(f"{MANIFEST_NAME}.damaged-*"))  # kept, not deleted
    assert items_table(out) == before
    again = build(dataset, out, tiny_vae, "--shard-mb", "0.01")
    assert again.exit_code == 0 and "nothing left to do" in again.output  # nothing is encoded again


def test_rebuild_restores_text_items_too(tmp_path, tiny_vae, dataset):
    from cachebuild.testing import make_tiny_text_pipeline

    pipeline = make_tiny_text_pipeline(tmp_path / "sdxl", "sdxl")
    for i, key in enumerate(("img000", "img001", "sub/img007")):
        (dataset / f"{key}.txt").write_text(f"caption number {i}", encoding="utf-8")
    out = tmp_path / "c"
    assert build(dataset, out, tiny_vae).exit_code == 0
    text = run("textenc", dataset, "--model", pipeline, "--out", out, "--device", "cpu", "--quiet")
    assert text.exit_code in (0, 3), text.output
    before = items_table(out)
    (out / MANIFEST_NAME).write_bytes(b"")
    (out / MANIFEST_NAME).unlink()
    assert run("rebuild-manifest", out).exit_code == 0
    assert items_table(out) == before


# -- shard names, leftovers, imports without fcntl -----------------------------------------------------------
def test_shard_names_are_never_reused_and_an_open_reader_says_the_cache_changed(tmp_path, tiny_vae, dataset):
    out = tmp_path / "c"
    assert build(dataset, out, tiny_vae).exit_code == 0
    first = {p.name for p in (out / "latents").glob("shard-*")}
    reader = open_cache(out)
    assert build(dataset, out, tiny_vae, "--rebuild", "--seed", "1", "--random-crop").exit_code == 0
    second = {p.name for p in (out / "latents").glob("shard-*")}
    assert first and second and not first & second
    with pytest.raises(CacheError, match="changed since it was opened; reopen it"):
        reader.tensors(reader.keys()[0])


def test_a_damaged_shard_is_still_reported_as_damage(tmp_path, tiny_vae, dataset):
    out = tmp_path / "c"
    assert build(dataset, out, tiny_vae).exit_code == 0
    reader = open_cache(out)
    for shard in (out / "latents").glob("shard-*"):
        shard.unlink()
    with pytest.raises(CacheError, match="verify"):
        reader.tensors(reader.keys()[0])


def test_leftover_temporary_files_never_make_verify_fail(tmp_path, tiny_vae, dataset):
    out = tmp_path / "c"
    assert build(dataset, out, tiny_vae).exit_code == 0
    (out / "latents" / "shard-00099.safetensors.tmp").write_bytes(b"half a shard")
    result = run("verify", out)
    assert result.exit_code == 0 and "leftover" in result.output
    assert run("verify", out, "--repair").exit_code == 0
    assert not (out / "latents" / "shard-00099.safetensors.tmp").exists()


def test_the_package_imports_and_reads_where_fcntl_does_not_exist(tmp_path, tiny_vae, dataset):
    """Windows has no fcntl: the CLI, status and the reader must still import and run."""
    out = tmp_path / "c"
    assert build(dataset, out, tiny_vae).exit_code == 0
    script = (
        "import sys; sys.modules['fcntl'] = None\n"
        "from cachebuild.cli import cli; from cachebuild import open_cache\n"
        f"cache = open_cache({str(out)!r}); print(len(cache.keys()))\n"
        f"cli(['status', {str(out)!r}], standalone_mode=False)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "8"
