"""scan_files: which files are found, their keys, clashes, and fingerprints."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cachebuild.cache.manifest import SourceFile
from cachebuild.sources.scan import scan_files


def touch(path: Path, data: bytes = b"x") -> Path:
    """Scanning only stats files, so any bytes will do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def keys(root: Path, **kwargs) -> list[str]:
    return [f.key for f in scan_files(root, **kwargs).files]


def test_recursive_keys_are_relative_posix_paths_without_extension(tmp_path):
    touch(tmp_path / "top.jpg")
    touch(tmp_path / "sub" / "mid.png")
    touch(tmp_path / "sub" / "deeper" / "low.webp")
    result = scan_files(tmp_path)
    by_key = {f.key: f for f in result.files}
    assert set(by_key) == {"top", "sub/mid", "sub/deeper/low"}
    assert by_key["sub/deeper/low"].path == "sub/deeper/low.webp"
    assert by_key["sub/mid"].path == "sub/mid.png"
    assert result.clashes == {}


def test_files_are_sorted_by_key(tmp_path):
    for name in ["b.jpg", "a/z.jpg", "c.png", "a.jpg", "B.jpg"]:
        touch(tmp_path / name)
    found = keys(tmp_path)
    assert found == sorted(found)
    assert len(found) == 5


def test_hidden_files_and_hidden_folders_are_skipped(tmp_path):
    touch(tmp_path / "seen.jpg")
    touch(tmp_path / ".hidden.jpg")
    touch(tmp_path / "sub" / ".also-hidden.png")
    touch(tmp_path / ".cache" / "inside.jpg")
    touch(tmp_path / "sub" / ".thumbs" / "deep" / "inside.jpg")
    assert keys(tmp_path) == ["seen"]


def test_extensions_are_case_insensitive_and_others_ignored(tmp_path):
    touch(tmp_path / "upper.JPG")
    touch(tmp_path / "mixed.PnG")
    touch(tmp_path / "jpeg.JPEG")
    touch(tmp_path / "caption.txt")
    touch(tmp_path / "noext")
    touch(tmp_path / "archive.jpg.zip")
    result = scan_files(tmp_path)
    assert {f.key: f.path for f in result.files} == {"upper": "upper.JPG", "mixed": "mixed.PnG", "jpeg": "jpeg.JPEG"}


def test_custom_extension_set(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.txt")
    assert keys(tmp_path, extensions=frozenset({".txt"})) == ["b"]


def test_clashing_keys_are_reported_and_listed_once(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "a.png")
    touch(tmp_path / "sub" / "b.webp")
    touch(tmp_path / "sub" / "b.JPG")
    touch(tmp_path / "c.jpg")
    result = scan_files(tmp_path)
    assert result.clashes == {"a": ["a.jpg", "a.png"], "sub/b": ["sub/b.JPG", "sub/b.webp"]}
    assert [f.key for f in result.files] == ["a", "c", "sub/b"]  # one entry per key
    assert {f.key: f.path for f in result.files}["a"] in ("a.jpg", "a.png")


def test_excluded_folder_is_not_entered(tmp_path):
    root = tmp_path / "dataset"
    touch(root / "img.jpg")
    touch(root / "cache" / "latents" / "img.png")  # e.g. a cache built inside the dataset
    touch(root / "cachex" / "kept.png")  # a sibling whose name merely starts the same way
    assert keys(root) == ["cache/latents/img", "cachex/kept", "img"]
    assert keys(root, exclude=root / "cache") == ["cachex/kept", "img"]


def test_exclude_given_relative_or_unnormalised(tmp_path, monkeypatch):
    root = tmp_path / "dataset"
    touch(root / "img.jpg")
    touch(root / "out" / "x.jpg")
    monkeypatch.chdir(tmp_path)
    assert keys(Path("dataset"), exclude=Path("dataset/sub/../out")) == ["img"]


def test_content_hash_only_when_asked(tmp_path):
    data = b"some image bytes"
    touch(tmp_path / "a.jpg", data)
    plain = scan_files(tmp_path).files[0]
    hashed = scan_files(tmp_path, content_hash=True).files[0]
    assert plain.sha256 is None
    assert hashed.sha256 == hashlib.sha256(data).hexdigest()
    assert plain.size == hashed.size == len(data)
    assert hashed.fingerprint.startswith(plain.fingerprint)
    assert hashed.fingerprint != plain.fingerprint


def test_fingerprint_changes_when_the_file_changes(tmp_path):
    path = touch(tmp_path / "a.jpg", b"0123456789")
    before = scan_files(tmp_path).files[0]
    assert scan_files(tmp_path).files[0].fingerprint == before.fingerprint  # stable while untouched

    path.write_bytes(b"0123456789abc")  # size changes
    os.utime(path, ns=(before.mtime_ns, before.mtime_ns))
    assert scan_files(tmp_path).files[0].fingerprint != before.fingerprint

    path.write_bytes(b"9876543210")  # same size, new mtime
    os.utime(path, ns=(before.mtime_ns + 5_000_000_000, before.mtime_ns + 5_000_000_000))
    assert scan_files(tmp_path).files[0].fingerprint != before.fingerprint


def test_content_hash_catches_an_edit_that_keeps_size_and_mtime(tmp_path):
    path = touch(tmp_path / "a.jpg", b"0123456789")
    before = scan_files(tmp_path, content_hash=True).files[0]
    path.write_bytes(b"9876543210")
    os.utime(path, ns=(before.mtime_ns, before.mtime_ns))
    plain_after = scan_files(tmp_path).files[0]
    hashed_after = scan_files(tmp_path, content_hash=True).files[0]
    assert plain_after.fingerprint == f"{before.size}:{before.mtime_ns}"  # stat alone cannot see it
    assert hashed_after.fingerprint != before.fingerprint


def test_fingerprint_format():
    assert SourceFile("k", "k.jpg", 12, 34).fingerprint == "12:34"
    assert SourceFile("k", "k.jpg", 12, 34, "ab").fingerprint == "12:34:ab"


def test_empty_folder(tmp_path):
    result = scan_files(tmp_path)
    assert result.files == [] and result.clashes == {}
