"""Image-to-video conditions for the latents job: ``cachebuild latents --model wan2.1-i2v-14b-480p`` (and the other
models :mod:`cachebuild.families.i2v` names) stores, beside each clip's latents, what its pipeline conditions on.

The condition image of a clip is, by default, the clip's own first frame exactly as its latents saw it (decoded,
resized and cropped to its bucket); with ``--control DIR`` it is the image in DIR under the clip's video's key (an
image item's own key), given to the pipeline's preprocessing as a user gives it; with ``--last-frame`` (Wan I2V) the
clip's last frame is the second one. Each family module (:mod:`.wan_i2v` ...) turns them into the VAE's input and
the image encoder's, as its pipeline does.

Where they are stored: in the ``control`` store, as FLUX.1 Kontext's condition latents are (:mod:`.control`), under
the clip keys, with a fingerprint of their own (the kind, the condition image's source, the image encoder's weights
and processor, and the clip geometry the latents were planned with) and one failure row per item. They are encoded
after the clips' latents, one clip at a time, from each done clip's record: the frames are the ones its latents
were encoded from, whatever planning does in the future. With ``--control`` both stores see a clip as the pair
(:func:`.control.paired_scan`): a changed or added condition image makes its clips pending in both; a missing one
fails them at the scan. A condition that cannot be made (an unreadable image, a frame that no longer decodes)
fails its clip in both stores with the reason: a clip without its condition cannot be trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cachebuild.cache.manifest import CONTROL, DONE, FAILED, LATENTS, PENDING, Manifest, ScanResult
from cachebuild.cache.store import RunSummary, ShardSink, finish_run, open_store, record_failures
from cachebuild.config import DType, EngineKind, LatentsConfig
from cachebuild.errors import ConfigError
from cachebuild.families import i2v
from cachebuild.families.vae import VaeFamily
from cachebuild.families.video_tiling import tiling_of_fingerprint
from cachebuild.hub import ResolvedVae, fetch_hub_folder, weight_files
from cachebuild.jobs.condition_models import ConditionModels
from cachebuild.jobs.control import check_control

log = logging.getLogger(__name__)

CONDITION_PAGE_ITEMS = 256  # pending conditions read from the manifest at a time; each page's shard is committed
CONDITION_LOADER_VERSION = 1  # bump when the condition image's pixels or their preprocessing change


@dataclass(frozen=True)
class Conditions:
    """What a run's conditions are: the kind, the pipeline folder and, where the pipeline runs one, its image
    encoder's (class, encoder folder, processor class, processor folder)."""

    kind: i2v.ConditionKind
    root: Path | None
    encoder: tuple[str, Path, str, Path] | None
    crf: int | None = None  # LTX-2: the H.264 CRF of the image's round trip


def plan_conditions(cfg: LatentsConfig, vae: ResolvedVae, family: VaeFamily) -> Conditions | None:
    """The conditions of the model ``cfg`` names, or None for a model without any; refuses what cannot be made.

    Raises:
        ConfigError: naming the fix (a model without conditions given --last-frame, conditions with --engine ray
            or --flip-aug, a VAE that is not the pipeline's).
    """
    kind = _model_kind(cfg, family)
    if kind is None:
        check_control(cfg, vae, family)  # FLUX.1 Kontext's --control, or its refusal
        if cfg.last_frame:
            raise ConfigError("--last-frame conditions Wan's image-to-video models on a clip's last frame; pass an "
                              "I2V --model (wan2.1-i2v-14b-480p, ...) or drop --last-frame")  # fmt: skip
        return None
    if family.cls != kind.vae_class or not family.video:
        raise ConfigError(
            f"{kind.name} conditions are encoded with {kind.vae_class} clips; {vae.source} gives "
            f"{family.cls}{'' if family.video else ' (not read as clips)'}: pass the model's own VAE"
        )
    if cfg.engine is EngineKind.RAY:
        raise ConfigError(f"{kind.name} conditions are encoded on this machine after the clips; drop --engine ray")
    if cfg.flip:
        raise ConfigError(f"{kind.name} conditions are made for the clip as it is, not mirrored; drop --flip-aug")
    if cfg.last_frame and not kind.last_frame:
        raise ConfigError(f"--last-frame is for Wan's image-to-video models; {kind.name} has no last frame: drop it")
    root, index = _pipeline_files(cfg, kind)
    encoder = None
    if i2v.uses_encoder(kind, index):
        folders = (root / kind.encoder, root / kind.processor)
        if not all(f.is_dir() for f in folders):
            raise ConfigError(f"{root} names an {kind.encoder} but has no {kind.encoder}/ and {kind.processor}/ "
                              "folders; pass the whole pipeline folder")  # fmt: skip
        encoder = (index[kind.encoder][1], folders[0], index[kind.processor][1], folders[1])
    crf = None
    if kind.name == "ltx-2-i2v":
        from cachebuild.families.ltx2_i2v import pipeline_crf

        crf = pipeline_crf(root)
    return Conditions(kind, root, encoder, crf)


def conditions_fingerprint(conditions: Conditions, latents_fp: dict, cfg: LatentsConfig, manifest: Manifest) -> dict:
    """Every setting that changes the stored conditions' bytes."""
    source = {"image": "control" if cfg.control is not None else "first-frame"}
    source |= {"last_frame": True} if cfg.last_frame else {}
    source |= {"crf": conditions.crf} if conditions.crf is not None else {}
    fp = {
        "vae": latents_fp["vae"],
        "condition": {"kind": conditions.kind.name} | source,
        # the clip geometry and frames: what the condition image is resized to, which frames are the first and last
        "geometry": {k: latents_fp[k] for k in ("buckets", "crop", "seed", "exif", "clips") if k in latents_fp},
        "latents": "mode",  # the posterior mode, as every pipeline's sample_mode="argmax"
        "dtype": latents_fp["dtype"],
        "dtype_out": cfg.dtype_out.value,
        "format": cfg.format.value,
        "loader_version": CONDITION_LOADER_VERSION,
    }
    if conditions.kind.clip_frames and "tiling" in latents_fp:  # a whole condition clip, in the clips' own tiles
        fp["tiling"] = latents_fp["tiling"]
    if conditions.encoder is not None:
        cls, folder, processor_cls, processor = conditions.encoder
        config = json.loads((folder / "config.json").read_text())
        fp["image_encoder"] = {
            "class": cls,
            "weights_sha256": manifest.files_sha256(weight_files(folder)),
            "processor": processor_cls,
            "processor_sha256": _files_hash(sorted(processor.glob("*.json"))),
            "tokens": list(i2v.kind_module(conditions.kind).encoder_tokens(config)),  # (T, D) of one image
        }
    return fp


def sync_conditions(
    manifest: Manifest, cfg: LatentsConfig, conditions: Conditions, latents_fp: dict, scan: ScanResult
) -> dict:
    """Open the ``control`` store for the run's conditions with the latents' scan (pairs with --control); returns its
    fingerprint. Runs with the latents' sync, before the scan is dropped."""
    fingerprint = conditions_fingerprint(conditions, latents_fp, cfg, manifest)
    open_store(manifest, CONTROL, fingerprint, scan, cfg.retry_failed, cfg.rebuild, cfg.prune)
    return fingerprint


def encode_conditions(
    manifest: Manifest,
    cfg: LatentsConfig,
    conditions: Conditions,
    sources: tuple[ResolvedVae, VaeFamily, dict],
    run: tuple[DType, torch.device, dict[str, Path]],
    summary: RunSummary,
) -> None:
    """Encode the pending conditions of the clips whose latents are done, after them; fail the conditions of
    failed clips, and the clips whose condition failed. Counts go into ``summary`` (the latents run's)."""
    vae, family, fingerprint = sources
    dtype, device, paths = run
    start = time.monotonic()
    failed = _clip_failures(manifest)
    part = RunSummary(CONTROL, summary.out)
    record_failures(manifest, CONTROL, part, failed)
    if _pending_with_clips(manifest):
        header = {
            "store": CONTROL,
            "vae_class": family.cls,
            "latent_channels": family.latent_channels,
            "downsample": family.downsample,
            "condition": conditions.kind.name,
            "dtype": cfg.dtype_out.value,
        }
        tiling = tiling_of_fingerprint(fingerprint)  # Wan I2V's condition clips: the clips' tiles; else whole frames
        models = ConditionModels(manifest, conditions, (vae, family), (dtype, device, tiling), cfg)
        with ShardSink(manifest, CONTROL, cfg.format.value, cfg.shard_bytes, header, part) as sink:
            _encode_pending(manifest, models, fingerprint, paths, sink)
        models.close(part)
        summary.nothing_to_do = False
    finish_run(manifest, part, start)
    for name in ("shards_written", "bytes_written", "oom_splits", "fp32_redos", "fp32_conversions", "model_loads"):
        setattr(summary, name, getattr(summary, name) + getattr(part, name))
    summary.model_loaded |= part.model_loaded
    of_failed_clips = {key for key, _ in failed}
    bad = [(f["key"], f"condition: {f['reason']}") for f in part.failures if f["key"] not in of_failed_clips]
    record_failures(manifest, LATENTS, summary, bad)  # a clip without its condition is not a training item


def _encode_pending(manifest: Manifest, models: ConditionModels, fingerprint: dict, paths, sink: ShardSink) -> None:
    """Each pending condition of a done clip, one at a time; a page's entries committed together."""
    clips = fingerprint["geometry"].get("clips", {})
    for page in manifest.item_pages(CONTROL, PENDING, CONDITION_PAGE_ITEMS):
        info = _done_infos(manifest, [row.key for row in page])
        for row in page:
            if row.key not in info:  # its clip is still pending: an interrupted run; the next one comes back
                continue
            made = models.encode(row, info[row.key], clips, paths.get(row.key))
            if isinstance(made, str):
                sink.fail([(row.key, made)])
                continue
            tensors, meta = made
            bucket = "x".join(map(str, (*meta["bucket"], meta["frames"])))
            sink.add(row.key, tensors, meta, [(row.key, bucket, meta)])
        sink.flush()


def _clip_failures(manifest: Manifest) -> list[tuple[str, str]]:
    """(key, reason) of the pending conditions whose clip failed: they fail with it."""
    rows = manifest.conn.execute(
        "SELECT c.key, l.reason FROM items c JOIN items l ON l.store=? AND l.key=c.key AND l.status=? "
        "WHERE c.store=? AND c.status=? ORDER BY c.key",
        (LATENTS, FAILED, CONTROL, PENDING),
    ).fetchall()
    return [(k, f"its clip failed: {reason}") for k, reason in rows]


def _pending_with_clips(manifest: Manifest) -> bool:
    row = manifest.conn.execute(
        "SELECT 1 FROM items c JOIN items l ON l.store=? AND l.key=c.key AND l.status=? WHERE c.store=? AND "
        "c.status=? LIMIT 1",
        (LATENTS, DONE, CONTROL, PENDING),
    ).fetchone()
    return row is not None


def _done_infos(manifest: Manifest, keys: list[str]) -> dict[str, dict]:
    """The latents records (``info``) of the done clips among ``keys``."""
    rows = manifest.conn.execute(
        "SELECT key, info FROM items WHERE store=? AND status=? AND key IN (SELECT value FROM json_each(?))",
        (LATENTS, DONE, json.dumps(keys)),
    ).fetchall()
    return {k: json.loads(info) for k, info in rows}


def _model_kind(cfg: LatentsConfig, family: VaeFamily) -> i2v.ConditionKind | None:
    """The kind of conditions of the model ``cfg`` names: a preset says it with no file read; a pipeline folder or
    hub id of a video VAE by its ``model_index.json`` (from the hub, that file alone); None for an image model, a
    text-to-video one, or a run given only ``--vae``."""
    preset = cfg.model.preset
    if preset is not None:
        return i2v.KINDS[i2v.PRESET_KINDS[preset]] if preset in i2v.PRESET_KINDS else None
    if cfg.model.model is None or not family.video:
        return None
    path = Path(cfg.model.pipeline).expanduser()
    root = path if path.is_dir() else fetch_hub_folder(cfg.model.pipeline, ["model_index.json"], cfg.model.revision)
    return i2v.detect_kind(None, _read_index(root))


def _pipeline_files(cfg: LatentsConfig, kind: i2v.ConditionKind) -> tuple[Path, dict | None]:
    """The pipeline folder and its ``model_index.json``, with what the kind's conditions read (its image encoder
    and processor; LTX-2's text encoder config, which says the CRF): the local folder, or fetched from the hub."""
    path = Path(cfg.model.pipeline).expanduser()
    if path.is_dir():
        return path, _read_index(path)
    patterns = ["model_index.json"]
    if kind.encoder is not None:
        patterns += [f"{kind.encoder}/*.json", f"{kind.encoder}/*.safetensors", f"{kind.processor}/*.json"]
    if kind.name == "ltx-2-i2v":
        patterns.append("text_encoder/config.json")
    root = fetch_hub_folder(cfg.model.pipeline, patterns, cfg.model.revision)
    return root, _read_index(root)


def _read_index(root: Path) -> dict | None:
    index = root / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else None


def _files_hash(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()
