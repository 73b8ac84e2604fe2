"""Verify a cache against its manifest, and optionally repair it so the next build re-encodes what is damaged.

Checks, for every store in the cache (``latents``, ``textenc``, ``control``):
  * every registered shard exists, has the recorded size and SHA-256;
  * every done item names a registered shard, and that shard holds the item's tensors with the shape and
    dtype its record implies (latents: ``(C, H/f, W/f)`` of its bucket, a clip's ``(C, F', H/f, W/f)`` of its
    bucket and frame count, in ``dtype_out``);
  * no tensor holds NaN or Inf;
  * files the manifest does not name are listed, never as problems: leftovers of an interrupted run (``.tmp``
    files, and shards a run of this manifest claimed and never committed, ``cache.claims``), and unnamed shards
    (no run of this manifest wrote them: a lost manifest's, another cache's), which nothing deletes.

``repair=True`` takes the cache's writer lock, marks every damaged item pending (its shard link cleared),
forgets and deletes shards no done item needs any more, and deletes the leftovers; the next
``cachebuild latents`` (or ``textenc``) run with the same settings then encodes exactly those items.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cachebuild.cache.claims import claimed
from cachebuild.cache.files import TMP_SUFFIX, sha256_file, shard_index
from cachebuild.cache.manifest import DONE, Manifest
from cachebuild.cache.shards import ShardFile
from cachebuild.config import DType
from cachebuild.errors import ConfigError
from cachebuild.families.i2v import expected_shapes
from cachebuild.families.rows import stored_rows
from cachebuild.storage import is_url

if TYPE_CHECKING:  # torch is imported when the first tensor is checked: a checksum-only pass needs none
    import torch

log = logging.getLogger(__name__)

STORES = ("latents", "textenc", "control")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a cache, for a person to read."""

    store: str
    message: str
    key: str | None = None  # the damaged item, when the problem is an item's
    shard: str | None = None


@dataclass
class VerifyReport:
    """What :func:`verify_cache` checked and found; ``ok`` when nothing is wrong."""

    cache: str
    stores: list[str] = field(default_factory=list)
    items_checked: int = 0
    shards_checked: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    repaired_items: int = 0  # items marked pending by --repair
    removed_files: list[str] = field(default_factory=list)  # shard files deleted by --repair
    leftovers: list[str] = field(default_factory=list)  # an interrupted run's files: --repair or a build deletes them
    unnamed: list[str] = field(default_factory=list)  # shards no run of this manifest wrote: kept (cache.claims)
    repaired: bool = False  # --repair queued every damaged item and removed every bad or stray file
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def damaged_keys(self) -> dict[str, list[str]]:
        """Damaged item keys per store, sorted."""
        out: dict[str, set[str]] = {}
        for p in self.problems:
            if p.key is not None:
                out.setdefault(p.store, set()).add(p.key)
        return {s: sorted(k) for s, k in out.items()}

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok, "damaged_keys": self.damaged_keys}


def verify_cache(path: str | os.PathLike, repair: bool = False) -> VerifyReport:
    """Check every shard and item of the cache at ``path``; with ``repair``, queue damaged items again.

    Raises:
        CacheError: ``path`` is not a cache, or (with ``repair``) a build is writing to it.

    Example:
        >>> report = verify_cache("./cache")
        >>> report.ok, report.damaged_keys
        (False, {'latents': ['sub/img001']})
    """
    if is_url(path):  # shards are read from local disk: a cache at a URL is not checked in place
        raise ConfigError(
            f"verify reads shards on local disk; copy {path} to a folder first (e.g. aws s3 sync), verify that, or "
            f"run: cachebuild status {path}"
        )
    start = time.monotonic()
    root = Path(path)
    report = VerifyReport(str(root))
    with Manifest.open(root, create=False, read_only=not repair) as manifest:  # a plain check writes nothing
        if repair:
            manifest.lock()  # no build may commit while items are re-queued
        for store in STORES:
            fingerprint = manifest.fingerprint(store)
            if fingerprint is None:
                continue
            report.stores.append(store)
            _verify_store(manifest, store, fingerprint, report)
            if repair:
                _repair_store(manifest, store, report)
        report.repaired = repair
    report.seconds = time.monotonic() - start
    return report


def _verify_store(manifest: Manifest, store: str, fingerprint: dict, report: VerifyReport) -> None:
    folder = manifest.root / store
    shards = {s["name"]: s for s in manifest.shards(store)}
    items = manifest.items(store, DONE)
    report.items_checked += len(items)
    by_shard: dict[str, list] = {}
    for row in items:
        if row.shard not in shards:
            report.problems.append(Problem(store, f"done, but its shard {row.shard!r} is not registered", row.key))
        else:
            by_shard.setdefault(row.shard, []).append(row)
    for name, shard in shards.items():
        rows = by_shard.get(name, [])
        report.shards_checked += 1
        trouble = _check_file(folder / name, shard)
        if trouble:
            report.problems.append(Problem(store, trouble, shard=name))
            report.problems += [Problem(store, f"in damaged shard {name}", r.key, name) for r in rows]
            continue
        report.bytes_checked += shard["bytes"]
        report.problems += _check_tensors(folder / name, store, fingerprint, rows)
    if folder.is_dir():
        ours = claimed(manifest, store)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name in shards:
                continue
            if entry.name.endswith(TMP_SUFFIX) or ours(entry.name):  # harmless: the next build (or --repair) deletes it
                report.leftovers.append(f"{store}/{entry.name}")
            elif shard_index(entry.name) is not None:  # not proven ours: never deleted
                report.unnamed.append(f"{store}/{entry.name}")


def _check_file(path: Path, shard: dict) -> str | None:
    if not path.is_file():
        return "shard file is missing"
    size = path.stat().st_size
    if size != shard["bytes"]:
        return f"shard file is {size} bytes, the manifest recorded {shard['bytes']} (truncated or overwritten)"
    if sha256_file(path) != shard["sha256"]:
        return "shard checksum (SHA-256) differs from the manifest: the file was altered or corrupted"
    return None


def _check_tensors(path: Path, store: str, fingerprint: dict, rows: list) -> list[Problem]:
    problems = []
    try:
        shard = ShardFile.open(path)
    except Exception as exc:  # an unreadable file with the right checksum: a writer bug, still reported per item
        return [Problem(store, f"shard cannot be read: {exc}", r.key, path.name) for r in rows]
    with shard:
        for row in rows:
            entry = row.info.get("text_id", row.key)  # text items point at a shared caption entry
            for name, shape in _expected(store, fingerprint, row.info).items():
                full = f"{entry}/{name}"
                if not shard.has(full):
                    problems.append(Problem(store, f"tensor {full} is missing from the shard", row.key, path.name))
                    continue
                problems += _check_one(shard.get(full), full, shape, fingerprint, store, row.key, path.name)
    return problems


def _check_one(t: torch.Tensor, name: str, shape, fingerprint: dict, store: str, key: str, shard: str):
    import torch

    found = []
    stored = fingerprint.get("dtype_out")
    want_dtype = DType(stored).torch if stored in ("fp32", "fp16", "bf16") else None
    if name.endswith("/alpha_mask"):  # --alpha-mask: the alpha channel itself, 0..255
        want_dtype = torch.uint8
    if want_dtype is not None and t.dtype != want_dtype:
        found.append(Problem(store, f"{name} is {t.dtype}, expected {want_dtype}", key, shard))
    if shape is not None and tuple(t.shape) != tuple(shape):
        found.append(Problem(store, f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}", key, shard))
    if t.is_floating_point() and not torch.isfinite(t).all():
        found.append(Problem(store, f"{name} holds NaN or Inf", key, shard))
    return found


def _expected(store: str, fingerprint: dict, info: dict) -> dict[str, tuple | None]:
    """Tensor name -> expected shape (None: any) for one item's record."""
    if store in ("latents", "control"):  # control: flux-kontext's condition latents at their own (W, H)
        vae = fingerprint.get("vae", {})
        c, f = vae.get("latent_channels"), vae.get("downsample")
        w, h = info["bucket"]
        shape = (c, h // f, w // f) if c and f else None
        if shape is not None and "frames" in info:  # a clip of a video VAE: (C, F', h, w), F' = 1 + (F - 1) / t
            shape = (c, 1 + (info["frames"] - 1) // vae.get("temporal_downsample", 1), *shape[1:])
        if store == "control" and "kind" in fingerprint.get("condition", {}):  # image-to-video conditions
            return expected_shapes(fingerprint, info)
        if store == "control":
            return {"control_latents": shape}
        # raw latents as the VAE returns them, (C, H/f, W/f) for every class (a 3D VAE's one frame squeezed out;
        # Flux.2's 2x2 patches are made on reading); moments only exist for VAEs with a posterior
        if fingerprint.get("latents") == "moments" and vae.get("class", "AutoencoderKL") != "AutoencoderTiny":
            names = ["mean", "std"]
        else:
            names = ["latents"]
        names += [n + "_flipped" for n in names] if info.get("flip") else []
        mask = {"alpha_mask": (h, w)} if fingerprint.get("alpha_mask") else {}  # pixels, the bucket's size
        return dict.fromkeys(names, shape) | mask
    out: dict[str, tuple | None] = {}
    for enc in fingerprint.get("encoders", []):
        if enc.get("hidden"):
            rows = info.get("tokens", {}).get(enc["name"]) if enc.get("trim") else enc.get("max_length")
            if enc.get("max_length") == 0:  # no length limit (qwen-image-edit): the item's info has its rows
                rows = info.get("tokens", {}).get(enc["name"])
            elif rows is not None and enc.get("trim"):
                rows = _trimmed_rows(enc, rows)
            out[enc["name"]] = None if rows is None else (rows, _ANY)
            if rows is not None and enc.get("all_layers"):  # HiDream's Llama: (layers, L, D)
                out[enc["name"]] = (_ANY, rows, _ANY)
        if enc.get("pooled"):
            out[f"{enc['name']}_pooled"] = None
    return out | dict.fromkeys(fingerprint.get("extra_tensors", []))  # stored beside them, any shape


def _trimmed_rows(enc: dict, tokens: int) -> int:
    """Rows a trimmed encoder stored for ``tokens`` real tokens, from its fingerprint."""
    return stored_rows(
        tokens, enc["max_length"], enc.get("extra_rows", 0), enc.get("drop_rows", 0), enc.get("window", 0)
    )


class _AnyDim:
    """Matches any size in an expected shape (a hidden width the fingerprint does not record)."""

    def __eq__(self, other) -> bool:
        return True

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "*"


_ANY = _AnyDim()


def _repair_store(manifest: Manifest, store: str, report: VerifyReport) -> None:
    damaged = report.damaged_keys.get(store, [])
    report.repaired_items += manifest.requeue_items(store, damaged)
    folder = manifest.root / store
    doomed = manifest.drop_dead_shards(store)  # shards no done item needs any more, damaged ones included
    doomed += [p.shard for p in report.problems if p.store == store and p.key is None and p.shard not in doomed]
    doomed += [name.split("/", 1)[1] for name in report.leftovers if name.startswith(f"{store}/")]
    known = {s["name"] for s in manifest.shards(store)}
    for name in dict.fromkeys(doomed):
        if name and name not in known and (folder / name).exists():
            (folder / name).unlink()
            report.removed_files.append(f"{store}/{name}")
    if damaged:
        log.info("%d %s item(s) marked pending; run the build command again to re-encode them", len(damaged), store)
