"""Text encoders: which models run, which of their outputs are stored, and how they are called. Each family's
module declares its encoders (``encoder_specs(ctx)``) and pipeline classes; this module resolves, tokenizes and
runs them.

Resolution never loads a model: it locates the local folders (fetching hub ids), so a finished job can be
checked from configs and weight hashes alone. See docs/format.md for the tensors each family stores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cachebuild import keep
from cachebuild.cache.manifest import Manifest
from cachebuild.config import PRESET_FAMILY, PRESETS, DType, Offload, TextencConfig, TextFamily
from cachebuild.encode import free_device_memory, resolve_dtype
from cachebuild.errors import ConfigError, ModelLoadError
from cachebuild.families import MODULES, family_module, rows
from cachebuild.hub import local_or_hub, pipeline_folder, tokenizer_files, weight_files
from cachebuild.offload import fp32_modules, free_bytes, needed_bytes, should_offload, stream_from_host

log = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77  # CLIP's position table; trainers feed all 77 positions


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
    prompt_template: str = ""  # non-empty: each caption is put in place of ``{}`` before tokenizing (Qwen-Image)
    drop_rows: int = 0  # trimmed: leading real-token rows not stored (the template's prefix, Qwen-Image's 34)
    body: str = ""  # non-empty: the loaded model's attribute that is run instead of the model (Qwen2.5-VL's
    # `model`: the same hidden states without the LM head's logits over the vocabulary)
    masked: bool | None = None  # None: as ``trim``; True with trim False: run with the attention mask and store
    # every max-length row (HiDream's T5 and Llama, Flux.2: their transformers read the rows at the padding too)
    all_layers: bool = False  # store every layer's output after the embeddings, stacked: (layers, L, D) (HiDream)
    pad_with_eos: bool = False  # pad with the tokenizer's EOS token (HiDream sets tokenizer_4.pad_token to it)
    layers: tuple[int, ...] = ()  # non-empty: these hidden_states indices (0: the embeddings) stacked and
    # concatenated per token, (L, len(layers) * D), in place of `layer` (Flux.2)
    system_message: str = ""  # non-empty: a system turn before the caption, each content as one typed text part
    # ({"type": "text", "text": ...}), the chat format Flux2Pipeline hands its processor
    processor: bool = False  # the tokenizer folder is a multimodal processor's (Flux.2's PixtralProcessor): see
    # load_tokenizer; captions lose "[IMG]", and no special tokens are added when the prompt starts with BOS

    prefix: str = ""  # text joined in front of every caption before tokenizing: Lumina 2's system prompt and
    # " <Prompt Start> ", Sana's complex human instruction
    lowercase: bool = False  # the caption is lower-cased and stripped before the prefix goes on (Sana)
    right_pad: bool = False  # pad on the right whatever the tokenizer's default (Gemma's is left): the pipeline
    # sets padding_side "right" itself (Lumina 2, Sana)
    window: int = 0  # > 0: max_length is the prefix's tokens + window - 2 and the rows kept are the first one
    # and, of the last window - 1 positions, those with real tokens (Sana's select_index; its transformer gets
    # (window, D) with the mask over them)
    prepare: Callable[[str], str | None] | None = None  # the pipeline's own change to a caption before anything
    # else (Wan's clean-up, HunyuanVideo 1.5's quoted text for ByT5); None from it: no tokens at all, stored as
    # zero rows (the pipeline's zeros and zero mask)
    left_pad: bool = False  # the pipeline pads on the left (LTX-2's Gemma 3): every caption runs at max_length, the
    # real tokens at its end, so their positions are the pipeline's; trimmed, the last rows are kept
    per_channel_layers: bool = False  # every hidden state, the embeddings included, side by side per channel:
    # (L, D * (layers + 1)), column d * (layers + 1) + k holding hidden_states[k][d] (LTX-2's torch.stack(dim=-1)
    # then flatten)

    @property
    def attention_mask(self) -> bool:
        """Whether the encoder runs with the attention mask."""
        return self.trim if self.masked is None else self.masked

    def fingerprint(self, manifest: Manifest) -> dict:
        extra = {"extra_rows": self.extra_rows} if self.extra_rows else {}  # absent: older caches keep theirs
        if self.chat_template:
            extra["chat_template"] = dict(self.chat_template)  # the template text itself is in tokenizer_sha256
        if self.prompt_template:
            extra["prompt_template"] = self.prompt_template
        if self.drop_rows:
            extra["drop_rows"] = self.drop_rows
        extra |= {"all_layers": True} if self.all_layers else {}
        extra |= {"pad_with_eos": True} if self.pad_with_eos else {}
        if self.layers:
            extra["layers"] = list(self.layers)
        if self.system_message:
            extra["system_message"] = self.system_message
        if self.processor:
            extra["processor"] = True
        if self.prefix:
            extra["prefix"] = self.prefix
        if self.lowercase:
            extra["lowercase"] = True
        if self.right_pad:
            extra["padding_side"] = "right"
        if self.window:
            extra["window"] = self.window
        if self.prepare is not None:  # the function's qualified name: a changed rule needs a new name
            extra["prepare"] = f"{self.prepare.__module__}.{self.prepare.__qualname__}"
        if self.left_pad:
            extra["padding_side"] = "left"
        if self.per_channel_layers:
            extra["per_channel_layers"] = True
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
            "attention_mask": self.attention_mask,
            "dtype": self.dtype.value,
        }


@dataclass(frozen=True)
class SpecContext:
    """What a family module's ``encoder_specs(ctx)`` builds its encoders from; nothing is loaded.

    Example:
        >>> ctx.clip("clip_l", "text_encoder", "tokenizer", "CLIPTextModel", -2).max_length
        77
    """

    cfg: TextencConfig
    root: Path  # the local pipeline folder
    family: TextFamily
    dtype: DType  # compute dtype of every encoder but T5 (resolved: never auto)
    t5_dtype: DType  # T5's compute dtype (--t5-dtype, else as dtype)

    def clip(
        self,
        name: str,
        sub: str,
        tok: str,
        cls: str,
        layer: int,
        hidden: bool = True,
        pooled: str | None = None,
        final_norm: bool = False,
        max_length: int = CLIP_MAX_LENGTH,
    ) -> EncoderSpec:
        """A CLIP encoder under the pipeline folder, run unmasked (causal) over every position, stored whole."""
        root = self.root
        return EncoderSpec(name, root / sub, root / tok, cls, layer, final_norm, hidden, pooled, max_length, False,
                           self.dtype)  # fmt: skip

    def t5(self, sub: str, tok: str, default_length: int, **fields) -> EncoderSpec:
        """T5's last hidden state at ``--t5-max-length`` (else ``default_length``), masked and trimmed with
        ``--t5-mask``; ``fields`` replace any EncoderSpec field of that (a family's own rule)."""
        length = self.cfg.t5_max_length or default_length
        spec = EncoderSpec(
            "t5", self.root / sub, self.root / tok, "T5EncoderModel", -1, False, True, None, length, self.cfg.t5_mask,
            self.t5_dtype,
        )  # fmt: skip
        return dataclasses.replace(spec, **fields)

    def llm(self, name: str, cls: str, layer: int, max_length: int, trim: bool, **fields) -> EncoderSpec:
        """A language model's hidden states (``text_encoder/``, ``tokenizer/``) at ``dtype``, no pooled output;
        ``fields`` set the EncoderSpec's keyword fields (templates, masks, layers) or replace its folders."""
        root = self.root
        spec = EncoderSpec(name, root / "text_encoder", root / "tokenizer", cls, layer, False, True, None, max_length,
                           trim, self.dtype)  # fmt: skip
        return dataclasses.replace(spec, **fields)


def resolve_encoders(cfg: TextencConfig, device: torch.device) -> tuple[TextFamily, list[EncoderSpec]]:
    """The family and its encoders, located on local disk (hub ids fetched), nothing loaded yet."""
    if cfg.text_encoder is not None:
        return TextFamily.GENERIC, [_generic_spec(cfg, resolve_dtype(cfg.dtype, device))]
    root = pipeline_folder(cfg.model, cfg.revision)
    family = cfg.family or _detect_family(cfg.model, root)
    if family is TextFamily.GENERIC:
        raise ConfigError("--family generic needs --text-encoder (and --tokenizer, --layer, --max-length)")
    # LLM families store bf16 because their hidden states pass fp16's range: they compute in bf16 on any card
    dtype = resolve_dtype(cfg.dtype, device, wide_range=stored_dtype(family) is DType.BF16)
    t5_dtype = resolve_dtype(cfg.t5_dtype or cfg.dtype, device)
    specs = family_module(family).encoder_specs(SpecContext(cfg, root, family, dtype, t5_dtype))
    for spec in specs:
        if not (spec.folder / "config.json").is_file() or not (spec.tokenizer).is_dir():
            raise ModelLoadError(
                f"{cfg.model} has no {spec.folder.name}/ or {spec.tokenizer.name}/ for the {family.value} family's "
                f"{spec.name}; pass the right --family or a complete pipeline"
            )
    return family, specs


def stored_dtype(family: TextFamily) -> DType:
    """The dtype a family's outputs are stored in where --dtype-out is not given: its module's ``STORED_DTYPE``,
    else fp16.

    LLM text encoders (Qwen3, Qwen2.5-VL, Mistral3, Llama, Gemma2) carry "massive activations" in their hidden
    states, channels in the thousands and beyond fp16's 65504, which the overflow guard would turn into failed
    items; their pipelines compute in bf16, so their modules store bf16, which loses nothing against them. CLIP
    and T5 outputs stay well inside fp16, which keeps 3 more bits.
    """
    if family is TextFamily.GENERIC:
        return DType.FP16
    return getattr(family_module(family), "STORED_DTYPE", DType.FP16)


def stored_rows(spec: EncoderSpec, n: int) -> int:
    """How many rows of a ``trim`` encoder's output are stored for a caption of ``n`` real tokens (prefix and
    special tokens included)."""
    return rows.stored_rows(n, spec.max_length, spec.extra_rows, spec.drop_rows, spec.window)


def kept_rows(spec: EncoderSpec, h: torch.Tensor, n: int) -> torch.Tensor:
    """The stored rows of one caption's (L, D) output run with its mask, ``n`` real tokens, right-padded (left-padded
    for a ``left_pad`` encoder)."""
    if spec.left_pad:
        return h[h.shape[0] - n :].clone()
    if spec.window:  # row 0, then the real rows among the last window - 1 positions of max_length
        return torch.cat([h[:1], h[spec.max_length - spec.window + 1 : n]]).clone()
    return h[spec.drop_rows : n + spec.extra_rows].clone()


def encoder_forward(model, spec: EncoderSpec, device: torch.device):
    """The batch function for :class:`GuardedForward`: (ids, mask) -> per item {tensor name: float32 CPU}."""

    def forward(inputs: tuple[torch.Tensor, torch.Tensor], _dtype: torch.dtype) -> list[dict]:
        ids, mask = inputs
        net = getattr(model, spec.body) if spec.body else model
        # LLMs: no KV cache; and where the causal LM's head runs (stacked layers of a whole model), logits at one
        # position only, not over a 131k vocabulary
        llm = {"use_cache": False} if spec.body or spec.layers or spec.all_layers else {}
        llm |= {"logits_to_keep": 1} if spec.layers and not spec.body else {}
        every_layer = spec.all_layers or spec.per_channel_layers
        with torch.inference_mode():
            out = net(
                input_ids=ids.to(device),
                attention_mask=mask.to(device) if spec.attention_mask else None,  # CLIP: causal, fed unmasked
                output_hidden_states=spec.layer != -1 or every_layer or bool(spec.layers),
                **llm,
            )
            results: list[dict] = [{} for _ in range(len(ids))]
            if spec.hidden and spec.per_channel_layers:
                for i, n in enumerate(mask.sum(dim=1).tolist()):
                    results[i][spec.name] = _per_channel_rows(spec, out.hidden_states, i, n)
            elif spec.hidden and spec.all_layers:  # (B, layers, L, D), stacked on the host: no device copy
                h = torch.stack([x.float().cpu() for x in out.hidden_states[1:]], dim=1)
                for i in range(len(ids)):
                    results[i][spec.name] = h[i]
            elif spec.hidden:
                if spec.layers:
                    h = _stacked_layers(out, spec.layers)
                else:
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


def _per_channel_rows(spec: EncoderSpec, states: tuple, i: int, n: int) -> torch.Tensor:
    """(T, D * (layers + 1)) on the CPU in the compute dtype: item ``i``'s stored rows of every hidden state, side by
    side per channel. The rows are cut on the device before stacking, and the result is not widened to float32: a
    1024-token LTX-2 caption is 385 MB in bf16 (3840 x 49 values a token) and twice that in float32."""
    rows = [kept_rows(spec, x[i], n) if spec.trim else x[i] for x in states]  # each (T, D)
    return torch.stack(rows, dim=-1).flatten(1).cpu()


def _stacked_layers(out, layers: tuple[int, ...]) -> torch.Tensor:
    """(B, L, len(layers) * D): per token, the listed hidden states side by side, as the Flux.2 pipelines stack
    them (``torch.stack(dim=1)``, then ``permute(0, 2, 1, 3)`` and reshape)."""
    return torch.cat([out.hidden_states[k] for k in layers], dim=-1)


def pad_tokens(hidden: torch.Tensor, max_length: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A trimmed (T, D) T5 output padded with zeros to (max_length, D), and its (max_length,) attention mask.

    Positions where the mask is 1 equal a masked encode at ``max_length``; longer outputs are cut. ``left``: the
    rows go to the end and the zeros before them (a left-padded encoder's layout, LTX-2's).

    Example:
        >>> h, mask = pad_tokens(torch.ones(5, 4096), 512)
        >>> h.shape, int(mask.sum())
        (torch.Size([512, 4096]), 5)
    """
    n = min(hidden.shape[0], max_length)
    padded = hidden.new_zeros((max_length, hidden.shape[1]))
    if left:
        padded[max_length - n :] = hidden[:n]
        return padded, token_mask(n, max_length).flip(0)
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
    if spec.all_layers:  # a stored row holds one D-wide row per layer
        return hidden * cfg.get("num_hidden_layers", 1), hidden
    if spec.per_channel_layers:  # one D-wide row per hidden state, the embeddings' included
        return hidden * (cfg.get("num_hidden_layers", 1) + 1), hidden
    hidden *= max(1, len(spec.layers))
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
    by_class = {}
    for name in MODULES:  # every family's module, each declaring its pipeline classes
        by_class |= family_module(name).PIPELINES
    if cls not in by_class:
        raise ConfigError(f"cannot tell the model family of {model} ({cls or 'no model_index.json'}); pass --family")
    family = TextFamily(by_class[cls])
    if family is TextFamily.SD15:  # StableDiffusionPipeline serves SD 2.x too: told apart by the encoder's width
        te = json.loads((root / "text_encoder" / "config.json").read_text())
        return TextFamily.SD2 if te.get("hidden_size") == 1024 else TextFamily.SD15  # OpenCLIP-H vs CLIP-L
    return family


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
def resident(spec: EncoderSpec, device: torch.device, offload: Offload = Offload.NEVER) -> Iterator:
    """One encoder loaded for the duration of the block, freed from host and device after it: on ``device``, or
    kept in host memory and streamed to ``device`` block by block where ``offload`` says so (cachebuild.offload;
    ``is_streamed(model)`` tells which). Under a current ``keep.ModelKeeper`` the encoder is loaded once and kept
    there between blocks instead (a process that builds again and again as files arrive)."""
    keeper = keep.current()
    if keeper is not None:
        yield keeper.get(("text", spec, str(device), offload), lambda: _load(spec, device, offload), device)
        return
    model = _load(spec, device, offload)
    try:
        yield model
    finally:
        del model
        free_device_memory(device)


def _load(spec: EncoderSpec, device: torch.device, offload: Offload):
    if choose_offload(spec, device, offload):
        return stream_from_host(load_encoder(spec, torch.device("cpu")), device)
    return load_encoder(spec, device)


def choose_offload(spec: EncoderSpec, device: torch.device, offload: Offload) -> bool:
    """Whether ``spec`` runs streamed from host memory, logged when it does (cachebuild.offload)."""
    if offload is Offload.NEVER:
        return False
    keep_fp32 = fp32_modules(spec.cls, spec.dtype.torch)  # T5's wo stays fp32 in an fp16 load
    needed, free = needed_bytes(weight_files(spec.folder), spec.dtype.torch, keep_fp32), free_bytes(device)
    if not should_offload(offload, device, needed, free):
        return False
    if offload is Offload.ALWAYS:
        log.info("%s: weights in host memory, streamed to %s block by block (--offload always)", spec.name, device)
    else:
        log.warning(
            "%s needs about %.1f GiB on %s with activations, %.1f GiB are free: its weights stay in host memory and "
            "are streamed to the device block by block (slower; --offload never to refuse)",
            spec.name,
            needed / 2**30,
            device,
            (free or 0) / 2**30,
        )
    return True
