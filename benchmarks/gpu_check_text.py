"""The text sections of ``gpu_check.py`` (``gpu_check_sections.py`` runs them): a T5-XXL-sized encoder through
``textenc`` against a bare loop, and a T5-XL-sized one streamed from host memory under a cap against resident."""

from __future__ import annotations

import time
from pathlib import Path

from gpu_check_sections import NO_GPU, Section, steady_rate

# -- textenc ------------------------------------------------------------------------------------------------------


def section_textenc(s: Section) -> None:
    import torch
    from bench_textenc import write_captions

    from cachebuild.config import DType, TextencConfig
    from cachebuild.jobs.textenc import build_textenc

    encoder, tokenizer, model = t5_model(s, s.sizes.t5, "t5-xxl")
    captions = write_captions(s.work / "captions", s.sizes.captions, 0)
    bare_s = bare_text_loop(s, model, tokenizer, captions)
    weights = sum(p.nbytes for p in model.parameters())
    del model
    if s.cuda:
        torch.cuda.empty_cache()
    loads = count_loads()
    tokens = sum(min(len(c.split()) + 1, s.sizes.max_length) for c in captions)
    chunk_mb = 0.55 * tokens * _width(s) * 2 / 2**20  # a little over half the outputs (bf16): two chunks
    cfg = TextencConfig(source=s.work / "captions", out=s.work / "text-cache", text_encoder=str(encoder),
                        tokenizer=str(tokenizer), max_length=s.sizes.max_length, device=str(s.device),
                        dtype=DType.FP32 if s.smoke else DType.BF16, dtype_out=DType.BF16,
                        batch_size=s.sizes.text_batch, chunk_mb=max(chunk_mb, 0.01))  # fmt: skip
    ticks = []
    start = time.perf_counter()
    summary = build_textenc(cfg, lambda p: ticks.append((time.perf_counter(), p.processed)))
    wall = time.perf_counter() - start
    moving = [t for t in ticks if t[1] > 0]
    steady = steady_rate(moving)
    bare = len(captions) / bare_s
    what = "T5-XXL config, random weights, bf16" if not s.smoke else "tiny T5 (smoke)"
    s.row("model / captions / batch", f"{what} ({weights / 2**30:.1f} GiB) / {summary.done} / {cfg.batch_size}")
    s.row("textenc, first to last batch", f"{steady:.1f} captions/s", "", "textenc_captions_s", steady)
    s.row("textenc, whole run", f"{summary.done / wall:.1f} captions/s ({wall:.1f} s, loading included)",
          "", "textenc_wall_captions_s", summary.done / wall)  # fmt: skip
    s.row("bare tokenize + forward", f"{bare:.1f} captions/s", "", "bare_captions_s", bare)
    s.row("ratio textenc / bare", f"{steady / bare:.3f}", ">= 0.9", "ratio", steady / bare)
    s.row("encoder loads (from_pretrained calls)", f"{loads[0]}, summary: {summary.model_loads}" +
          f" (--chunk-mb {chunk_mb:.2f}: about two chunks)", "1", "loads", loads[0])  # fmt: skip


def t5_model(s: Section, config: dict | None, name: str):
    """(encoder folder, tokenizer folder, the model loaded on the device in the compute dtype). At real widths
    the model is built on the device in bf16 (random weights: seconds, not minutes of host init) and saved."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from cachebuild.testing import make_tiny_t5, make_tiny_tokenizer

    tokenizer = s.work / "t5-tokenizer"
    if not tokenizer.exists():
        make_tiny_tokenizer(tokenizer, "t5", max_length=s.sizes.max_length)
    folder = s.work / name
    if config is None:
        if not folder.exists():
            make_tiny_t5(folder, d_model=64, layers=2, d_kv=16)
        return folder, tokenizer, T5EncoderModel.from_pretrained(folder).eval()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(s.device):
            model = T5EncoderModel(T5Config(**config, pad_token_id=0, eos_token_id=1)).eval()
    finally:
        torch.set_default_dtype(default)
    if not folder.exists():
        model.save_pretrained(folder, max_shard_size="5GB")
    return folder, tokenizer, model


def bare_text_loop(s: Section, model, tokenizer_folder: Path, captions: list[str]) -> float:
    """Seconds of the plain loop over ``captions``: tokenize a batch (padded as textenc pads a masked T5: to the
    longest, rounded up to 64), forward with the mask, last hidden state to the host; batches in order of length,
    as textenc forms them."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    ordered = sorted(captions, key=lambda c: len(tok(c, truncation=True, max_length=s.sizes.max_length).input_ids))
    b = s.sizes.text_batch
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ordered), b):
            enc = tok(ordered[i : i + b], padding="longest", pad_to_multiple_of=64, truncation=True,
                      max_length=s.sizes.max_length, return_tensors="pt")  # fmt: skip
            out = model(input_ids=enc.input_ids.to(s.device), attention_mask=enc.attention_mask.to(s.device))
            out.last_hidden_state.float().cpu()
    return time.perf_counter() - start


def count_loads() -> list[int]:
    """Counts ``T5EncoderModel.from_pretrained`` calls from now on (a list, so the caller reads it later)."""
    from transformers import T5EncoderModel

    calls = [0]
    original = T5EncoderModel.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        calls[0] += 1
        return original(cls, *args, **kwargs)

    T5EncoderModel.from_pretrained = classmethod(counted)
    return calls


def _width(s: Section) -> int:
    return (s.sizes.t5 or {}).get("d_model", 64)


# -- offload ------------------------------------------------------------------------------------------------------


def section_offload(s: Section) -> None:
    import torch
    from bench_textenc import write_captions

    from cachebuild.config import DType, Offload, TextencConfig
    from cachebuild.jobs.textenc import build_textenc

    encoder, tokenizer, model = t5_model(s, s.sizes.offload_t5, "t5-xl")
    weights = sum(p.nbytes for p in model.parameters())
    del model
    if s.cuda:
        torch.cuda.empty_cache()
    write_captions(s.work / "offload-captions", s.sizes.offload_captions, 1)

    def run(out: str, offload: Offload, cap: int | None):
        cfg = TextencConfig(source=s.work / "offload-captions", out=s.work / out, text_encoder=str(encoder),
                            tokenizer=str(tokenizer), max_length=s.sizes.max_length, device=str(s.device),
                            dtype=DType.FP32 if s.smoke else DType.BF16, dtype_out=DType.BF16, batch_size=64,
                            offload=offload)  # fmt: skip
        if cap and s.cuda:
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            summary = build_textenc(cfg)
        finally:
            if cap and s.cuda:
                torch.cuda.set_per_process_memory_fraction(1.0)
        peak = torch.cuda.max_memory_allocated() if s.cuda else None
        return summary, time.perf_counter() - start, peak

    resident, resident_s, _ = run("offload-resident", Offload.NEVER, None)
    streamed, streamed_s, peak = run("offload-streamed", Offload.ALWAYS, s.sizes.offload_cap_bytes)
    what = "T5-XL config, random weights, bf16" if not s.smoke else "tiny T5 (smoke)"
    s.row("model / captions", f"{what} ({weights / 2**30:.2f} GiB) / {streamed.done}")
    s.row("resident, whole run", f"{resident_s:.1f} s", "", "resident_s", resident_s)
    s.row("streamed, whole run", f"{streamed_s:.1f} s ({', '.join(streamed.offloaded) or 'not streamed'})",
          "", "streamed_s", streamed_s)  # fmt: skip
    s.row("ratio streamed / resident time", f"{streamed_s / resident_s:.2f}", "", "ratio", streamed_s / resident_s)
    if s.cuda:
        cap = s.sizes.offload_cap_bytes
        s.row("streamed peak under the cap", f"{peak / 2**20:.0f} MiB of {cap / 2**20:.0f} MiB", "< cap",
              "streamed_peak_bytes", peak)  # fmt: skip
    else:
        s.row("streamed peak under the cap", NO_GPU, "< cap")
    same = same_outputs(s.work / "offload-resident", s.work / "offload-streamed")
    s.row("streamed outputs equal resident", same, "True", "equal", same)


def same_outputs(a: Path, b: Path) -> bool:
    """Whether two text caches hold the same tensors under the same names."""
    from safetensors.torch import load_file

    def tensors(root: Path) -> dict:
        found = {}
        for shard in sorted((root / "textenc").glob("*.safetensors")):
            found |= load_file(str(shard))
        return found

    x, y = tensors(a), tensors(b)
    return sorted(x) == sorted(y) and all(x[k].equal(y[k]) for k in x)
