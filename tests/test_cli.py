"""The CLI end to end, through click's runner: exit codes, summaries and status output."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cachebuild.cli import cli


def latents_args(dataset, out, vae, *extra):
    return [
        "latents",
        str(dataset),
        "--vae",
        str(vae),
        "--out",
        str(out),
        "--resolution",
        "128",
        "--min-bucket-reso",
        "64",
        "--max-bucket-reso",
        "256",
        "--workers",
        "0",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture
def runner():
    return CliRunner()


def test_latents_then_status_json(runner, tmp_path, tiny_vae, dataset):
    out = tmp_path / "cache"
    result = runner.invoke(cli, latents_args(dataset, out, tiny_vae, "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["done"] == 8 and summary["encoded"] == 8 and summary["model_loaded"] is True

    status = runner.invoke(cli, ["status", str(out), "--json"])
    assert status.exit_code == 0
    info = json.loads(status.stdout)
    assert info["items"] == {"done": 8, "failed": 0, "pending": 0}
    assert info["failures"] == [] and info["shards"] >= 1
    assert info["bytes"] == sum(p.stat().st_size for p in (out / "latents").iterdir())
    assert sum(info["buckets"].values()) == 8 and all("x" in b for b in info["buckets"])
    assert info["fingerprint"]["vae"]["weights_sha256"]


def test_rerun_says_nothing_is_left(runner, tmp_path, tiny_vae, dataset):
    out = tmp_path / "cache"
    assert runner.invoke(cli, latents_args(dataset, out, tiny_vae, "-q")).exit_code == 0
    again = runner.invoke(cli, latents_args(dataset, out, tiny_vae))
    assert again.exit_code == 0 and "nothing left to do" in again.stderr


def test_failed_items_give_exit_3_and_reasons_in_status(runner, tmp_path, tiny_vae, dataset):
    (dataset / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    out = tmp_path / "cache"
    result = runner.invoke(cli, latents_args(dataset, out, tiny_vae, "-q"))
    assert result.exit_code == 3
    assert "cachebuild status" in result.stderr
    status = runner.invoke(cli, ["status", str(out)])
    assert "broken.jpg" in status.stdout and "8 done, 1 failed" in status.stdout
    info = json.loads(runner.invoke(cli, ["status", str(out), "--json"]).stdout)
    assert info["failures"][0]["key"] == "broken" and info["failures"][0]["path"] == "broken.jpg"


def test_changed_settings_exit_2_with_the_fix(runner, tmp_path, tiny_vae, dataset):
    out = tmp_path / "cache"
    assert runner.invoke(cli, latents_args(dataset, out, tiny_vae, "-q")).exit_code == 0
    result = runner.invoke(cli, latents_args(dataset, out, tiny_vae, "-q", "--latents", "mean"))
    assert result.exit_code == 2
    assert "latents: cache has 'sample', this run asks for 'mean'" in result.stderr
    assert "--rebuild" in result.stderr


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--min-bucket-reso", "100"], "multiples"),
        (["--bucket-reso-steps", "3", "--min-bucket-reso", "63", "--max-bucket-reso", "255"], "downsampling"),
        (["--dtype-out", "int8"], "--dtype-out"),
    ],
)
def test_bad_arguments_fail_before_any_work(runner, tmp_path, tiny_vae, dataset, extra, needle):
    out = tmp_path / "cache"
    result = runner.invoke(cli, latents_args(dataset, out, tiny_vae, *extra))
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not (out / "latents").exists()


def test_missing_dataset_and_missing_model(runner, tmp_path, tiny_vae):
    result = runner.invoke(cli, ["latents", str(tmp_path / "nope"), "--vae", str(tiny_vae), "--out", "x"])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(cli, ["latents", str(tmp_path), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "--model" in result.output
