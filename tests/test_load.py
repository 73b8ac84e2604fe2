"""load: header reads, decoding (EXIF, colour modes, transparency), bad files, JPEG draft, batch loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from cachebuild.config import AlphaMode, BucketConfig, ColorMode, CropMode
from cachebuild.errors import ItemError
from cachebuild.images.load import decode, iter_batches, read_size, to_rgb
from cachebuild.images.pixels import REFERENCE, Pixels
from cachebuild.images.plan import BucketPlan, ItemPlan, batch_by_bucket, plan_item
from tests.conftest import ODD_IMAGES, write_image

MAX_PIXELS = 178_956_970  # the CLI default
CORPUS = sorted(p for p in ODD_IMAGES.iterdir() if p.is_file()) if ODD_IMAGES.is_dir() else []
needs_corpus = pytest.mark.skipif(not ODD_IMAGES.is_dir(), reason=f"odd-images corpus not found at {ODD_IMAGES}")


@pytest.fixture(autouse=True)
def _restore_pillow_limit(monkeypatch):
    """load._open sets Pillow's process-wide MAX_IMAGE_PIXELS; keep that from leaking between tests."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


def plan_for(
    path: Path, bucket: tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS, pixels: Pixels = REFERENCE
) -> ItemPlan:
    """A centre-crop plan of ``path`` for ``bucket`` (default: the image's own upright size)."""
    size = read_size(str(path), max_pixels)
    bucket = bucket or size
    resized, crop = BucketPlan(BucketConfig()).resize_and_crop(size, bucket, CropMode.CENTER, 0, path.stem)
    return ItemPlan(path.stem, str(path), size, bucket, resized, crop, pixels=pixels)


WHITE, BLACK = Pixels(alpha=AlphaMode.WHITE), Pixels(alpha=AlphaMode.BLACK)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# -- the odd-images corpus: every file decodes or fails with a reason, nothing else ------------------


@needs_corpus
@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_corpus_file_decodes_or_fails_with_a_reason(path):
    plan = BucketPlan(BucketConfig(resolution=(64, 64), min_reso=32, max_reso=128, steps=32))
    try:
        size = read_size(str(path), MAX_PIXELS)
        item = plan_item(plan, path.stem, str(path), size, CropMode.CENTER, seed=0)
        pixels = decode(item, MAX_PIXELS)
    except ItemError as exc:
        assert str(exc).strip(), f"{path.name}: ItemError without a reason"
        return
    assert pixels.dtype == np.uint8
    assert pixels.shape == (item.bucket[1], item.bucket[0], 3)


@needs_corpus
def test_corpus_known_bad_files_fail():
    for name, words in [
        ("broken.png", "not an image"),
        ("decompression_bomb.gif", "--max-pixels"),
        ("LICENSE-Pillow.txt", "not an image"),
    ]:
        with pytest.raises(ItemError, match=words):
            read_size(str(ODD_IMAGES / name), MAX_PIXELS)


@needs_corpus
@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 8])
def test_corpus_hopper_orientations_decode_upright(orientation):
    reference = decode(plan_for(ODD_IMAGES / "hopper.jpg"), MAX_PIXELS)
    path = ODD_IMAGES / f"hopper_orientation_{orientation}.jpg"
    decoded = decode(plan_for(path), MAX_PIXELS)
    assert decoded.shape == reference.shape
    assert mean_abs_diff(decoded, reference) < 10
    stored = np.asarray(Image.open(path).convert("RGB"))  # as stored, not rotated
    assert mean_abs_diff(stored, reference) > 40  # so the comparison above can tell upright from not


# -- EXIF orientation with our own asymmetric image -------------------------------------------------

RED, GREEN, GREY = (255, 0, 0), (0, 255, 0), (128, 128, 128)

# pixels to store so that a viewer applying EXIF orientation n shows the upright image (EXIF 2.3, tag 0x0112)
TO_STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # shown mirrored left-right
    3: lambda a: a[::-1, ::-1],  # shown rotated 180
    4: lambda a: a[::-1, :],  # shown mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # 0th row = visual left, 0th column = visual top
    6: lambda a: np.rot90(a, 1),  # 0th row = visual right, 0th column = visual top (shown rotated 90 CW)
    7: lambda a: np.rot90(a.transpose(1, 0, 2), 2),  # 0th row = visual right, 0th column = visual bottom
    8: lambda a: np.rot90(a, -1),  # 0th row = visual left, 0th column = visual bottom (shown rotated 90 CCW)
}


def upright_pattern(w: int, h: int) -> np.ndarray:
    """Landscape grey image, red block top-left, green block top-right: every orientation differs."""
    arr = np.full((h, w, 3), GREY, np.uint8)
    b = h // 2
    arr[:b, :b] = RED
    arr[:b, w - b :] = GREEN
    return arr


def save_oriented(path: Path, upright: np.ndarray, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(TO_STORED[orientation](upright))
    Image.fromarray(stored, "RGB").save(path, exif=exif.tobytes(), **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


def assert_upright(pixels: np.ndarray) -> None:
    h, w, _ = pixels.shape
    q = h // 4  # sample the middle of each block, away from JPEG ringing and resize edges
    regions = {
        "top-left": (pixels[q : h // 2 - q // 2, q : h // 2 - q // 2], RED),
        "top-right": (pixels[q : h // 2 - q // 2, w - h // 2 + q // 2 : w - q], GREEN),
        "bottom-left": (pixels[h // 2 + q // 2 :, : h // 2], GREY),
        "bottom-right": (pixels[h // 2 + q // 2 :, w - h // 2 :], GREY),
    }
    for name, (region, colour) in regions.items():
        got = region.reshape(-1, 3).mean(axis=0)
        assert np.abs(got - colour).max() < 40, f"{name}: expected {colour}, got {got.round()}"


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_upright_size_and_pixels(tmp_path, orientation, suffix):
    path = save_oriented(tmp_path / f"o{orientation}{suffix}", upright_pattern(64, 32), orientation)
    with Image.open(path) as img:
        assert img.getexif().get(0x0112) == orientation  # the file really carries the tag
        assert img.size == ((32, 64) if orientation >= 5 else (64, 32))
    assert read_size(str(path), MAX_PIXELS) == (64, 32)
    pixels = decode(plan_for(path), MAX_PIXELS)
    assert pixels.shape == (32, 64, 3)
    assert_upright(pixels)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_with_jpeg_draft_and_resize(tmp_path, orientation):
    """A large rotated JPEG into a small bucket: draft decoding must still give upright pixels."""
    path = save_oriented(tmp_path / f"big{orientation}.jpg", upright_pattern(256, 128), orientation)
    assert read_size(str(path), MAX_PIXELS) == (256, 128)
    pixels = decode(plan_for(path, bucket=(64, 32)), MAX_PIXELS)
    assert pixels.shape == (32, 64, 3)
    assert_upright(pixels)


# -- colour modes ----------------------------------------------------------------------------------


def test_fully_transparent_rgba_keeps_its_colour_or_becomes_the_background(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (32, 16), (10, 20, 30, 0)).save(path)
    assert (decode(plan_for(path), MAX_PIXELS) == (10, 20, 30)).all()  # alpha dropped, as convert("RGB")
    assert (decode(plan_for(path, pixels=WHITE), MAX_PIXELS) == 255).all()
    assert (decode(plan_for(path, pixels=BLACK), MAX_PIXELS) == 0).all()


def test_partly_transparent_rgba_is_composited_over_the_background_asked_for(tmp_path):
    arr = np.zeros((16, 32, 4), np.uint8)
    arr[:, :16] = (200, 10, 10, 255)  # opaque red left half
    arr[:, 16:] = (0, 0, 255, 0)  # fully transparent blue right half
    arr[:8, 16:, 3] = 128  # ... whose top quarter is half transparent
    path = tmp_path / "half.png"
    Image.fromarray(arr, "RGBA").save(path)
    pixels = decode(plan_for(path, pixels=WHITE), MAX_PIXELS).astype(int)
    assert (pixels[:, :16] == (200, 10, 10)).all()
    assert (pixels[8:, 16:] == 255).all()
    assert np.abs(pixels[:8, 16:] - (127, 127, 255)).max() <= 2  # 50% blue over white
    black = decode(plan_for(path, pixels=BLACK), MAX_PIXELS).astype(int)
    assert (black[8:, 16:] == 0).all() and np.abs(black[:8, 16:] - (0, 0, 128)).max() <= 2
    np.testing.assert_array_equal(decode(plan_for(path), MAX_PIXELS), arr[..., :3])  # the default: no compositing


def test_la_and_palette_transparency(tmp_path):
    la = tmp_path / "la.png"
    Image.new("LA", (16, 16), (40, 0)).save(la)
    assert (decode(plan_for(la), MAX_PIXELS) == 40).all()
    assert (decode(plan_for(la, pixels=WHITE), MAX_PIXELS) == 255).all()

    pal = Image.new("P", (16, 16), 3)
    pal.putpalette([0, 0, 0] * 3 + [5, 6, 7] + [0, 0, 0] * 252)
    pal_path = tmp_path / "pal.png"
    pal.save(pal_path, transparency=3)
    assert (decode(plan_for(pal_path), MAX_PIXELS) == (5, 6, 7)).all()  # the palette entry's colour
    assert (decode(plan_for(pal_path, pixels=WHITE), MAX_PIXELS) == 255).all()


@pytest.mark.parametrize("mode,key", [("RGB", (0, 0, 0)), ("L", 0)])
def test_colour_key_transparency(tmp_path, mode, key):
    path = tmp_path / f"trns-{mode}.png"
    Image.new(mode, (16, 16), key).save(path, transparency=key)
    with Image.open(path) as img:
        assert img.info.get("transparency") == key
        assert (np.asarray(img.convert("RGBA"))[..., 3] == 0).all()  # Pillow itself sees it transparent
    assert (decode(plan_for(path), MAX_PIXELS) == 0).all()
    assert (decode(plan_for(path, pixels=WHITE), MAX_PIXELS) == 255).all()


def test_alpha_mask_is_the_alpha_channel_resized_and_cropped_with_the_colours(tmp_path):
    arr = np.zeros((40, 80, 4), np.uint8)
    arr[..., :3] = (90, 80, 70)
    arr[:, 40:, 3] = 255  # left half transparent, right half opaque
    path = tmp_path / "half.png"
    Image.fromarray(arr, "RGBA").save(path)
    keep = Pixels(alpha_mask=True)
    out = decode(plan_for(path, (64, 32), pixels=keep), MAX_PIXELS)  # 80x40 -> 64x32
    assert out.shape == (32, 64, 4) and (out[..., :3] == (90, 80, 70)).all()
    assert (out[:, :28, 3] == 0).all() and (out[:, 36:, 3] == 255).all()
    want = np.asarray(Image.fromarray(arr[..., 3]).resize((64, 32), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(out[..., 3], want)
    opaque = write_image(tmp_path / "rgb.jpg", (64, 32))
    assert (decode(plan_for(opaque, pixels=keep), MAX_PIXELS)[..., 3] == 255).all()  # no alpha: all ones


def test_icc_profile_is_applied_only_with_color_icc(tmp_path):
    from tests.pixel_files import swapped_profile

    path = tmp_path / "tagged.png"
    Image.new("RGB", (16, 16), (200, 50, 20)).save(path, icc_profile=swapped_profile())
    assert (decode(plan_for(path), MAX_PIXELS) == (200, 50, 20)).all()  # the stored values
    icc = decode(plan_for(path, pixels=Pixels(ColorMode.ICC)), MAX_PIXELS)
    assert (icc == (20, 50, 200)).all()  # the profile swaps red and blue primaries


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits(tmp_path):
    row = np.array([0] * 16 + [65535] * 16 + [32896] * 16 + [257] * 16, np.uint16)
    arr = np.tile(row, (8, 1))  # (8, 64)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"
    pixels = decode(plan_for(path), MAX_PIXELS)
    assert pixels.shape == (8, 64, 3)
    assert (pixels[:, :16] == 0).all()
    assert (pixels[:, 16:32] == 255).all()
    assert (np.abs(pixels[:, 32:48].astype(int) - 128) <= 1).all()
    assert (pixels[:, 48:] == 1).all()
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_thirty_two_bit_greyscale_is_clipped_and_scaled():
    img = Image.fromarray(np.array([[-5, 0, 65535, 70000, 32896]], np.int32))
    assert img.mode == "I"
    out = np.asarray(to_rgb(img))[0, :, 0]
    assert out.tolist() == [0, 0, 255, 255, 128]


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    with Image.open(path) as img:
        assert img.mode == "CMYK"
    pixels = decode(plan_for(path), MAX_PIXELS).reshape(-1, 3).mean(axis=0)
    assert pixels[0] > 200 and pixels[1] < 60 and pixels[2] < 60


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_other_modes_come_out_rgb(tmp_path, mode):
    path = write_image(tmp_path / f"m{mode}.png", (24, 16), mode=mode)
    pixels = decode(plan_for(path), MAX_PIXELS)
    assert pixels.shape == (16, 24, 3) and pixels.dtype == np.uint8


# -- bad files ---------------------------------------------------------------------------------------


def test_zero_byte_file_is_reported_empty(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ItemError, match="empty"):
        read_size(str(path), MAX_PIXELS)
    with pytest.raises(ItemError, match="empty"):
        decode(ItemPlan("empty", str(path), (64, 64), (64, 64), (64, 64), (0, 0)), MAX_PIXELS)


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are my captions, not a photo\n")
    with pytest.raises(ItemError, match="not an image"):
        read_size(str(path), MAX_PIXELS)


def test_truncated_jpeg_fails_on_decode_as_truncated(tmp_path):
    whole = write_image(tmp_path / "whole.jpg", (128, 96), quality=95)
    data = whole.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    assert read_size(str(cut), MAX_PIXELS) == (128, 96)  # the header survived
    with pytest.raises(ItemError, match="truncated") as info:
        decode(plan_for(cut), MAX_PIXELS)
    assert "re-copy" in str(info.value)


def _cut_entropy_data_at_half(data: bytes) -> bytes:
    """The JPEG with its (last) scan's data cut at half and an end-of-image marker appended."""
    sos = data.rindex(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    end = data.rindex(b"\xff\xd9")
    return data[: start + (end - start) // 2] + b"\xff\xd9"


@pytest.mark.parametrize(
    "source",
    [pytest.param("flower.jpg", marks=needs_corpus), pytest.param("hopper.jpg", marks=needs_corpus), "grey.jpg"],
)
def test_jpeg_whose_data_stops_early_but_ends_with_an_end_marker_fails(tmp_path, source):
    if source == "grey.jpg":
        whole = write_image(tmp_path / source, (96, 64), mode="L", quality=90)
    else:
        whole = ODD_IMAGES / source
    cut = tmp_path / f"cut-{source}"
    cut.write_bytes(_cut_entropy_data_at_half(whole.read_bytes()))
    size = read_size(str(cut), MAX_PIXELS)
    assert read_size(str(whole), MAX_PIXELS) == size  # the header is intact: only decoding can tell
    with pytest.raises(ItemError, match="truncated JPEG: the image data ends early; re-export or re-download"):
        decode(plan_for(cut), MAX_PIXELS)
    small = plan_item(
        BucketPlan(BucketConfig(resolution=(32, 32), min_reso=16, max_reso=64, steps=16)),
        "cut",
        str(cut),
        size,
        CropMode.CENTER,
        0,
    )
    with pytest.raises(ItemError, match="truncated JPEG"):  # also when Pillow decodes at a draft scale
        decode(small, MAX_PIXELS)
    decode(plan_for(whole), MAX_PIXELS)


def test_complete_jpeg_that_ends_in_flat_grey_still_decodes(tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.full((96, 128, 3), 128, dtype=np.uint8)  # a 50% grey background, exactly what a cut file shows
    pixels[:32] = rng.integers(0, 256, (32, 128, 3), dtype=np.uint8)
    path = tmp_path / "grey-background.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    out = decode(plan_for(path), MAX_PIXELS)
    assert (out[-8:] == 128).all()


def test_vanished_file(tmp_path):
    with pytest.raises(ItemError, match="vanished"):
        read_size(str(tmp_path / "gone.jpg"), MAX_PIXELS)


@pytest.mark.parametrize("size", [(100, 100), (71, 71)])
def test_decompression_bomb_names_max_pixels(tmp_path, size):
    path = write_image(tmp_path / "big.png", size)
    with pytest.raises(ItemError, match="--max-pixels"):
        read_size(str(path), 5000)
    with pytest.raises(ItemError, match="--max-pixels"):
        decode(ItemPlan("big", str(path), size, (64, 64), (64, 64), (0, 0)), 5000)


def test_image_at_the_pixel_limit_is_accepted(tmp_path):
    path = write_image(tmp_path / "edge.png", (100, 50))
    assert read_size(str(path), 5000) == (100, 50)
    assert decode(plan_for(path, max_pixels=5000), 5000).shape == (50, 100, 3)


def test_image_at_an_odd_pixel_limit_is_accepted(tmp_path):
    path = write_image(tmp_path / "edge.png", (71, 69))  # 4899 pixels
    assert read_size(str(path), 4899) == (71, 69)


# -- JPEG draft -------------------------------------------------------------------------------------


def smooth_photo(w: int, h: int) -> np.ndarray:
    """Gradients, waves and a few flat shapes: photo-like low frequencies with some edges."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / 150.0)
    g = 128 + 100 * np.cos(y / 120.0)
    b = 255 * (x + y) / (w + h)
    arr = np.stack([r, g, b], axis=-1)
    arr[300:700, 400:900] = (230, 40, 40)
    arr[900:1300, 1200:1800] = (20, 20, 200)
    return np.clip(arr, 0, 255).astype(np.uint8)


def test_jpeg_draft_is_used_and_close_to_a_full_decode(tmp_path, monkeypatch):
    path = tmp_path / "large.jpg"
    Image.fromarray(smooth_photo(2000, 1500), "RGB").save(path, quality=92)
    drafts = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        drafts.append(size)
        return original_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    item = plan_for(path, bucket=(192, 128))
    assert item.resized == (192, 144)
    got = decode(item, MAX_PIXELS)
    assert drafts, "a 2000 px JPEG going into a 192 px bucket should be draft-decoded"

    with Image.open(path) as img:
        full = img.convert("RGB").resize(item.resized, Image.Resampling.LANCZOS)
    left, top = item.crop
    expected = np.asarray(full)[top : top + 128, left : left + 192]
    assert got.shape == expected.shape == (128, 192, 3)
    assert mean_abs_diff(got, expected) < 6


def test_no_draft_when_the_jpeg_is_barely_larger(tmp_path, monkeypatch):
    path = write_image(tmp_path / "small.jpg", (96, 64), quality=95)
    calls = []
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, *a: calls.append(a))
    decode(plan_for(path, bucket=(64, 48)), MAX_PIXELS)
    assert calls == []


# -- batch loading ------------------------------------------------------------------------------------


def test_iter_batches_same_with_and_without_workers(tmp_path):
    root = tmp_path / "data"
    plan = BucketPlan(BucketConfig(resolution=(64, 64), min_reso=32, max_reso=128, steps=32))
    items = []
    for i, size in enumerate([(96, 64), (64, 96), (80, 80), (100, 70), (64, 64), (70, 100), (90, 60)]):
        path = write_image(root / f"img{i}{'.png' if i % 2 else '.jpg'}", size, seed=i)
        items.append(plan_item(plan, path.stem, str(path), read_size(str(path), MAX_PIXELS), CropMode.RANDOM, 3))
    bad = root / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really")
    items.append(ItemPlan("bad", str(bad), (64, 64), (64, 64), (64, 64), (0, 0)))
    batches = list(batch_by_bucket(items, 2))
    assert len(batches) >= 4

    serial = list(iter_batches(batches, workers=0, max_pixels=MAX_PIXELS))
    parallel = list(iter_batches(batches, workers=2, max_pixels=MAX_PIXELS))
    assert len(serial) == len(parallel) == len(batches)
    for batch, s, p in zip(batches, serial, parallel, strict=True):
        assert [i.key for i in s.items] == [i.key for i in p.items]
        assert [(i.key, r) for i, r in s.failures] == [(i.key, r) for i, r in p.failures]
        assert {i.key for i in s.items} | {i.key for i, _ in s.failures} == {i.key for i in batch}
        if s.pixels is None:
            assert p.pixels is None
        else:
            bw, bh = batch[0].bucket
            assert s.pixels.shape == (len(s.items), bh, bw, 3)
            np.testing.assert_array_equal(s.pixels, p.pixels)
    failed = [i.key for b in serial for i, _ in b.failures]
    assert failed == ["bad"]


def test_iter_batches_keeps_at_most_workers_plus_prefetch_batches_in_flight(tmp_path, monkeypatch):
    from concurrent.futures import ProcessPoolExecutor

    from cachebuild.images import load

    root = tmp_path / "data"
    plan = BucketPlan(BucketConfig(resolution=(64, 64), min_reso=32, max_reso=128, steps=32))
    items = []
    for i in range(12):
        path = write_image(root / f"img{i:02d}.png", (64, 64), seed=i)
        items.append(plan_item(plan, path.stem, str(path), (64, 64), CropMode.CENTER, 0))
    batches = list(batch_by_bucket(items, 1))
    submitted = []
    real_submit = ProcessPoolExecutor.submit

    def counting_submit(self, fn, *args, **kwargs):
        submitted.append(1)
        return real_submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(ProcessPoolExecutor, "submit", counting_submit)
    in_flight = []
    for consumed, _ in enumerate(iter_batches(batches, workers=1, max_pixels=MAX_PIXELS), start=1):
        in_flight.append(len(submitted) - consumed)  # decoded or decoding, not yet handed to the encoder
    assert len(in_flight) == 12
    assert max(in_flight) <= 1 + load.PREFETCH_BATCHES  # the bound does not grow with the number of batches
