"""Read a cache from Python: keyed records, a PyTorch dataset and a bucket-aware batch sampler.

Opening reads the index from the manifest in one query per store and touches no shard, so a cache of 100k
items opens in a fraction of a second. Shards (safetensors, memory-mapped; or HDF5) are opened on first use,
one handle per shard per process: handles are keyed by the process id, so a reader built before a
DataLoader forks its workers opens fresh handles in each worker instead of sharing the parent's. A shard is
checked against the manifest's size and SHA-256 before it is first opened (``consumers.handles``), and a
shard that cannot be read is reported with the item, the shard and ``cachebuild verify CACHE --repair``.

    cache = open_cache("./cache")
    loader = DataLoader(cache.dataset(scale=True), batch_sampler=cache.bucket_sampler(batch_size=8), num_workers=2)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from cachebuild.cache.manifest import CONTROL, LATENTS, TEXTENC, Manifest
from cachebuild.consumers.handles import ShardChecks, ShardDamaged, ShardFileHandles, memo_path

if TYPE_CHECKING:  # torch is imported when a tensor is read, not when a cache is opened
    import torch

    from cachebuild.consumers.dataset import LatentDataset
    from cachebuild.consumers.sampler import BucketBatchSampler
from cachebuild.errors import CacheError, ConfigError
from cachebuild.keys import split_clip_key
from cachebuild.storage import UrlPath, is_url

log = logging.getLogger(__name__)

CAPTION_SHARDS = 16  # text shards whose caption table ``caption`` keeps: a few MB of text at most

__all__ = ["CacheReader", "open_cache"]


def open_cache(
    path: str | os.PathLike, seed: int | None = None, text: bool | None = None, checksums: bool = True
) -> CacheReader:
    """Open the cache folder at ``path`` (safetensors or HDF5 shards) for reading.

    Args:
        path: the ``--out`` folder of ``cachebuild latents``.
        seed: seeds the fresh latent drawn per read from a ``--latents moments`` cache; None follows torch's
            own seeding (``torch.manual_seed``, and the per-worker seeds a DataLoader sets).
        text: join the text-encoder outputs of ``cachebuild textenc`` by key: None when the cache has them,
            True to require them, False to ignore them.
        checksums: check each shard's size and SHA-256 against the manifest the first time it is opened (a
            pass is remembered per unchanged file: ``consumers.handles``); False skips it.

    Raises:
        CacheError: no manifest there, no finished latents in it, or no text outputs when ``text=True``.

    Example:
        >>> cache = open_cache("./cache")
        >>> rec = cache["sub/img001"]
        >>> rec["latents"].shape, rec["bucket"]
        (torch.Size([4, 128, 96]), (768, 1024))
    """
    if is_url(path):  # object storage: the published snapshot, shards fetched on use (cache.remote)
        return _open_remote(UrlPath(str(path)), seed, text, checksums)
    return CacheReader(Path(path), seed, text, checksums)


def _open_remote(url: UrlPath, seed: int | None, text: bool | None, checksums: bool) -> CacheReader:
    from cachebuild.cache.remote import mirror_snapshot, shard_fetchers

    root = mirror_snapshot(url)
    reader = CacheReader(root, seed, text, checksums)
    fetch = shard_fetchers(url, root, (LATENTS, TEXTENC, CONTROL))
    reader._handles.fetch, reader._text_handles.fetch = fetch[LATENTS], fetch[TEXTENC]
    reader._control_handles.fetch = fetch[CONTROL]
    return reader


class CacheReader:
    """The items of one cache, by key. Build it with :func:`open_cache`.

    A record (``cache[key]``) is a dict: ``key``; ``latents`` (C, H/f, W/f), raw as stored; ``original_size``
    (W, H) after EXIF rotation; ``crop`` (left, top) of the bucket in the resized image; ``bucket`` (W, H);
    ``flip``; ``latents_flipped`` when the cache was built with ``--flip-aug``; and ``alpha_mask`` (H, W) float32
    in [0, 1], the image's alpha at the bucket's size (unflipped), when it was built with ``--alpha-mask``.

    With text outputs joined, a record also holds each stored text tensor by name (``clip_l`` (77, D),
    ``clip_g_pooled`` (D,), ...); T5 outputs, stored trimmed, come back padded with zeros to the max length
    (``t5`` (L, D)) with their attention mask (``t5_mask`` (L,), 1 at real tokens). Only keys with both
    latents and text are items then; the others are listed in ``unmatched``, never silently dropped.
    """

    def __init__(self, root: Path, seed: int | None = None, text: bool | None = None, checksums: bool = True):
        self.root = root
        self.seed = seed
        with Manifest.open(root, read_only=True) as manifest:
            records = {
                store: {r["name"]: (r["bytes"], r["sha256"]) for r in manifest.shards(store)}
                for store in (LATENTS, TEXTENC, CONTROL)
            }  # one short query per store: a row per shard
            conn = manifest.conn
            self.fingerprint = manifest.fingerprint(LATENTS)
            if self.fingerprint is None:
                raise CacheError(f"{root} holds no latents; build them with: cachebuild latents DATASET --out {root}")
            # one query per store; info stays JSON text until a record asks for it
            rows = conn.execute(
                "SELECT key, shard, bucket, info FROM items WHERE store=? AND status='done' ORDER BY key", (LATENTS,)
            ).fetchall()
            self.text_fingerprint = manifest.fingerprint(TEXTENC)  # None when the cache has no text outputs
            joined = text is not False and self.text_fingerprint is not None
            if text and self.text_fingerprint is None:
                raise CacheError(
                    f"{root} holds no text outputs; build them with: cachebuild textenc CAPTIONS --out {root}"
                )
            text_rows = _text_rows(conn) if joined else []
            self._control = {k: (shard, size) for k, shard, size in _control_rows(conn)}  # flux-kontext pairs
            self.control_fingerprint = manifest.fingerprint(CONTROL)  # or image-to-video conditions (families.i2v)
        self._text: dict[str, tuple[str, str, str]] = {k: (shard, tid, tokens) for k, shard, tid, tokens in text_rows}
        self._clips = "clips" in self.fingerprint  # a video cache: a clip's caption is its video's
        self.unmatched: dict[str, list[str]] = {"latents_only": [], "text_only": []}
        if joined:
            rows = self._join(rows)
        self._keys: list[str] = [r[0] for r in rows]
        self._index: dict[str, tuple[str, str, str]] = {r[0]: (r[1], r[2], r[3]) for r in rows}
        vae = self.fingerprint.get("vae", {})
        self.scaling_factor: float = float(vae.get("scaling_factor", 1.0))
        self.shift_factor: float = float(vae.get("shift_factor") or 0.0)
        self.latents_mode: str = self.fingerprint.get("latents", "sample")
        memo = memo_path(root)
        checks = {store: ShardChecks(records[store], memo) if checksums else None for store in records}
        self._handles = ShardFileHandles(root / LATENTS, checks=checks[LATENTS])
        self._text_handles = ShardFileHandles(root / TEXTENC, checks=checks[TEXTENC])
        self._control_handles = ShardFileHandles(root / CONTROL, checks=checks[CONTROL])
        self._rng: tuple[int, torch.Generator] | None = None

    # -- mapping ---------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every done item's key, sorted."""
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __iter__(self):
        return iter(self._keys)

    def __getitem__(self, key: str) -> dict:
        return self.record(key)

    def record(self, key: str, t5_max_length: int | None = None) -> dict:
        """The record of ``key``; ``t5_max_length`` pads (or cuts) trimmed text outputs to that length instead
        of the encoder's max length."""
        info = self.info(key)
        tensors = self.tensors(key)
        record = {
            "key": key,
            "original_size": tuple(info["original_size"]),
            "crop": tuple(info["crop"]),
            "bucket": tuple(info["bucket"]),
            "flip": bool(info.get("flip", False)),
        }
        for suffix in ("", "_flipped"):
            z = self._latents(tensors, suffix)
            if z is not None:
                record["latents" + suffix] = z
        if "alpha_mask" in tensors:  # stored 0..255; as sd-scripts hands it to its loss: alpha / 255 in float32
            record["alpha_mask"] = tensors["alpha_mask"].float() / 255.0
        if "frames" in info:  # a clip: its video, first frame, frame count and rate (docs/format.md)
            record |= {"source": info["source"], "start": info["start"], "frames": info["frames"], "fps": info["fps"]}
        if self.text_key(key) in self._text:
            record |= self.text_tensors(key, t5_max_length)
        if key in self._control:
            record |= self._conditions(key)
        return record

    def _conditions(self, key: str) -> dict:
        """FLUX.1 Kontext's condition image's raw latents, (C, h, w) at its own (W, H); or a clip's image-to-video
        conditions (``condition_latents``, ``image_embeds``) with their kind (``condition_kind``)."""
        from cachebuild.families.i2v import stored_names

        shard, size = self._control[key]
        fingerprint = self.control_fingerprint or {}
        condition = fingerprint.get("condition", {})
        if "kind" not in condition:
            found = self._read(self._control_handles, CONTROL, key, shard, key, ["control_latents"])
            return found | {"control_size": tuple(int(v) for v in size.split("x"))}
        found = self._read(self._control_handles, CONTROL, key, shard, key, stored_names(fingerprint))
        return found | {"condition_kind": condition["kind"], "condition_last_frame": bool(condition.get("last_frame"))}

    def text_key(self, key: str) -> str:
        """The key an item's text outputs are stored under: its own, or for a clip its video's (a clip's caption is
        the caption of the video it was cut from)."""
        if self._clips:
            parts = split_clip_key(key)
            if parts is not None:
                return parts[0]
        return key

    def pipeline_inputs(self, key: str, family: str | None = None) -> dict[str, torch.Tensor]:
        """The item's tensors exactly as the family's diffusers pipeline hands them to its denoiser, under the
        pipeline's own names and without the batch dimension: ``latents`` normalised as the pipeline normalises
        them (in its layout before any packing), and what ``encode_prompt`` returns (``prompt_embeds``,
        ``pooled_prompt_embeds``, ...); for a clip of an image-to-video cache, its conditions too (``condition``,
        ``image_embeds``, ...: ``families.i2v``). See docs/format.md for each family.

        Args:
            family: one of ``cachebuild.families.MODULES`` (``sdxl``, ``flux``, ``qwen-image``, ``flux2``,
                ``hidream``, ...); default: the text cache's family (a cache with latents only needs it named).

        Example:
            >>> open_cache("./cache").pipeline_inputs("img001")["prompt_embeds"].shape
            torch.Size([512, 4096])
        """
        from cachebuild.families import MODULES, pipeline_inputs_for

        family = family or (self.text_fingerprint or {}).get("family")
        if family not in MODULES:
            raise ConfigError(
                f"pipeline_inputs needs the model family ({', '.join(sorted(MODULES))}); this cache "
                + (f"has {family!r}" if family else "has no text outputs to tell it")
                + ": pass family=..."
            )
        from cachebuild.families.i2v import condition_inputs

        record, vae = self.record(key), self.fingerprint.get("vae", {})
        return pipeline_inputs_for(family)(record, vae) | condition_inputs(record, vae)

    def text_tensors(self, key: str, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """The item's text-encoder outputs by name, trimmed ones padded back with an attention mask."""
        from cachebuild.families.text import pad_tokens, token_mask

        shard, text_id, tokens = self._text[self.text_key(key)]
        encoders = self.text_fingerprint.get("encoders", [])
        names = [e["name"] for e in encoders if e.get("hidden")] + [
            f"{e['name']}_pooled" for e in encoders if e.get("pooled")
        ]
        names += self.text_fingerprint.get("extra_tensors", [])  # stored beside the encoders' (qwen-image-edit)
        stored = self._read(self._text_handles, TEXTENC, key, shard, text_id, names)
        for enc in encoders:
            name = enc["name"]
            if enc.get("hidden") and enc.get("trim"):  # (T, D) real tokens -> (L, D) and its (L,) mask
                # window: Sana's rows, not its tokens; drop_rows: Qwen-Image's template prefix is not stored
                length = max_length or enc.get("window") or enc["max_length"] - enc.get("drop_rows", 0)
                left = enc.get("padding_side") == "left"  # LTX-2: zeros first, the rows at the end
                stored[name], stored[name + "_mask"] = pad_tokens(stored[name], length, left)
            elif enc.get("hidden") and name == "t5":  # stored whole, unmasked: the mask only marks the real tokens
                if max_length not in (None, enc["max_length"]):
                    raise ConfigError(
                        f"T5 was encoded unmasked over {enc['max_length']} positions (as the Flux.1 and SD3 pipelines "
                        f"run it), so it cannot be read at {max_length}; build the text cache with --t5-mask for "
                        "outputs that pad to any length"
                    )
                n = json.loads(tokens or "{}").get(name, enc["max_length"])
                stored[name + "_mask"] = token_mask(n, enc["max_length"])
        return stored

    def token_counts(self, key: str) -> dict[str, int]:
        """``{encoder name: tokens}``: how many positions of each encoder's max length the item's caption filled
        (special tokens included), as tokenized when it was encoded; empty when the item has no text outputs."""
        if self.text_key(key) not in self._text:
            return {}
        return json.loads(self._text[self.text_key(key)][2] or "{}")

    def caption(self, key: str) -> str | None:
        """The caption text the item's text outputs were encoded from (as stored with them), or None when the
        item has no text outputs. Reads the shard's item table once per shard and keeps it."""
        if self.text_key(key) not in self._text:
            return None
        shard, text_id, _ = self._text[self.text_key(key)]
        cache = self.__dict__.setdefault("_captions", OrderedDict())
        if shard not in cache:
            items = self._guarded(TEXTENC, key, shard, lambda: self._text_handles.get(shard).describe()[1])
            cache[shard] = {tid: meta.get("text") for tid, meta in items.items()}
            if len(cache) > CAPTION_SHARDS:
                cache.popitem(last=False)
        cache.move_to_end(shard)
        return cache[shard].get(text_id)

    def info(self, key: str) -> dict:
        """The item's stored metadata: ``original_size``, ``bucket``, ``resized``, ``crop``, ``flip``."""
        return json.loads(self._entry(key)[2])

    def bucket(self, key: str) -> tuple[int, ...]:
        """The item's bucket (W, H), or for a clip its shape (W, H, F): what :meth:`bucket_sampler` batches by,
        from the index alone."""
        return tuple(int(v) for v in self._entry(key)[1].split("x"))

    def source_paths(self) -> dict[str, str]:
        """``{key: source path relative to the dataset folder}`` for the done items (one manifest query)."""
        with Manifest.open(self.root, read_only=True) as manifest:
            return {row.key: row.path for row in manifest.items(LATENTS, "done")}

    def shard_of(self, key: str) -> str:
        """The file name of the shard that holds the item's tensors."""
        return self._entry(key)[0]

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        """The item's stored tensors by name (``latents``, or ``mean``/``std`` for moments; ``*_flipped``;
        ``alpha_mask`` (H, W) uint8 with ``--alpha-mask``)."""
        shard, _, info = self._entry(key)
        flip = json.loads(info).get("flip", False)
        names = ["mean", "std"] if self.latents_mode == "moments" else ["latents"]
        names += [n + "_flipped" for n in names] if flip else []
        names += ["alpha_mask"] if self.fingerprint.get("alpha_mask") else []
        return self._read(self._handles, LATENTS, key, shard, key, names)

    # -- torch -----------------------------------------------------------------------------------------
    def dataset(
        self, scale: bool = False, dtype: torch.dtype | None = None, t5_max_length: int | None = None
    ) -> LatentDataset:
        """A map-style torch Dataset over :meth:`keys`; index ``i`` is ``keys()[i]``.

        Args:
            scale: apply ``(z - shift_factor) * scaling_factor``, what the diffusion model is trained on.
            dtype: dtype of the latents and text tensors handed out (default float32).
            t5_max_length: length trimmed text outputs (T5) are padded to; default the encoder's max length.
        """
        import torch

        from cachebuild.consumers.dataset import LatentDataset

        return LatentDataset(self, scale, dtype or torch.float32, t5_max_length)

    def bucket_sampler(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> BucketBatchSampler:
        """Batches of dataset indices that share one bucket (and one condition image size, for FLUX.1 Kontext
        pairs: their ``control_latents`` stack too); see :class:`BucketBatchSampler`."""
        shapes: dict[str, tuple[int, ...]] = {}
        buckets = [shapes.setdefault(b, self.bucket(k)) for k in self._keys for b in (self._index[k][1],)]
        if self._control:  # (W, H, control W, control H): "WxH" strings parsed once each, as the buckets are
            sizes = [self._control[k][1] if k in self._control else "" for k in self._keys]
            parsed = {b: tuple(int(v) for v in b.split("x")) if b else () for b in set(sizes)}
            buckets = [b + parsed[c] for b, c in zip(buckets, sizes, strict=True)]
        from cachebuild.consumers.sampler import BucketBatchSampler

        return BucketBatchSampler(buckets, batch_size, shuffle, seed, drop_last, rank, world_size)

    # -- internals -------------------------------------------------------------------------------------
    def _join(self, rows: list) -> list:
        """Keep the latents rows that have text; list the keys that have only one side."""
        latents = {r[0] for r in rows}
        covered = {self.text_key(k) for k in latents}  # the text keys some item joins (a video's, for its clips)
        self.unmatched = {
            "latents_only": sorted(k for k in latents if self.text_key(k) not in self._text),
            "text_only": sorted(self._text.keys() - covered),
        }
        if self.unmatched["latents_only"] or self.unmatched["text_only"]:
            log.warning(
                "%d item(s) have latents but no text and %d text but no latents (e.g. %s); they are left out: "
                "see CacheReader.unmatched",
                len(self.unmatched["latents_only"]),
                len(self.unmatched["text_only"]),
                (self.unmatched["latents_only"] + self.unmatched["text_only"])[0],
            )
        return [r for r in rows if self.text_key(r[0]) in self._text]

    def _read(self, handles, store: str, key: str, shard: str, entry: str, names: list[str]) -> dict:
        """Tensors of ``entry`` from ``shard``."""
        return self._guarded(store, key, shard, lambda: handles.get(shard).read(entry, names))

    def _guarded(self, store: str, key: str, shard: str, read):
        """``read()``; a shard that cannot be read is reported with the item, the shard and the fix, and one that
        is gone because the cache was rebuilt or re-encoded after this reader opened it as that, not as damage."""
        from safetensors import SafetensorError

        try:
            return read()
        except (CacheError, OSError, SafetensorError) as exc:  # the shard's file, not a bug: damage, named
            if not isinstance(exc, ShardDamaged) and self._moved(store, key, shard):
                raise CacheError(
                    f"the cache at {self.root} changed since it was opened; reopen it (call open_cache again): it was "
                    "rebuilt or re-encoded meanwhile"
                ) from None
            why = str(exc) if isinstance(exc, CacheError) else f"{type(exc).__name__}: {exc}"
            fix = f"run `cachebuild verify {self.root} --repair`, then the build command again to re-encode its items"
            if self._handles.fetch is not None:  # a cache at a URL: the copy in the mirror folder may be the bad one
                fix = (
                    f"delete the downloaded copies in {self.root / store} to fetch them again; if it stays damaged, "
                    "repair a local copy of the cache: cachebuild verify CACHE --repair"
                )
            raise CacheError(f"cannot read item {key!r} from shard {store}/{shard}: {why}; {fix}") from exc

    def _moved(self, store: str, key: str, shard: str) -> bool:
        """Whether the manifest now puts ``key`` somewhere other than ``shard`` (or nowhere)."""
        try:
            with Manifest.open(self.root, create=False, read_only=True) as manifest:
                row = manifest.conn.execute("SELECT shard FROM items WHERE store=? AND key=?", (store, key)).fetchone()
        except CacheError:
            return True  # the manifest itself is gone or unreadable now
        return row is None or row[0] != shard

    def _entry(self, key: str) -> tuple[str, str, str]:
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"{key!r} is not a done item of {self.root}; see `cachebuild status {self.root}`") from None

    def _latents(self, tensors: dict[str, torch.Tensor], suffix: str) -> torch.Tensor | None:
        if "latents" + suffix in tensors:
            return tensors["latents" + suffix]
        if "mean" + suffix not in tensors:
            return None
        import torch

        mean, std = tensors["mean" + suffix], tensors["std" + suffix]
        eps = torch.randn(mean.shape, generator=self._generator(), dtype=torch.float32)
        return (mean.float() + std.float() * eps).to(mean.dtype)  # a fresh draw on every read

    def _generator(self) -> torch.Generator:
        """This process's generator for moments draws; workers get their own streams."""
        import torch

        pid = os.getpid()
        if self._rng is None or self._rng[0] != pid:
            info = torch.utils.data.get_worker_info()
            base = torch.initial_seed() if self.seed is None else self.seed
            # in a DataLoader worker, mix in the worker's seed: it differs per worker and per epoch
            parts = f"{base}:{info.seed if info is not None else ''}"
            seed = int.from_bytes(hashlib.sha256(parts.encode()).digest()[:8], "little") & ((1 << 63) - 1)
            self._rng = (pid, torch.Generator().manual_seed(seed))
        return self._rng[1]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        # open handles never cross processes
        state["_handles"], state["_text_handles"] = self._handles.fresh(), self._text_handles.fresh()
        state["_control_handles"] = self._control_handles.fresh()
        state["_rng"] = None
        return state


def _text_rows(conn: sqlite3.Connection) -> list[tuple[str, str, str, str]]:
    """(key, shard, text id, tokens JSON) of every done text item: identical captions share one stored entry."""
    return conn.execute(
        "SELECT key, shard, json_extract(info, '$.text_id'), json_extract(info, '$.tokens') FROM items "
        "WHERE store=? AND status='done'",
        (TEXTENC,),
    ).fetchall()


def _control_rows(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """(key, shard, "WxH") of every done condition image (``cachebuild latents --control``)."""
    return conn.execute("SELECT key, shard, bucket FROM items WHERE store=? AND status='done'", (CONTROL,)).fetchall()
