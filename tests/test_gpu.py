"""What only a GPU shows: device memory flat across chunks and freed at the end, half-precision paths,
out-of-memory recovery on a real allocator. Skipped without CUDA (see conftest)."""

from __future__ import annotations

import pytest
import torch

from cachebuild.config import BucketConfig, DType, LatentsMode
from cachebuild.jobs.latents import build_latents
from tests.conftest import write_image
from tests.test_pipeline import make_cfg, read_cache

pytestmark = pytest.mark.gpu

BIG = BucketConfig(resolution=(1024, 1024), min_reso=256, max_reso=2048, steps=64)


def _dataset(root, n: int, size=(512, 512)):
    for i in range(n):
        write_image(root / f"im{i:03d}.png", size, seed=i)
    return root


def test_peak_device_memory_does_not_grow_with_the_number_of_images(tmp_path, medium_vae):
    peaks = []
    for n in (4, 32):
        ds = _dataset(tmp_path / f"ds{n}", n)
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        summary = build_latents(make_cfg(ds, tmp_path / f"c{n}", medium_vae, device="cuda", batch_size=4))
        assert summary.done == n
        peaks.append(torch.cuda.max_memory_allocated() - start)
        assert torch.cuda.memory_allocated() - start < 1 << 20  # the 53 MiB model and the batches gone after the run
    assert peaks[1] <= peaks[0] * 1.05, peaks


@pytest.mark.parametrize("dtype", [DType.FP16, DType.BF16])
def test_half_precision_latents_are_finite_and_close_to_fp32(tmp_path, tiny_vae, dtype):
    ds = _dataset(tmp_path / "ds", 4, (256, 256))
    build_latents(make_cfg(ds, tmp_path / "fp32", tiny_vae, device="cuda", latents=LatentsMode.MEAN))
    build_latents(make_cfg(ds, tmp_path / "half", tiny_vae, device="cuda", dtype=dtype, latents=LatentsMode.MEAN))
    full, half = read_cache(tmp_path / "fp32"), read_cache(tmp_path / "half")
    for key in full:
        a, b = full[key]["latents"].float(), half[key]["latents"].float()
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)


def test_out_of_memory_splits_the_batch_and_every_image_is_done(tmp_path, tiny_vae):
    ds = _dataset(tmp_path / "ds", 8, (2048, 2048))
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 3 * 2**30 / total))  # one image fits, eight do not
    try:
        cfg = make_cfg(ds, tmp_path / "c", tiny_vae, device="cuda", batch_size=8, buckets=BIG)
        summary = build_latents(cfg)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert summary.oom_splits > 0 and summary.done == 8 and summary.failed == 0


def test_a_batch_sized_past_the_memory_cap_is_split_and_every_image_encodes(tiny_vae):
    """A real allocator's out-of-memory error, not a stand-in: the batch is sized from a measured per-image
    peak to need twice the memory the process may use, and the split runs after the failed attempt's tensors
    are released (inside the except block its traceback would hold them and every half would fail too)."""
    from diffusers import AutoencoderKL

    from cachebuild.config import LatentsMode
    from cachebuild.families.vae import VaeEncoder
    from tests.test_encode import FAMILY

    device = torch.device("cuda")
    vae = AutoencoderKL.from_pretrained(tiny_vae).to(device).eval().requires_grad_(False)
    one = torch.randint(0, 256, (1, 2048, 2048, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    alone = VaeEncoder(vae, FAMILY, device, DType.FP32, LatentsMode.MEAN, False, 0).encode(["a"], one)[0]
    per_image = torch.cuda.max_memory_allocated() - base
    cap = base + 4 * per_image  # room for the model and about four images at once
    n = 8  # twice what fits under the cap
    free, total = torch.cuda.mem_get_info()
    assert cap < free, "the card is too busy for this test"
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        enc = VaeEncoder(vae, FAMILY, device, DType.FP32, LatentsMode.MEAN, False, 0)
        results = enc.encode([f"k{i}" for i in range(n)], one.expand(n, -1, -1, -1).contiguous())
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert enc.oom_splits > 0
    assert [r.reason for r in results] == [None] * n
    for r in results:
        torch.testing.assert_close(
            r.tensors["latents"], alone.tensors["latents"], atol=1e-2, rtol=1e-2
        )  # TF32 convs vary by batch
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() - base < per_image  # nothing of the failed attempts stays behind
