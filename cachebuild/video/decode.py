"""Decode one clip in a decode worker: frames streamed from FFmpeg (PyAV) into one bucket-sized array.

Host memory is one clip (the (F, H, W, 3) result, filled frame by frame) plus the frame being converted; a video
is never held whole. A clip in the middle of a long video is decoded from the keyframe before it
(``VideoHeader.seek_point``), not from the start.

Pixels, in this order:
  * frames in presentation order; with ``--fps``, the frames ``video.clips.kept`` keeps;
  * converted to 8-bit RGB by FFmpeg's swscale with its defaults, as ``ffmpeg -pix_fmt rgb24`` converts: the
    matrix and range the frame is tagged with (BT.601, limited range where untagged), 10- and 12-bit samples
    brought to 8 bits by swscale's own rounding, HDR (PQ, HLG) not tone-mapped;
  * turned upright by the display matrix's rotation (90, 180, 270 degrees), as FFmpeg's ``autorotate`` does;
  * resized to cover the bucket (Pillow's LANCZOS, as images are) and cut at the planned crop.
Audio streams are never read. Animated GIF and WebP go through Pillow (``images.load.to_rgb``: transparency
over white), still images through the image loader (EXIF orientation applied).
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from cachebuild.errors import ItemError
from cachebuild.images.load import decode as decode_image
from cachebuild.images.load import to_rgb
from cachebuild.images.plan import ItemPlan
from cachebuild.video.clips import slot
from cachebuild.video.probe import ANIMATION, IMAGE, animation_durations, open_reason

if TYPE_CHECKING:  # the plan imports this module to decode itself
    from cachebuild.video.plan import ClipPlan

DECODE_THREADS = 1  # FFmpeg threads per decode worker, decoding and converting: the workers are the parallelism
# (one clip each), so --workers stays the number of cores decoding (swscale's own threads made a 720p frame
# 4x slower on a busy 2-core machine: 20 ms against 4.5)


def decode_clip(plan: ClipPlan, max_pixels: int) -> np.ndarray:
    """The (F, H, W, 3) uint8 frames of ``plan``, each resized and cropped to its bucket.

    Raises:
        ItemError: the file cannot be read, ends before the clip does, or is damaged.
    """
    w, h = plan.size
    out = np.empty((plan.frames, h, w, 3), dtype=np.uint8)
    if plan.kind == IMAGE:
        item = ItemPlan(plan.key, plan.path, plan.original, plan.size, plan.resized, plan.crop, plan.exif)
        out[0] = decode_image(item, max_pixels)
        return out
    filled = _decode_animation(plan, out) if plan.kind == ANIMATION else _decode_video(plan, out)
    if filled < plan.frames:
        raise ItemError(
            f"the video ends after frame {plan.start + filled} of the clip's {plan.start + plan.frames}: the file is "
            "truncated or changed since it was probed; re-copy it"
        )
    return out


def _decode_video(plan: ClipPlan, out: np.ndarray) -> int:
    """Fill ``out`` with the clip's frames from the keyframe before it; returns the frames filled."""
    import av

    seek_pts, index, kept_before, prev_pts = plan.seek
    fps, source = plan.rate(), plan.source_rate()
    tb = Fraction(*plan.time_base)

    def seconds(pts: int | None, i: int) -> Fraction:
        if source is not None:  # the user's rate replaces the timestamps
            return Fraction(i) / source
        if pts is None:
            raise ItemError("frames carry no timestamps, so --fps cannot place them; pass --source-fps as well")
        return (pts - plan.start_pts) * tb

    try:
        with av.open(plan.path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = DECODE_THREADS
            if seek_pts is not None:
                container.seek(seek_pts, stream=stream, backward=True, any_frame=False)
            last = slot(seconds(prev_pts, index - 1), fps) if fps is not None and index else None
            n, filled = kept_before, 0
            for frame in container.decode(stream):
                if seek_pts is not None and frame.pts is not None and frame.pts < seek_pts:
                    continue  # before the keyframe (an open GOP's leading frames): counted in kept_before
                if fps is not None:
                    s = slot(seconds(frame.pts, index), fps)
                    keep, last = s != last, s
                    index += 1
                    if not keep:
                        continue
                if n >= plan.start:
                    rgb = frame.to_ndarray(format="rgb24", threads=DECODE_THREADS)  # (H, W, 3) as stored
                    out[filled] = _fit(_upright(rgb, plan.rotation), plan)
                    filled += 1
                    if filled == plan.frames:
                        break
                n += 1
    except ItemError:
        raise
    except av.error.FFmpegError as exc:
        raise ItemError(open_reason(plan.path, exc)) from exc
    return filled


def _decode_animation(plan: ClipPlan, out: np.ndarray) -> int:
    """An animated GIF or WebP through Pillow, from its first frame (they are short)."""
    fps, source = plan.rate(), plan.source_rate()
    try:
        with Image.open(plan.path) as img:
            durations = animation_durations(img)
            n, filled, last, t = 0, 0, None, Fraction(0)
            for i, duration in enumerate(durations):
                at, t = (Fraction(i) / source if source is not None else t), t + duration
                if fps is not None:
                    s = slot(at, fps)
                    keep, last = s != last, s
                    if not keep:
                        continue
                if n >= plan.start:
                    img.seek(i)
                    out[filled] = _fit(np.asarray(to_rgb(img.copy())), plan)
                    filled += 1
                    if filled == plan.frames:
                        break
                n += 1
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ItemError(f"animation cannot be read ({type(exc).__name__}: {exc}); re-save it or remove it") from exc
    return filled


def _upright(frame: np.ndarray, rotation: int) -> np.ndarray:
    """(H, W, 3) as stored -> as displayed: turned ``rotation`` degrees counterclockwise."""
    return np.rot90(frame, k=rotation // 90) if rotation else frame


def _fit(frame: np.ndarray, plan: ClipPlan) -> np.ndarray:
    """One displayed frame -> the bucket: cover-resize to ``plan.resized``, then cut at ``plan.crop``."""
    img = Image.fromarray(np.ascontiguousarray(frame), "RGB")
    if img.size != plan.resized:
        img = img.resize(plan.resized, Image.Resampling.LANCZOS)
    left, top = plan.crop
    w, h = plan.size
    pixels = np.asarray(img)[top : top + h, left : left + w]
    if pixels.shape != (h, w, 3):  # geometry bug guard: never hand the encoder a wrong-sized frame
        raise ItemError(f"internal: cropped to {pixels.shape}, expected {(h, w, 3)}")
    return pixels
