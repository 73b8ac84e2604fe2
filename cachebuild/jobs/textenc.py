"""Text-encoder caches: the same scan -> manifest -> shard -> commit machinery as latents, for captions.

Memory: pending captions are read from the manifest, tokenized and encoded one chunk at a time (at most
``TEXT_CHUNK_CAPTIONS`` captions and ``--chunk-mb`` of outputs), so host memory does not grow with the
dataset. Encoders are resident one at a time: a chunk goes through encoder 1, which is freed (host and
device) before encoder 2 is loaded, and so on, so peak device memory is the largest encoder plus one batch.
A set larger than one chunk loads each encoder once per chunk.

Storage: identical caption text is encoded once per store; tensors live under the caption's text id
(``<text_id>/clip_l``) and every item with that text points at them. Each encoder's outputs are what its
family's pipeline computes (``families.text``): full max-length rows where the pipeline runs unmasked (Flux.1
and SD3 T5 by default), the real tokens only where it runs masked and keeps only those (``trim``), which
then run at a padded length of ``PAD_MULTIPLE`` rather than at max length.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate

import torch

from cachebuild.cache.manifest import PENDING, TEXTENC, Manifest
from cachebuild.cache.remote import open_output
from cachebuild.cache.store import Progress, ProgressFn, RunSummary, ShardSink, finish_run, open_store
from cachebuild.config import TextencConfig
from cachebuild.encode import GuardedForward, pick_device, use_device
from cachebuild.errors import ConfigError
from cachebuild.families import MODULES, family_module
from cachebuild.families.text import (
    EncoderSpec,
    encoder_forward,
    output_dims,
    resident,
    resolve_encoders,
    stored_dtype,
    stored_rows,
)
from cachebuild.families.tokens import load_tokenizer, tokenize
from cachebuild.offload import is_streamed
from cachebuild.sources.captions import CaptionScan, scan_captions, text_id

log = logging.getLogger(__name__)

CAPTION_RULES_VERSION = 1  # bump when caption reading changes the text handed to the tokenizers
TEXT_CHUNK_CAPTIONS = 2048  # pending captions read, tokenized and encoded at a time: their rows, tokens (5 bytes
# a position: 2.5 KB a caption for T5 at 512) and outputs stay bounded however many captions there are. Each
# encoder loads once per chunk, so a chunk should be seconds of device work; the --chunk-mb output budget
# already cuts Flux-sized T5 outputs (about 0.8 MB a caption) into chunks of this order
TOKENIZE_TEXTS = 256  # captions per tokenizer call: a fast tokenizer builds per-token objects (about 100 bytes a
# padded position, 200 MB for 4096 captions at 512) before its tensors; this many keep that transient small
PAD_MULTIPLE = 64  # masked (T5) inputs are padded to a multiple of this, not to max length: with the mask the
# outputs at real tokens do not depend on the padding, and most captions are far shorter than 512 tokens


def build_textenc(cfg: TextencConfig, progress: ProgressFn | None = None) -> RunSummary:
    """Build or finish the text-encoder cache that ``cfg`` describes; same resume rules as latents.

    Example:
        >>> build_textenc(TextencConfig(Path("captions"), Path("cache"), model="sdxl")).done
        20000
    """
    start = time.monotonic()
    device = use_device(pick_device(cfg.device))  # cuda:k: no context on GPU 0
    family, specs = resolve_encoders(cfg, device)
    if cfg.dtype_out is None:  # the family's stored dtype, resolved before it enters the fingerprint
        cfg = dataclasses.replace(cfg, dtype_out=stored_dtype(family))
    if family.value in MODULES and hasattr(family_module(family.value), "pictures"):  # captions encoded with
        # their condition images (qwen-image-edit, -plus): a job of its own
        from cachebuild.jobs.textenc_edit import build_textenc_edit

        return build_textenc_edit(
            cfg, family, specs, device, start, progress, CAPTION_RULES_VERSION, TEXT_CHUNK_CAPTIONS
        )
    if cfg.control is not None:
        raise ConfigError(f"--control is for the qwen-image-edit families; {family.value} encodes captions alone")
    captions = scan_captions(cfg.source, cfg.caption_ext, cfg.caption_column)
    summary = RunSummary(TEXTENC, str(cfg.out))
    with open_output(cfg.out, cfg.manifest_dir) as manifest:  # a URL: cache.remote
        manifest.lock()
        fingerprint = {
            "family": family.value,
            "encoders": [s.fingerprint(manifest) for s in specs],
            "dtype_out": cfg.dtype_out.value,
            "format": cfg.format.value,
            "caption_rules": CAPTION_RULES_VERSION,
        }
        sync = open_store(manifest, TEXTENC, fingerprint, captions.scan, cfg.retry_failed, cfg.rebuild, cfg.prune)
        summary.new, summary.changed, summary.removed = sync.new, sync.changed, sync.removed
        tally = _Tally(manifest.counts(TEXTENC)[PENDING] * len(specs), summary, progress)
        if tally.total:
            header = {"store": TEXTENC, "family": family.value, "dtype": cfg.dtype_out.value}
            with ShardSink(manifest, TEXTENC, cfg.format.value, cfg.shard_bytes, header, summary) as sink:
                _encode_pending(cfg, specs, device, captions, sink, summary, tally)
            if summary.truncated:
                log.warning("%d caption(s) longer than an encoder's max length were truncated", summary.truncated)
        else:
            summary.nothing_to_do = not (sync.new or sync.changed or sync.removed)
        return finish_run(manifest, summary, start)


@dataclass
class _Tally:
    """Progress of one run in (item, encoder) steps: an item counts once per encoder when its caption has been
    through that encoder, or for every encoder at once when it fails or reuses a stored caption."""

    total: int  # pending items when the run started, times the encoders
    summary: RunSummary
    progress: ProgressFn | None
    steps: int = 0  # steps finished so far

    def add(self, steps: int) -> None:
        self.steps += steps
        self.show(0)

    def show(self, extra: int) -> None:
        """Report the finished steps plus ``extra`` steps of the encoder pass under way."""
        if self.progress:
            self.progress(Progress(self.steps + extra, self.total, self.summary.failed_now, None))


def _encode_pending(
    cfg: TextencConfig,
    specs: list[EncoderSpec],
    device: torch.device,
    captions: CaptionScan,
    sink: ShardSink,
    summary: RunSummary,
    tally: _Tally,
) -> None:
    """Pending items, one chunk of ``TEXT_CHUNK_CAPTIONS`` at a time in key order: fail the unreadable, point
    those whose caption is stored, encode the rest."""
    manifest = sink.manifest
    for page in manifest.item_pages(TEXTENC, PENDING, TEXT_CHUNK_CAPTIONS):
        bad = [(r.key, captions.bad[r.key]) for r in page if r.key in captions.bad]
        sink.fail(bad)
        todo = {r.key: captions.texts[r.key] for r in page if r.key in captions.texts}
        new_texts = _reuse_stored(manifest, todo, summary)
        tally.add((len(bad) + len(todo) - sum(len(keys) for _, keys in new_texts.values())) * len(specs))
        if new_texts:
            _encode_texts(cfg, specs, device, new_texts, sink, summary, tally)
            sink.flush()  # committed now, a later chunk finds these captions stored: identical text is encoded once


def _encode_texts(
    cfg: TextencConfig,
    specs: list[EncoderSpec],
    device: torch.device,
    new_texts: dict[str, tuple[str, list[str]]],
    sink: ShardSink,
    summary: RunSummary,
    tally: _Tally,
) -> None:
    """Tokenize one chunk's new captions, run the encoders over them in turns and store the outputs."""
    ids = sorted(new_texts)
    texts = [new_texts[t][0] for t in ids]
    tokens = {spec.name: _tokenize(spec, texts) for spec in specs}
    # Order by padded length, then text id: a fixed order whatever the order items arrived in, and batches
    # whose trimmed encoders run at one padded length for every caption in them.
    pads = [_pad_key(specs, tokens, i) for i in range(len(ids))]
    order = sorted(range(len(ids)), key=lambda i: (pads[i], ids[i]))
    ids, texts, pads = [ids[i] for i in order], [texts[i] for i in order], [pads[i] for i in order]
    tokens = {name: (t[0][order], t[1][order], [t[2][i] for i in order]) for name, t in tokens.items()}
    summary.truncated += sum(any(tokens[s.name][2][i] for s in specs) for i in range(len(ids)))
    keys_before = list(accumulate((len(new_texts[t][1]) for t in ids), initial=0))  # items behind texts [0, i)
    out_dtype = cfg.dtype_out.torch
    for lo, hi in _chunks(specs, tokens, len(ids), out_dtype.itemsize, cfg.chunk_bytes):
        outputs: list[dict | str] = [{} for _ in range(hi - lo)]

        def report(e: int, lo: int = lo) -> None:  # texts [lo, e) are through the encoder under way
            tally.show(keys_before[e] - keys_before[lo])

        for spec in specs:
            _run_encoder(cfg, spec, device, tokens[spec.name], pads, (lo, hi), outputs, summary, report)
            tally.add(keys_before[hi] - keys_before[lo])
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
) -> None:
    """One encoder's pass over texts [lo, hi), merging into ``outputs``; ``report(e)`` after texts [lo, e).
    A function of its own so that the model, the guard and the forward closure are all gone when it returns,
    before the next encoder loads."""
    input_ids, mask, _ = tokens
    lo, hi = span
    out_dtype = cfg.dtype_out.torch
    with resident(spec, device, cfg.offload) as model:
        summary.model_loaded = True
        if is_streamed(model) and spec.name not in summary.offloaded:
            summary.offloaded.append(spec.name)
        guard = GuardedForward(model, device, spec.dtype.torch, encoder_forward(model, spec, device), spec.name)
        for b, e in _batches(pads, lo, hi, cfg.batch_size):
            width = _padded_length(spec, int(mask[b:e].sum(dim=1).max())) if spec.trim else spec.max_length
            for j, res in enumerate(guard((input_ids[b:e, :width].long(), mask[b:e, :width].long()))):
                slot = b - lo + j
                if isinstance(outputs[slot], dict):
                    outputs[slot] = res if isinstance(res, str) else outputs[slot] | _cast(res, out_dtype)
            report(e)
        summary.oom_splits += guard.oom_splits
        summary.fp32_redos += guard.upcasts


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
        sink.fail([(k, f"encoder outputs overflow --dtype-out {sink.header['dtype']}; use bf16 or fp32") for k in keys])
        return
    info = {
        "text_id": tid,
        "tokens": {s.name: int(tokens[s.name][1][index].sum()) for s in specs},  # real tokens, incl. special
        "truncated": [s.name for s in specs if tokens[s.name][2][index]],
    }
    sink.add(tid, result, info | {"text": text, "keys": keys}, [(k, None, info) for k in keys])


def _reuse_stored(manifest: Manifest, todo: dict[str, str], summary: RunSummary) -> dict[str, tuple[str, list[str]]]:
    """Point one chunk's items at already-stored identical captions; return the texts still to encode, by id."""
    tids = {key: text_id(text) for key, text in todo.items()}
    stored = manifest.done_by_info(TEXTENC, "text_id", sorted(set(tids.values())))
    reuse, new_texts = [], {}
    for key, text in sorted(todo.items()):
        tid = tids[key]
        if tid in stored:
            shard, info = stored[tid]
            reuse.append((key, shard, info))
        else:
            new_texts.setdefault(tid, (text, []))[1].append(key)
    if reuse:
        manifest.point_items(TEXTENC, reuse)
        summary.encoded += len(reuse)
    return new_texts


def _tokenize(spec: EncoderSpec, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """``tokenize`` in slices of ``TOKENIZE_TEXTS``, kept compact: int32 ids and a bool mask, 5 bytes a position
    instead of 16. ``_run_encoder`` hands the encoder int64 again: the same values, so the same outputs."""
    tokenizer = load_tokenizer(spec)
    ids = torch.empty(len(texts), spec.max_length, dtype=torch.int32)  # (N, max length)
    mask = torch.empty(len(texts), spec.max_length, dtype=torch.bool)
    truncated: list[bool] = []
    for i in range(0, len(texts), TOKENIZE_TEXTS):
        part_ids, part_mask, part_truncated = tokenize(tokenizer, spec, texts[i : i + TOKENIZE_TEXTS])
        ids[i : i + len(part_truncated)], mask[i : i + len(part_truncated)] = part_ids, part_mask
        truncated += part_truncated
    return ids, mask, truncated


def _padded_length(spec: EncoderSpec, tokens: int) -> int:
    """Masked encoders run at the caption's length (and the rows kept past it) rounded up to PAD_MULTIPLE, not
    at max length; a caption with no tokens (HunyuanVideo 1.5's ByT5 without quoted text) at PAD_MULTIPLE; a
    left-padded encoder at max length, where the pipeline puts the real tokens."""
    if spec.left_pad:
        return spec.max_length
    return min(spec.max_length, -(-max(1, tokens + spec.extra_rows) // PAD_MULTIPLE) * PAD_MULTIPLE)


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
    dims = {s.name: output_dims(s) for s in specs}
    lo, used = 0, 0
    for i in range(n):
        size = 0
        for s in specs:
            hidden, pooled = dims[s.name]
            rows = stored_rows(s, int(tokens[s.name][1][i].sum())) if s.trim else s.max_length
            size += ((rows * hidden if s.hidden else 0) + (pooled if s.pooled else 0)) * itemsize
        if i > lo and used + size > budget:
            yield lo, i
            lo, used = i, 0
        used += size
    if lo < n:
        yield lo, n


def _cast(result: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) for k, v in result.items()}
