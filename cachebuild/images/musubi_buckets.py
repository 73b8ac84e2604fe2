"""musubi-tuner's bucket rule, reproduced so that a latent sits in the bucket musubi recomputes at training.

musubi-tuner never stores a bucket: at training it parses each image's size back from the cache file's name
and asks its ``BucketSelector`` (``dataset/bucket.py``) again. A latent encoded at any other bucket is stacked
with the wrong neighbours, so ``cachebuild latents --buckets musubi`` plans with this rule and the musubi export
checks every item against it. The rule, as musubi-tuner v0.3.4 writes it:

- area = W * H of the dataset's ``resolution``; sides in steps of 16 for every image architecture it trains
  (qi, f2d, f2k4b, f2k9b, zi, fk, wan, ...);
- buckets: for w from ``(isqrt(area) // 2)`` rounded down to the step, up to ``isqrt(area)`` inclusive, in
  steps: (w, h) and (h, w) with h = ``area // w`` rounded down to the step; no min or max side;
- an image takes the first bucket, in sorted (W, H) order, whose aspect ratio is nearest its own;
- with ``bucket_no_upscale``, an image of area at most ``area`` keeps its own size rounded down to the step.
"""

from __future__ import annotations

import math

MUSUBI_STEPS = 16  # BucketSelector.RESOLUTION_STEPS_* of every image architecture exported (16 pixels)


def musubi_buckets(resolution: tuple[int, int], steps: int = MUSUBI_STEPS) -> list[tuple[int, int]]:
    """musubi's bucket list for a dataset ``resolution`` (W, H), sorted as musubi sorts it."""
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area))
    first = _down(side // 2, steps)
    buckets = set()
    for w in range(first, side + steps, steps):
        h = _down(area // w, steps)
        buckets.add((w, h))
        buckets.add((h, w))
    return sorted(buckets)


def musubi_bucket(
    size: tuple[int, int],
    resolution: tuple[int, int],
    no_upscale: bool = False,
    buckets: list[tuple[int, int]] | None = None,
    steps: int = MUSUBI_STEPS,
) -> tuple[int, int]:
    """The bucket (W, H) musubi's ``get_bucket_resolution`` gives an image of ``size`` (W, H).

    Example:
        >>> musubi_bucket((1200, 800), (1024, 1024))
        (1248, 832)
    """
    w, h = size
    if no_upscale and w * h <= resolution[0] * resolution[1]:
        return _down(w, steps), _down(h, steps)
    buckets = buckets if buckets is not None else musubi_buckets(resolution, steps)
    ratio = w / h
    errors = [abs(bw / bh - ratio) for bw, bh in buckets]
    return buckets[errors.index(min(errors))]  # the first of equal errors, as numpy's argmin


def _down(x: int, steps: int) -> int:
    return x - x % steps
