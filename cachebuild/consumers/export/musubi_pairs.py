"""musubi-tuner's image-pair architectures: Qwen-Image-Edit (``qie``) and FLUX.1 Kontext (``fk``).

Each latent file holds the target's latents and the condition image's, as musubi-tuner v0.3.4 writes them
(``dataset/cache_io.py``, ``qwen_image_cache_latents.py``, ``flux_kontext_cache_latents.py``):

  qie  ``latents_1x<h>x<w>_bfloat16`` (C, 1, h, w) and ``latents_control_0_1x<h'>x<w'>_bfloat16`` (C, 1, h', w'),
       both ``(z - mean) / std`` per channel; metadata ``architecture`` "qwen_image" (musubi's Qwen-Image savers
       write it for every variant); text ``varlen_vl_embed_bfloat16`` (T, 3584) with the condition image's tokens
  fk   ``latents_1x<h>x<w>_float32`` (16, h, w) and ``latents_control_1x<h'>x<w'>_float32`` (16, h', w'), both
       ``(z - shift) * scale``; text ``t5_vec_bfloat16`` (512, 4096), T5 unmasked over every position, and
       ``clip_l_pooler_bfloat16`` (768,)

What is exported, and where musubi's own caching would differ: the condition latents are the ones the diffusers
pipelines compute, at their own size (Kontext: the nearest preferred resolution; Qwen-Image-Edit: about 1024 * 1024
at the image's aspect ratio) and from the posterior mode. musubi's own caching resizes a condition image to the
target's bucket and, for Kontext, samples the posterior (its ``AutoEncoder.encode``); its trainers read the
condition latents at whatever size the file holds (each control shape is its own batch bucket, packed with its own
position ids), so they train on what the pipeline feeds at inference. Refused, because a trainer would read it
differently: an item without condition latents (its collator has no control to stack), and a Kontext text cache
built with ``--t5-mask`` or another T5 length (musubi's trainer reads the 512 unmasked rows, and would read zeros
at the padding instead).
"""

from __future__ import annotations

import torch

from cachebuild.errors import ConfigError
from cachebuild.families.vae import normalize_latents

PAIRS = ("qie", "fk")
T5_LENGTH = 512  # musubi's T5XXL_MAX_LENGTH for Kontext's t5_vec


def check_pairs(arch, reader) -> list[str]:
    """Refuse a cache whose text musubi's trainer would read differently; the warnings that say what the export
    holds.

    Raises:
        ConfigError: a Kontext text cache whose T5 is masked or not 512 rows long.
    """
    warnings: list[str] = []
    text = reader.text_fingerprint or {}
    exported = text.get("family") in arch.text_families  # other text is not exported at all (a warning says so)
    t5 = next((e for e in text.get("encoders", []) if e["name"] == "t5"), None) if exported else None
    if arch.name == "fk" and t5 is not None and (t5.get("trim") or t5.get("max_length") != T5_LENGTH):
        raise ConfigError(
            f"musubi's Kontext trainer reads T5 unmasked over {T5_LENGTH} rows; this text cache was built with "
            "--t5-mask or another --t5-max-length: rebuild it with cachebuild textenc ... --rebuild, without them"
        )
    if arch.name == "fk" and reader.latents_mode != "sample":
        warnings.append(
            f"this cache holds the posterior {'mean' if reader.latents_mode == 'mean' else 'mean (of its moments)'}"
            "; musubi's own Kontext caching stores one posterior sample (build with --latents sample to match it)"
        )
    where = "nearest Kontext resolution" if arch.name == "fk" else "about 1024 x 1024 at its aspect ratio"
    warnings.append(
        f"condition latents are the pipeline's: the posterior mode at the {where}; musubi's own caching resizes a "
        "condition image to the target's bucket, and its trainer reads them at the size stored"
    )
    return warnings


def control_tensors(reader, text, key: str, arch) -> dict[str, torch.Tensor] | str:
    """``{key name: tensor}`` of the item's condition latents for its latent file, or why it is refused."""
    if arch.name == "fk":
        rec = reader.record(key)
        if "control_latents" not in rec:
            return "no condition latents: build them with cachebuild latents --control DIR"
        z = normalize_latents(rec["control_latents"], reader.fingerprint.get("vae", {}))  # (16, h, w) float32
        return {f"latents_control_1x{z.shape[1]}x{z.shape[2]}_float32": z.contiguous()}
    stored = text.text_tensors(key) if text is not None and key in text else {}
    if "control_latents" not in stored:
        return "no condition latents: Qwen-Image-Edit keeps them with its text (cachebuild textenc --control DIR)"
    z = stored["control_latents"].to(torch.bfloat16)[:, None]  # normalised (C, h, w) -> (C, 1, h, w)
    return {f"latents_control_0_1x{z.shape[2]}x{z.shape[3]}_bfloat16": z.contiguous()}


def kontext_text_tensors(text, key: str) -> dict[str, torch.Tensor]:
    """``t5_vec_bfloat16`` (512, 4096) and ``clip_l_pooler_bfloat16`` (768,): the pipeline's prompt_embeds and
    pooled_prompt_embeds, in the dtype musubi's own caching writes them."""
    inputs = text.pipeline_inputs(key, family="flux-kontext")
    return {
        "t5_vec_bfloat16": inputs["prompt_embeds"].to(torch.bfloat16).contiguous(),
        "clip_l_pooler_bfloat16": inputs["pooled_prompt_embeds"].to(torch.bfloat16).contiguous(),
    }
