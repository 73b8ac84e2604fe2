"""One clip's image-to-video condition, from its record to its stored tensors: the condition image(s), the family's
preprocessing, the VAE and the image encoder (each loaded on the first item that needs it, run through the
out-of-memory and non-finite guards). :mod:`cachebuild.jobs.conditions` drives it over the pending items."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from cachebuild.cache.manifest import ItemRow, Manifest
from cachebuild.cache.store import RunSummary
from cachebuild.config import ExifMode
from cachebuild.encode import GuardedForward, free_device_memory
from cachebuild.errors import ItemError, ModelLoadError
from cachebuild.families import i2v
from cachebuild.families.vae import VaeFamily, load_vae
from cachebuild.families.video_vae import encode_clip_raw, release_decoder
from cachebuild.hub import ResolvedVae
from cachebuild.keys import fs_path
from cachebuild.video.plan import plan_from_record
from cachebuild.video.probe import HEADER_META, VideoHeader


class ConditionModels:
    """Makes each clip's stored conditions; ``close`` frees the models and counts the guards' work."""

    def __init__(self, manifest: Manifest, conditions, sources: tuple[ResolvedVae, VaeFamily], run: tuple, cfg):
        dtype, device, self.tiling = run  # the compute dtype, the device, the tiles of a whole condition clip
        self.manifest, self.conditions, (self.vae, self.family) = manifest, conditions, sources
        self.dtype, self.device, self.cfg = dtype.torch, device, cfg  # cfg: the run's LatentsConfig
        self.module = i2v.kind_module(conditions.kind)
        self.root = cfg.dataset.resolve()
        self.vae_guard: GuardedForward | None = None
        self.encoder_guard: GuardedForward | None = None
        self.processor = _load_processor(conditions.encoder) if conditions.encoder is not None else None  # JSON only
        self.loads = 0

    def encode(self, row: ItemRow, info: dict, clips: dict, control: Path | None):
        """``(tensors, meta)`` of the clip ``row`` whose latents record is ``info``, or why it cannot be made."""
        try:
            images, source = self._images(row, info, clips, control)
            shape = (*info["bucket"], info.get("frames", 1))  # (W, H, F)
            options = {"crf": self.conditions.crf} if self.conditions.crf is not None else {}
            pixels, seen = self.module.prepare(self.conditions.kind.name, images, shape, **options)
            encoder_pixels = self._encoder_pixels(seen)
        except ItemError as exc:  # a frame that no longer decodes, a one-frame item with --last-frame: the reason
            return str(exc)
        except Exception as exc:  # per-item boundary: Pillow, PyAV and the processors raise many types
            return f"the condition image ({_name(control)}) cannot be used: {type(exc).__name__}: {exc}"
        out_dtype = self.cfg.dtype_out.torch
        (z,) = self._vae()((pixels,))  # (C, F_c, h, w) float32: the posterior mode
        if isinstance(z, str):
            return z
        tensors = {i2v.CONDITION_LATENTS: z.to(out_dtype)}
        if encoder_pixels is not None:
            embeds = self._encoder()((encoder_pixels,))  # per image (T, D)
            reasons = [e for e in embeds if isinstance(e, str)]
            if reasons:
                return reasons[0]
            tensors[i2v.IMAGE_EMBEDS] = torch.stack(embeds).to(out_dtype)  # (N, T, D)
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            return f"the condition overflows --dtype-out {self.cfg.dtype_out.value}; use fp32"
        meta = {"bucket": list(info["bucket"]), "frames": info.get("frames", 1), "condition": source}
        return tensors, meta

    def close(self, summary: RunSummary) -> None:
        """Free the models; count their loads and the guards' splits and redos into ``summary``."""
        for guard in (self.vae_guard, self.encoder_guard):
            if guard is not None:
                summary.oom_splits += guard.oom_splits
                summary.fp32_redos += guard.upcasts
                summary.fp32_conversions += guard.fp32_conversions
        summary.model_loads += self.loads
        summary.model_loaded |= self.loads > 0
        self.vae_guard = self.encoder_guard = None
        if self.loads:
            free_device_memory(self.device)

    def _images(self, row: ItemRow, info: dict, clips: dict, control: Path | None) -> tuple[list, str]:
        """The condition image (the control file, or the clip's first frame) and, with --last-frame, the clip's last
        frame, as PIL images; and what the first one is, for the record."""
        from PIL import Image

        cfg, frames = self.cfg, info.get("frames", 1)
        if cfg.last_frame and frames < 2:
            raise ItemError("a one-frame item has no last frame to condition on; --last-frame needs clips")
        images = [_open_image(control, cfg.max_pixels, cfg.exif)] if control is not None else []
        wanted = ([] if images else [0]) + ([frames - 1] if cfg.last_frame else [])
        for offset in wanted:  # frames of the clip as its latents saw them: its plan, one frame at a time
            plan = self._plan(row, info | {"start": info.get("start", 0) + offset, "frames": 1}, clips)
            images.append(Image.fromarray(plan.decode(cfg.max_pixels)[0]))
        return images, (control.name if control is not None else "frame 0")

    def _plan(self, row: ItemRow, info: dict, clips: dict):
        """The plan of one frame of the clip (``info`` says which), with its video's remembered header."""
        entry = self.manifest.get_meta(HEADER_META + row.path) or {}
        header = VideoHeader.from_json(entry["header"]) if "header" in entry else None  # None: an image
        plan = plan_from_record(row.key, str(self.root / fs_path(row.path)), info, header, clips, self.cfg.exif)
        return replace(plan, bucket=(*plan.size, 1))

    def _encoder_pixels(self, images: list) -> torch.Tensor | None:
        if self.conditions.encoder is None or not images:
            return None
        return self.module.encoder_pixels(self.processor, images)

    def _vae(self) -> GuardedForward:
        if self.vae_guard is None:
            model = load_vae(self.vae, self.family, self.dtype, self.device)
            release_decoder(model)  # conditions only encode
            self.loads += 1
            channels, device, family, tiling = self.family.latent_channels, self.device, self.family, self.tiling

            def forward(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> list[torch.Tensor]:
                moments = encode_clip_raw(model, family, inputs[0].to(device, dtype), tiling)  # (B, 2C, F_c, h, w)
                return list(moments[:, :channels].cpu())  # the mean: sample_mode="argmax"

            self.vae_guard = GuardedForward(model, device, self.dtype, forward, "VAE")
        return self.vae_guard

    def _encoder(self) -> GuardedForward:
        if self.encoder_guard is None:
            model = _load_encoder(self.conditions.encoder, self.dtype, self.device)
            self.loads += 1
            module, device = self.module, self.device

            def forward(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> list[torch.Tensor]:
                with torch.inference_mode():
                    return list(module.encoder_forward(model, inputs[0].to(device, dtype)).float().cpu())

            self.encoder_guard = GuardedForward(model, device, self.dtype, forward, "image encoder")
        return self.encoder_guard


def _load_encoder(encoder: tuple, dtype: torch.dtype, device: torch.device):
    """The pipeline's image encoder (the transformers class its ``model_index.json`` names), in eval mode."""
    import transformers

    from cachebuild.families.text import _version_tuple

    cls, folder, _, _ = encoder
    transformers.utils.logging.disable_progress_bar()  # the CLI owns the terminal
    dtype_arg = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    try:
        model = getattr(transformers, cls).from_pretrained(folder, **{dtype_arg: dtype})
    except Exception as exc:  # transformers raises many types; one message naming the source
        raise ModelLoadError(f"could not load the image encoder from {folder}: {exc}") from exc
    return model.to(device).eval().requires_grad_(False)


def _load_processor(encoder: tuple):
    """The pipeline's image processor (the class its ``model_index.json`` names, as ``from_pretrained`` of the
    pipeline loads it: without torchvision, transformers' PIL variant of it, which it says once; quietened here)."""
    import transformers

    _, _, cls, folder = encoder
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        return getattr(transformers, cls).from_pretrained(folder)
    except Exception as exc:  # transformers raises many types; one message naming the source
        raise ModelLoadError(f"could not load the image processor from {folder}: {exc}") from exc
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


def _open_image(path: Path, max_pixels: int, exif: ExifMode):
    """The condition image at ``path`` as a user hands it to the pipeline (``load_image``: upright, RGB)."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        if img.width * img.height > max_pixels:
            raise ValueError(f"{img.width}x{img.height} is over --max-pixels {max_pixels} (a decompression bomb?)")
        return (ImageOps.exif_transpose(img) if exif is ExifMode.APPLY else img).convert("RGB")


def _name(control: Path | None) -> str:
    return str(control) if control is not None else "the clip's frame"
