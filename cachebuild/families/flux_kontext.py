"""FLUX.1 Kontext (``FluxKontextPipeline``): Flux.1's text and VAE, and a condition image beside each target.

Text is Flux.1's (:mod:`cachebuild.families.flux`: CLIP-L's pooled output, T5 unmasked over 512 positions).

The condition image (``cachebuild latents --control DIR``, the same keys as the images) is what ``__call__`` and
``prepare_latents`` make of the ``image`` argument: its size floored to the 2x2-packed latent grid
(``get_default_height_width``, 16 pixels for Flux.1's VAE) gives the aspect ratio; the entry of
:data:`PREFERRED_KONTEXT_RESOLUTIONS` nearest to it is taken and floored to that multiple; the image is resized
to it (PIL, Lanczos) and scaled to [-1, 1]; the VAE's posterior mode (``sample_mode="argmax"``) is normalised
``(z - shift_factor) * scaling_factor`` and packed 2x2 into ``image_latents`` (h/2 * w/2, 64), with
``image_ids`` (h/2 * w/2, 3) of ``(1, row, col)``: its tokens follow the target's. The cache stores the raw mode
(``control_latents`` (16, h, w), in the ``control`` store; the factors are the latents store's) and
:func:`pipeline_inputs` normalises and packs it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cachebuild.config import ExifMode
from cachebuild.families import flux
from cachebuild.families.flux import encoder_specs  # noqa: F401 (Flux.1's text)
from cachebuild.families.vae import normalize_latents

PIPELINES = {"FluxKontextPipeline": "flux-kontext"}
CONTROL_LATENTS = "control_latents"  # the record's raw (C, h, w) posterior mode of the condition image
PREFERRED_KONTEXT_RESOLUTIONS = [  # diffusers.pipelines.flux.pipeline_flux_kontext's (W, H) list
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
]


def condition_size(width: int, height: int, multiple: int = 16) -> tuple[int, int]:
    """(W, H) ``__call__`` resizes a condition image of ``width`` x ``height`` to: the preferred resolution nearest
    in aspect ratio to the size floored to ``multiple`` (the VAE's downsampling times 2), floored to ``multiple``.

    Raises:
        ValueError: a side shorter than ``multiple`` (the pipeline divides by zero there).

    Example:
        >>> condition_size(1920, 1080)
        (1392, 752)
    """
    w, h = width - width % multiple, height - height % multiple  # get_default_height_width
    if not w or not h:
        raise ValueError(f"{width}x{height} has a side under {multiple} pixels")
    _, w, h = min((abs(w / h - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
    return w // multiple * multiple, h // multiple * multiple


def condition_pixels(path: Path, multiple: int, max_pixels: int, exif: ExifMode) -> tuple[torch.Tensor, tuple]:
    """((1, 3, H, W) float32 pixels in [-1, 1], (W, H)) of the condition image at ``path``, as the pipeline
    preprocesses it: upright unless ``exif`` says ignore (diffusers' ``load_image`` applies the orientation),
    RGB, resized with ``VaeImageProcessor.resize`` and scaled by its ``preprocess``.

    Raises:
        OSError, ValueError: an unreadable, too large or too small image (the item fails with the message).
    """
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        if img.width * img.height > max_pixels:
            raise ValueError(f"{img.width}x{img.height} is over --max-pixels {max_pixels} (a decompression bomb?)")
        img = (ImageOps.exif_transpose(img) if exif is ExifMode.APPLY else img).convert("RGB")
    w, h = condition_size(*img.size, multiple)
    processor = VaeImageProcessor(vae_scale_factor=multiple)
    return processor.preprocess(processor.resize(img, h, w), h, w), (w, h)


def image_ids(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(rows * cols, 3): ``(1, row, col)`` for each packed condition token, row-major, as ``prepare_latents``."""
    ids = torch.zeros(rows, cols, 3, dtype=dtype)
    ids[..., 0] = 1
    ids[..., 1] = torch.arange(rows, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)


def pipeline_inputs(rec: dict, vae: dict) -> dict[str, torch.Tensor]:
    """Flux.1's (``latents`` (16, h, w) normalised, ``prompt_embeds``, ``pooled_prompt_embeds``, ``text_ids``) and,
    where the item has its condition image, ``image_latents`` (h'/2 * w'/2, 64) and ``image_ids`` (same, 3): what
    ``prepare_latents`` returns for it, without the batch dimension."""
    out = flux.pipeline_inputs(rec, vae)
    if CONTROL_LATENTS in rec:
        z = normalize_latents(rec[CONTROL_LATENTS], vae)  # (C, h, w) float32
        out["image_latents"] = flux.pack_latents(z[None])[0]
        out["image_ids"] = image_ids(z.shape[1] // 2, z.shape[2] // 2)
    return out
