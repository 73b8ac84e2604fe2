"""sd-scripts' Lumina 2 text cache, ``<stem>_lumina_te.npz``, from a cachebuild ``lumina2`` text cache.

sd-scripts (``library/strategy_lumina.py``) tokenizes ``f"{system_prompt} <Prompt Start> " + caption`` (the
caption alone when ``--system_prompt`` is empty, its default) with Gemma's tokenizer padded on the right to
``--gemma2_max_token_length`` (256) and a multiple of 8, runs Gemma2 with the mask, takes ``hidden_states[-2]``
and saves, per image:

  ``hidden_state`` (L, D) float32, every position (Gemma2's outputs at the padding too);
  ``attention_mask`` (L,) int64, 1 at the real tokens; ``input_ids`` (L,) int64.

That is Lumina2Pipeline's encoding when ``--system_prompt`` is the pipeline's system prompt, which is what a
cachebuild Lumina 2 text cache holds (families.lumina2). The cache keeps the real rows only, so ``hidden_state``
is written with zeros past the real tokens, rows sd-scripts' NextDiT never reads (its caption refiner attends
with the mask and the joint sequence takes the first ``mask.sum()`` rows). ``input_ids`` are not stored: they
are tokenized again here with the text job's own tokenizer, re-resolved from ``--model`` and checked against the
tokenizer hash in the text cache's fingerprint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cachebuild.errors import ConfigError

PROMPT_START = " <Prompt Start> "  # sd-scripts: f"{system_prompt} <Prompt Start> " before every caption
SD_SCRIPTS_LAYER = -2  # LuminaTextEncodingStrategy: outputs.hidden_states[-2]
SD_SCRIPTS_MAX_LENGTH = 256  # LuminaTokenizeStrategy's default --gemma2_max_token_length
SD_SCRIPTS_PAD_MULTIPLE = 8  # its tokenizer call pads to a multiple of 8 as well as to max_length


class ItemRefused(Exception):
    """One item's text cannot be written as sd-scripts would; the message is the reason."""


def sd_scripts_gap(encoder: dict) -> str | None:
    """Why sd-scripts' Lumina encoding cannot give the hidden states stored by ``encoder`` (the text cache's
    ``gemma2`` fingerprint entry), or None when it can (with the options :func:`sd_scripts_options` names)."""
    if encoder.get("class") != "Gemma2Model":
        return f"the text cache ran {encoder.get('class')}, sd-scripts runs Gemma2Model"
    if encoder.get("layer") != SD_SCRIPTS_LAYER or encoder.get("layers"):
        return f"the text cache holds hidden state {encoder.get('layer')}, sd-scripts caches hidden_states[-2]"
    if not encoder.get("attention_mask") or encoder.get("padding_side") != "right":
        return "the text cache ran Gemma2 without the mask or not right-padded; sd-scripts runs it masked, right-padded"
    if encoder.get("max_length", 0) % SD_SCRIPTS_PAD_MULTIPLE:
        return f"the text cache's length {encoder.get('max_length')} is not a multiple of 8, which sd-scripts pads to"
    changed = [k for k in ("chat_template", "prompt_template", "lowercase", "drop_rows", "window") if encoder.get(k)]
    if changed:
        return f"the text cache's prompt goes through {', '.join(changed)}, sd-scripts' does not"
    prefix = encoder.get("prefix", "")
    if prefix and (not prefix.endswith(PROMPT_START) or not prefix[: -len(PROMPT_START)]):
        return f"the text cache's prompt prefix {prefix!r} is not one sd-scripts' --system_prompt can give"
    return None


def sd_scripts_options(encoder: dict) -> list[str]:
    """The sd-scripts options under which its own Lumina text cache equals this export (for the warning)."""
    options = []
    prefix = encoder.get("prefix", "")
    if prefix:  # sd-scripts' default system prompt is empty: no prefix at all
        options.append(f"--system_prompt {prefix[: -len(PROMPT_START)]!r}")
    if encoder.get("max_length") != SD_SCRIPTS_MAX_LENGTH:
        options.append(f"--gemma2_max_token_length {encoder.get('max_length')}")
    return options


class LuminaTokens:
    """The text job's tokenization of a caption, run again for sd-scripts' ``input_ids``.

    Args:
        encoder: the text cache's ``gemma2`` fingerprint entry.
        model: the Lumina 2 pipeline (preset, hub id or folder) the text cache was built with.

    Raises:
        ConfigError: no ``model``; it is not a Lumina 2 pipeline; its tokenizer or prompt differs from the one the
            text cache was built with.
    """

    def __init__(self, encoder: dict, model: str | None):
        from cachebuild.config import TextencConfig, TextFamily
        from cachebuild.families.text import resolve_encoders
        from cachebuild.families.tokens import load_tokenizer

        if model is None:
            raise ConfigError(
                "sd-scripts' _lumina_te.npz needs input_ids, which are tokenized again from each caption: pass "
                "--model with the Lumina 2 pipeline the text cache was built with"
            )
        cfg = TextencConfig(Path("."), Path("."), model=model, device="cpu")
        family, specs = resolve_encoders(cfg, torch.device("cpu"))
        spec = next((s for s in specs if s.name == encoder.get("name")), None)
        if family is not TextFamily.LUMINA2 or spec is None:
            raise ConfigError(
                f"--model {model} is a {family.value} pipeline; pass the Lumina 2 one the text cache was built with"
            )
        sha = tokenizer_sha256(spec.tokenizer)
        if sha != encoder.get("tokenizer_sha256"):
            raise ConfigError(
                f"--model {model} has another tokenizer (sha256 {sha[:12]}...) than the text cache "
                f"({str(encoder.get('tokenizer_sha256'))[:12]}...); pass the pipeline the cache was built with"
            )
        if spec.prefix != encoder.get("prefix", "") or spec.max_length != encoder.get("max_length"):
            raise ConfigError(
                f"--model {model} builds another prompt (system prompt or length) than the text cache was built "
                "with; export with the cachebuild version that built it, or rebuild the text cache"
            )
        self.spec, self.tokenizer = spec, load_tokenizer(spec)

    def __call__(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids (L,), attention_mask (L,))`` of one caption, int64, as the text job tokenized it."""
        from cachebuild.families.tokens import tokenize

        ids, mask, _ = tokenize(self.tokenizer, self.spec, [caption])
        return ids[0].to(torch.int64), mask[0].to(torch.int64)


def tokenizer_sha256(folder: Path) -> str:
    """The tokenizer hash a text cache's fingerprint records (``Manifest.files_sha256`` of ``tokenizer_files``),
    without a manifest."""
    from cachebuild.cache.files import files_sha256
    from cachebuild.hub import tokenizer_files

    return files_sha256(tokenizer_files(folder))


def lumina_text_arrays(reader, key: str, tokens: LuminaTokens | None = None) -> dict[str, np.ndarray]:
    """``_lumina_te.npz``: Gemma2's hidden states over the padded length, its mask and the token ids, from the
    Lumina 2 pipeline's names (``prompt_embeds``, ``prompt_attention_mask``); ``input_ids`` from ``tokens``.

    Raises:
        ConfigError: no ids (no ``tokens``): the whole text part cannot be written.
        ItemRefused: the caption no longer tokenizes to the stored mask (this item only).
    """
    inputs = reader.pipeline_inputs(key, family=reader.text_fingerprint.get("family"))
    ids = inputs.get("input_ids", inputs.get("prompt_input_ids"))
    if "prompt_embeds" not in inputs or (ids is None and tokens is None):
        raise ConfigError(
            "sd-scripts' _lumina_te.npz holds hidden_state, attention_mask and input_ids; this text cache does not "
            "give them all (input_ids are not stored); let sd-scripts cache Lumina's text itself"
        )
    embeds, mask = inputs["prompt_embeds"].float(), inputs.get("prompt_attention_mask")  # (L, D) zero-padded
    mask = torch.ones(embeds.shape[0], dtype=torch.int64) if mask is None else mask.to(torch.int64)
    if ids is None:
        ids, token_mask = tokens(reader.caption(key) or "")
        if not torch.equal(token_mask, mask):
            raise ItemRefused(
                f"its caption tokenizes to {int(token_mask.sum())} tokens, the text cache holds {int(mask.sum())}; "
                "rebuild the text cache"
            )
    return {"hidden_state": embeds.numpy(), "attention_mask": mask.numpy(), "input_ids": ids.to(torch.int64).numpy()}
