"""The text job's planner: pending items to chunks of distinct captions, tokenized, for any engine.

Pending items are read from the manifest a page of ``page_size`` at a time, in key order. Per page: items whose
caption cannot be read fail; items whose caption is already stored point at its tensors; the rest are grouped
by text id (identical captions are encoded once), tokenized for every encoder, ordered by padded length and text
id, and cut into chunks whose stored outputs fit the chunk budget (``--chunk-mb``). An engine encodes a chunk at
a time; its batches never cross a chunk, so the batches are the same on every engine.

Deduplication is global, across pages and devices. Before each page the caller settles what earlier pages
handed out (one device commits its open shard), so a caption encoded there is found stored. Where pages run
ahead of the devices (several devices, Ray), a caption still on its way to a device is not handed out twice:
its later items stay pending, and ``finish`` points them at its tensors once every chunk is committed (or
fails them with the reason its caption failed: a caption that failed is not encoded again). The ids of the
texts in flight and of those that failed are the only state kept between pages, so the planner's memory is one
page, the work in flight and the failures (which the run summary lists anyway), not the dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch

from cachebuild.cache.manifest import FAILED, PENDING, TEXTENC, Manifest
from cachebuild.cache.store import RunSummary, record_failures
from cachebuild.engines.text import TextItem, padded_length
from cachebuild.families.text import EncoderSpec, output_dims, stored_rows
from cachebuild.families.tokens import load_tokenizer, tokenize
from cachebuild.sources.captions import CaptionScan, text_id

log = logging.getLogger(__name__)

TOKENIZE_TEXTS = 256  # captions per tokenizer call: a fast tokenizer builds per-token objects (about 100 bytes a
# padded position, 200 MB for 4096 captions at 512) before its tensors; this many keep that transient small


class TextPlanner:
    """Chunks of distinct pending captions, a page at a time (see the module docstring).

    Example:
        >>> planner = TextPlanner(manifest, specs, captions, summary, budget=2 << 30, itemsize=2, page_size=2048)
        >>> for chunk in planner.chunks(settle=sink.flush): ...
        >>> planner.finish()
    """

    def __init__(
        self,
        manifest: Manifest,
        specs: list[EncoderSpec],
        captions: CaptionScan,
        summary: RunSummary,
        budget: int,
        itemsize: int,
        page_size: int,
        count: Callable[[int], None] = lambda steps: None,
    ):
        """``budget``: bytes of stored outputs per chunk at ``itemsize`` bytes an element; ``count(steps)`` is
        told of (item, encoder) steps finished here (items failed or pointed at stored tensors)."""
        self.manifest, self.specs, self.captions, self.summary = manifest, specs, captions, summary
        self.budget, self.itemsize, self.page_size, self.count = budget, itemsize, page_size, count
        self.handed: dict[str, str] = {}  # text id -> first item key: handed out in this run and not yet found
        # stored (in flight, or failed)
        self.left = 0  # items left pending because their caption was in flight
        self._dims = {s.name: output_dims(s) for s in specs}

    def chunks(self, settle: Callable[[], None]) -> Iterator[list[TextItem]]:
        """Every pending caption to encode, in chunks; ``settle()`` runs before each page is looked up."""
        for page in self.manifest.item_pages(TEXTENC, PENDING, self.page_size):
            settle()
            bad = [(r.key, self.captions.bad[r.key]) for r in page if r.key in self.captions.bad]
            record_failures(self.manifest, TEXTENC, self.summary, bad)
            todo = {r.key: self.captions.texts[r.key] for r in page if r.key in self.captions.texts}
            new_texts = reuse_stored(self.manifest, todo, self.summary)
            self._forget_stored()
            new = {tid: entry for tid, entry in new_texts.items() if tid not in self.handed}
            self.left += sum(len(keys) for tid, (_, keys) in new_texts.items() if tid in self.handed)
            self.count((len(bad) + len(todo) - sum(len(keys) for _, keys in new_texts.values())) * len(self.specs))
            if new:
                items = self._items(new)
                self.handed.update((i.tid, i.key) for i in items)
                yield from cut_chunks(items, self.budget)

    def finish(self) -> None:
        """After every chunk is committed: point the items left pending at their caption's tensors, or fail them
        with the reason their caption failed."""
        if not self.left:
            return
        log.info("%d item(s) whose caption was in flight or failed when planned: settling them now", self.left)
        reasons: dict[str, str] | None = None
        for page in self.manifest.item_pages(TEXTENC, PENDING, self.page_size):
            todo = {r.key: self.captions.texts[r.key] for r in page if r.key in self.captions.texts}
            failed, unknown = [], 0
            for tid, (_, keys) in reuse_stored(self.manifest, todo, self.summary).items():
                if tid not in self.handed:  # not seen by this run: stays pending, as any such item
                    unknown += len(keys)
                    continue
                if reasons is None:  # only where a caption failed: the failed items' reasons, read once
                    reasons = {r.key: r.reason or "" for r in self.manifest.items(TEXTENC, FAILED)}
                why = reasons.get(self.handed[tid]) or "the encoders failed on this caption"
                failed += [(k, why) for k in keys]
            record_failures(self.manifest, TEXTENC, self.summary, failed)
            self.count((len(todo) - unknown) * len(self.specs))

    def _forget_stored(self) -> None:
        """Drop the texts handed out that are stored by now: what stays is in flight, or failed."""
        if self.handed:
            for tid in self.manifest.done_by_info(TEXTENC, "text_id", sorted(self.handed)):
                del self.handed[tid]

    def _items(self, new_texts: dict[str, tuple[str, list[str]]]) -> list[TextItem]:
        """One page's new captions tokenized for every encoder, ordered by padded length, then text id: a fixed
        order whatever the order items arrived in, and batches whose masked encoders run at one padded length."""
        ids = sorted(new_texts)
        texts = [new_texts[t][0] for t in ids]
        tokens = {spec.name: _tokenize(spec, texts) for spec in self.specs}
        items = []
        for i, tid in enumerate(ids):
            text, keys = new_texts[tid]
            toks = {name: (t[0][i].numpy(), t[1][i].numpy()) for name, t in tokens.items()}
            truncated = tuple(s.name for s in self.specs if tokens[s.name][2][i])
            item = TextItem(keys[0], tid, text, keys, toks, truncated)
            item.pad = tuple(padded_length(s, item.real(s.name)) for s in self.specs if s.trim)
            item.nbytes = self._nbytes(item)
            items.append(item)
        self.summary.truncated += sum(1 for i in items if i.truncated)
        return sorted(items, key=lambda i: (i.pad, i.tid))

    def _nbytes(self, item: TextItem) -> int:
        """The item's stored outputs, exact from its token counts."""
        size = 0
        for s in self.specs:
            hidden, pooled = self._dims[s.name]
            rows = stored_rows(s, item.real(s.name)) if s.trim else s.max_length
            size += (rows * hidden if s.hidden else 0) + (pooled if s.pooled else 0)
        return size * self.itemsize


def cut_chunks(items: Iterable[TextItem], budget: int) -> Iterator[list[TextItem]]:
    """Consecutive runs of ``items`` whose stored outputs fit in ``budget`` bytes (at least one item each)."""
    chunk: list[TextItem] = []
    used = 0
    for item in items:
        if chunk and used + item.nbytes > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(item)
        used += item.nbytes
    if chunk:
        yield chunk


def reuse_stored(manifest: Manifest, todo: dict[str, str], summary: RunSummary) -> dict[str, tuple[str, list[str]]]:
    """Point one page's items at already-stored identical captions; return the texts still to encode, by id."""
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
    instead of 16. The encoder gets int64 again: the same values, so the same outputs."""
    tokenizer = load_tokenizer(spec)
    ids = torch.empty(len(texts), spec.max_length, dtype=torch.int32)  # (N, max length)
    mask = torch.empty(len(texts), spec.max_length, dtype=torch.bool)
    truncated: list[bool] = []
    for i in range(0, len(texts), TOKENIZE_TEXTS):
        part_ids, part_mask, part_truncated = tokenize(tokenizer, spec, texts[i : i + TOKENIZE_TEXTS])
        ids[i : i + len(part_truncated)], mask[i : i + len(part_truncated)] = part_ids, part_mask
        truncated += part_truncated
    return ids, mask, truncated
