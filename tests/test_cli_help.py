"""CLI: every command has help ending in an example; bad arguments exit 2 with a message naming the fix."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cachebuild.cli import EXIT_USAGE, cli

COMMANDS = [[], ["latents"], ["status"], ["build"], ["watch"]]


def run(args: list[str]):
    return CliRunner().invoke(cli, args)


def description(help_text: str) -> list[str]:
    """The help's own text: the lines between the usage line and the Options/Commands lists."""
    lines = help_text.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith(("Options:", "Commands:")))
    return [line.strip() for line in lines[1:end] if line.strip()]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "cachebuild")
def test_help_exits_0_and_ends_with_an_example(args):
    result = run([*args, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage:")
    text = description(result.output)
    assert "Example:" in text
    assert text[-1].startswith("cachebuild ")  # the last line of the description is a command to copy
    if args:
        assert text[-1].split()[1] == args[0]  # ... and it uses this command


def test_group_lists_every_command():
    output = run(["--help"]).output
    commands = output.split("Commands:", 1)[1].split()
    assert "latents" in commands and "status" in commands


def test_short_help_flag():
    assert run(["latents", "-h"]).exit_code == 0


def test_status_without_a_manifest_exits_2_with_a_message(tmp_path):
    result = run(["status", str(tmp_path)])
    assert result.exit_code == EXIT_USAGE == 2
    assert "not a cachebuild cache" in result.output and "manifest.sqlite" in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # status never creates a cache


def test_status_on_a_missing_folder_exits_2(tmp_path):
    result = run(["status", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "not a cachebuild cache" in result.output
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("value", ["abc", "1024,768,512", "12x", ""])
def test_bad_resolution_exits_2(tmp_path, value):
    result = run(["latents", str(tmp_path), "--out", str(tmp_path / "out"), "--model", "sdxl", "--resolution", value])
    assert result.exit_code == 2, result.output
    assert "--resolution" in result.output
    assert not (tmp_path / "out").exists()


def test_non_positive_resolution_exits_2(tmp_path):
    result = run(["latents", str(tmp_path), "--out", str(tmp_path / "out"), "--model", "sdxl", "--resolution", "0"])
    assert result.exit_code == 2
    assert "--resolution" in result.output


def test_latents_without_a_model_exits_2_naming_model(tmp_path):
    result = run(["latents", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "--model" in result.output and "--vae" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_latents_requires_out(tmp_path):
    result = run(["latents", str(tmp_path), "--model", "sdxl"])
    assert result.exit_code == 2
    assert "--out" in result.output


def test_latents_missing_dataset_exits_2(tmp_path):
    result = run(["latents", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--model", "sdxl"])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_help_does_not_import_torch():
    """`cachebuild --help` must be instant: torch and diffusers are imported only when work starts."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from cachebuild.cli import cli\n"
        "for args in [['--help']] + [[name, '--help'] for name in ('latents', 'status', 'build', 'watch')]:\n"
        "    assert CliRunner().invoke(cli, args).exit_code == 0\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'PIL') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
