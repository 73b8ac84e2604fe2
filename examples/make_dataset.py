"""Generate the small example dataset in examples/dataset/ (deterministic, seeded).

The images are procedural "photos" (sky gradients, hills, a sun, trees, a figure, soft texture and a
little grain) and two flat "illustrations" saved as PNG, one with transparency. They cover the cases a
cache builder meets first: landscape, portrait, square, very wide and very tall aspect ratios, a
subfolder, JPEG and PNG, an alpha channel, and a JPEG whose pixels are stored sideways with EXIF
orientation 6 (rotate 90 degrees clockwise to display). A few images have a caption in a ``.txt`` file
with the same stem.

    python examples/make_dataset.py                # writes examples/dataset/
    python examples/make_dataset.py --out /tmp/ds  # somewhere else

The output is committed to the repository (about 0.4 MB); re-running this script reproduces it.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

JPEG_QUALITY = 85  # typical of photos found in training sets; smooth content keeps files small
EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how to rotate the stored pixels for display


@dataclass(frozen=True)
class Spec:
    """One image: its path under the dataset root, its upright size (W, H) and how to draw it."""

    path: str
    size: tuple[int, int]  # (W, H) as displayed, after any EXIF rotation
    kind: str  # "landscape" | "portrait" | "illustration"
    seed: int
    orientation: int = 1  # EXIF orientation to store; 6 stores the pixels rotated 90 degrees counter-clockwise
    caption: str | None = None


SPECS = [
    Spec("lake-640x480.jpg", (640, 480), "landscape", 1, caption="a calm lake below green hills at noon"),
    Spec("figure-480x640.jpg", (480, 640), "portrait", 2),
    Spec("dunes-800x450.jpg", (800, 450), "landscape", 3, caption="orange dunes under a hazy evening sky"),
    Spec("badge-512x512.png", (512, 512), "illustration", 4, caption="a flat round badge with a star"),
    Spec("banner-300x900.jpg", (300, 900), "portrait", 5),
    Spec("valley-1024x576.jpg", (1024, 576), "landscape", 6),
    Spec("meadow-900x600.jpg", (900, 600), "landscape", 7),
    Spec("panorama-1200x400.jpg", (1200, 400), "landscape", 8, caption="a wide panorama of a mountain ridge"),
    Spec("square-600x600.jpg", (600, 600), "landscape", 9),
    Spec("logo-400x300.png", (400, 300), "illustration", 10),
    Spec("people/walker-480x640.jpg", (480, 640), "portrait", 11, caption="a person walking on a hill path"),
    Spec("people/sideways-480x640.jpg", (480, 640), "portrait", 12, orientation=6),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "dataset")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    for spec in SPECS:
        path = write_image(args.out, spec)
        print(f"{path.relative_to(args.out)}  {spec.size[0]}x{spec.size[1]}  {path.stat().st_size // 1024} KiB")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{len(SPECS)} images in {args.out}, {total / 1024:.0f} KiB in all")


def write_image(root: Path, spec: Spec) -> Path:
    """Draw ``spec`` upright, store it (rotated for its EXIF orientation) and its caption; return the path."""
    rng = np.random.default_rng(spec.seed)
    draw = {"landscape": draw_landscape, "portrait": draw_portrait, "illustration": draw_illustration}[spec.kind]
    img = draw(spec.size, rng)
    path = root / spec.path
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        img.save(path, optimize=True)
    else:
        exif = Image.Exif()
        if spec.orientation == 6:
            img = img.transpose(Image.Transpose.ROTATE_90)  # stored sideways; orientation 6 turns it back
            exif[EXIF_ORIENTATION] = 6
        img.save(path, quality=JPEG_QUALITY, exif=exif)
    if spec.caption:
        path.with_suffix(".txt").write_text(spec.caption + "\n", encoding="utf-8")
    return path


def draw_landscape(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Sky gradient, a sun, two or three ranges of hills with soft texture, a few trees, grain."""
    w, h = size
    horizon = rng.uniform(0.45, 0.65)
    top, bottom = _colour(rng, (40, 120), (90, 170), (160, 240)), _colour(rng, (170, 250), (150, 220), (120, 200))
    img = _vertical_gradient(size, top, bottom)
    draw = ImageDraw.Draw(img)
    sx, sy, r = rng.uniform(0.15, 0.85) * w, rng.uniform(0.1, horizon * 0.7) * h, rng.uniform(0.04, 0.09) * min(w, h)
    draw.ellipse((sx - r, sy - r, sx + r, sy + r), fill=_colour(rng, (240, 255), (200, 245), (120, 200)))
    pixels = np.asarray(img, dtype=np.float32)
    x = np.linspace(0.0, 1.0, w)
    for layer in range(int(rng.integers(2, 4))):
        base = horizon + 0.08 * layer
        ridge = base + sum(rng.uniform(0.01, 0.05) * np.sin(2 * np.pi * (f * x + rng.uniform())) for f in (1, 2, 5))
        colour = np.array(_colour(rng, (30, 120), (70, 160), (30, 100)), dtype=np.float32) * (1.0 - 0.15 * layer)
        rows = np.arange(h)[:, None] / h
        mask = rows >= ridge[None, :]
        shade = 0.75 + 0.5 * _soft_noise((h, w), rng, cells=12)  # fields and shadows
        pixels = np.where(mask[..., None], colour[None, None, :] * shade[..., None], pixels)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        tx, ty = rng.uniform(0, w), rng.uniform(horizon + 0.1, 0.95) * h
        th = rng.uniform(0.06, 0.16) * h
        draw.rectangle((tx - th * 0.05, ty - th * 0.3, tx + th * 0.05, ty), fill=(70, 50, 30))
        draw.polygon(
            [(tx - th * 0.3, ty - th * 0.25), (tx + th * 0.3, ty - th * 0.25), (tx, ty - th)], fill=(20, 70, 35)
        )
    return _finish(img, rng)


def draw_portrait(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A soft background, a figure (head and body), side light, grain."""
    w, h = size
    img = _vertical_gradient(
        size, _colour(rng, (60, 200), (60, 200), (60, 220)), _colour(rng, (20, 90), (20, 90), (20, 90))
    )
    pixels = np.asarray(img, dtype=np.float32) * (0.8 + 0.4 * _soft_noise((h, w), rng, cells=6))[..., None]
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cx = rng.uniform(0.35, 0.65) * w
    body = _colour(rng, (40, 200), (40, 200), (40, 200))
    draw.rounded_rectangle((cx - 0.22 * w, 0.45 * h, cx + 0.22 * w, 1.05 * h), radius=int(0.1 * w), fill=body)
    hr = 0.13 * min(w, h * 0.75)
    draw.ellipse(
        (cx - hr, 0.42 * h - 2.2 * hr, cx + hr, 0.42 * h), fill=_colour(rng, (170, 240), (120, 190), (90, 160))
    )
    draw.ellipse((cx - hr * 1.05, 0.42 * h - 2.3 * hr, cx + hr * 1.05, 0.42 * h - 1.4 * hr), fill=(40, 28, 20))
    light = np.linspace(1.15, 0.8, w, dtype=np.float32)[None, :, None]  # light from the left
    img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) * light, 0, 255).astype(np.uint8))
    return _finish(img, rng)


def draw_illustration(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Flat shapes on a transparent background: an RGBA PNG (the loader drops its alpha unless --alpha says)."""
    w, h = size
    img = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    m = 0.06 * min(w, h)
    draw.ellipse((m, m, w - m, h - m), fill=(*_colour(rng, (30, 200), (30, 200), (30, 200)), 255))
    cx, cy, r = w / 2, h / 2, 0.35 * min(w, h)
    star = [
        (
            cx + (r if i % 2 == 0 else r * 0.45) * np.sin(i * np.pi / 5),
            cy - (r if i % 2 == 0 else r * 0.45) * np.cos(i * np.pi / 5),
        )
        for i in range(10)
    ]
    draw.polygon(star, fill=(*_colour(rng, (220, 255), (180, 240), (20, 90)), 255))
    draw.rectangle((w * 0.2, h * 0.78, w * 0.8, h * 0.86), fill=(250, 250, 250, 200))
    return img


def _colour(rng: np.random.Generator, *ranges: tuple[int, int]) -> tuple[int, int, int]:
    return tuple(int(rng.integers(lo, hi)) for lo, hi in ranges)


def _vertical_gradient(size: tuple[int, int], top, bottom) -> Image.Image:
    w, h = size
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    rows = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)  # (H, 1, 3)
    return Image.fromarray(np.repeat(rows, w, axis=1).astype(np.uint8))


def _soft_noise(shape: tuple[int, int], rng: np.random.Generator, cells: int) -> np.ndarray:
    """Low-frequency texture in [0, 1]: a coarse random grid, enlarged smoothly."""
    h, w = shape
    grid = rng.random((cells, max(2, cells * w // h))).astype(np.float32)
    big = Image.fromarray((grid * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float32) / 255.0


def _finish(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A slight blur (camera softness) and faint grain, as in a real photo."""
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    grain = rng.normal(0.0, 3.0, (img.height, img.width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


if __name__ == "__main__":
    main()
