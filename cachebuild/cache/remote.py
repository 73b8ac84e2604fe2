"""A cache at a URL (``--out s3://bucket/cache/``): shards uploaded there, the manifest kept on local disk.

SQLite needs a local file, so a remote output has a local *manifest folder* (``--manifest-dir``, by default
``<user cache dir>/cachebuild/manifests/<name-and-hash of the URL>``; the user cache dir is
``$XDG_CACHE_HOME`` or ``~/.cache``). It holds ``manifest.sqlite`` (the truth, as for a local cache), the
writer lock, and each shard while it is written. The order of events keeps the promises of a local cache:

1. a shard is written durably in the manifest folder, as for a local cache;
2. it is uploaded under a temporary name (``<shard>.<random>.tmp``), moved to its real name, and the local
   copy deleted (``upload_shard``);
3. only then does the manifest commit it with its items;
4. after commits (at most every ``SNAPSHOT_MIN_SECONDS``) and at the end of the run, a snapshot of the
   manifest (SQLite's backup API, so it is consistent) is uploaded under a temporary name and moved to
   ``<out>/manifest.sqlite`` (``publish``). A snapshot is taken after the commits it holds, and every shard
   it names was uploaded before its commit, so a published snapshot never names a shard that is not there.
5. shards nothing needs any more are deleted remotely only after a snapshot without them is published.

A killed run resumes with the same command: leftover temporary uploads and uploaded shards that a run of the
manifest claimed and never committed (``cache.claims``) are deleted, and the pending items encoded; other shards
the manifest does not name are kept. Without a local manifest (another machine, a cleared cache folder) the
published snapshot is downloaded first and the run goes on from there; shards committed after that snapshot
are then uncommitted leftovers of the snapshot's run, deleted and encoded again. Without a local manifest and
without a snapshot, a URL that holds shards is refused. One writer per output URL.

Readers (``open_cache("s3://...")``, ``cachebuild status s3://...``) download the published snapshot into
``<user cache dir>/cachebuild/remote/<name-and-hash>/`` and fetch each shard there on first use, under a name
that carries its checksum, so a reader never mixes up two versions of a shard name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from cachebuild.cache.claims import lost_manifest_message, refuse_lost_manifest
from cachebuild.cache.files import TMP_SUFFIX, ShardInfo, shard_index, write_durably
from cachebuild.cache.manifest import MANIFEST_NAME, STORES, Manifest
from cachebuild.errors import CachebuildError, CacheError, ConfigError, StorageError
from cachebuild.storage import UrlPath, filesystem, is_url

log = logging.getLogger(__name__)

SNAPSHOT_MIN_SECONDS = 30.0  # publish the manifest snapshot at most this often during a run: each publish
# uploads the whole manifest (about 320 bytes an item), so a run of many small shards does not spend its
# bandwidth on snapshots, while a reader or a resume on another machine is at most this far behind
SNAPSHOT_TIME_SHARE = 0.05  # and spend at most this share of the run's time publishing: a manifest of millions
# of items takes long to copy and upload, so the interval grows to 20 times the last publish's duration
CACHE_DIR_ENV = "XDG_CACHE_HOME"
PUBLISHED_NAME = "published.json"  # in the manifest folder: the identity of this manifest's last published
# snapshot, so a run never goes on from a local manifest that another writer's snapshot has overtaken


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cachebuild`` or ``~/.cache/cachebuild``: local manifests and fetched shards."""
    base = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cachebuild"


def local_folder_for(url: UrlPath, kind: str) -> Path:
    """A local folder for ``url``: readable prefix, plus a hash so that two URLs never share one."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", url.url.split("://", 1)[1]).strip("-")[:48]
    return user_cache_dir() / kind / f"{slug}-{hashlib.sha256(url.url.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def open_output(out, manifest_dir: Path | None = None) -> Iterator[Manifest]:
    """The writable manifest of the cache at ``out``: as ``Manifest.open(out)`` for a local folder; for a URL
    the local manifest in ``manifest_dir`` (restored from the published snapshot when missing), with shard
    uploads and snapshot publishing attached (``manifest.remote``), and a final snapshot published when the
    run ends without an error.
    """
    if not is_url(out):
        refuse_lost_manifest(Path(out))  # shards without their manifest are never taken for leftovers
        with Manifest.open(out) as manifest:
            yield manifest
        return
    remote = RemoteOutput(out if isinstance(out, UrlPath) else UrlPath(out), manifest_dir)
    remote.restore()
    with Manifest.open(remote.local) as manifest:
        manifest.remote = remote
        remote.manifest = manifest
        yield manifest
        remote.publish_if_changed()


def committed_since(out, manifest_dir: Path | None, store: str, since: float) -> int:
    """Items of ``store`` committed at or after Unix time ``since`` in the manifest that ``open_output`` opens
    (read-only; 0 where there is none yet)."""
    root = Path(out) if not is_url(out) else RemoteOutput(UrlPath(str(out)), manifest_dir).local
    try:
        with Manifest.open(root, create=False, read_only=True) as manifest:
            return manifest.done_since(store, since)
    except CachebuildError:
        return 0


class RemoteOutput:
    """Uploads and the published snapshot of one remote output; ``Manifest.remote`` while a job runs."""

    def __init__(self, out: UrlPath, manifest_dir: Path | None = None):
        self.out = out
        self.local = Path(manifest_dir) if manifest_dir is not None else local_folder_for(out, "manifests")
        self.manifest: Manifest | None = None
        self._published_at = 0.0  # time.monotonic() of the last publish; 0: none in this run
        self._published_changes = 0  # the connection's total_changes at the last publish
        self._publish_seconds = 0.0  # how long the last publish took
        self._needs_publish = False  # the snapshot is missing remotely: publish even if nothing changes

    # -- shards ----------------------------------------------------------------------------------------
    def upload_shard(self, store: str, info: ShardInfo) -> None:
        """Upload a durable local shard under a temporary name, move it to its name, delete the local copy."""
        local = self.local / store / info.name
        final = f"{self._base()}/{store}/{info.name}"
        with self._errors(f"uploading {info.name}"):
            fs = self.out.fs
            tmp = f"{final}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
            fs.put_file(str(local), tmp)
            fs.mv(tmp, final)
        local.unlink(missing_ok=True)

    def committed(self) -> None:
        """After a shard's commit: publish the snapshot when the last publish is old enough."""
        interval = max(SNAPSHOT_MIN_SECONDS, self._publish_seconds / SNAPSHOT_TIME_SHARE)
        if time.monotonic() - self._published_at >= interval:
            self.publish()

    def clean(self, store: str, known: set[str], ours) -> tuple[set[str], list[str]]:
        """Delete temporary uploads and the shards ``ours(name)`` proves this manifest's runs uploaded and never
        committed (``cache.claims``); return the known names present and the other unknown shards, kept."""
        folder = f"{self._base()}/{store}"
        with self._errors(f"listing {self.out}/{store}"):
            fs = self.out.fs
            fs.invalidate_cache(folder)
            try:
                names = [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
            except FileNotFoundError:
                names = []
            present, foreign = set(), []
            for name in names:
                if name.endswith(TMP_SUFFIX) or (name not in known and ours(name)):
                    log.info("removing %s/%s left by an interrupted run", folder, name)
                    fs.rm_file(f"{folder}/{name}")
                elif name in known:
                    present.add(name)
                elif shard_index(name) is not None:
                    foreign.append(name)
        return present, foreign

    def drop(self, store: str, names: list[str]) -> None:
        """Delete shards nothing points at, after publishing a snapshot that no longer names them."""
        if not names:
            return
        self.publish()
        with self._errors(f"deleting unused shards of {self.out}/{store}"):
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    self.out.fs.rm_file(f"{self._base()}/{store}/{name}")

    # -- the manifest snapshot -------------------------------------------------------------------------
    def restore(self) -> None:
        """No local manifest: start from the published snapshot, if there is one. With a local manifest,
        check that the published snapshot is this manifest's own last publish.

        Raises:
            ConfigError: the snapshot was published from another local manifest (another machine, another
                ``--manifest-dir``): going on would delete the shards that manifest committed.
        """
        path = self.local / MANIFEST_NAME
        if path.exists():
            self._needs_publish = not self._snapshot_exists()
            if not self._needs_publish:
                self._check_own_snapshot()
            return
        self.local.mkdir(parents=True, exist_ok=True)
        for side in ("-wal", "-shm"):  # side files of a manifest that is gone would not belong to the snapshot
            (self.local / (MANIFEST_NAME + side)).unlink(missing_ok=True)
        if not self._snapshot_exists():
            self._refuse_unindexed_shards()
            self._needs_publish = True
            return
        log.warning("no local manifest in %s; starting from the snapshot published at %s", self.local, self.out)
        download_snapshot(self.out, path)
        self._write_state(self._snapshot_key(), in_flight=False)

    def publish(self) -> None:
        """Upload a consistent copy of the manifest beside the shards: temporary name, then move."""
        assert self.manifest is not None
        start = time.monotonic()
        tmp_local = self.local / f"{MANIFEST_NAME}.publish{TMP_SUFFIX}"
        tmp_local.unlink(missing_ok=True)
        dst = sqlite3.connect(tmp_local)
        try:
            self.manifest.conn.backup(dst)  # one consistent state, whatever the writer does next
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
        finally:
            dst.close()
        final = f"{self._base()}/{MANIFEST_NAME}"
        state = self._read_state()
        self._write_state(state.get("key") if state else None, in_flight=True)  # a crash in between: ours
        with self._errors("publishing the manifest snapshot"):
            fs = self.out.fs
            tmp = f"{final}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
            fs.put_file(str(tmp_local), tmp)
            fs.mv(tmp, final)
            self._write_state(self._snapshot_key(), in_flight=False)
        tmp_local.unlink(missing_ok=True)
        self._published_at = time.monotonic()
        self._publish_seconds = self._published_at - start
        self._published_changes = self.manifest.conn.total_changes
        self._needs_publish = False

    @contextlib.contextmanager
    def publishing_from(self, manifest: Manifest):
        """Upload and publish from ``manifest``, another connection to the same file, for the duration of the
        block (a writer thread's: SQLite connections stay in their thread); then back to the first one, which
        counts the snapshot as current if it made no change of its own meanwhile."""
        owner, before = self.manifest, self.manifest.conn.total_changes
        manifest.remote, self.manifest = self, manifest
        try:
            yield
        finally:
            current = self.manifest.conn.total_changes == self._published_changes and not self._needs_publish
            self.manifest, manifest.remote = owner, None
            if current and owner.conn.total_changes == before:
                self._published_changes = owner.conn.total_changes
            else:
                self._published_changes = -1  # publish at the end

    def publish_if_changed(self) -> None:
        """At the end of a run: publish unless nothing changed since the last publish (a finished cache's
        re-run uploads nothing)."""
        if self._needs_publish or self.manifest.conn.total_changes != self._published_changes:
            self.publish()

    # -- helpers ---------------------------------------------------------------------------------------
    def _refuse_unindexed_shards(self) -> None:
        """No local manifest and no published one: shards at ``out`` would have nothing to prove them ours."""
        count = 0
        with self._errors(f"listing {self.out}"):
            for store in STORES:
                try:
                    names = self.out.fs.ls(f"{self._base()}/{store}", detail=False)
                except FileNotFoundError:
                    continue
                tails = (n.rsplit("/", 1)[-1] for n in names)
                count += sum(shard_index(t) is not None and not t.endswith(TMP_SUFFIX) for t in tails)
        if count:
            fix = (
                "point --manifest-dir at the folder of the run that built it, or copy the cache to a folder and "
                "rebuild its manifest there with: cachebuild rebuild-manifest FOLDER"
            )
            raise CacheError(lost_manifest_message(f"{self.out} (local manifest folder {self.local})", count, fix))

    def _base(self) -> str:
        return self.out.path.rstrip("/")

    def _check_own_snapshot(self) -> None:
        state = self._read_state()
        if state is not None and (state.get("in_flight") or state.get("key") == self._snapshot_key()):
            return
        raise ConfigError(
            f"the manifest snapshot at {self.out} was published from another local manifest than the one in "
            f"{self.local} (another machine or --manifest-dir); to continue from the published snapshot, pass an "
            "empty --manifest-dir (or delete that folder)"
        )

    def _snapshot_key(self) -> str:
        """The published snapshot's identity as the store reports it (ETag, size and time)."""
        with self._errors(f"reading {self.out}"):
            fs = self.out.fs
            fs.invalidate_cache(self._base())
            return str(fs.ukey(f"{self._base()}/{MANIFEST_NAME}"))

    def _read_state(self) -> dict | None:
        try:
            return json.loads((self.local / PUBLISHED_NAME).read_text())
        except (OSError, ValueError):
            return None

    def _write_state(self, key: str | None, in_flight: bool) -> None:
        write_durably(self.local / PUBLISHED_NAME, json.dumps({"key": key, "in_flight": in_flight}).encode())

    def _snapshot_exists(self) -> bool:
        with self._errors(f"reading {self.out}"):
            fs = self.out.fs
            fs.invalidate_cache(self._base())
            return fs.exists(f"{self._base()}/{MANIFEST_NAME}")

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Any failure to reach the store as one clear line; committed shards and the snapshot stay valid."""
        try:
            yield
        except CachebuildError:
            raise
        except Exception as exc:  # network, credentials, permissions, a missing bucket
            raise StorageError(
                f"{what} at {self.out} failed ({type(exc).__name__}: {exc}); check the credentials, the endpoint "
                "and the bucket, then run the same command again: committed shards are kept"
            ) from exc


# -- reading ---------------------------------------------------------------------------------------------
def download_snapshot(out: UrlPath, dest: Path) -> None:
    """Download ``<out>/manifest.sqlite`` to ``dest`` (temporary name, then rename).

    Raises:
        CacheError: no snapshot there.
    """
    fs, base = filesystem(out.url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        fs.get_file(f"{base.rstrip('/')}/{MANIFEST_NAME}", str(tmp))
    except FileNotFoundError:
        tmp.unlink(missing_ok=True)
        raise CacheError(
            f"{out} holds no published manifest ({MANIFEST_NAME}); check the URL, or build a cache there with: "
            f"cachebuild latents DATASET --out {out}"
        ) from None
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise CacheError(
            f"cannot read {out}/{MANIFEST_NAME} ({type(exc).__name__}: {exc}); check the URL, the credentials and "
            "the endpoint in the environment (AWS_ENDPOINT_URL, AWS_PROFILE, ... for s3://)"
        ) from None
    for side in ("-wal", "-shm"):
        Path(str(dest) + side).unlink(missing_ok=True)
    os.replace(tmp, dest)


def mirror_snapshot(out: UrlPath) -> Path:
    """A local folder holding the latest published snapshot of ``out`` as its manifest (shards come later)."""
    folder = local_folder_for(out, "remote")
    download_snapshot(out, folder / MANIFEST_NAME)
    return folder


class ShardFetcher:
    """Local paths of one store's shards, each downloaded on first use (a temporary name, then renamed, so
    several DataLoader workers may fetch at once). Picklable: holds only text and paths."""

    def __init__(self, url: str, folder: Path, sha256: dict[str, str]):
        self.url, self.folder, self.sha256 = url.rstrip("/"), folder, sha256

    def __call__(self, name: str) -> Path:
        digest = self.sha256.get(name)
        path = self.folder / (f"{digest[:16]}-{name}" if digest else name)
        if path.exists():
            return path
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
        fs, inner = filesystem(f"{self.url}/{name}")
        try:
            fs.get_file(inner, str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def shard_fetchers(out: UrlPath, root: Path, stores: tuple[str, ...]) -> dict[str, ShardFetcher]:
    """A ``ShardFetcher`` per store of the snapshot mirrored in ``root``."""
    with Manifest.open(root, create=False, read_only=True) as manifest:
        digests = {store: {s["name"]: s["sha256"] for s in manifest.shards(store)} for store in stores}
    return {store: ShardFetcher(f"{out.url}/{store}", root / store, digests[store]) for store in stores}


def remote_bytes(out: UrlPath, store: str, names: set[str]) -> int:
    """Bytes of the named shards as the store lists them."""
    fs, base = filesystem(out.url)
    try:
        listing = fs.ls(f"{base.rstrip('/')}/{store}", detail=True)
    except FileNotFoundError:
        return 0
    return sum(int(e.get("size") or 0) for e in listing if e["name"].rsplit("/", 1)[-1] in names)
