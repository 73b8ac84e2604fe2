"""Load: read headers, decode, EXIF-rotate, convert to RGB, resize and crop. No torch in here.

Decoding runs in worker processes (spawned, so they never inherit a CUDA context), a bounded number of
batches ahead of the encoder. Each image becomes a (H, W, 3) uint8 array exactly the size of its bucket.
A worker that dies costs at most the batches it held (``_Prefetch``), and workers die with the run
(``workers.py``).

Colour rules, applied in this order (the item's ``pixels`` say which; ``images.pixels`` has the why):
  * the first frame of an animated file;
  * EXIF orientation applied (the stored original size is the upright size), unless the item's ``exif`` is
    ``ignore``: then the pixels and size are as stored in the file, as sd-scripts and musubi-tuner read them;
  * the alpha channel taken aside, with ``--alpha-mask`` only;
  * an embedded ICC profile converted to sRGB when Pillow has LittleCMS, with ``--color icc`` only;
  * 16-bit and 32-bit greyscale scaled to 8 bits by value range (I;16: v / 257; I: clipped to 0..65535 first);
  * transparency (RGBA, LA, PA, and P/L/RGB/1 with a tRNS colour key) composited over white or black with
    ``--alpha white|black``; by default the alpha is dropped;
  * every mode to RGB through Pillow's convert("RGB") (CMYK, L, 1, P, YCbCr, LAB, HSV, RGBA, ...).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageOps

from cachebuild.config import ColorMode, ExifMode
from cachebuild.errors import ItemError, StorageError
from cachebuild.images.pixels import BACKGROUNDS, REFERENCE, Pixels, alpha_channel, composite
from cachebuild.images.plan import ItemPlan
from cachebuild.images.workers import describe_exit, run_alone, start_pool
from cachebuild.storage import input_size, open_input, read_input

log = logging.getLogger(__name__)

PREFETCH_BATCHES = 2  # decoded batches waiting for the encoder, beyond one per worker: keeps the device
# fed through slow files while host memory stays at a few batches of pixels
DRAFT_MIN_REDUCTION = 2  # use JPEG draft decoding when the source is at least this many times the target
BATCH_RETRIES_AFTER_CRASH = 1  # a batch unfinished when a worker died is decoded once more, alone in a fresh
# process: most deaths (the OOM killer's pick, a neighbouring batch's bad file) do not repeat, and a retry
# costs one process start
ITEM_TRIES_AFTER_CRASH = 1  # then each of its items gets one fresh process: a file that kills its decoder
# does so every time, so a second try would only repeat the crash
LOADER_VERSION = 2  # bump when decoding changes the pixels handed to the encoder; part of the fingerprint.
# 2: the default reads pixels as the trainers do (images.pixels); caches recorded at 1 keep their old rules

_SRGB = None


@dataclass(frozen=True)
class LoadedBatch:
    """Pixels for the items that decoded, and reasons for those that did not."""

    items: list[ItemPlan]  # items whose pixels are in ``pixels``, in order
    pixels: np.ndarray | None  # (B, H, W, 3) uint8, H x W the bucket ((B, F, H, W, 3) for clips); None: none decoded
    failures: list[tuple[ItemPlan, str]]  # (item, reason)
    alpha: np.ndarray | None = None  # (B, H, W) uint8, each item's alpha channel; only with --alpha-mask


def read_size(path: str, max_pixels: int, exif: ExifMode = ExifMode.APPLY) -> tuple[int, int]:
    """(W, H) after EXIF rotation (as stored with ``ExifMode.IGNORE``), from the header only.

    Raises:
        ItemError: the file is not a readable image, is empty, or is over ``max_pixels``.
    """
    with _open(path, max_pixels, whole=False) as img:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ItemError(f"image has zero size ({w}x{h})")
        if exif is ExifMode.IGNORE:
            return w, h
        try:
            orientation = img.getexif().get(0x0112, 1)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ItemError(_decode_reason(exc)) from exc
        return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def decode(item: ItemPlan, max_pixels: int) -> np.ndarray:
    """The bucket-sized (H, W, 3) uint8 pixels for one planned item; (H, W, 4), the alpha channel last, when the
    item keeps its alpha mask (``item.pixels.alpha_mask``).

    Raises:
        ItemError: with a reason a person can act on.
    """
    with _open(item.path, max_pixels) as img:
        try:
            img.seek(0)
            _maybe_draft(img, item)
            img.load()
            _refuse_early_end(img, item.path)
            if item.exif is ExifMode.APPLY:
                img = ImageOps.exif_transpose(img)
            alpha = alpha_channel(img) if item.pixels.alpha_mask else None
            img = _resize(to_rgb(img, item.pixels), item.resized)
            if alpha is not None:  # resized and cropped with the colours, as sd-scripts does its RGBA image
                img = Image.merge("RGBA", (*img.split(), _resize(alpha, item.resized)))
        except ItemError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ItemError(_decode_reason(exc)) from exc
    left, top = item.crop
    bw, bh = item.bucket
    pixels = np.asarray(img, dtype=np.uint8)[top : top + bh, left : left + bw]
    want = (bh, bw, 4 if item.pixels.alpha_mask else 3)
    if pixels.shape != want:  # geometry bug guard: never hand the encoder a wrong-sized image
        raise ItemError(f"internal: cropped to {pixels.shape}, expected {want}")
    return pixels


def to_rgb(img: Image.Image, pixels: Pixels = REFERENCE) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, by the rules in this module's docstring and ``pixels``' modes."""
    if pixels.color is ColorMode.ICC:
        img = _apply_icc(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if img.mode.startswith("I") else 1.0
        img = Image.fromarray(np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8), "L")
    if pixels.alpha in BACKGROUNDS:  # --alpha white|black; by default convert("RGB") drops the alpha
        img = composite(img, pixels.alpha)
    with warnings.catch_warnings():  # Pillow advises RGBA for a palette's transparency: dropping it is the point
        warnings.simplefilter("ignore", UserWarning)
        return img if img.mode == "RGB" else img.convert("RGB")


def iter_batches(batches: Iterable[list[ItemPlan]], workers: int, max_pixels: int) -> Iterator[LoadedBatch]:
    """Decode ``batches`` in order, with at most ``workers + PREFETCH_BATCHES`` of them in flight; ``batches``
    is read lazily, never held whole.

    A worker that dies (the OOM killer, a codec crash) costs at most its batch: see ``_Prefetch``. With
    ``workers == 0`` decoding runs in this process, so a crashing decoder ends the run as any crash of this
    process would; there is no worker to restart.
    """
    if workers == 0:
        for batch in batches:
            yield load_batch(batch, max_pixels)
        return
    prefetch = _Prefetch(workers, max_pixels)
    try:
        for batch in batches:
            prefetch.put(batch)
            if len(prefetch.pending) >= workers + PREFETCH_BATCHES:
                yield prefetch.take()
        while prefetch.pending:
            yield prefetch.take()
    finally:
        prefetch.close()


def load_batch(batch: list[ItemPlan], max_pixels: int) -> LoadedBatch:
    """Decode one bucket-homogeneous batch; a bad file fails alone."""
    ok, arrays, failures = [], [], []
    for item in batch:
        try:  # a plan may decode itself (video.plan.ClipPlan: a clip's frames); images.plan's are decoded here
            arrays.append(item.decode(max_pixels) if hasattr(item, "decode") else decode(item, max_pixels))
            ok.append(item)
        except ItemError as exc:
            failures.append((item, str(exc)))
        except StorageError:  # the object store failed, not the file: stop the run (storage.remote_read_errors)
            raise
        except Exception as exc:  # per-item boundary: any decoder surprise fails this item only
            failures.append((item, f"could not decode: {type(exc).__name__}: {exc}"))
    if not arrays:
        return LoadedBatch(ok, None, failures)
    stack = np.stack(arrays)  # (B, H, W, 3), or (B, H, W, 4) with the alpha channel kept
    if stack.shape[-1] == 3:
        return LoadedBatch(ok, stack, failures)
    return LoadedBatch(ok, np.ascontiguousarray(stack[..., :3]), failures, np.ascontiguousarray(stack[..., 3]))


def join_batches(parts: list[LoadedBatch], failures: list[tuple[ItemPlan, str]]) -> LoadedBatch:
    """Decoded batches (a crashed batch's items, decoded one by one) as one, with ``failures`` for the items
    that are in none of them."""
    done = [p for p in parts if p.pixels is not None]
    if not done:
        return LoadedBatch([], None, failures)
    alpha = np.concatenate([p.alpha for p in done]) if done[0].alpha is not None else None
    return LoadedBatch([i for p in done for i in p.items], np.concatenate([p.pixels for p in done]), failures, alpha)


class _Prefetch:
    """Batches decoding in a worker pool, handed back in the order they were put.

    When a worker dies the pool is broken and every batch that was unfinished in it is a suspect: the pool
    is restarted for the batches still to come, and each suspect is decoded again alone when its turn
    comes (``_recover``), so the order and the in-flight bound hold whatever dies.
    """

    def __init__(self, workers: int, max_pixels: int):
        self.workers, self.max_pixels = workers, max_pixels
        self.pool = start_pool(workers)
        self.pending: deque[tuple[list[ItemPlan], Future | None]] = deque()  # None: a suspect, not in any pool

    def put(self, batch: list[ItemPlan]) -> None:
        try:
            future = self.pool.submit(load_batch, batch, self.max_pixels)
        except BrokenProcessPool:
            self._restart()
            future = self.pool.submit(load_batch, batch, self.max_pixels)
        self.pending.append((batch, future))

    def take(self) -> LoadedBatch:
        batch, future = self.pending.popleft()
        if future is not None:
            try:
                return future.result()
            except BrokenProcessPool:
                self._restart()
        return _recover(batch, self.max_pixels)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _restart(self) -> None:
        log.warning("a decode worker died; restarting the pool, its unfinished batches are decoded again alone")
        self.pending = deque((b, f if f is not None and _succeeded(f) else None) for b, f in self.pending)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = start_pool(self.workers)


def _succeeded(future: Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _recover(batch: list[ItemPlan], max_pixels: int) -> LoadedBatch:
    """A batch whose worker died: once more alone, then each item in its own process, so only a file that
    kills its decoder fails."""
    for _ in range(BATCH_RETRIES_AFTER_CRASH):
        loaded, exitcode = run_alone(load_batch, batch, max_pixels)
        if loaded is not None:
            return loaded
        log.warning("decoding a batch of %d killed its process again (%s)", len(batch), describe_exit(exitcode))
    parts, failures = [], []
    for item in batch:
        loaded, exitcode = _load_item_alone(item, max_pixels)
        if loaded is None:
            failures.append((item, _crash_reason(exitcode)))
            continue
        failures.extend(loaded.failures)
        parts.append(loaded)
    return join_batches(parts, failures)


def _load_item_alone(item: ItemPlan, max_pixels: int) -> tuple[LoadedBatch | None, int | None]:
    exitcode = None
    for _ in range(ITEM_TRIES_AFTER_CRASH):
        loaded, exitcode = run_alone(load_batch, [item], max_pixels)
        if loaded is not None:
            return loaded, None
    return None, exitcode


def _crash_reason(exitcode: int | None) -> str:
    return (
        f"the decoder crashed on this file (worker process died: {describe_exit(exitcode)}); re-save the file "
        "or remove it (a SIGKILL can also be the system out of memory: then lower --workers)"
    )


def _open(path: str, max_pixels: int, whole: bool = True) -> Image.Image:
    # Pillow refuses images over twice this limit itself (before reading pixel data); the exact check is ours
    Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(open_input(path, whole=whole))  # a URL's bytes come through fsspec (storage)
    except Image.DecompressionBombError as exc:
        raise ItemError(f"decompression bomb refused: {str(exc).rstrip('.')}; raise --max-pixels if trusted") from exc
    except FileNotFoundError as exc:
        raise ItemError("file vanished after the scan; run again to drop it from the index") from exc
    except Image.UnidentifiedImageError as exc:
        raise ItemError(_unidentified_reason(path)) from exc
    except OSError as exc:
        raise ItemError(_decode_reason(exc)) from exc
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ItemError(_bomb_reason(w * h, max_pixels))
    return img


def _refuse_early_end(img: Image.Image, path: str) -> None:
    """A JPEG whose data stops early but still ends with an end-of-image marker: libjpeg fills the missing
    blocks with zeros (flat grey, 128) and Pillow reports nothing, not even with ``LOAD_TRUNCATED_IMAGES``
    off. A grey last pixel is the cheap hint; the proof is decoding the file again with junk bytes before its
    end marker: complete data ignores them, data that ended early decodes them into the missing blocks.
    """
    if img.format not in ("JPEG", "MPO") or img.mode not in ("L", "RGB"):
        return
    corner = img.getpixel((img.size[0] - 1, img.size[1] - 1))
    if corner not in (128, (128, 128, 128)):
        return
    data = _read_bytes(path)
    end = _jpeg_end_marker(data)
    if end is not None and not np.array_equal(_tiny_decode(data), _tiny_decode(data[:end] + _JUNK + data[end:])):
        raise ItemError("truncated JPEG: the image data ends early; re-export or re-download it")


_JUNK = bytes(range(0x10, 0xFF)) * 8  # about 2 KB of varied entropy-coded bits, never 0xFF (a marker)
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0..7 markers carry no length field


def _jpeg_end_marker(data: bytes) -> int | None:
    """Offset of the end-of-image marker (FF D9) of the first image in ``data``, walking its segments."""
    pos = 2  # after start-of-image
    while pos + 1 < len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xD9:
            return pos
        if marker == 0xFF or marker in _NO_LENGTH:
            pos += 1 if marker == 0xFF else 2  # fill byte, or a marker alone
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker that is not 00 or RSTn
            pos = data.find(b"\xff", pos)
            while pos != -1 and pos + 1 < len(data) and (data[pos + 1] == 0 or 0xD0 <= data[pos + 1] <= 0xD7):
                pos = data.find(b"\xff", pos + 2)
            if pos == -1:
                return None
    return None


def _tiny_decode(data: bytes) -> np.ndarray:
    """The image at 1/8 scale: libjpeg still decodes every block's data, at a fraction of the cost."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft(img.mode, (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
        return np.asarray(img)


def _read_bytes(path: str) -> bytes:
    return read_input(path)


def _maybe_draft(img: Image.Image, item: ItemPlan) -> None:
    """JPEG only: decode at 1/2, 1/4 or 1/8 scale when that still covers the resize target."""
    if img.format != "JPEG":
        return
    tw, th = item.resized
    if item.original[0] != img.size[0]:  # EXIF rotation swaps sides; draft works on the stored orientation
        tw, th = th, tw
    if img.size[0] >= DRAFT_MIN_REDUCTION * tw and img.size[1] >= DRAFT_MIN_REDUCTION * th:
        img.draft(img.mode, (tw, th))


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    if img.size == size:
        return img
    return img.resize(size, Image.Resampling.LANCZOS)


def _apply_icc(img: Image.Image) -> Image.Image:
    global _SRGB
    profile = img.info.get("icc_profile")
    if not profile or img.mode not in ("RGB", "RGBA", "CMYK"):
        return img
    try:
        if _SRGB is None:
            _SRGB = ImageCms.createProfile("sRGB")
        src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(img, src, _SRGB, outputMode=out_mode)
    except (ImageCms.PyCMSError, OSError, ValueError):  # a broken profile: fall back to plain conversion
        return img


def _bomb_reason(pixels: int, max_pixels: int) -> str:
    return f"decompression bomb refused: {pixels} pixels exceeds --max-pixels {max_pixels}; raise it if trusted"


def _unidentified_reason(path: str) -> str:
    if input_size(path) == 0:
        return "file is empty (0 bytes); re-copy it or delete it"
    return "not an image Pillow can read (unknown or unsupported format); convert it or remove it"


def _decode_reason(exc: BaseException) -> str:
    text = str(exc)
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"file is truncated ({text}); re-copy it from the original"
    return f"image data is damaged ({type(exc).__name__}: {text}); re-save it or remove it"
