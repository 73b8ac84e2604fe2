"""Plan: one clip's geometry and frames, and what its decode worker needs to find them.

The spatial bucket, resize and crop are the images' (``images.plan.BucketPlan``: kohya's rule, or musubi's with
``--buckets musubi``), chosen from the displayed size of the video's frames; the frames are fixed per clip.
``ClipPlan.bucket`` is (W, H, F): what the engines group batches by and size ``--batch-size auto`` for, so a
batch holds clips of one shape. A plan decodes itself (``ClipPlan.decode``): the image decode workers call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from cachebuild.config import CropMode, ExifMode
from cachebuild.images.plan import BucketPlan
from cachebuild.video.probe import IMAGE, VideoHeader


@dataclass(frozen=True)
class ClipPlan:
    """Geometry and frames of one clip; sizes are (W, H) in pixels, frames counted after ``--fps``."""

    key: str
    path: str  # absolute path of the source file
    original: tuple[int, int]  # displayed size of its frames (rotation or EXIF orientation applied)
    bucket: tuple[int, int, int]  # (W, H, F): the clip's shape once resized and cropped
    resized: tuple[int, int]  # every frame is resized to this before the crop
    crop: tuple[int, int]  # (left, top) of the bucket inside the resized frame
    start: int  # the clip's first frame, counted on the resampled timeline
    kind: str  # probe.VIDEO, probe.ANIMATION or probe.IMAGE
    rotation: int = 0  # degrees counterclockwise the stored frames turn to be displayed
    seek: tuple = (None, 0, 0, None)  # VideoHeader.seek_point(start)
    time_base: tuple[int, int] = (1, 1)
    start_pts: int = 0
    fps: tuple[int, int] | None = None  # the --fps rate as a fraction (None: every frame kept)
    source_fps: tuple[int, int] | None = None  # --source-fps as a fraction (None: the timestamps)
    exif: ExifMode = ExifMode.APPLY  # images only
    source: str = ""  # the file, relative to the dataset folder (for the record)
    clip_fps: float = 0.0  # the rate of the clip's frames: --fps, or the source's average rate (for the record)

    @property
    def frames(self) -> int:
        return self.bucket[2]

    @property
    def size(self) -> tuple[int, int]:
        """The spatial bucket (W, H)."""
        return self.bucket[0], self.bucket[1]

    def rate(self) -> Fraction | None:
        return None if self.fps is None else Fraction(*self.fps)

    def source_rate(self) -> Fraction | None:
        return None if self.source_fps is None else Fraction(*self.source_fps)

    def decode(self, max_pixels: int) -> np.ndarray:
        """The clip's (F, H, W, 3) uint8 frames, bucket-sized (``video.decode``).

        Raises:
            ItemError: with a reason a person can act on.
        """
        from cachebuild.video.decode import decode_clip

        return decode_clip(self, max_pixels)


def plan_clip(
    buckets: BucketPlan,
    key: str,
    path: str,
    header: VideoHeader,
    span: tuple[int, int],
    crop: CropMode,
    seed: int,
    rates: tuple[Fraction | None, Fraction | None],
) -> ClipPlan:
    """The plan of the clip ``span`` (start, frames) of a video whose header is ``header``; ``rates`` is (--fps,
    --source-fps). The crop is seeded by the clip's key, so each clip of a video may get its own random crop."""
    size = buckets.select(header.size)
    resized, cut = buckets.resize_and_crop(header.size, size, crop, seed, key)
    fps, source = rates
    return ClipPlan(
        key, path, header.size, (*size, span[1]), resized, cut, span[0], header.kind, header.rotation,
        tuple(header.seek_point(span[0])), header.time_base, header.start_pts,
        None if fps is None else (fps.numerator, fps.denominator),
        None if source is None else (source.numerator, source.denominator),
    )  # fmt: skip


def plan_image(
    buckets: BucketPlan, key: str, path: str, original: tuple[int, int], crop: CropMode, seed: int, exif: ExifMode
) -> ClipPlan:
    """A still image of a video dataset as a clip of one frame."""
    size = buckets.select(original)
    resized, cut = buckets.resize_and_crop(original, size, crop, seed, key)
    return ClipPlan(key, path, original, (*size, 1), resized, cut, 0, IMAGE, exif=exif)


def plan_from_record(
    key: str, path: str, info: dict, header: VideoHeader | None, clips: dict, exif: ExifMode = ExifMode.APPLY
) -> ClipPlan:
    """The plan of a stored clip, rebuilt from its record (``info``), its video's remembered header and the cache
    fingerprint's ``clips`` object, to decode its source frames again (preview). ``header`` None: an image."""
    bucket = (*info["bucket"], info.get("frames", 1))
    geometry = (tuple(info["original_size"]), bucket, tuple(info["resized"]), tuple(info["crop"]))
    if header is None:
        return ClipPlan(key, path, *geometry, 0, IMAGE, exif=exif)
    fps, source = (None if clips.get(k) is None else Fraction(clips[k]) for k in ("fps", "source_fps"))
    return ClipPlan(
        key, path, *geometry, info["start"], header.kind, header.rotation, tuple(header.seek_point(info["start"])),
        header.time_base, header.start_pts,
        None if fps is None else (fps.numerator, fps.denominator),
        None if source is None else (source.numerator, source.denominator),
    )  # fmt: skip
