"""A cache whose manifest is gone: a build refuses (exit 2, one line naming rebuild-manifest) and deletes nothing;
shard files the manifest does not name are deleted only where a run of it claimed them (cache.claims)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from click.testing import CliRunner

from cachebuild.cache.manifest import MANIFEST_NAME, Manifest
from cachebuild.cli import cli
from cachebuild.testing import make_tiny_text_pipeline
from tests.conftest import write_image
from tests.test_cli import latents_args


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def files_of(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def remove_manifest(out: Path) -> None:
    for side in ("", "-wal", "-shm"):
        (out / (MANIFEST_NAME + side)).unlink(missing_ok=True)


def refused(result, out: Path) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "no manifest.sqlite" in lines[0], result.output
    assert f"cachebuild rebuild-manifest {out}" in lines[0]
    assert not (out / MANIFEST_NAME).exists()  # not even an empty one was made


def test_a_lost_manifest_is_refused_and_no_shard_is_deleted(tmp_path, tiny_vae):
    dataset, one = tmp_path / "ds", tmp_path / "one"
    for i in range(12):
        write_image(dataset / f"im{i:02d}.png", (64, 64), seed=i)
    write_image(one / "im00.png", (64, 64), seed=0)
    out = tmp_path / "cache"
    assert run(*latents_args(dataset, out, tiny_vae, "--shard-mb", "0.001")).exit_code == 0  # a shard an item
    before = files_of(out / "latents")
    assert len(before) == 12
    remove_manifest(out)  # a user's rm, a sync tool, a partial copy
    refused(run(*latents_args(one, out, tiny_vae, "--shard-mb", "0.001")), out)  # the case
    assert files_of(out / "latents") == before
    assert run("rebuild-manifest", out).exit_code == 0  # the fix the line names gives everything back
    again = run(*latents_args(dataset, out, tiny_vae, "--shard-mb", "0.001"))
    assert again.exit_code == 0 and "nothing left to do: 12 items done" in again.output, again.output


def test_a_lost_manifest_is_refused_by_textenc_too(tmp_path):
    model = make_tiny_text_pipeline(tmp_path / "sd15", "sd15")
    captions = tmp_path / "captions"
    captions.mkdir()
    for i, text in enumerate(["a cat", "a dog", "a red car"]):
        (captions / f"im{i}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "cache"
    args = ["textenc", captions, "--model", model, "--out", out, "--device", "cpu", "-q"]
    assert run(*args).exit_code == 0
    before = files_of(out / "textenc")
    remove_manifest(out)
    refused(run(*args), out)
    assert files_of(out / "textenc") == before


def test_unnamed_shards_in_a_cache_are_kept_and_named_by_verify(tmp_path, tiny_vae, dataset):
    out = tmp_path / "cache"
    assert run(*latents_args(dataset, out, tiny_vae)).exit_code == 0
    stray = out / "latents" / "shard-00050.safetensors"  # another cache's, or a lost manifest's
    stray.write_bytes(b"not written by a run of this manifest")
    write_image(dataset / "new.png", (64, 64), seed=99)
    assert run(*latents_args(dataset, out, tiny_vae)).exit_code == 0  # a build, with its crash clean-up
    result = run("verify", out, "--repair")
    assert result.exit_code == 0 and "shard-00050.safetensors" in result.output and "kept" in result.output
    assert stray.read_bytes() == b"not written by a run of this manifest"
    with Manifest.open(out, create=False) as m:  # names are handed out past it
        assert {r.key: r.shard for r in m.items("latents", "done")}["new"] == "shard-00051.safetensors"
