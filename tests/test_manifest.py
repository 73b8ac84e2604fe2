"""manifest: index sync, atomic shard commits, fingerprints, source comparison, the writer lock."""

from __future__ import annotations

import os
import sqlite3

import pytest

from cachebuild.cache.files import ShardInfo
from cachebuild.cache.manifest import DONE, FAILED, MANIFEST_NAME, PENDING, Manifest, SourceFile, same_source
from cachebuild.errors import CacheError

STORE = "latents"
FP = {"vae": {"weights_sha256": "abc"}, "crop": "center"}


def sf(key: str, size: int = 100, mtime: int = 1_000, sha: str | None = None, ext: str = ".jpg") -> SourceFile:
    return SourceFile(key, key + ext, size, mtime, sha)


def statuses(m: Manifest, store: str = STORE) -> dict[str, str]:
    return {r.key: r.status for r in m.items(store)}


def shard(name: str, keys: list[str]) -> ShardInfo:
    return ShardInfo(name, tuple(keys), 1234, "f" * 64)


def done_rows(keys: list[str]) -> list[tuple[str, str | None, dict]]:
    return [(k, "64x48", {"crop": [0, 1]}) for k in keys]


@pytest.fixture
def m(tmp_path):
    with Manifest.open(tmp_path / "cache") as manifest:
        yield manifest


def test_open_creates_and_reopens(tmp_path):
    with pytest.raises(CacheError, match="not a cachebuild cache"):
        Manifest.open(tmp_path / "nope", create=False)
    assert not (tmp_path / "nope").exists()
    with Manifest.open(tmp_path / "c") as m:
        m.sync_items(STORE, [sf("a")], {}, False, FP)
    assert (tmp_path / "c" / MANIFEST_NAME).is_file()
    with Manifest.open(tmp_path / "c", create=False) as m:
        assert statuses(m) == {"a": PENDING}


def test_open_refuses_a_newer_schema(tmp_path):
    with Manifest.open(tmp_path):
        pass
    conn = sqlite3.connect(tmp_path / MANIFEST_NAME)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(CacheError, match="newer cachebuild"):
        Manifest.open(tmp_path)


def test_sync_new_changed_removed(m):
    r = m.sync_items(STORE, [sf("a"), sf("b"), sf("c")], {}, False, FP)
    assert (r.new, r.changed, r.removed, r.retried) == (3, 0, 0, 0)
    assert statuses(m) == {"a": PENDING, "b": PENDING, "c": PENDING}

    m.commit_shard(STORE, shard("shard-00000.safetensors", ["a", "b", "c"]), done_rows(["a", "b", "c"]))
    assert statuses(m) == {"a": DONE, "b": DONE, "c": DONE}

    # nothing changed: nothing to do
    r = m.sync_items(STORE, [sf("a"), sf("b"), sf("c")], {}, False, FP)
    assert (r.new, r.changed, r.removed, r.retried) == (0, 0, 0, 0)
    assert statuses(m) == {"a": DONE, "b": DONE, "c": DONE}

    # b edited (mtime), c deleted, d added
    r = m.sync_items(STORE, [sf("a"), sf("b", mtime=2_000), sf("d")], {}, False, FP)
    assert (r.new, r.changed, r.removed, r.retried) == (1, 1, 1, 0)
    assert statuses(m) == {"a": DONE, "b": PENDING, "d": PENDING}
    b = {r.key: r for r in m.items(STORE)}["b"]
    assert b.shard is None and b.bucket is None and b.info == {}


def test_sync_changed_by_size_and_by_path(m):
    m.sync_items(STORE, [sf("a"), sf("b")], {}, False, FP)
    m.commit_shard(STORE, shard("s0", ["a", "b"]), done_rows(["a", "b"]))
    r = m.sync_items(STORE, [sf("a", size=101), sf("b", ext=".png")], {}, False, FP)
    assert r.changed == 2
    rows = {r.key: r for r in m.items(STORE)}
    assert rows["a"].status == rows["b"].status == PENDING
    assert rows["b"].path == "b.png"


def test_sync_retry_failed(m):
    m.sync_items(STORE, [sf("a"), sf("b"), sf("c")], {}, False, FP)
    m.mark_failed(STORE, [("a", "file is truncated"), ("b", "not an image")])
    m.commit_shard(STORE, shard("s0", ["c"]), done_rows(["c"]))
    rows = {r.key: r for r in m.items(STORE)}
    assert rows["a"].status == FAILED and rows["a"].reason == "file is truncated"

    r = m.sync_items(STORE, [sf("a"), sf("b"), sf("c")], {}, False, FP)
    assert r.retried == 0
    assert statuses(m) == {"a": FAILED, "b": FAILED, "c": DONE}

    r = m.sync_items(STORE, [sf("a"), sf("b"), sf("c")], {}, True, FP)
    assert (r.new, r.changed, r.removed, r.retried) == (0, 0, 0, 2)
    rows = {r.key: r for r in m.items(STORE)}
    assert statuses(m) == {"a": PENDING, "b": PENDING, "c": DONE}
    assert rows["a"].reason is None


def test_failed_item_whose_source_changed_is_pending_again(m):
    m.sync_items(STORE, [sf("a")], {}, False, FP)
    m.mark_failed(STORE, [("a", "file is truncated")])
    r = m.sync_items(STORE, [sf("a", size=5000)], {}, False, FP)
    assert r.changed == 1 and statuses(m) == {"a": PENDING}


def test_clash_rows_fail_with_a_reason_naming_the_files(m):
    clashes = {"a": ["a.jpg", "a.png"]}
    r = m.sync_items(STORE, [sf("a"), sf("b")], clashes, False, FP)
    assert r.new == 1
    rows = {r.key: r for r in m.items(STORE)}
    assert rows["a"].status == FAILED
    assert "a.jpg" in rows["a"].reason and "a.png" in rows["a"].reason
    assert rows["b"].status == PENDING
    # a clash stays failed even with --retry-failed while both files exist
    m.sync_items(STORE, [sf("a"), sf("b")], clashes, True, FP)
    assert statuses(m)["a"] == FAILED


def test_clash_on_a_done_item_fails_it(m):
    m.sync_items(STORE, [sf("a")], {}, False, FP)
    m.commit_shard(STORE, shard("s0", ["a"]), done_rows(["a"]))
    m.sync_items(STORE, [sf("a")], {"a": ["a.jpg", "a.png"]}, False, FP)
    row = m.items(STORE)[0]
    assert row.status == FAILED and row.shard is None


def test_resolved_clash_is_encoded_again(m):
    m.sync_items(STORE, [sf("a")], {"a": ["a.jpg", "a.png"]}, False, FP)
    assert statuses(m) == {"a": FAILED}
    m.sync_items(STORE, [sf("a")], {}, False, FP)  # the user renamed a.png away, as the reason told them
    row = m.items(STORE)[0]
    assert row.status == PENDING, row.reason


def test_sync_records_the_fingerprint(m):
    assert m.fingerprint(STORE) is None
    m.sync_items(STORE, [sf("a")], {}, False, FP)
    assert m.fingerprint(STORE) == FP
    assert m.fingerprint("textenc") is None


def test_fingerprint_set_get_per_store(m):
    m.set_fingerprint(STORE, {"b": 2, "a": [1, 2]})
    m.set_fingerprint("textenc", {"t": True})
    assert m.fingerprint(STORE) == {"a": [1, 2], "b": 2}
    assert m.fingerprint("textenc") == {"t": True}
    m.set_fingerprint(STORE, {"c": None})
    assert m.fingerprint(STORE) == {"c": None}


def test_meta_set_get(m):
    assert m.get_meta("x") is None
    m.set_meta("x", {"n": 1})
    assert m.get_meta("x") == {"n": 1}


def test_commit_shard_marks_items_done_and_records_the_shard(m):
    m.sync_items(STORE, [sf("a"), sf("b"), sf("c")], {}, False, FP)
    m.commit_shard(STORE, ShardInfo("shard-00000.safetensors", ("a", "b"), 999, "ab" * 32), done_rows(["a", "b"]))
    rows = {r.key: r for r in m.items(STORE)}
    assert rows["a"].status == DONE and rows["a"].shard == "shard-00000.safetensors"
    assert rows["a"].bucket == "64x48" and rows["a"].info == {"crop": [0, 1]}
    assert rows["c"].status == PENDING and rows["c"].shard is None
    assert m.shards(STORE) == [{"name": "shard-00000.safetensors", "items": 2, "bytes": 999, "sha256": "ab" * 32}]
    assert [r.key for r in m.items(STORE, DONE)] == ["a", "b"]
    assert [r.key for r in m.items(STORE, PENDING)] == ["c"]


def test_commit_shard_is_atomic(m):
    m.sync_items(STORE, [sf("a"), sf("b")], {}, False, FP)
    rows = [("a", "64x48", {"ok": 1}), ("b", "64x48", {"bad": object()})]  # not JSON: fails mid-transaction
    with pytest.raises(TypeError):
        m.commit_shard(STORE, shard("shard-00000.safetensors", ["a", "b"]), rows)
    assert m.shards(STORE) == []
    assert statuses(m) == {"a": PENDING, "b": PENDING}
    # and the connection is usable afterwards
    m.commit_shard(STORE, shard("shard-00000.safetensors", ["a", "b"]), done_rows(["a", "b"]))
    assert statuses(m) == {"a": DONE, "b": DONE}


def test_transaction_rolls_back_on_any_exception(m):
    m.sync_items(STORE, [sf("a")], {}, False, FP)
    with pytest.raises(KeyboardInterrupt), m.transaction() as c:
        c.execute("UPDATE items SET status=? WHERE key='a'", (DONE,))
        c.execute("INSERT INTO shards VALUES (?,?,?,?,?,?)", (STORE, "s0", 1, 1, "x", 0.0))
        raise KeyboardInterrupt
    assert statuses(m) == {"a": PENDING} and m.shards(STORE) == []


def test_commit_is_visible_to_another_connection(tmp_path):
    with Manifest.open(tmp_path) as writer:
        writer.sync_items(STORE, [sf("a")], {}, False, FP)
        writer.commit_shard(STORE, shard("s0", ["a"]), done_rows(["a"]))
        with Manifest.open(tmp_path, create=False) as reader:
            assert statuses(reader) == {"a": DONE}
            assert [s["name"] for s in reader.shards(STORE)] == ["s0"]


def test_stores_are_independent(m):
    m.sync_items(STORE, [sf("a"), sf("b")], {}, False, FP)
    r = m.sync_items("textenc", [sf("b")], {}, False, {"t": 1})
    assert r.new == 1
    assert statuses(m) == {"a": PENDING, "b": PENDING}
    assert statuses(m, "textenc") == {"b": PENDING}
    assert m.clear_store("textenc") == []
    assert statuses(m, "textenc") == {} and m.fingerprint("textenc") is None
    assert statuses(m) == {"a": PENDING, "b": PENDING} and m.fingerprint(STORE) == FP


def test_clear_store_returns_its_shards(m):
    m.sync_items(STORE, [sf("a"), sf("b")], {}, False, FP)
    m.commit_shard(STORE, shard("s0", ["a"]), done_rows(["a"]))
    m.commit_shard(STORE, shard("s1", ["b"]), done_rows(["b"]))
    assert sorted(m.clear_store(STORE)) == ["s0", "s1"]
    assert m.items(STORE) == [] and m.shards(STORE) == [] and m.fingerprint(STORE) is None


@pytest.mark.parametrize(
    "old,new,same",
    [
        (None, "10:5", False),
        ("10:5", "10:5", True),
        ("10:5", "10:6", False),  # touched: without hashes, mtime decides
        ("10:5", "11:5", False),
        ("10:5:aa", "10:9:aa", True),  # hashes on both sides: a touched file is the same content
        ("10:5:aa", "10:5:bb", False),  # same stat, different content
        ("10:5:aa", "11:5:aa", False),  # size differs
        ("10:5", "10:5:aa", True),  # hash on one side only: size and mtime decide
        ("10:5:aa", "10:5", True),
        ("10:5", "10:6:aa", False),
        ("10:5:aa", "10:6", False),
    ],
)
def test_same_source(old, new, same):
    assert same_source(old, new) is same


def test_touched_file_with_hashes_is_not_reencoded(m):
    m.sync_items(STORE, [sf("a", sha="aa")], {}, False, FP)
    m.commit_shard(STORE, shard("s0", ["a"]), done_rows(["a"]))
    r = m.sync_items(STORE, [sf("a", mtime=9_999, sha="aa")], {}, False, FP)
    assert r.changed == 0 and statuses(m) == {"a": DONE}
    r = m.sync_items(STORE, [sf("a", mtime=9_999, sha="bb")], {}, False, FP)
    assert r.changed == 1 and statuses(m) == {"a": PENDING}


def test_second_lock_on_the_same_folder_names_the_holder(tmp_path):
    first = Manifest.open(tmp_path)
    first.lock()
    second = Manifest.open(tmp_path)
    try:
        with pytest.raises(CacheError) as info:
            second.lock()
        message = str(info.value)
        assert f"pid {os.getpid()}" in message
        assert str(tmp_path) in message and "--out" in message
    finally:
        second.close()
        first.close()
    # released on close: a new writer may take it
    third = Manifest.open(tmp_path)
    try:
        third.lock()
    finally:
        third.close()


def test_drop_dead_shards(m):
    m.sync_items(STORE, [sf("a"), sf("b"), sf("c")], {}, False, FP)
    m.commit_shard(STORE, shard("s0", ["a", "b"]), done_rows(["a", "b"]))
    m.commit_shard(STORE, shard("s1", ["c"]), done_rows(["c"]))
    assert m.drop_dead_shards(STORE) == []
    m.sync_items(STORE, [sf("a"), sf("b", mtime=5), sf("c", mtime=5)], {}, False, FP)  # b and c changed
    assert m.drop_dead_shards(STORE) == ["s1"]  # s0 still holds a
    assert [s["name"] for s in m.shards(STORE)] == ["s0"]
    m.sync_items(STORE, [sf("b", mtime=5), sf("c", mtime=5)], {}, False, FP)  # a removed
    assert m.drop_dead_shards(STORE) == ["s0"]
    assert m.shards(STORE) == []


def test_counts_and_bucket_counts(m):
    assert m.counts(STORE) == {DONE: 0, FAILED: 0, PENDING: 0}
    assert list(m.counts(STORE)) == [DONE, FAILED, PENDING]
    keys = [f"k{i}" for i in range(7)]
    m.sync_items(STORE, [sf(k) for k in keys], {}, False, FP)
    m.commit_shard(
        STORE,
        shard("s0", keys[:4]),
        [("k0", "1024x1024", {}), ("k1", "128x64", {}), ("k2", "1024x1024", {}), ("k3", "960x1024", {})],
    )
    m.mark_failed(STORE, [("k4", "bad")])
    assert m.counts(STORE) == {DONE: 4, FAILED: 1, PENDING: 2}
    buckets = m.bucket_counts(STORE)
    assert buckets == {"128x64": 1, "960x1024": 1, "1024x1024": 2}
    assert list(buckets) == ["128x64", "960x1024", "1024x1024"]  # numeric order, not string order


def test_remembered_hash_follows_the_file_stat(m, tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"1234")
    assert m.remembered_hash(weights) is None
    m.remember_hash(weights, "deadbeef")
    assert m.remembered_hash(weights) == "deadbeef"
    weights.write_bytes(b"12345")
    assert m.remembered_hash(weights) is None


def test_item_pages_walk_one_status_in_key_order_while_the_caller_commits(m):
    keys = [f"k{i:02d}" for i in range(10)]
    m.sync_items(STORE, [sf(k) for k in keys], {}, False, FP)
    m.mark_failed(STORE, [("k03", "bad")])
    seen = []
    for i, page in enumerate(m.item_pages(STORE, PENDING, 4)):
        assert len(page) <= 4
        read = [r.key for r in page]
        seen += read
        # committing what was read must not repeat or skip anything ahead of the cursor
        m.commit_shard(STORE, shard(f"shard-{i:05d}.safetensors", read), done_rows(read))
    assert seen == [k for k in keys if k != "k03"]
    assert list(m.item_pages(STORE, PENDING, 4)) == []


def test_done_by_info_finds_the_first_done_item_per_value(m):
    m.sync_items(STORE, [sf(k) for k in ("a", "b", "c", "d")], {}, False, FP)
    rows = [("b", None, {"text_id": "t1"}), ("a", None, {"text_id": "t1", "n": 0}), ("c", None, {"text_id": "t2"})]
    m.commit_shard(STORE, shard("shard-00000.safetensors", ["a", "b", "c"]), rows)
    found = m.done_by_info(STORE, "text_id", ["t1", "t3"])
    assert found == {"t1": ("shard-00000.safetensors", {"text_id": "t1", "n": 0})}  # "a" sorts first
    assert m.done_by_info(STORE, "text_id", []) == {}
