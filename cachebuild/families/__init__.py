"""Model families: one module per family (VAE normalisation, text encoders, what its pipeline hands its
denoiser). ``pipeline_inputs_for(name)`` finds a family's ``pipeline_inputs`` without importing the others.

A family module declares ``PIPELINES`` (diffusers pipeline class -> family name), ``encoder_specs(ctx)`` (its
text encoders, see families.text.SpecContext), optionally ``STORED_DTYPE`` (fp16 where absent), and
``pipeline_inputs(record, vae_fingerprint)``; docs/architecture.md's "Adding a family" has the steps."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

# family name (as the text fingerprint records it) -> module under cachebuild.families
MODULES = {
    "sd15": "sd15",
    "sd2": "sd15",
    "sdxl": "sdxl",
    "sd3": "sd3",
    "flux": "flux",
    "chroma": "chroma",
    "z-image": "zimage",
    "hidream": "hidream",
}
MODULES |= {"qwen-image": "qwenimage", "flux2": "flux2", "lumina2": "lumina2", "sana": "sana"}
MODULES |= {"flux2-klein": "flux2"}  # Flux.2 [klein]: Flux.2's VAE and its own Qwen3 text encoder
MODULES["qwen-image-edit"] = "qwenimage_edit"  # the caption is encoded with its condition image
MODULES["qwen-image-edit-plus"] = "qwenimage_edit_plus"
MODULES["wan"] = "wan"  # latents of clips (Wan 2.1, Wan 2.2 A14B) and UMT5 text
MODULES |= {"hunyuanvideo-1.5": "hunyuanvideo15", "ltx-2": "ltx2", "flux-kontext": "flux_kontext"}


def pipeline_inputs_for(family: str) -> Callable[[dict, dict], dict]:
    """``pipeline_inputs(record, vae_fingerprint)`` of ``family``; KeyError for one with no adapter."""
    return family_module(family).pipeline_inputs


def family_module(family: str) -> ModuleType:
    """The module under cachebuild.families that declares ``family``; KeyError for one with no module."""
    return importlib.import_module(f"cachebuild.families.{MODULES[family]}")
