"""Text-encoder caches: the same scan -> manifest -> shard -> commit machinery as latents, for captions.

Memory: encoders are resident one at a time. The pending unique captions go through encoder 1 in chunks
of at most ``--chunk-mb`` of outputs; it is freed (host and device) before encoder 2 is loaded, and so on,
so peak device memory is the largest encoder plus one batch. Only a set larger than one chunk loads each
encoder once per chunk.

Storage: identical caption text is encoded once per store; tensors live under the caption's text id
(``<text_id>/clip_l``) and every item with that text points at them. T5 outputs are encoded with the
attention mask and stored trimmed to the caption's real token count: with the mask, the outputs at real
tokens do not depend on the padding, so a reader can pad back to any max length exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cachebuild.captions import scan_captions, text_id
from cachebuild.config import PRESETS, DType, TextencConfig, TextFamily
from cachebuild.encode import GuardedForward, free_device_memory, pick_device, resolve_dtype
from cachebuild.errors import ConfigError, ModelLoadError
from cachebuild.manifest import DONE, PENDING, Manifest
from cachebuild.models import fetch_hub_folder, weight_files
from cachebuild.pipeline import Progress, ProgressFn, RunSummary, ShardSink, finish_run, open_store
from cachebuild.pipeline import weights_sha256 as files_sha256

log = logging.getLogger(__name__)

TEXTENC = "textenc"  # store name: folder under --out and the manifest's store key
CLIP_MAX_LENGTH = 77  # CLIP's position table; trainers feed all 77 positions
CAPTION_RULES_VERSION = 1  # bump when caption reading changes the text handed to the tokenizers
PAD_MULTIPLE = 64  # masked (T5) inputs are padded to a multiple of this, not to max length: with the mask the
# outputs at real tokens do not depend on the padding, and most captions are far shorter than 512 tokens
DEFAULT_T5_MAX_LENGTH = {TextFamily.SD3: 256, TextFamily.FLUX: 512}  # the pipelines' own defaults


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
    trim: bool  # encode with the attention mask and store only the real tokens (T5)
    dtype: DType

    def fingerprint(self, manifest: Manifest) -> dict:
        return {
            "name": self.name,
            "class": self.cls,
            "weights_sha256": files_sha256(weight_files(self.folder), manifest),
            "tokenizer_sha256": files_sha256(_tokenizer_files(self.tokenizer), manifest),
            "layer": self.layer,
            "final_norm": self.final_norm,
            "hidden": self.hidden,
            "pooled": self.pooled,
            "max_length": self.max_length,
            "trim": self.trim,
            "attention_mask": self.trim,
            "dtype": self.dtype.value,
        }


def build_textenc(cfg: TextencConfig, progress: ProgressFn | None = None) -> RunSummary:
    """Build or finish the text-encoder cache that ``cfg`` describes; same resume rules as latents.

    Example:
        >>> build_textenc(TextencConfig(Path("captions"), Path("cache"), model="sdxl")).done
        20000
    """
    start = time.monotonic()
    device = pick_device(cfg.device)
    family, specs = resolve_encoders(cfg, device)
    captions = scan_captions(cfg.source, cfg.caption_ext, cfg.caption_column)
    summary = RunSummary(TEXTENC, str(cfg.out))
    with Manifest.open(cfg.out) as manifest:
        manifest.lock()
        fingerprint = {
            "family": family.value,
            "encoders": [s.fingerprint(manifest) for s in specs],
            "dtype_out": cfg.dtype_out.value,
            "format": cfg.format.value,
            "caption_rules": CAPTION_RULES_VERSION,
        }
        sync = open_store(manifest, TEXTENC, fingerprint, captions.scan, cfg.retry_failed, cfg.rebuild)
        summary.new, summary.changed, summary.removed = sync.new, sync.changed, sync.removed
        pending = manifest.items(TEXTENC, PENDING)
        if pending:
            bad = [(r.key, captions.bad[r.key]) for r in pending if r.key in captions.bad]
            _record_failures(manifest, bad, summary)
            todo = {r.key: captions.texts[r.key] for r in pending if r.key in captions.texts}
            new_texts = _reuse_stored(manifest, todo, summary)
            if new_texts:
                header = {"store": TEXTENC, "family": family.value, "dtype": cfg.dtype_out.value}
                with ShardSink(manifest, TEXTENC, cfg.format.value, cfg.shard_bytes, header, summary) as sink:
                    _encode_all(cfg, specs, device, new_texts, sink, summary, progress)
        else:
            summary.nothing_to_do = not (sync.new or sync.changed or sync.removed)
        return finish_run(manifest, summary, start)


def resolve_encoders(cfg: TextencConfig, device: torch.device) -> tuple[TextFamily, list[EncoderSpec]]:
    """The family and its encoders, located on local disk (hub ids fetched), nothing loaded yet."""
    dtype = resolve_dtype(cfg.dtype, device)
    t5_dtype = resolve_dtype(cfg.t5_dtype or cfg.dtype, device)
    if cfg.text_encoder is not None:
        return TextFamily.GENERIC, [_generic_spec(cfg, dtype)]
    root = _pipeline_folder(cfg.model, cfg.revision)
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
            "t5", root / sub, root / tok, "T5EncoderModel", -1, False, True, None, t5_len, True, t5_dtype
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
    }
    specs = table[family]()
    for spec in specs:
        if not (spec.folder / "config.json").is_file() or not (spec.tokenizer).is_dir():
            raise ModelLoadError(
                f"{cfg.model} has no {spec.folder.name}/ or {spec.tokenizer.name}/ for the {family.value} family's "
                f"{spec.name}; pass the right --family or a complete pipeline"
            )
    return family, specs


def load_encoder(spec: EncoderSpec, device: torch.device):
    """The transformers model for ``spec``, in eval mode on ``device``."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the CLI owns the terminal
    try:
        model = getattr(transformers, spec.cls).from_pretrained(spec.folder, dtype=spec.dtype.torch)
    except Exception as exc:  # transformers raises many types; one message naming the source
        raise ModelLoadError(f"could not load the {spec.name} encoder from {spec.folder}: {exc}") from exc
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(spec: EncoderSpec):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.tokenizer)
    except Exception as exc:
        raise ModelLoadError(f"could not load the {spec.name} tokenizer from {spec.tokenizer}: {exc}") from exc


def tokenize(tokenizer, spec: EncoderSpec, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """(input_ids (N, L), attention_mask (N, L), truncated per text) padded to the spec's max length."""
    enc = tokenizer(texts, padding="max_length", max_length=spec.max_length, truncation=True, return_tensors="pt")
    full = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
    return enc["input_ids"], enc["attention_mask"], [len(ids) > spec.max_length for ids in full]


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
                    results[i][spec.name] = h[i, :n].clone() if spec.trim else h[i]  # (T, D) or (L, D)
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
    mask = torch.zeros(max_length, dtype=torch.long)
    mask[:n] = 1
    return padded, mask


@contextlib.contextmanager
def resident(spec: EncoderSpec, device: torch.device) -> Iterator:
    """One encoder loaded for the duration of the block, freed from host and device after it."""
    model = load_encoder(spec, device)
    try:
        yield model
    finally:
        del model
        free_device_memory(device)


def _encode_all(
    cfg: TextencConfig,
    specs: list[EncoderSpec],
    device: torch.device,
    new_texts: dict[str, tuple[str, list[str]]],
    sink: ShardSink,
    summary: RunSummary,
    progress: ProgressFn | None,
) -> None:
    ids = sorted(new_texts)
    texts = [new_texts[t][0] for t in ids]
    tokens = {spec.name: tokenize(load_tokenizer(spec), spec, texts) for spec in specs}
    # Order by padded length, then text id: a fixed order whatever the order items arrived in, and batches
    # whose trimmed encoders run at one padded length for every caption in them.
    pads = [_pad_key(specs, tokens, i) for i in range(len(ids))]
    order = sorted(range(len(ids)), key=lambda i: (pads[i], ids[i]))
    ids, texts, pads = [ids[i] for i in order], [texts[i] for i in order], [pads[i] for i in order]
    tokens = {name: (t[0][order], t[1][order], [t[2][i] for i in order]) for name, t in tokens.items()}
    summary.truncated = sum(any(tokens[s.name][2][i] for s in specs) for i in range(len(ids)))
    if summary.truncated:
        log.warning("%d caption(s) longer than an encoder's max length were truncated", summary.truncated)
    out_dtype = cfg.dtype_out.torch
    steps, total_steps = 0, len(ids) * len(specs)  # progress counts (caption, encoder) passes

    def report(n: int, base: int) -> None:
        if progress:
            progress(Progress(base + n, total_steps, summary.failed_now, None))

    for lo, hi in _chunks(specs, tokens, len(ids), out_dtype.itemsize, cfg.chunk_bytes):
        outputs: list[dict | str] = [{} for _ in range(hi - lo)]
        for spec in specs:
            base = steps
            steps += _run_encoder(
                cfg, spec, device, tokens[spec.name], pads, (lo, hi), outputs, summary, lambda n, b=base: report(n, b)
            )
        for j, tid in enumerate(ids[lo:hi]):
            _store_text(sink, specs, tid, new_texts[tid], outputs[j], tokens, lo + j)
            outputs[j] = {}  # release as it goes into the shard


def _run_encoder(
    cfg: TextencConfig,
    spec: EncoderSpec,
    device: torch.device,
    tokens,
    pads: list[tuple],
    span: tuple[int, int],
    outputs: list[dict | str],
    summary: RunSummary,
    report: Callable[[int], None],
) -> int:
    """One encoder's pass over texts [lo, hi), merging into ``outputs``. A function of its own so that the
    model, the guard and the forward closure are all gone when it returns, before the next encoder loads."""
    input_ids, mask, _ = tokens
    lo, hi = span
    out_dtype = cfg.dtype_out.torch
    with resident(spec, device) as model:
        summary.model_loaded = True
        guard = GuardedForward(model, device, spec.dtype.torch, encoder_forward(model, spec, device), spec.name)
        for b, e in _batches(pads, lo, hi, cfg.batch_size):
            width = _padded_length(spec, int(mask[b:e].sum(dim=1).max())) if spec.trim else spec.max_length
            for j, res in enumerate(guard((input_ids[b:e, :width], mask[b:e, :width]))):
                slot = b - lo + j
                if isinstance(outputs[slot], dict):
                    outputs[slot] = res if isinstance(res, str) else outputs[slot] | _cast(res, out_dtype)
            report(e - lo)
        summary.oom_splits += guard.oom_splits
        summary.fp32_redos += guard.upcasts
    return hi - lo


def _store_text(
    sink: ShardSink,
    specs: list[EncoderSpec],
    tid: str,
    entry: tuple[str, list[str]],
    result: dict | str,
    tokens: dict,
    index: int,
) -> None:
    text, keys = entry
    if isinstance(result, str):
        sink.fail([(k, result) for k in keys])
        return
    if not all(torch.isfinite(t).all() for t in result.values()):
        sink.fail([(k, "encoder outputs overflow --dtype-out fp16; use bf16 or fp32") for k in keys])
        return
    info = {
        "text_id": tid,
        "tokens": {s.name: int(tokens[s.name][1][index].sum()) for s in specs},  # real tokens, incl. special
        "truncated": [s.name for s in specs if tokens[s.name][2][index]],
    }
    sink.add(tid, result, info | {"text": text, "keys": keys}, [(k, None, info) for k in keys])


def _reuse_stored(manifest: Manifest, todo: dict[str, str], summary: RunSummary) -> dict[str, tuple[str, list[str]]]:
    """Point items at already-stored identical captions; return the texts still to encode, by text id."""
    stored = {}
    for row in manifest.items(TEXTENC, DONE):
        stored.setdefault(row.info.get("text_id"), (row.shard, row.info))
    reuse, new_texts = [], {}
    for key, text in sorted(todo.items()):
        tid = text_id(text)
        if tid in stored:
            shard, info = stored[tid]
            reuse.append((key, shard, info))
        else:
            new_texts.setdefault(tid, (text, []))[1].append(key)
    if reuse:
        manifest.point_items(TEXTENC, reuse)
        summary.encoded += len(reuse)
    return new_texts


def _padded_length(spec: EncoderSpec, tokens: int) -> int:
    """Masked encoders run at the caption's length rounded up to PAD_MULTIPLE, not at max length."""
    return min(spec.max_length, -(-tokens // PAD_MULTIPLE) * PAD_MULTIPLE)


def _pad_key(specs: list[EncoderSpec], tokens: dict, i: int) -> tuple[int, ...]:
    return tuple(_padded_length(s, int(tokens[s.name][1][i].sum())) for s in specs if s.trim)


def _batches(pads: list[tuple], lo: int, hi: int, size: int) -> Iterator[tuple[int, int]]:
    """[b, e) ranges of at most ``size`` inside [lo, hi) that never mix padded lengths."""
    b = lo
    while b < hi:
        e = b + 1
        while e < hi and e - b < size and pads[e] == pads[b]:
            e += 1
        yield b, e
        b = e


def _chunks(specs, tokens, n: int, itemsize: int, budget: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges whose stored outputs (exact, from token counts) fit in ``budget`` bytes."""
    dims = {s.name: _output_dims(s) for s in specs}
    lo, used = 0, 0
    for i in range(n):
        size = 0
        for s in specs:
            hidden, pooled = dims[s.name]
            rows = int(tokens[s.name][1][i].sum()) if s.trim else s.max_length
            size += ((rows * hidden if s.hidden else 0) + (pooled if s.pooled else 0)) * itemsize
        if i > lo and used + size > budget:
            yield lo, i
            lo, used = i, 0
        used += size
    if lo < n:
        yield lo, n


def _output_dims(spec: EncoderSpec) -> tuple[int, int]:
    cfg = json.loads((spec.folder / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    hidden = cfg.get("hidden_size") or cfg.get("d_model") or 0
    return hidden, cfg.get("projection_dim", hidden) if spec.pooled == "text_embeds" else hidden


def _final_layer_norm(model):
    """CLIP's final layer norm: on the model in transformers 5, under ``text_model`` before."""
    inner = getattr(model, "text_model", model)
    return inner.final_layer_norm


def _cast(result: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) for k, v in result.items()}


def _record_failures(manifest: Manifest, failures: list[tuple[str, str]], summary: RunSummary) -> None:
    if failures:
        manifest.mark_failed(TEXTENC, failures)
        summary.failed_now += len(failures)
        summary.failures += [{"key": k, "reason": r} for k, r in failures]


def _generic_spec(cfg: TextencConfig, dtype: DType) -> EncoderSpec:
    folder = _local_or_hub(cfg.text_encoder, cfg.revision)
    tok = _local_or_hub(cfg.tokenizer, cfg.revision) if cfg.tokenizer else folder
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


def _pipeline_folder(model: str | None, revision: str | None) -> Path:
    assert model is not None
    return _local_or_hub(PRESETS.get(model, model), revision, pipeline=True)


def _local_or_hub(source: str, revision: str | None, pipeline: bool = False) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if pipeline:
        subs = ["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"]
        patterns = ["model_index.json"] + [
            f"{s}/*.{ext}" for s in subs for ext in ("json", "safetensors", "txt", "model")
        ]
    else:
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
    return fetch_hub_folder(source, patterns, revision)


def _detect_family(model: str | None, root: Path) -> TextFamily:
    if model in PRESETS:
        return TextFamily(model)
    index = root / "model_index.json"
    cls = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    by_class = {
        "StableDiffusionXLPipeline": TextFamily.SDXL,
        "StableDiffusion3Pipeline": TextFamily.SD3,
        "FluxPipeline": TextFamily.FLUX,
    }
    if cls in by_class:
        return by_class[cls]
    if cls == "StableDiffusionPipeline":
        te = json.loads((root / "text_encoder" / "config.json").read_text())
        return TextFamily.SD2 if te.get("hidden_size") == 1024 else TextFamily.SD15  # OpenCLIP-H vs CLIP-L
    raise ConfigError(f"cannot tell the model family of {model} ({cls or 'no model_index.json'}); pass --family")


def _tokenizer_files(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.iterdir() if p.is_file()))
