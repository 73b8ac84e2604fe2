"""The sections of ``gpu_check.py``, each run in a process of its own: ``run_section(name, ...)`` writes its rows
(figure, value, goal) and numeric figures as JSON, and any error as one more field, never a crash.

Sizes: ``GPU`` at real widths; ``SMOKE`` tiny, on the CPU, exercising the same code paths in seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

NO_GPU = "no GPU"

SDXL_VAE_CONFIG = {  # stabilityai/sdxl-vae config.json (public); weights are random here
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
T5_XXL_CONFIG = {  # google/t5-v1_1-xxl's encoder, as Flux.1's and SD3's text_encoder_2 (public config)
    "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
}  # fmt: skip
T5_XL_CONFIG = T5_XXL_CONFIG | {"d_model": 2048, "d_ff": 5120, "num_heads": 32}  # google/t5-v1_1-xl: 1.2B params
# (the text sections are in gpu_check_text.py)


@dataclass(frozen=True)
class Sizes:
    images: int  # images of the latents run
    long_side: tuple[int, int]  # pixels: the range of the generated images' long side
    resolution: int  # bucket area as one side
    batch: int  # images per batch
    auto_images: int  # images per shape of the --batch-size auto run
    auto_shapes: tuple[tuple[int, int], ...]  # (W, H) of its images
    captions: int
    text_batch: int
    max_length: int
    t5: dict | None  # T5 config; None: the tiny test T5
    offload_t5: dict | None
    offload_captions: int
    offload_cap_bytes: int  # the device-memory cap of the streamed run


GPU = Sizes(128, (1024, 2000), 1024, 8, 8, ((1024, 1024), (832, 1216)), 1024, 64, 512, T5_XXL_CONFIG, T5_XL_CONFIG,
            512, 1 << 30)  # fmt: skip
SMOKE = Sizes(6, (96, 160), 128, 2, 2, ((128, 128), (96, 160)), 24, 8, 64, None, None, 12, 0)


def run_section(name: str, work: Path, smoke: bool, out: Path) -> None:
    result: dict = {"rows": [], "figures": {}}
    try:
        SECTIONS[name](Section(work, smoke, result))
    except Exception:  # the check goes on: the error is a line in the table
        result["error"] = traceback.format_exc(limit=6)
    out.write_text(json.dumps(result, indent=2, default=str))


class Section:
    """What a section writes to: rows for the table, figures for the JSON."""

    def __init__(self, work: Path, smoke: bool, result: dict):
        import torch

        self.work, self.smoke, self.result = work, smoke, result
        self.sizes = SMOKE if smoke else GPU
        self.device = torch.device("cpu" if smoke else "cuda")
        self.cuda = self.device.type == "cuda"

    def row(self, figure: str, value, goal: str = "", key: str | None = None, number=None) -> None:
        self.result["rows"].append([figure, str(value), goal])
        if key is not None:
            self.result["figures"][key] = number if number is not None else value


# -- tests ------------------------------------------------------------------------------------------------------


def section_tests(s: Section) -> None:
    limit = int(os.environ.get("CACHEBUILD_GPU_CHECK_LIMIT", "170")) - 10
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "tests"]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        text, note = proc.stdout, ""
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        text, note = (out.decode("utf-8", "replace") if isinstance(out, bytes) else out), f", stopped at {limit} s"
    lines = re.findall(r"^(\S+::.*?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)(?: |$)", text, re.M)  # -v: one a test
    counts = {k: sum(outcome == k.upper() for _, outcome in lines) for k in ("passed", "failed", "skipped", "error")}
    seconds = time.monotonic() - start
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n or k in ("passed", "failed"))
    value = f"{summary} ({seconds:.0f} s{note})" + (f"; {NO_GPU}: skipped" if s.smoke else "")
    s.row("pytest -m gpu", value, "0 failed", "tests", counts)
    for test in [test for test, outcome in lines if outcome in ("FAILED", "ERROR")][:8]:
        s.row("  failed", test)


# -- sdxl -------------------------------------------------------------------------------------------------------


def section_sdxl(s: Section) -> None:
    import torch
    from bench_latents import bucket_counts, generate_images, time_bare_model

    from cachebuild.encode import device_memory_bytes
    from cachebuild.jobs.latents import build_latents

    vae = sdxl_vae(s)
    images = s.work / "sdxl-images"
    generate_images(images, s.sizes.images, s.sizes.long_side)
    cfg = latents_config(s, images, s.work / "sdxl-cache", vae, s.sizes.batch)
    ticks, peaks = [], []
    thirds = [s.sizes.images * k // 3 for k in (1, 2, 3)]

    def progress(p) -> None:
        ticks.append((time.perf_counter(), p.processed))
        if s.cuda and thirds and p.processed >= thirds[0]:  # this third's peak, then the next starts
            peaks.append(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            while thirds and p.processed >= thirds[0]:
                thirds.pop(0)

    before = device_memory_bytes(s.device)
    if s.cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    summary = build_latents(cfg, progress)
    wall = time.perf_counter() - start
    left = device_memory_bytes(s.device)
    steady = steady_rate(ticks)
    bare_images, bare_seconds = time_bare_model(cfg, bucket_counts(cfg.out), s.device, cfg.dtype)
    bare = bare_images / bare_seconds
    what = "SDXL VAE config, random weights" if not s.smoke else "tiny VAE (smoke)"
    s.row("model / images / batch", f"{what} / {summary.done} done, {summary.failed} failed / {cfg.batch_size}")
    s.row("cachebuild, first to last batch", f"{steady:.2f} img/s", "", "cachebuild_img_s", steady)
    s.row("cachebuild, whole run", f"{summary.done / wall:.2f} img/s ({wall:.1f} s, load and scan included)",
          "", "cachebuild_wall_img_s", summary.done / wall)  # fmt: skip
    s.row("bare model, same shapes and batches", f"{bare:.2f} img/s", "", "bare_img_s", bare)
    s.row("ratio cachebuild / bare", f"{steady / bare:.3f}", ">= 0.95", "ratio", steady / bare)
    s.row("fp32 redos / OOM splits / trims", f"{summary.fp32_redos} / {summary.oom_splits} / "
          f"{summary.allocator_trims}")  # fmt: skip
    if not s.cuda:
        s.row("device peak per third of the run", NO_GPU, "flat within 2%")
        s.row("device memory left after the run", NO_GPU, "0")
        return
    spread = max(peaks) / min(peaks) - 1 if len(peaks) == 3 else float("nan")
    s.row("device peak per third of the run", " / ".join(f"{p / 2**20:.0f} MiB" for p in peaks) +
          f" (spread {spread:.1%})", "flat within 2%", "chunk_peaks", peaks)  # fmt: skip
    s.row("device memory left after the run", f"{(left - before) / 2**20:.2f} MiB", "0", "left_bytes", left - before)


def sdxl_vae(s: Section) -> Path:
    """The SDXL VAE's public config with random weights, saved once per work folder (the tiny VAE in smoke)."""
    folder = s.work / ("sdxl-vae" if not s.smoke else "tiny-vae")
    if (folder / "config.json").exists():
        return folder
    if s.smoke:
        from cachebuild.testing import make_tiny_vae

        return make_tiny_vae(folder)
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL.from_config(SDXL_VAE_CONFIG).save_pretrained(folder)
    return folder


def latents_config(s: Section, images: Path, out: Path, vae: Path, batch: int | None):
    from cachebuild.config import BucketConfig, DType, LatentsConfig, LatentsMode, ModelSpec

    res = s.sizes.resolution
    buckets = BucketConfig(resolution=(res, res), min_reso=min(256, res // 2), max_reso=2 * res, steps=64)
    return LatentsConfig(
        dataset=images, out=out, model=ModelSpec(vae=str(vae)), buckets=buckets, latents=LatentsMode.MEAN,
        dtype=DType.FP32 if s.smoke else DType.BF16, batch_size=batch, device=str(s.device),
    )  # fmt: skip


# -- auto ---------------------------------------------------------------------------------------------------------


def section_auto(s: Section) -> None:
    import numpy as np
    from PIL import Image

    from cachebuild.cache.manifest import Manifest
    from cachebuild.jobs.latents import build_latents

    images = s.work / "auto-images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for w, h in s.sizes.auto_shapes:
        for i in range(s.sizes.auto_images):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{w}x{h}-{i}.png")
    cfg = latents_config(s, images, s.work / "auto-cache", sdxl_vae(s), None)
    start = time.perf_counter()
    summary = build_latents(cfg)
    seconds = time.perf_counter() - start
    with Manifest.open(cfg.out, create=False) as m:
        found = m.get_meta("auto_batch:latents") or {}
    sizes = {key.rsplit("|", 1)[1]: value["batch"] for key, value in found.items()}
    shown = ", ".join(f"{shape}: {n}" for shape, n in sorted(sizes.items()))
    s.row("batch sizes found", shown or f"{NO_GPU}: a fixed 4 on the CPU", "", "sizes", sizes)
    s.row("images done / seconds", f"{summary.done} / {seconds:.1f} s (searches included)")
    s.row("OOM splits", summary.oom_splits, "0", "oom_splits", summary.oom_splits)
    s.row("allocator trims", summary.allocator_trims, "<= shapes", "allocator_trims", summary.allocator_trims)


def steady_rate(ticks: list[tuple[float, int]]) -> float:
    """Items per second between the first and the last progress report: (seconds, items done) pairs."""
    if len(ticks) < 2:
        return float("nan")
    return (ticks[-1][1] - ticks[0][1]) / (ticks[-1][0] - ticks[0][0])


def section_textenc(s: Section) -> None:
    from gpu_check_text import section_textenc as run

    run(s)


def section_offload(s: Section) -> None:
    from gpu_check_text import section_offload as run

    run(s)


SECTIONS = {
    "tests": section_tests,
    "sdxl": section_sdxl,
    "auto": section_auto,
    "textenc": section_textenc,
    "offload": section_offload,
}
