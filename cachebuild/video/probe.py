"""Probe: a video's header, read once per new or changed file and remembered in the manifest by the scan.

What planning needs without decoding: the displayed size (rotation applied), the frame count after ``--fps``,
the source rate for the record, and where to seek for a clip. A video file is demuxed once, packets only (no
frame is decoded but the first, for its rotation): every frame's timestamp gives an exact count for any frame
rate, constant or variable, and a file whose packets stop early is caught here. Each keyframe becomes a seek
point that says how many kept frames precede it, so a clip in the middle of a long video is decoded from the
keyframe before it, never from the start (``video.decode``).

Animated GIF and WebP files are read through Pillow (FFmpeg's WebP decoder reads no animation): their frame
times are the sums of the frame durations; they are short, so they are decoded from the start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from fractions import Fraction

from cachebuild.errors import ItemError
from cachebuild.video.clips import kept

VIDEO = "video"  # decoded by FFmpeg (PyAV)
ANIMATION = "animation"  # an animated GIF or WebP, decoded by Pillow
IMAGE = "image"  # a still image in a video dataset: a clip of one frame, decoded as images are
HEADER_META = "video:"  # manifest meta key prefix: each video file's remembered header, by its relative path
# ({"fp": source fingerprint, "settings": [fps, source fps], "header": VideoHeader.as_json() or "reason": why not})
TRUNCATION_SLACK_S = 0.5  # frames may end this much (plus two frames) before the container's stated duration
# without the file counting as truncated: containers round durations and count the last frame's display time


@dataclass(frozen=True)
class VideoHeader:
    """What planning knows of one video, JSON-ready (``as_json`` / ``from_json``)."""

    size: tuple[int, int]  # (W, H) as displayed: the rotation applied
    rotation: int  # degrees counterclockwise the stored frames turn to be displayed: 0, 90, 180 or 270
    frames: int  # frames after --fps (all of them without it)
    fps: float  # the source's rate as its container states it (FFmpeg's average rate), else frames over their span
    kind: str = VIDEO
    time_base: tuple[int, int] = (1, 1)  # of the video stream's timestamps (seconds per tick)
    start_pts: int = 0  # the first frame's timestamp: times count from here
    seek: list[list] = field(default_factory=list)  # per keyframe: [pts, frames before it, kept frames before it,
    # pts of the frame before it or None]; video only

    def as_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> VideoHeader:
        return cls(**(d | {"size": tuple(d["size"]), "time_base": tuple(d["time_base"])}))

    def seek_point(self, start: int) -> tuple[int | None, int, int, int | None]:
        """(pts to seek to, None for the first frame; frames and kept frames before it; the previous frame's pts)
        for a clip whose first kept frame is ``start``: the last keyframe with at most ``start`` kept frames
        before it."""
        best = None
        for point in self.seek:
            if point[2] > start:
                break
            best = point
        if best is None or best[1] == 0:
            return None, 0, 0, None
        return best[0], best[1], best[2], best[3]


def probe(path: str, kind: str, fps: Fraction | None, source_fps: Fraction | None, max_pixels: int) -> VideoHeader:
    """The header of the video at ``path``; ``fps`` is the rate clips are resampled to (None: none) and
    ``source_fps`` the rate to assume instead of the timestamps.

    Raises:
        ItemError: with the reason a person can act on (empty, no video stream, truncated, not readable).
    """
    if kind == ANIMATION:
        return _probe_animation(path, fps, source_fps, max_pixels)
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ItemError(_no_video_reason(container))
            stream = container.streams.video[0]
            _check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels)
            pts, keys, rotation = _timestamps(container, stream)
            declared = _stated_duration(container, stream)
            stated = float(stream.average_rate) if stream.average_rate else None
            w, h = stream.codec_context.width, stream.codec_context.height
    except ItemError:
        raise
    except av.error.FFmpegError as exc:
        raise ItemError(open_reason(path, exc)) from exc
    if not pts:
        raise ItemError("the video stream holds no frames; re-export the file or remove it")
    tb = Fraction(stream.time_base) if stream.time_base else Fraction(1, 1)
    times = _times(pts, tb, source_fps)
    span = times[-1] + (times[-1] / max(1, len(times) - 1))  # the last frame's display time included
    if declared is not None and float(span) + TRUNCATION_SLACK_S + 2 * float(span) / len(times) < declared:
        raise ItemError(
            f"file is truncated: the container says {declared:.2f} s but its frames end at {float(span):.2f} s; "
            "re-copy it from the original"
        )
    flags = kept(times, fps)
    seek, before = [], 0
    for i, (p, keep) in enumerate(zip(pts, flags, strict=True)):
        if p in keys:
            seek.append([p, i, before, pts[i - 1] if i else None])
        before += keep
    size = (h, w) if rotation in (90, 270) else (w, h)
    rate = stated or (float(len(times) / span) if span else 0.0)
    return VideoHeader(size, rotation, before, rate, VIDEO, (tb.numerator, tb.denominator), pts[0], seek)


def open_reason(path: str, exc: Exception) -> str:
    """Why FFmpeg could not read a file, for a person: empty, truncated, or not a video it knows."""
    import os

    text = str(exc)
    try:
        if os.path.getsize(path) == 0:
            return "file is empty (0 bytes); re-copy it or delete it"
    except OSError:
        pass
    if "moov atom not found" in text or "End of file" in text or "truncat" in text.lower():
        return f"file is truncated ({text}); re-copy it from the original"
    return (
        f"FFmpeg cannot read it as a video ({type(exc).__name__}: {text}): it is damaged, truncated or not a video "
        "format FFmpeg knows; re-copy or convert it, or remove it"
    )


def _timestamps(container, stream) -> tuple[list[int], set[int], int]:
    """Every frame's timestamp in presentation order, the keyframes', and the display rotation, from the packets:
    only the first frame is decoded, for its rotation (FFmpeg's display matrix, which its decoders attach to
    every frame), as 0, 90, 180 or 270 degrees counterclockwise; a mirroring matrix is not applied."""
    import av

    pts: list[int] = []
    keys: set[int] = set()
    rotation = None
    try:
        for packet in container.demux(stream):
            t = packet.pts if packet.pts is not None else packet.dts
            if packet.size == 0 or t is None:  # the demuxer's flush packet
                continue
            pts.append(t)
            if packet.is_keyframe:
                keys.add(t)
            if rotation is None:  # decoders may hold a few packets (B-frames) before the first frame comes out
                frames = packet.decode()
                rotation = int(round((frames[0].rotation or 0) / 90.0)) % 4 * 90 if frames else None
    except av.error.FFmpegError as exc:
        raise ItemError(f"file is truncated or damaged after {len(pts)} frames ({exc}); re-copy it") from exc
    pts.sort()  # decode order -> presentation order (B-frames)
    return pts, keys, rotation or 0


def _times(pts: list[int], tb: Fraction, source_fps: Fraction | None) -> list[Fraction]:
    if source_fps is not None:  # the user's rate replaces the timestamps: frame i shows at i / rate
        return [Fraction(i) / source_fps for i in range(len(pts))]
    return [(p - pts[0]) * tb for p in pts]


def _stated_duration(container, stream) -> float | None:
    """Seconds the video stream says it lasts: its own duration (mp4, mov), its DURATION tag (Matroska, WebM), else
    the container's (the longest stream's: a longer audio stream there could make a whole video look cut, so the
    video's own duration comes first)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag:
        try:
            h, m, sec = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            pass
    return container.duration / 1_000_000 if container.duration else None


def _no_video_reason(container) -> str:
    if container.streams.audio:
        return "the file holds audio but no video stream; remove it from the video dataset"
    return "the file holds no video stream; remove it or convert it"


def _check_pixels(w: int, h: int, max_pixels: int) -> None:
    if w <= 0 or h <= 0:
        raise ItemError(f"video has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise ItemError(f"frames of {w}x{h} exceed --max-pixels {max_pixels}; raise it if the file is trusted")


def _probe_animation(path: str, fps: Fraction | None, source_fps: Fraction | None, max_pixels: int) -> VideoHeader:
    from PIL import Image

    try:
        with Image.open(path) as img:
            _check_pixels(*img.size, max_pixels)
            durations = animation_durations(img)
            size = img.size
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ItemError(f"animation cannot be read ({type(exc).__name__}: {exc}); re-save it or remove it") from exc
    starts = [sum(durations[:i], Fraction(0)) for i in range(len(durations))]
    times = [Fraction(i) / source_fps for i in range(len(starts))] if source_fps is not None else starts
    total = sum(durations, Fraction(0))
    rate = float(len(durations) / total) if total else 0.0
    return VideoHeader(size, 0, sum(kept(times, fps)), rate, ANIMATION)


def is_animated(path: str) -> bool:
    """Whether a GIF or WebP holds more than one frame (a still one is an image); an unreadable one is left to
    the image loader, which gives the reason."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return getattr(img, "n_frames", 1) > 1
    except (OSError, SyntaxError, ValueError, EOFError):
        return False


def animation_durations(img) -> list[Fraction]:
    """Each frame's display time in seconds (Pillow's ``duration``, milliseconds; 100 ms where it is 0 or absent,
    as browsers show such frames)."""
    out = []
    for i in range(getattr(img, "n_frames", 1)):
        img.seek(i)
        ms = img.info.get("duration") or 100
        out.append(Fraction(int(ms), 1000))
    return out
