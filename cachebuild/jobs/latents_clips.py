"""The latents job's clip items, for video families: a video becomes one item per clip, an image one item of one
frame.

The scan lists files (``stat`` only); ``expand_clips`` turns each video into its clips before the index is synced,
so a clip is an item like any other: its key is the video's key plus its start and length (``keys.clip_key``), its
source the video file, and a changed video re-plans its own clips and nothing else. The header each expansion
needs (``video.probe``: frame count after ``--fps``, size, rotation, seek points) is read once per new or changed
file, in threads, and remembered in the manifest by the file's fingerprint, so a re-run of a finished job reads
no video. A video that cannot be read, or that is shorter than every ``--frames`` count, is one failed item under
its own key, with the reason.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace
from fractions import Fraction

from cachebuild.cache.manifest import LATENTS, Manifest, ScanResult, SourceFile
from cachebuild.cache.store import diff_fingerprints, record_failures
from cachebuild.config import ClipConfig, ExtractMode, LatentsConfig
from cachebuild.errors import ConfigError, FingerprintMismatch, ItemError
from cachebuild.families.vae import VaeFamily
from cachebuild.images.load import read_size
from cachebuild.images.plan import BucketPlan
from cachebuild.images.reads import ReadTimedOut, TimedReads
from cachebuild.keys import clip_key, fs_path, split_clip_key
from cachebuild.sources.scan import ANIMATION_EXTENSIONS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from cachebuild.storage import is_url
from cachebuild.video.clips import check_frame_rule, clip_spans
from cachebuild.video.plan import ClipPlan, plan_clip, plan_image
from cachebuild.video.probe import ANIMATION, HEADER_META, VIDEO, VideoHeader, is_animated, probe

CLIP_LOADER_VERSION = 1  # bump when clip decoding changes the pixels handed to the encoder; in the fingerprint
PROBE_THREADS = 4  # videos probed at once: demuxing is mostly I/O, and FFmpeg releases the GIL while it reads


def media_extensions(family: VaeFamily) -> frozenset[str]:
    """What the scan lists: images, and for a video family videos too."""
    return IMAGE_EXTENSIONS | VIDEO_EXTENSIONS if family.video else IMAGE_EXTENSIONS


def check_clip_options(cfg: LatentsConfig, family: VaeFamily) -> None:
    """Clip options only for video families, pixel options only for image ones, and every frame count within the
    family's frame rule.

    Raises:
        ConfigError: in one line naming the fix (for a count: the nearest valid counts).
    """
    clips = cfg.clips
    if not family.video:
        if clips != ClipConfig():
            raise ConfigError(
                "--frames, --extract, --stride, --samples, --max-frames and --fps are for video VAEs (Wan, "
                f"HunyuanVideo 1.5, LTX-2); {family.cls} encodes images: drop them"
            )
        return
    if is_url(cfg.dataset):
        raise ConfigError("video datasets are read from a local folder; copy the videos to disk first")
    if cfg.color or cfg.alpha or cfg.alpha_mask:  # clips: FFmpeg's RGB; a video dataset's images: convert("RGB")
        raise ConfigError(
            "--color, --alpha and --alpha-mask are for image families; a video family reads frames as FFmpeg "
            "converts them to RGB and images as convert('RGB') does: drop them"
        )
    check_frame_rule(clips.frames or (), family.frame_modulus, "--frames", family.cls)
    if clips.max_frames is not None:
        check_frame_rule((clips.max_frames,), family.frame_modulus, "--max-frames", family.cls)


def rates(clips: ClipConfig, family: VaeFamily) -> tuple[Fraction | None, Fraction | None]:
    """(--fps, --source-fps) as exact fractions; --fps alone is the family's own rate."""
    fps = clips.fps if clips.fps != "family" else family.default_fps
    return (None if fps is None else Fraction(str(fps))), (
        None if clips.source_fps is None else Fraction(str(clips.source_fps))
    )


def clips_fingerprint(cfg: LatentsConfig, family: VaeFamily) -> dict:
    """Every clip setting that changes the bytes: the counts and how clips are cut, and the rate."""
    c = cfg.clips
    fps, source = rates(c, family)
    fp: dict = {"extract": c.extract.value, "loader_version": CLIP_LOADER_VERSION}
    if c.extract is ExtractMode.FULL:
        fp["max_frames"] = c.max_frames_or_default
    else:
        fp["frames"] = sorted(set(c.frames or ()))
    if c.extract is ExtractMode.SLIDE:
        fp["stride"] = c.stride or 1
    if c.extract is ExtractMode.UNIFORM:
        fp["samples"] = c.samples or 1
    fp["fps"] = None if fps is None else str(fps)
    if source is not None:
        fp["source_fps"] = str(source)
    return fp


def check_fingerprint_first(manifest: Manifest, fingerprint: dict, rebuild: bool) -> None:
    """Refuse other settings before any video is read (``open_store`` would, after the expansion)."""
    old = manifest.fingerprint(LATENTS)
    if old is not None and old != fingerprint and not rebuild:
        raise FingerprintMismatch(LATENTS, str(manifest.root), diff_fingerprints(old, fingerprint))


def expand_clips(manifest: Manifest, scan: ScanResult, cfg: LatentsConfig, family: VaeFamily) -> ScanResult:
    """The scan with each video (and animated GIF/WebP) replaced by its clips; images stay one item each.

    Raises:
        ConfigError: the dataset holds videos but no --frames was given (and --extract is not full).
    """
    root = cfg.dataset.resolve()
    fps, source = rates(cfg.clips, family)
    settings = [None if fps is None else str(fps), None if source is None else str(source)]
    media = [f for f in scan.files if f.reason is None and _suffix(f) in VIDEO_EXTENSIONS | ANIMATION_EXTENSIONS]
    videos = [f for f in media if _suffix(f) in VIDEO_EXTENSIONS]
    if videos:  # before any video is read
        _check_videos_can_be_cut(videos[0], cfg.clips, family)
        if importlib.util.find_spec("av") is None:
            raise ConfigError("the dataset holds videos, which are read with PyAV: pip install 'cachebuild[video]'")
    remembered = {f.path: manifest.get_meta(HEADER_META + f.path) for f in media}
    # a file that failed is read again with --retry-failed (a codec installed since, a file repaired in place)
    stale = [f for f in media if not _fresh(remembered[f.path], f, settings, cfg.retry_failed)]

    def read(f: SourceFile) -> dict:
        kind = VIDEO if _suffix(f) in VIDEO_EXTENSIONS else ANIMATION
        entry = {"fp": f.fingerprint, "settings": settings}
        path = str(root / fs_path(f.path))
        try:
            if kind == ANIMATION and not is_animated(path):
                return entry | {"still": True}  # one frame: an image like any other
            header = probe(path, kind, fps, source, cfg.max_pixels)
        except ItemError as exc:
            return entry | {"reason": str(exc)}
        except Exception as exc:  # per-file boundary: any demuxer surprise fails this video only
            return entry | {"reason": f"could not read the video header: {type(exc).__name__}: {exc}"}
        return entry | {"header": header.as_json()}

    with TimedReads(PROBE_THREADS, cfg.read_timeout) as reads:  # a stalled file fails alone (images.reads)
        results = reads.map(read, stale, what=lambda f: f.path)
    fresh = {}
    for f, result in zip(stale, results, strict=True):
        if isinstance(result, BaseException) and not isinstance(result, ReadTimedOut):
            raise result  # read() keeps every other failure as the file's reason: a bug
        timed_out = {"fp": f.fingerprint, "settings": settings, "reason": str(result)}
        fresh[f.path] = timed_out if isinstance(result, ReadTimedOut) else result
    remembered |= fresh
    manifest.set_meta_many(
        {HEADER_META + p: v for p, v in fresh.items()}, HEADER_META, [HEADER_META + p for p in remembered]
    )
    return _clip_files(scan, remembered, cfg.clips, family)


def _check_videos_can_be_cut(video: SourceFile, clips: ClipConfig, family: VaeFamily) -> None:
    if clips.frames is None and clips.extract is not ExtractMode.FULL:
        raise ConfigError(
            f"the dataset holds videos ({video.path}, ...): pass --frames with clip lengths ({family.frame_modulus}k+1 "
            "for this VAE, e.g. --frames 17,33,81), or --extract full for whole videos"
        )


def _clip_files(scan: ScanResult, remembered: dict, clips: ClipConfig, family: VaeFamily) -> ScanResult:
    files: list[SourceFile] = []
    for f in scan.files:
        entry = remembered.get(f.path)
        if entry is None or entry.get("still"):
            files.append(f)
            continue
        if "reason" in entry:
            files.append(replace(f, reason=entry["reason"]))
            continue
        _check_videos_can_be_cut(f, clips, family)  # an animated GIF or WebP is a video too
        header = VideoHeader.from_json(entry["header"])
        spans = clip_spans(header.frames, clips, family.frame_modulus)
        if not spans:
            counts = ",".join(map(str, sorted(set(clips.frames or ()))))
            files.append(replace(f, reason=f"video has {header.frames} frames, fewer than every --frames count "
                                 f"({counts}): it yields no clip; lower --frames or remove it"))  # fmt: skip
            continue
        files += [replace(f, key=clip_key(f.key, start, n)) for start, n in spans]
    by_key: dict[str, list[SourceFile]] = {}
    for f in files:
        by_key.setdefault(f.key, []).append(f)
    clashes = dict(scan.clashes) | {k: sorted(g.path for g in group) for k, group in by_key.items() if len(group) > 1}
    return ScanResult(sorted((g[0] for g in by_key.values()), key=lambda f: f.key), clashes, scan.unlisted)


def plan_clip_chunk(manifest: Manifest, cfg: LatentsConfig, family: VaeFamily, pending, pool, summary) -> list:
    """Plans for one chunk of pending items (clips and one-frame images); the ones that cannot be planned fail."""
    root = cfg.dataset.resolve()
    buckets = BucketPlan(cfg.buckets)
    fps_rates = rates(cfg.clips, family)
    headers: dict[str, dict | None] = {}
    for row in pending:
        if row.path not in headers:
            headers[row.path] = manifest.get_meta(HEADER_META + row.path) if _is_media(row.path) else None

    def one(row) -> tuple[ClipPlan | None, tuple[str, str] | None]:
        path = str(root / fs_path(row.path))
        entry, span = headers[row.path], split_clip_key(row.key)
        try:
            if entry is not None and "header" in entry and span is not None:
                header = VideoHeader.from_json(entry["header"])
                plan = plan_clip(buckets, row.key, path, header, span[1:], cfg.crop, cfg.seed, fps_rates)
                fps = float(fps_rates[0]) if fps_rates[0] is not None else header.fps
                return replace(plan, source=row.path, clip_fps=fps), None
            size = read_size(path, cfg.max_pixels, cfg.exif)
            plan = plan_image(buckets, row.key, path, size, cfg.crop, cfg.seed, cfg.exif)
            return replace(plan, source=row.path), None
        except ItemError as exc:
            return None, (row.key, str(exc))
        except Exception as exc:  # per-item boundary
            return None, (row.key, f"could not plan the clip: {type(exc).__name__}: {exc}")

    results = list(pool.map(one, pending))
    record_failures(manifest, LATENTS, summary, [f for _, f in results if f])
    return [p for p, _ in results if p]


def clip_meta(item: ClipPlan, flip: bool) -> dict:
    """A clip's record: where it comes from, which frames, at what rate, and its geometry."""
    return {
        "source": item.source,  # the video (or image) file, relative to the dataset folder
        "start": item.start,  # first frame, counted after --fps
        "frames": item.frames,  # F: frame count
        "fps": item.clip_fps,  # the rate of the clip's frames (--fps, or the source's average rate)
        "original_size": list(item.original),  # (W, H) as displayed: rotation applied
        "bucket": list(item.size),  # (W, H)
        "resized": list(item.resized),  # (W, H) before the crop
        "crop": list(item.crop),  # (left, top) in resized pixels
        "flip": flip,
    }


def clip_bucket(item: ClipPlan) -> str:
    """The index's bucket of a clip: 'WxHxF', what the reader's sampler batches by."""
    return "x".join(map(str, item.bucket))


def _fresh(entry: dict | None, f: SourceFile, settings: list, retry_failed: bool) -> bool:
    if entry is None or (retry_failed and "reason" in entry):
        return False
    return entry.get("fp") == f.fingerprint and entry.get("settings") == settings


def _suffix(f: SourceFile) -> str:
    return os.path.splitext(f.path)[1].lower()


def _is_media(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS | ANIMATION_EXTENSIONS
