"""scan_files: which files are found, their keys, clashes, and fingerprints."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cachebuild.cache.manifest import Manifest, SourceFile
from cachebuild.errors import ConfigError
from cachebuild.keys import fs_path, path_text
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


# -- links, special files, unlisted folders, names that are not UTF-8 -----------------------------------------
def test_linked_folders_are_followed_and_a_loop_ends(tmp_path):
    outside = tmp_path / "raw"
    touch(outside / "p.jpg")
    root = tmp_path / "ds"
    touch(root / "sub" / "a.jpg")
    (root / "10_concept").symlink_to(outside, target_is_directory=True)
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # back to an ancestor
    (root / "sub" / "here").symlink_to(".", target_is_directory=True)  # to itself
    (root / "link.jpg").symlink_to(root / "sub" / "a.jpg")  # a linked file is a file
    assert keys(root) == ["10_concept/p", "link", "sub/a"]


def test_a_folder_linked_twice_is_scanned_once_at_its_first_path(tmp_path):
    root = tmp_path / "ds"
    touch(root / "raw" / "p.jpg")
    (root / "10_concept").symlink_to(root / "raw", target_is_directory=True)
    assert keys(root) == ["10_concept/p"]  # "10_concept" sorts before "raw"


def test_special_files_and_dangling_links_fail_with_a_reason(tmp_path):
    touch(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    os.mkfifo(tmp_path / "ignored.txt")  # not an image suffix: not listed at all
    reasons = {f.key: f.reason for f in scan_files(tmp_path).files}
    assert reasons == {
        "fifo": "not a regular file (FIFO); remove it or replace it with a regular file",
        "gone": f"symbolic link to a missing file ({tmp_path / 'missing.jpg'}); fix or remove the link",
        "ok": None,
    }


def test_a_file_that_cannot_be_stat_ed_fails_naming_it(tmp_path, monkeypatch):
    touch(tmp_path / "sub" / "locked.png")
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if os.fspath(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    [f] = scan_files(tmp_path).files
    assert f.reason == "cannot read sub/locked.png: permission denied; fix its permissions"


def test_unlisted_subfolder_is_reported_and_covers_its_keys(tmp_path, monkeypatch):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "locked" / "b.jpg")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = scan_files(tmp_path)
    assert result.unlisted == ("locked",) and result.covers("locked/b") and not result.covers("a")
    assert {f.key: f.reason for f in result.files} == {
        "a": None,
        "locked/": "cannot list locked/: permission denied; fix its permissions",
    }


def test_an_unlisted_dataset_root_is_a_config_error(tmp_path, monkeypatch):
    def scandir(path="."):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ConfigError, match="cannot list the dataset folder .*fix its permissions"):
        scan_files(tmp_path)


def test_names_that_are_not_utf8_get_text_keys_that_lead_back_to_the_file(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9 \xff.png")
    with open(raw, "wb") as f:
        f.write(b"x")
    [found] = scan_files(tmp_path).files
    assert (found.key, found.path, found.reason) == ("caf\\xe9 \\xff", "caf\\xe9 \\xff.png", None)
    assert os.path.exists(os.path.join(str(tmp_path), fs_path(found.path)))


def test_path_text_and_fs_path_round_trip():
    for name in [os.fsdecode(b"a\xe9/b\xff.png"), "café.png", "日本.png", "a b#%'\".png", "-x.png", "back\\slash"]:
        assert fs_path(path_text(name)) == name
        path_text(name).encode("utf-8")  # always storable
    assert path_text(os.fsdecode(b"caf\xe9")) == "caf\\xe9"
    assert fs_path("caf\\xc3\\xa9") == "caf\\xc3\\xa9"  # valid UTF-8 once unescaped: the name holds these characters
    assert fs_path("caf\\x41") == "caf\\x41"  # backslashreplace never writes bytes below 0x80


def test_sync_keeps_items_under_unlisted_folders(tmp_path):
    files = [SourceFile(k, f"{k}.jpg", 1, 0) for k in ("a", "locked/b", "locked/c")]
    with Manifest.open(tmp_path) as m:
        m.sync_items("latents", files, {}, False, {})
        r = m.sync_items("latents", files[:1], {}, False, {}, unlisted=("locked",))
        assert r.removed == 0 and [row.key for row in m.items("latents")] == ["a", "locked/b", "locked/c"]
        r = m.sync_items("latents", files[:1], {}, False, {})
        assert r.removed == 2
