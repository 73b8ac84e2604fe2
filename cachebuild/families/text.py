"""Text encoders per family: which models run, which of their outputs are stored, and how they are called.

Resolution never loads a model: it locates the local folders (fetching hub ids), so a finished job can be
checked from configs and weight hashes alone. See docs/format.md for the tensors each family stores.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cachebuild.cache.manifest import Manifest
from cachebuild.config import PRESET_FAMILY, PRESETS, DType, TextencConfig, TextFamily
from cachebuild.encode import free_device_memory, resolve_dtype
from cachebuild.errors import ConfigError, ModelLoadError
from cachebuild.hub import local_or_hub, pipeline_folder, tokenizer_files, weight_files

# Stored dtype where --dtype-out is not given. LLM text encoders (Qwen3 for Z-Image) carry "massive activations"
# in their hidden states, channels in the thousands and beyond fp16's 65504, which the overflow guard would turn
# into failed items; their pipelines compute in bf16, so bf16 storage loses nothing against them. CLIP and T5
# outputs stay well inside fp16, which keeps 3 more bits.
STORED_DTYPE = {TextFamily.ZIMAGE: DType.BF16}
STORED_DTYPE |= {TextFamily.LUMINA2: DType.BF16, TextFamily.SANA: DType.BF16}  # Gemma2 hidden states, likewise
CLIP_MAX_LENGTH = 77  # CLIP's position table; trainers feed all 77 positions
DEFAULT_T5_MAX_LENGTH = {TextFamily.SD3: 256, TextFamily.FLUX: 512, TextFamily.CHROMA: 512}  # the pipelines' own
ZIMAGE_MAX_LENGTH = 512  # ZImagePipeline's max_sequence_length, counted with the chat template's tokens
ZIMAGE_CHAT = (("add_generation_prompt", True), ("enable_thinking", True))  # as ZImagePipeline._encode_prompt


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder and exactly which of its outputs are stored."""

    name: str  # tensor name prefix: clip_l, clip_g, clip_h, t5, te
    folder: Path  # local model folder
    tokenizer: Path  # local tokenizer folder
    cls: str  # transformers class
    layer: int  # -1: last_hidden_state (final norm included); -2: penultimate hidden_states[-2]
    final_norm: bool  # apply the final layer norm to a non-last layer (SD1.5 clip skip)
    hidden: bool  # store hidden states as `<name>`: (77, D), or (T, D) trimmed
    pooled: str | None  # output field stored as `<name>_pooled`: (D,)
    max_length: int
    trim: bool  # encode with the attention mask and store only the real tokens (T5 with --t5-mask); False: the
    # encoder sees every max-length position unmasked and all of them are stored (Flux.1 and SD3 T5's default)
    dtype: DType
    extra_rows: int = 0  # trimmed: rows past the real tokens that are kept too (Chroma attends to one padding token)
    chat_template: tuple[tuple[str, bool], ...] = ()  # non-empty: each caption becomes one user message put
    # through the tokenizer's chat template with these apply_chat_template keywords before tokenizing (Z-Image)
    prefix: str = ""  # text joined in front of every caption before tokenizing: Lumina 2's system prompt and
    # " <Prompt Start> ", Sana's complex human instruction
    lowercase: bool = False  # the caption is lower-cased and stripped before the prefix goes on (Sana)
    right_pad: bool = False  # pad on the right whatever the tokenizer's default (Gemma's is left): the pipeline
    # sets padding_side "right" itself (Lumina 2, Sana)
    window: int = 0  # > 0: max_length is the prefix's tokens + window - 2 and the rows kept are the first one
    # and, of the last window - 1 positions, those with real tokens (Sana's select_index; its transformer gets
    # (window, D) with the mask over them)

    def fingerprint(self, manifest: Manifest) -> dict:
        extra = {"extra_rows": self.extra_rows} if self.extra_rows else {}  # absent: older caches keep theirs
        if self.chat_template:
            extra["chat_template"] = dict(self.chat_template)  # the template text itself is in tokenizer_sha256
        if self.prefix:
            extra["prefix"] = self.prefix
        if self.lowercase:
            extra["lowercase"] = True
        if self.right_pad:
            extra["padding_side"] = "right"
        if self.window:
            extra["window"] = self.window
        return extra | {
            "name": self.name,
            "class": self.cls,
            "weights_sha256": manifest.files_sha256(weight_files(self.folder)),
            "tokenizer_sha256": manifest.files_sha256(tokenizer_files(self.tokenizer)),
            "layer": self.layer,
            "final_norm": self.final_norm,
            "hidden": self.hidden,
            "pooled": self.pooled,
            "max_length": self.max_length,
            "trim": self.trim,
            "attention_mask": self.trim,
            "dtype": self.dtype.value,
        }


def resolve_encoders(cfg: TextencConfig, device: torch.device) -> tuple[TextFamily, list[EncoderSpec]]:
    """The family and its encoders, located on local disk (hub ids fetched), nothing loaded yet."""
    dtype = resolve_dtype(cfg.dtype, device)
    t5_dtype = resolve_dtype(cfg.t5_dtype or cfg.dtype, device)
    if cfg.text_encoder is not None:
        return TextFamily.GENERIC, [_generic_spec(cfg, dtype)]
    root = pipeline_folder(cfg.model, cfg.revision)
    family = cfg.family or _detect_family(cfg.model, root)
    if family is TextFamily.GENERIC:
        raise ConfigError("--family generic needs --text-encoder (and --tokenizer, --layer, --max-length)")
    t5_len = cfg.t5_max_length or DEFAULT_T5_MAX_LENGTH.get(family, 512)

    def clip(name, sub, tok, cls, layer, hidden=True, pooled=None, final_norm=False):
        return EncoderSpec(
            name, root / sub, root / tok, cls, layer, final_norm, hidden, pooled, CLIP_MAX_LENGTH, False, dtype
        )

    def t5(sub, tok):
        return EncoderSpec(
            "t5", root / sub, root / tok, "T5EncoderModel", -1, False, True, None, t5_len, cfg.t5_mask, t5_dtype
        )

    table = {
        TextFamily.SD15: lambda: [
            clip("clip_l", "text_encoder", "tokenizer", "CLIPTextModel", -cfg.clip_skip, final_norm=cfg.clip_skip > 1)
        ],
        TextFamily.SD2: lambda: [clip("clip_h", "text_encoder", "tokenizer", "CLIPTextModel", -1)],
        TextFamily.SDXL: lambda: [
            clip("clip_l", "text_encoder", "tokenizer", "CLIPTextModel", -2),
            clip("clip_g", "text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", -2, pooled="text_embeds"),
        ],
        TextFamily.SD3: lambda: [
            clip("clip_l", "text_encoder", "tokenizer", "CLIPTextModelWithProjection", -2, pooled="text_embeds"),
            clip("clip_g", "text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", -2, pooled="text_embeds"),
            t5("text_encoder_3", "tokenizer_3"),
        ],
        TextFamily.FLUX: lambda: [
            clip("clip_l", "text_encoder", "tokenizer", "CLIPTextModel", -1, hidden=False, pooled="pooler_output"),
            t5("text_encoder_2", "tokenizer_2"),
        ],
        TextFamily.CHROMA: lambda: [  # masked, as ChromaPipeline runs it; its transformer sees one padding token
            EncoderSpec(
                "t5",
                root / "text_encoder",
                root / "tokenizer",
                "T5EncoderModel",
                -1,
                False,
                True,
                None,
                t5_len,
                True,
                t5_dtype,
                extra_rows=1,
            )
        ],
        TextFamily.ZIMAGE: lambda: [  # Qwen3's penultimate hidden state at the real (template) tokens, masked
            EncoderSpec(
                "qwen3",
                root / "text_encoder",
                root / "tokenizer",
                "Qwen3Model",
                -2,
                False,
                True,
                None,
                ZIMAGE_MAX_LENGTH,
                True,
                dtype,
                chat_template=ZIMAGE_CHAT,
            )
        ],
    }
    table |= {  # families whose module declares its encoder
        TextFamily.LUMINA2: lambda: [importlib.import_module("cachebuild.families.lumina2").encoder_spec(root, dtype)],
        TextFamily.SANA: lambda: [importlib.import_module("cachebuild.families.sana").encoder_spec(root, dtype)],
    }
    specs = table[family]()
    for spec in specs:
        if not (spec.folder / "config.json").is_file() or not (spec.tokenizer).is_dir():
            raise ModelLoadError(
                f"{cfg.model} has no {spec.folder.name}/ or {spec.tokenizer.name}/ for the {family.value} family's "
                f"{spec.name}; pass the right --family or a complete pipeline"
            )
    return family, specs


def stored_rows(spec: EncoderSpec, n: int) -> int:
    """How many rows of a ``trim`` encoder's output are stored for a caption of ``n`` real tokens (prefix and
    special tokens included)."""
    if spec.window:
        return 1 + max(0, n - (spec.max_length - spec.window + 1))
    return min(n + spec.extra_rows, spec.max_length)


def kept_rows(spec: EncoderSpec, h: torch.Tensor, n: int) -> torch.Tensor:
    """The stored rows of one caption's (L, D) output run with its mask, ``n`` real tokens, right-padded."""
    if spec.window:  # row 0, then the real rows among the last window - 1 positions of max_length
        return torch.cat([h[:1], h[spec.max_length - spec.window + 1 : n]]).clone()
    return h[: n + spec.extra_rows].clone()


def load_tokenizer(spec: EncoderSpec):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.tokenizer)
    except Exception as exc:
        raise ModelLoadError(f"could not load the {spec.name} tokenizer from {spec.tokenizer}: {exc}") from exc


def tokenize(tokenizer, spec: EncoderSpec, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """(input_ids (N, L), attention_mask (N, L), truncated per text) padded to the spec's max length."""
    if spec.chat_template:
        texts = [chat_prompt(tokenizer, spec, text) for text in texts]
    if spec.lowercase:
        texts = [text.lower().strip() for text in texts]
    if spec.prefix:
        texts = [spec.prefix + text for text in texts]
    if spec.right_pad:
        tokenizer.padding_side = "right"
    enc = tokenizer(texts, padding="max_length", max_length=spec.max_length, truncation=True, return_tensors="pt")
    full = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
    return enc["input_ids"], enc["attention_mask"], [len(ids) > spec.max_length for ids in full]


def chat_prompt(tokenizer, spec: EncoderSpec, text: str) -> str:
    """``text`` as the one user message of the tokenizer's chat template, untokenized (Z-Image's prompt).

    Example:
        >>> chat_prompt(qwen_tokenizer, spec, "a cat")
        '<|im_start|>user\\na cat<|im_end|>\\n<|im_start|>assistant\\n'
    """
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, **dict(spec.chat_template))


def encoder_forward(model, spec: EncoderSpec, device: torch.device):
    """The batch function for :class:`GuardedForward`: (ids, mask) -> per item {tensor name: float32 CPU}."""

    def forward(inputs: tuple[torch.Tensor, torch.Tensor], _dtype: torch.dtype) -> list[dict]:
        ids, mask = inputs
        with torch.inference_mode():
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device) if spec.trim else None,  # CLIP: causal, fed unmasked like trainers
                output_hidden_states=spec.layer != -1,
            )
            results: list[dict] = [{} for _ in range(len(ids))]
            if spec.hidden:
                h = out.last_hidden_state if spec.layer == -1 else out.hidden_states[spec.layer]
                if spec.final_norm:
                    h = _final_layer_norm(model)(h)
                h = h.float().cpu()  # (B, L, D)
                lengths = mask.sum(dim=1).tolist()
                for i, n in enumerate(lengths):
                    results[i][spec.name] = kept_rows(spec, h[i], n) if spec.trim else h[i]  # (T, D) | (L, D)
            if spec.pooled:
                pooled = getattr(out, spec.pooled).float().cpu()  # (B, D)
                for i in range(len(ids)):
                    results[i][f"{spec.name}_pooled"] = pooled[i]
        return results

    return forward


def pad_tokens(hidden: torch.Tensor, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A trimmed (T, D) T5 output padded with zeros to (max_length, D), and its (max_length,) attention mask.

    Positions where the mask is 1 equal a masked encode at ``max_length``; longer outputs are cut.

    Example:
        >>> h, mask = pad_tokens(torch.ones(5, 4096), 512)
        >>> h.shape, int(mask.sum())
        (torch.Size([512, 4096]), 5)
    """
    n = min(hidden.shape[0], max_length)
    padded = hidden.new_zeros((max_length, hidden.shape[1]))
    padded[:n] = hidden[:n]
    return padded, token_mask(n, max_length)


def token_mask(n: int, length: int) -> torch.Tensor:
    """(length,) int64: 1 at the first ``n`` positions (the real tokens), 0 at the padding."""
    mask = torch.zeros(length, dtype=torch.long)
    mask[: min(n, length)] = 1
    return mask


def output_dims(spec: EncoderSpec) -> tuple[int, int]:
    cfg = json.loads((spec.folder / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    hidden = cfg.get("hidden_size") or cfg.get("d_model") or 0
    return hidden, cfg.get("projection_dim", hidden) if spec.pooled == "text_embeds" else hidden


def _final_layer_norm(model):
    """CLIP's final layer norm: on the model in transformers 5, under ``text_model`` before."""
    inner = getattr(model, "text_model", model)
    return inner.final_layer_norm


def _generic_spec(cfg: TextencConfig, dtype: DType) -> EncoderSpec:
    folder = local_or_hub(cfg.text_encoder, cfg.revision)
    tok = local_or_hub(cfg.tokenizer, cfg.revision) if cfg.tokenizer else folder
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type", "")
    if model_type == "t5" or model_type == "umt5":
        cls, pooled, trim = "T5EncoderModel", None, True
    elif model_type.startswith("clip"):
        with_proj = "CLIPTextModelWithProjection" in config.get("architectures", [])
        cls = "CLIPTextModelWithProjection" if with_proj else "CLIPTextModel"
        pooled, trim = ("text_embeds" if with_proj else "pooler_output"), False
    else:
        cls, pooled, trim = "AutoModel", None, True
    max_length = cfg.max_length or (CLIP_MAX_LENGTH if not trim else 512)
    return EncoderSpec("te", folder, tok, cls, cfg.layer, False, True, pooled, max_length, trim, dtype)


def _detect_family(model: str | None, root: Path) -> TextFamily:
    if model in PRESETS:
        name = PRESET_FAMILY.get(model, model)
        if name not in {f.value for f in TextFamily}:
            raise ConfigError(f"--model {model}: its text encoders are not supported yet (its latents are)")
        return TextFamily(name)
    index = root / "model_index.json"
    cls = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    by_class = {
        "StableDiffusionXLPipeline": TextFamily.SDXL,
        "StableDiffusion3Pipeline": TextFamily.SD3,
        "FluxPipeline": TextFamily.FLUX,
        "ChromaPipeline": TextFamily.CHROMA,
        "ZImagePipeline": TextFamily.ZIMAGE,
        "Lumina2Pipeline": TextFamily.LUMINA2,
        "Lumina2Text2ImgPipeline": TextFamily.LUMINA2,  # the same pipeline's earlier name
        "SanaPipeline": TextFamily.SANA,
    }
    if cls in by_class:
        return by_class[cls]
    if cls == "StableDiffusionPipeline":
        te = json.loads((root / "text_encoder" / "config.json").read_text())
        return TextFamily.SD2 if te.get("hidden_size") == 1024 else TextFamily.SD15  # OpenCLIP-H vs CLIP-L
    raise ConfigError(f"cannot tell the model family of {model} ({cls or 'no model_index.json'}); pass --family")


def load_encoder(spec: EncoderSpec, device: torch.device):
    """The transformers model for ``spec``, in eval mode on ``device``."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the CLI owns the terminal
    # transformers renamed `torch_dtype` to `dtype` in 4.56 (and warns about the old name after it)
    dtype_arg = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    try:
        model = getattr(transformers, spec.cls).from_pretrained(spec.folder, **{dtype_arg: spec.dtype.torch})
    except Exception as exc:  # transformers raises many types; one message naming the source
        raise ModelLoadError(f"could not load the {spec.name} encoder from {spec.folder}: {exc}") from exc
    return model.to(device).eval().requires_grad_(False)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


@contextlib.contextmanager
def resident(spec: EncoderSpec, device: torch.device) -> Iterator:
    """One encoder loaded for the duration of the block, freed from host and device after it."""
    model = load_encoder(spec, device)
    try:
        yield model
    finally:
        del model
        free_device_memory(device)
