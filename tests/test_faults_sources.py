"""Datasets as users really have them: odd file names, linked and unreadable folders, FIFOs, a dataset folder
that is empty or wrong, captions and metadata that are not what they should be. None of them may crash or
hang a run, and none may cost a cache its entries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cachebuild.cache.manifest import TEXTENC, Manifest, ScanResult, SourceFile
from cachebuild.cache.store import open_store
from cachebuild.cli import cli
from cachebuild.consumers.reader import open_cache
from cachebuild.errors import ConfigError
from cachebuild.sources.captions import scan_captions
from tests.conftest import done_count, write_image
from tests.test_cli import latents_args

REPO = Path(__file__).resolve().parents[1]

# name as the OS gives it (bytes) -> the key stored for it (text)
ODD_NAMES = {
    b"caf\xe9.png": "caf\\xe9",  # Latin-1 from a Windows zip: not UTF-8
    b"dir\xff/inner.png": "dir\\xff/inner",  # an undecodable folder name
    b"with space.png": "with space",
    b'quote\'s "dq".png': 'quote\'s "dq"',
    b"hash#1.png": "hash#1",
    b"pct%20.png": "pct%20",
    b"-leading.png": "-leading",
    "日本語の写真.png".encode(): "日本語の写真",
}


def write_bytes_named(root: Path, name: bytes, seed: int) -> None:
    """An image at a path given as bytes, so names that are not UTF-8 really reach the file system."""
    path = os.path.join(os.fsencode(root), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staged = write_image(root / f".staging-{seed}.png", (64, 48), seed=seed)
    os.rename(os.fsencode(staged), path)


@pytest.fixture
def odd_dataset(tmp_path) -> Path:
    root = tmp_path / "odd"
    for i, name in enumerate(ODD_NAMES):
        write_bytes_named(root, name, i)
    return root


@pytest.fixture
def runner():
    return CliRunner()


def shard_files(out: Path) -> dict[str, tuple[int, int]]:
    folder = out / "latents"
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.name.startswith("shard")}


def many_images(root: Path, n: int) -> Path:
    for i in range(n):
        write_image(root / f"img{i:02d}.png", (64, 64), seed=i)
    return root


# -- file names ------------------------------------------------------------------------------------------------
def test_odd_names_round_trip_through_cli_reader_and_kohya_export(runner, tmp_path, tiny_vae, odd_dataset):
    out = tmp_path / "cache"
    run = runner.invoke(cli, latents_args(odd_dataset, out, tiny_vae, "--json"))
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["done"] == len(ODD_NAMES)

    status = json.loads(runner.invoke(cli, ["status", str(out), "--json"]).stdout)
    assert status["items"] == {"done": len(ODD_NAMES), "failed": 0, "pending": 0}

    reader = open_cache(out)
    assert sorted(reader.keys()) == sorted(ODD_NAMES.values())
    assert all(reader.tensors(key)["latents"].shape[0] == 4 for key in reader)
    assert reader.source_paths()["caf\\xe9"] == "caf\\xe9.png"  # the documented text form

    export = runner.invoke(cli, ["export", str(out), "--format", "kohya", "--to", str(odd_dataset)])
    assert export.exit_code == 0, export.output
    written = set(os.listdir(os.fsencode(odd_dataset)))
    assert b"caf\xe9_0064x0048_sdxl.npz" in written  # beside the image, under its real bytes
    assert b"inner_0064x0048_sdxl.npz" in os.listdir(os.path.join(os.fsencode(odd_dataset), b"dir\xff"))
    assert not any(b"\\x" in name for name in written)  # never under the escaped text
    assert b"-leading_0064x0048_sdxl.npz" in written and "日本語の写真_0064x0048_sdxl.npz".encode() in written


def test_odd_names_round_trip_through_hdf5_shards(runner, tmp_path, tiny_vae, odd_dataset):
    pytest.importorskip("h5py")
    out = tmp_path / "cache"
    run = runner.invoke(cli, latents_args(odd_dataset, out, tiny_vae, "--format", "hdf5"))
    assert run.exit_code == 0, run.output
    reader = open_cache(out)
    assert sorted(reader.keys()) == sorted(ODD_NAMES.values())
    assert all(reader.tensors(key)["latents"].ndim == 3 for key in reader)


def test_a_literal_escape_in_a_name_fails_instead_of_opening_another_file(runner, tmp_path, tiny_vae):
    root = tmp_path / "ds"
    write_image(root / "plain.png", (64, 64))
    write_image(root / "a\\xe9b.png", (64, 64))  # these four characters would read back as the byte 0xE9
    out = tmp_path / "cache"
    assert runner.invoke(cli, latents_args(root, out, tiny_vae)).exit_code == 3
    failures = json.loads(runner.invoke(cli, ["status", str(out), "--json"]).stdout)["failures"]
    assert [f["key"] for f in failures] == ["a\\xe9b"] and "rename it" in failures[0]["reason"]


# -- folders and special files ---------------------------------------------------------------------------------
def test_linked_concept_folder_is_encoded(runner, tmp_path, tiny_vae):
    elsewhere = tmp_path / "raw"
    for i in range(3):
        write_image(elsewhere / f"p{i}.jpg", (64, 64), seed=i)
    root = tmp_path / "ds"
    root.mkdir()
    (root / "10_concept").symlink_to(elsewhere, target_is_directory=True)  # kohya's repeat folder, linked
    (root / "10_concept" / "loop").symlink_to(root, target_is_directory=True)  # and a way back up
    out = tmp_path / "cache"
    run = runner.invoke(cli, latents_args(root, out, tiny_vae, "--json"))
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["done"] == 3
    assert sorted(open_cache(out).keys()) == ["10_concept/p0", "10_concept/p1", "10_concept/p2"]


def test_fifo_named_like_an_image_fails_and_never_hangs(tmp_path, tiny_vae):
    root = tmp_path / "ds"
    write_image(root / "ok.png", (64, 64))
    os.mkfifo(root / "y.png")  # opening it would block until someone writes
    out = tmp_path / "cache"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cachebuild", *latents_args(root, out, tiny_vae, "-q")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    with Manifest.open(out, create=False) as m:
        rows = {r.key: r for r in m.items("latents")}
    assert rows["ok"].status == "done" and rows["y"].status == "failed"
    assert rows["y"].reason.startswith("not a regular file (FIFO)") and "remove it" in rows["y"].reason


def test_unreadable_subfolder_is_reported_and_its_items_kept(runner, tmp_path, tiny_vae, dataset, monkeypatch):
    out = tmp_path / "cache"
    assert runner.invoke(cli, latents_args(dataset, out, tiny_vae)).exit_code == 0
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith(f"{os.sep}dataset{os.sep}sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    again = runner.invoke(cli, latents_args(dataset, out, tiny_vae, "--json"))
    assert again.exit_code == 3, again.output
    assert json.loads(again.stdout)["removed"] == 0
    status = json.loads(runner.invoke(cli, ["status", str(out), "--json"]).stdout)
    assert status["items"]["done"] == 8  # sub/img007 is still there
    assert status["failures"] == [
        {"key": "sub/", "path": "sub/", "reason": "cannot list sub/: permission denied; fix its permissions"}
    ]
    monkeypatch.setattr(os, "scandir", real_scandir)
    fixed = runner.invoke(cli, latents_args(dataset, out, tiny_vae))
    assert fixed.exit_code == 0 and done_count(out) == 8


def test_unreadable_image_fails_as_a_permission_problem(runner, tmp_path, tiny_vae, dataset, monkeypatch):
    from PIL import Image

    real_open = Image.open

    def image_open(fp, *args, **kwargs):
        if str(fp).endswith("img001.jpg"):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", image_open)
    out = tmp_path / "cache"
    assert runner.invoke(cli, latents_args(dataset, out, tiny_vae)).exit_code == 3
    failures = json.loads(runner.invoke(cli, ["status", str(out), "--json"]).stdout)["failures"]
    assert failures == [
        {"key": "img001", "path": "img001.jpg", "reason": "permission denied reading img001.jpg; fix its permissions"}
    ]


# -- a cache is never emptied by accident ------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [(), ("--rebuild",)])
def test_empty_dataset_folder_is_refused_with_the_cache_intact(runner, tmp_path, tiny_vae, dataset, extra):
    out = tmp_path / "cache"
    assert runner.invoke(cli, latents_args(dataset, out, tiny_vae)).exit_code == 0
    before = shard_files(out)
    empty = tmp_path / "unmounted"
    empty.mkdir()
    refused = runner.invoke(cli, latents_args(empty, out, tiny_vae, *extra))
    assert refused.exit_code == 2
    assert "found no files" in refused.output and "8 item(s)" in refused.output and "--prune" in refused.output
    assert shard_files(out) == before and done_count(out) == 8

    pruned = runner.invoke(cli, latents_args(empty, out, tiny_vae, "--prune", "--json"))
    assert pruned.exit_code == 0, pruned.output
    assert json.loads(pruned.stdout)["removed"] == 8 and done_count(out) == 0 and shard_files(out) == {}


def test_wrong_dataset_folder_is_refused_and_prune_confirms(runner, tmp_path, tiny_vae):
    out = tmp_path / "cache"
    assert runner.invoke(cli, latents_args(many_images(tmp_path / "ds", 12), out, tiny_vae)).exit_code == 0
    before = shard_files(out)
    wrong = tmp_path / "other"
    write_image(wrong / "unrelated.png", (64, 64))
    refused = runner.invoke(cli, latents_args(wrong, out, tiny_vae))
    assert refused.exit_code == 2
    assert "12 of the 12 done item(s)" in refused.output and "--prune" in refused.output
    assert shard_files(out) == before and done_count(out) == 12

    pruned = runner.invoke(cli, latents_args(wrong, out, tiny_vae, "--prune", "--json"))
    assert pruned.exit_code == 0, pruned.output
    assert json.loads(pruned.stdout)["removed"] == 12 and done_count(out) == 1
    assert not set(shard_files(out)) & set(before)  # the old shards held only removed items


def test_a_few_deleted_images_need_no_flag(runner, tmp_path, tiny_vae):
    root = many_images(tmp_path / "ds", 12)
    out = tmp_path / "cache"
    assert runner.invoke(cli, latents_args(root, out, tiny_vae)).exit_code == 0
    for i in range(3):
        (root / f"img{i:02d}.png").unlink()
    run = runner.invoke(cli, latents_args(root, out, tiny_vae, "--json"))
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["removed"] == 3 and done_count(out) == 9


def test_textenc_store_is_guarded_too(tmp_path):
    files = [SourceFile(f"k{i:02d}", f"k{i:02d}.txt", 1, 0, "h") for i in range(20)]
    with Manifest.open(tmp_path / "cache") as m:
        open_store(m, TEXTENC, {"fp": 1}, ScanResult(files, {}), False, False)
        m.point_items(TEXTENC, [(f.key, "shard-00000.safetensors", {}) for f in files])
        with pytest.raises(ConfigError, match="found no files.*--prune"):
            open_store(m, TEXTENC, {"fp": 1}, ScanResult([], {}), False, False)
        with pytest.raises(ConfigError, match="11 of the 20 done"):
            open_store(m, TEXTENC, {"fp": 1}, ScanResult(files[:9], {}), False, False)
        assert m.counts(TEXTENC)["done"] == 20
        assert open_store(m, TEXTENC, {"fp": 1}, ScanResult(files[:9], {}), False, False, prune=True).removed == 11


# -- captions and metadata ---------------------------------------------------------------------------------------
@pytest.fixture
def alarm():
    """Turn a hang (opening a FIFO) into a failure instead of a stuck test run."""

    def expire(*_):
        raise TimeoutError("the scan blocked: it opened something that is not a regular file")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_utf16_captions_without_a_mark_fail_and_with_one_are_read(tmp_path, alarm):
    (tmp_path / "nul.txt").write_bytes("a cat".encode("utf-16-le"))
    (tmp_path / "bom.txt").write_bytes("a dog".encode("utf-16"))  # with its byte-order mark
    (tmp_path / "ok.txt").write_text("a bird", encoding="utf-8")
    os.mkfifo(tmp_path / "pipe.txt")
    scan = scan_captions(tmp_path)
    assert scan.texts == {"bom": "a dog", "ok": "a bird"}
    assert "looks like UTF-16" in scan.bad["nul"] and scan.bad["nul"].endswith("re-save it as UTF-8")
    assert "not a regular file (FIFO)" in {f.key: f.reason for f in scan.scan.files}["pipe"]


def test_metadata_file_names_must_stay_inside_the_folder(tmp_path):
    rows = ["/etc/passwd.png", "../up.png", "sub/../../x.png", "C:\\data\\x.png", "./fine/ok.png"]
    lines = [json.dumps({"file_name": name, "text": "t"}) for name in rows]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    scan = scan_captions(tmp_path)
    reasons = {f.key: f.reason for f in scan.scan.files}
    assert scan.texts == {"fine/ok": "t"} and reasons["fine/ok"] is None
    assert "is absolute" in reasons["metadata.jsonl:1"] and "is absolute" in reasons["metadata.jsonl:4"]
    assert "'..'" in reasons["metadata.jsonl:2"] and "'..'" in reasons["metadata.jsonl:3"]
    assert reasons["metadata.jsonl:2"].startswith("metadata.jsonl line 2:")


def test_malformed_json_lines_fail_with_their_line_number(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "a"}\n\n{"file_name": "b.png", "text": \n[1, 2]\n', encoding="utf-8"
    )
    scan = scan_captions(tmp_path)
    reasons = {f.key: f.reason for f in scan.scan.files}
    assert scan.texts == {"a": "a"}
    assert reasons["metadata.jsonl:3"].startswith("metadata.jsonl line 3 is not valid JSON")
    assert "not a JSON object" in reasons["metadata.jsonl:4"]


def test_csv_rows_with_the_wrong_number_of_fields_fail_with_their_line_number(tmp_path):
    (tmp_path / "metadata.csv").write_text(
        'file_name,text\na.png,"two\nlines"\nb.png,a cat, sitting\nc.png\nd.png,"a, quoted"\n', encoding="utf-8"
    )
    scan = scan_captions(tmp_path)
    reasons = {f.key: f.reason for f in scan.scan.files}
    assert scan.texts == {"a": "two\nlines", "d": "a, quoted"}
    assert reasons["metadata.csv:4"] == (
        "metadata.csv line 4 has 3 fields, the header 2; quote fields that hold commas, or fix the row"
    )
    assert reasons["metadata.csv:5"].startswith("metadata.csv line 5 has 1 fields")


def test_metadata_in_utf16_without_a_mark_is_refused_naming_the_fix(tmp_path):
    (tmp_path / "metadata.jsonl").write_bytes('{"file_name": "a.png", "text": "a"}\n'.encode("utf-16-le"))
    with pytest.raises(ConfigError, match="re-save it as UTF-8"):
        scan_captions(tmp_path)
