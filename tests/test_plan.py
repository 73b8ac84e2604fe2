"""plan: kohya sd-scripts bucket parity, bucket selection, resize-and-crop geometry, batching, seeds."""

from __future__ import annotations

import hashlib
import math
import random

import pytest

from cachebuild.config import BucketConfig, CropMode
from cachebuild.errors import ItemError
from cachebuild.images.plan import BucketPlan, ItemPlan, batch_by_bucket, make_buckets, plan_item
from cachebuild.keys import item_seed

# -- an independent transcription of kohya sd-scripts' library/model_util.py and train_util.BucketManager --


def kohya_make_bucket_resolutions(max_reso, min_size=256, max_size=1024, divisible=64):
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def kohya_no_upscale_bucket(image_width, image_height, max_area, reso_steps):
    """BucketManager.select_bucket with no_upscale=True."""

    def round_to_steps(x):
        x = int(x + 0.5)
        return x - x % reso_steps

    aspect_ratio = image_width / image_height
    if image_width * image_height > max_area:
        resized_width = math.sqrt(max_area * aspect_ratio)
        resized_height = max_area / resized_width
        b_width_rounded = round_to_steps(resized_width)
        b_height_in_wr = round_to_steps(b_width_rounded / aspect_ratio)
        ar_width_rounded = b_width_rounded / b_height_in_wr
        b_height_rounded = round_to_steps(resized_height)
        b_width_in_hr = round_to_steps(b_height_rounded * aspect_ratio)
        ar_height_rounded = b_width_in_hr / b_height_rounded
        if abs(ar_width_rounded - aspect_ratio) < abs(ar_height_rounded - aspect_ratio):
            resized_size = (b_width_rounded, int(b_width_rounded / aspect_ratio + 0.5))
        else:
            resized_size = (int(b_height_rounded * aspect_ratio + 0.5), b_height_rounded)
    else:
        resized_size = (image_width, image_height)
    return (resized_size[0] - resized_size[0] % reso_steps, resized_size[1] - resized_size[1] % reso_steps)


CONFIGS = [
    BucketConfig(resolution=(1024, 1024), min_reso=256, max_reso=2048, steps=64),
    BucketConfig(resolution=(512, 512), min_reso=256, max_reso=1024, steps=64),
    BucketConfig(resolution=(768, 1024), min_reso=256, max_reso=2048, steps=64),
    BucketConfig(resolution=(640, 480), min_reso=128, max_reso=1024, steps=32),
    BucketConfig(resolution=(1024, 1024), min_reso=512, max_reso=1536, steps=128),
]


def random_sizes(n: int, seed: int, lo: int = 16, hi: int = 4000) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(lo, hi), rng.randint(lo, hi)) for _ in range(n)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.resolution}-{c.min_reso}-{c.max_reso}-{c.steps}")
def test_buckets_match_kohya(cfg):
    expected = kohya_make_bucket_resolutions(cfg.resolution, cfg.min_reso, cfg.max_reso, cfg.steps)
    assert make_buckets(cfg) == expected
    assert BucketPlan(cfg).buckets == expected


def test_known_bucket_set_for_sdxl_defaults():
    buckets = make_buckets(BucketConfig())
    assert (1024, 1024) in buckets
    assert (832, 1216) in buckets and (1216, 832) in buckets  # the well-known SDXL portrait/landscape pair
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(256 <= w <= 2048 and 256 <= h <= 2048 for w, h in buckets)
    assert all(w * h <= 1024 * 1024 for w, h in buckets)


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: f"{c.resolution}")
def test_select_minimises_aspect_ratio_error(cfg):
    plan = BucketPlan(cfg)
    for w, h in random_sizes(300, seed=1):
        chosen = plan.select((w, h))
        assert chosen in plan.buckets
        best = min(abs(bw / bh - w / h) for bw, bh in plan.buckets)
        assert abs(chosen[0] / chosen[1] - w / h) == pytest.approx(best, abs=1e-12)


def test_select_docstring_example():
    assert BucketPlan(BucketConfig(resolution=(512, 512))).select((1200, 800)) == (640, 384)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.resolution}-{c.steps}")
def test_exact_bucket_sized_image_keeps_its_bucket(cfg):
    plan = BucketPlan(cfg)
    for bucket in plan.buckets:
        assert plan.select(bucket) == bucket
        assert plan.select((bucket[0] * 3, bucket[1] * 3)) == bucket  # same aspect, larger: same bucket


def test_exact_bucket_wins_over_an_equal_ratio_bucket():
    plan = BucketPlan(BucketConfig(resolution=(512, 512), min_reso=256, max_reso=1024, steps=64))
    plan.buckets = [(256, 512), (512, 1024)]  # two buckets with the same aspect ratio
    plan._ratios = [0.5, 0.5]
    assert plan.select((512, 1024)) == (512, 1024)
    assert plan.select((256, 512)) == (256, 512)


SIZES = [(1200, 800), (800, 1200), (1000, 1000), (4000, 300), (300, 4000), (517, 389), (1025, 1023), (64, 64)]


@pytest.mark.parametrize("size", SIZES)
def test_resize_covers_the_bucket_with_one_side_equal(size):
    plan = BucketPlan(BucketConfig())
    bucket = plan.select(size)
    for crop in CropMode:
        resized, (left, top) = plan.resize_and_crop(size, bucket, crop, seed=0, key="k")
        assert resized[0] >= bucket[0] and resized[1] >= bucket[1]
        assert resized[0] == bucket[0] or resized[1] == bucket[1]
        assert 0 <= left <= resized[0] - bucket[0] and 0 <= top <= resized[1] - bucket[1]
        # the aspect ratio is kept to within rounding of the longer side
        assert abs(resized[0] / resized[1] - size[0] / size[1]) <= 1.0 / min(resized) + 1e-9


def test_center_crop_is_centered():
    plan = BucketPlan(BucketConfig())
    for size in SIZES + random_sizes(100, seed=2):
        bucket = plan.select(size)
        resized, (left, top) = plan.resize_and_crop(size, bucket, CropMode.CENTER, seed=0, key="k")
        right, bottom = resized[0] - bucket[0] - left, resized[1] - bucket[1] - top
        assert 0 <= right - left <= 1 and 0 <= bottom - top <= 1


def test_random_crop_is_deterministic_per_seed_and_key_and_in_range():
    plan = BucketPlan(BucketConfig())
    size, bucket = (3000, 1000), (1536, 640)
    first = plan.resize_and_crop(size, bucket, CropMode.RANDOM, seed=7, key="sub/img001")
    assert plan.resize_and_crop(size, bucket, CropMode.RANDOM, seed=7, key="sub/img001") == first
    resized = first[0]
    slack = resized[0] - bucket[0]
    assert slack > 100  # the crop has real room to move
    by_key = {plan.resize_and_crop(size, bucket, CropMode.RANDOM, seed=7, key=f"k{i}")[1] for i in range(40)}
    by_seed = {plan.resize_and_crop(size, bucket, CropMode.RANDOM, seed=s, key="sub/img001")[1] for s in range(40)}
    assert len(by_key) > 10 and len(by_seed) > 10
    for left, top in by_key | by_seed:
        assert 0 <= left <= slack and top == 0  # no vertical slack here


def test_random_crop_stays_in_range_for_many_sizes():
    plan = BucketPlan(BucketConfig())
    for i, size in enumerate(random_sizes(200, seed=3, lo=200)):
        bucket = plan.select(size)
        resized, (left, top) = plan.resize_and_crop(size, bucket, CropMode.RANDOM, seed=1, key=str(i))
        assert 0 <= left <= resized[0] - bucket[0]
        assert 0 <= top <= resized[1] - bucket[1]


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1], CONFIGS[3]], ids=lambda c: f"{c.resolution}-{c.steps}")
def test_no_upscale_never_enlarges_and_matches_kohya(cfg):
    cfg = BucketConfig(cfg.resolution, cfg.min_reso, cfg.max_reso, cfg.steps, no_upscale=True)
    plan = BucketPlan(cfg)
    for w, h in random_sizes(400, seed=4, lo=cfg.steps, hi=5000):
        bucket = plan.select((w, h))
        assert bucket == kohya_no_upscale_bucket(w, h, cfg.max_area, cfg.steps), (w, h)
        assert bucket[0] <= w and bucket[1] <= h
        assert bucket[0] % cfg.steps == 0 and bucket[1] % cfg.steps == 0
        assert min(bucket) >= cfg.steps
        resized, _ = plan.resize_and_crop((w, h), bucket, CropMode.CENTER, seed=0, key="k")
        assert resized[0] <= w and resized[1] <= h  # never upscaled
        assert resized[0] >= bucket[0] and resized[1] >= bucket[1]


def test_no_upscale_small_image_keeps_its_own_size_rounded_down():
    plan = BucketPlan(BucketConfig(resolution=(512, 512), no_upscale=True))
    assert plan.select((300, 200)) == (256, 192)
    assert plan.select((256, 192)) == (256, 192)


@pytest.mark.parametrize("size", [(40, 300), (300, 40), (63, 63)])
def test_no_upscale_too_small_image_is_an_item_error(size):
    plan = BucketPlan(BucketConfig(resolution=(512, 512), no_upscale=True))
    with pytest.raises(ItemError, match="--bucket-no-upscale"):
        plan.select(size)


def test_plan_item_combines_select_and_crop():
    plan = BucketPlan(BucketConfig(resolution=(512, 512)))
    item = plan_item(plan, "k", "/abs/k.jpg", (1200, 800), CropMode.CENTER, seed=0)
    assert item.key == "k" and item.path == "/abs/k.jpg" and item.original == (1200, 800)
    assert item.bucket == (640, 384)
    assert item.resized == (640, 427)
    assert item.crop == (0, 21)


def _item(key: str, bucket: tuple[int, int]) -> ItemPlan:
    return ItemPlan(key, f"/{key}.jpg", bucket, bucket, bucket, (0, 0))


def test_batch_by_bucket_is_homogeneous_complete_and_deterministic():
    buckets = [(512, 512), (640, 384), (384, 640)]
    items = [_item(f"img{i:03d}", buckets[i % 3]) for i in range(23)]
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    batches = list(batch_by_bucket(items, 4))
    assert [[i.key for i in b] for b in batches] == [[i.key for i in b] for b in batch_by_bucket(shuffled, 4)]
    assert all(len({i.bucket for i in b}) == 1 for b in batches)
    assert all(1 <= len(b) <= 4 for b in batches)
    flat = [i.key for b in batches for i in b]
    assert sorted(flat) == sorted(i.key for i in items) and len(flat) == len(set(flat))
    order = [b[0].bucket for b in batches]
    assert order == sorted(order)  # buckets in sorted order, each bucket's batches together
    for b in batches:
        assert [i.key for i in b] == sorted(i.key for i in b)
    # only a bucket's last batch may be short
    for prev, nxt in zip(batches, batches[1:], strict=False):
        if prev[0].bucket == nxt[0].bucket:
            assert len(prev) == 4


def test_batch_by_bucket_empty():
    assert list(batch_by_bucket([], 4)) == []


def test_item_seed_is_stable_and_separates_inputs():
    value = item_seed(0, "sub/img001", "crop")
    assert value == item_seed(0, "sub/img001", "crop")
    assert 0 <= value < 2**63
    # pinned: a change here changes every random crop and sampled latent in existing caches
    digest = hashlib.sha256(b"0\x00sub/img001\x00crop").digest()
    assert value == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    others = {item_seed(1, "sub/img001", "crop"), item_seed(0, "sub/img002", "crop"), item_seed(0, "sub/img001", "x")}
    assert value not in others and len(others) == 3
