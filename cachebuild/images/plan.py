"""Plan: aspect-ratio buckets (kohya sd-scripts' rules) and, per image, the resize and crop to take.

All geometry here is pure arithmetic on sizes; nothing is decoded. A plan for an item says: the image is
``original`` pixels (after EXIF rotation, unless ``exif`` is ignore); resize it to ``resized`` (covering the
bucket); cut the bucket out at ``crop`` (left, top) in resized pixels.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cachebuild.config import BucketConfig, BucketRule, CropMode, ExifMode
from cachebuild.errors import ItemError
from cachebuild.images.musubi_buckets import MUSUBI_STEPS, musubi_bucket, musubi_buckets
from cachebuild.images.pixels import REFERENCE, Pixels
from cachebuild.keys import item_seed


@dataclass(frozen=True)
class ItemPlan:
    """Geometry for one image, all in pixels as (W, H) or (left, top)."""

    key: str
    path: str  # absolute path of the source file
    original: tuple[int, int]  # size after EXIF rotation (as stored in the file with ExifMode.IGNORE)
    bucket: tuple[int, int]
    resized: tuple[int, int]  # size the whole image is resized to before the crop
    crop: tuple[int, int]  # (left, top) of the bucket inside the resized image
    exif: ExifMode = ExifMode.APPLY  # carried with the item so every decode process reads the file the same way
    pixels: Pixels = REFERENCE  # likewise: colour, transparency and whether the alpha channel is kept


class BucketPlan:
    """The bucket set for one config, and the rule that puts an image into a bucket.

    Example:
        >>> plan = BucketPlan(BucketConfig(resolution=(512, 512)))
        >>> plan.select((1200, 800))
        (640, 384)
    """

    def __init__(self, cfg: BucketConfig):
        self.cfg = cfg
        self.musubi = cfg.rule is BucketRule.MUSUBI
        self.buckets = musubi_buckets(cfg.resolution) if self.musubi else make_buckets(cfg)
        self._ratios = [w / h for w, h in self.buckets]

    def select(self, size: tuple[int, int]) -> tuple[int, int]:
        """The bucket (W, H) for an image of ``size`` (W, H)."""
        w, h = size
        if self.musubi:
            bucket = musubi_bucket(size, self.cfg.resolution, self.cfg.no_upscale, self.buckets)
            if min(bucket) == 0:
                raise ItemError(
                    f"image is {w}x{h}, smaller than musubi's bucket step ({MUSUBI_STEPS} px) on a side; "
                    "drop --bucket-no-upscale or leave the image out"
                )
            return bucket
        if self.cfg.no_upscale:
            return self._own_bucket(w, h)
        if (w, h) in self.buckets:  # already bucket-sized: keep it, as kohya does
            return (w, h)
        ratio = w / h
        best = min(range(len(self.buckets)), key=lambda i: (abs(self._ratios[i] - ratio), self.buckets[i]))
        return self.buckets[best]

    def resize_and_crop(self, size: tuple[int, int], bucket: tuple[int, int], crop: CropMode, seed: int, key: str):
        """(resized, crop): the cover-resize of ``size`` for ``bucket`` and the (left, top) of the cut."""
        w, h = size
        bw, bh = bucket
        scale = max(bw / w, bh / h)
        resized = (max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5)))
        slack_x, slack_y = resized[0] - bw, resized[1] - bh
        if crop is CropMode.RANDOM:
            rng = random.Random(item_seed(seed, key, "crop"))
            left, top = rng.randint(0, slack_x), rng.randint(0, slack_y)
        else:
            left, top = slack_x // 2, slack_y // 2
        return resized, (left, top)

    def _own_bucket(self, w: int, h: int) -> tuple[int, int]:
        """--bucket-no-upscale: shrink to the area limit if larger, then round sides down to the steps."""
        steps, ratio = self.cfg.steps, w / h
        if w * h > self.cfg.max_area:
            rw = math.sqrt(self.cfg.max_area * ratio)
            rh = self.cfg.max_area / rw
            bw = _round_to_steps(rw, steps)
            by_w = bw / max(steps, _round_to_steps(bw / ratio, steps))
            bh = _round_to_steps(rh, steps)
            by_h = max(steps, _round_to_steps(bh * ratio, steps)) / max(bh, 1)
            w, h = (bw, int(bw / ratio + 0.5)) if abs(by_w - ratio) < abs(by_h - ratio) else (int(bh * ratio + 0.5), bh)
        bucket = (w - w % steps, h - h % steps)
        if min(bucket) == 0:
            raise ItemError(
                f"image is {w}x{h}, smaller than one bucket step ({steps} px) on a side; drop "
                "--bucket-no-upscale or lower --bucket-reso-steps"
            )
        return bucket


def make_buckets(cfg: BucketConfig) -> list[tuple[int, int]]:
    """kohya's bucket set: the square bucket, then every (W, H) with W in steps from min to max side and H
    the largest multiple of ``steps`` with W * H <= area, capped at the max side; sorted."""
    steps, lo, hi = cfg.steps, cfg.min_reso, cfg.max_reso
    area = cfg.max_area
    side = int(math.sqrt(area) // steps) * steps
    buckets = {(side, side)}
    for width in range(lo, hi + 1, steps):
        height = min(hi, int((area // width) // steps) * steps)
        if height >= lo:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def plan_item(
    plan: BucketPlan,
    key: str,
    path: str,
    original: tuple[int, int],
    crop: CropMode,
    seed: int,
    exif: ExifMode = ExifMode.APPLY,
    pixels: Pixels = REFERENCE,
) -> ItemPlan:
    bucket = plan.select(original)
    resized, cut = plan.resize_and_crop(original, bucket, crop, seed, key)
    return ItemPlan(key, path, original, bucket, resized, cut, exif, pixels)


def batch_by_bucket(items: Iterable[ItemPlan], batch_size: int) -> Iterator[list[ItemPlan]]:
    """Bucket-homogeneous batches: sorted by bucket then key, so the order is the same on every run."""
    by_bucket: dict[tuple[int, int], list[ItemPlan]] = {}
    for item in items:
        by_bucket.setdefault(item.bucket, []).append(item)
    for bucket in sorted(by_bucket):
        group = sorted(by_bucket[bucket], key=lambda i: i.key)
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def _round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps
