"""The GPU path's faults found by reading, each checked where only a GPU shows it: the fp32 redo on real fp16
overflows, no context on a GPU a process was not given, nothing of the model left after a run, one device sync
per batch, trims and batch sizes at real budgets, the dtype auto picks, the allocator setting, out-of-memory
errors by message, pixels and outputs, and streamed weights. Skipped without CUDA (see conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from cachebuild.config import BucketConfig, DType, LatentsMode
from cachebuild.encode import GuardedForward, resolve_dtype
from cachebuild.jobs.latents import build_latents
from tests.conftest import write_image
from tests.test_pipeline import make_cfg, read_cache

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = BucketConfig(resolution=(256, 256), min_reso=128, max_reso=512, steps=64)


def _dataset(root: Path, n: int, size=(256, 256)) -> Path:
    for i in range(n):
        write_image(root / f"im{i:03d}.png", size, seed=i)
    return root


def _dtypes(module) -> dict[str, torch.dtype]:
    return {n: t.dtype for n, t in [*module.named_parameters(), *module.named_buffers()]}


def _hot_vae(source: Path, out: Path) -> Path:
    """``source`` with its first conv scaled so that fp16 activations overflow (fp32 ones do not): what the
    original SDXL VAE does in fp16, on a small model."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(source)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e5)
    vae.save_pretrained(out)
    return out


def _run_python(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (a fresh CUDA state), from the checkout's root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)  # fmt: skip


# -- 1. the fp32 redo ------------------------------------------------------------------------------------------


def test_a_real_fp16_vae_overflow_is_redone_once_converted_and_every_image_done(tmp_path, medium_vae):
    hot = _hot_vae(medium_vae, tmp_path / "hot")
    ds = _dataset(tmp_path / "ds", 8)
    summary = build_latents(make_cfg(ds, tmp_path / "c", hot, device="cuda", dtype=DType.FP16, batch_size=2))
    assert summary.done == 8 and summary.failed == 0
    assert summary.fp32_redos > 0 and summary.fp32_conversions == 1  # kept once made, not converted per batch
    assert all(torch.isfinite(t).all() for item in read_cache(tmp_path / "c").values() for t in item.values())


def test_the_redo_leaves_every_tensor_in_its_own_dtype_on_the_gpu(tmp_path, medium_vae):
    from diffusers import AutoencoderKL
    from transformers import T5EncoderModel

    from cachebuild.families.vae import VaeEncoder
    from cachebuild.testing import make_tiny_t5
    from tests.test_encode import FAMILY

    cuda = torch.device("cuda")
    vae = AutoencoderKL.from_pretrained(_hot_vae(medium_vae, tmp_path / "hot"), torch_dtype=torch.float16)
    vae = vae.to(cuda).eval().requires_grad_(False)
    loaded = _dtypes(vae)
    enc = VaeEncoder(vae, FAMILY, cuda, DType.FP16, LatentsMode.MEAN, False, 0)
    pixels = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    assert all(r.tensors is not None for r in enc.encode(["a", "b", "c"], pixels))
    assert enc.upcasts > 0 and _dtypes(vae) == loaded

    t5 = T5EncoderModel.from_pretrained(make_tiny_t5(tmp_path / "t5"), dtype=torch.float16).to(cuda).eval()
    with torch.no_grad():
        t5.encoder.final_layer_norm.weight.fill_(3e4)  # normalised rows of a few units: past 65504 in fp16
    loaded = _dtypes(t5)
    assert {d for n, d in loaded.items() if ".wo." in n} == {torch.float32}

    def forward(inputs, dtype):
        with torch.inference_mode():
            return list(t5(input_ids=inputs[0].to(cuda)).last_hidden_state.float())

    guard = GuardedForward(t5, cuda, torch.float16, forward, "t5")
    out = guard((torch.randint(2, t5.config.vocab_size, (4, 16)),))
    assert guard.upcasts == 4 and all(torch.isfinite(t).all() for t in out)
    assert _dtypes(t5) == loaded


# -- 2. no context on a GPU the process was not given ---------------------------------------------------------

PRIMARY_CONTEXTS = """
import ctypes
def primary_contexts():
    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuInit(0)
    count = ctypes.c_int()
    cuda.cuDeviceGetCount(ctypes.byref(count))
    active = []
    for i in range(count.value):
        dev, flags, on = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
        cuda.cuDeviceGet(ctypes.byref(dev), i)
        cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(on))
        active.append(bool(on.value))
    return active
"""


def test_a_several_device_run_opens_no_context_in_the_parent_process(tmp_path, medium_vae):
    """``--devices cuda:0,cuda:0`` on one GPU: the two device processes encode; the parent, the manifest's writer,
    must not open a context (asking about bf16 once did, by making a tensor on GPU 0)."""
    ds = _dataset(tmp_path / "ds", 6)
    code = (
        PRIMARY_CONTEXTS
        + f"""
from pathlib import Path
from cachebuild.config import DType
from cachebuild.jobs.latents import build_latents
from tests.test_pipeline import make_cfg
cfg = make_cfg(Path({str(ds)!r}), Path({str(tmp_path / "c")!r}), Path({str(medium_vae)!r}), device=None,
               devices=("cuda:0", "cuda:0"), dtype=DType.AUTO, batch_size=2)
summary = build_latents(cfg)
print("RESULT", summary.done, primary_contexts())
"""
    )
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    assert line.split(" ", 2)[1] == "6"
    assert "True" not in line.split(" ", 2)[2], line  # the parent holds no context on any GPU


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_run_on_cuda_1_opens_no_context_on_gpu_0(tmp_path, medium_vae):
    ds = _dataset(tmp_path / "ds", 6)
    code = (
        PRIMARY_CONTEXTS
        + f"""
from pathlib import Path
from cachebuild.config import DType
from cachebuild.jobs.latents import build_latents
from tests.test_pipeline import make_cfg
cfg = make_cfg(Path({str(ds)!r}), Path({str(tmp_path / "c")!r}), Path({str(medium_vae)!r}), device="cuda:1",
               dtype=DType.AUTO, batch_size=2, workers=1)
summary = build_latents(cfg)
print("RESULT", summary.done, primary_contexts())
"""
    )
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    contexts = json.loads(line.split(" ", 2)[2].replace("True", "true").replace("False", "false"))
    assert line.split(" ", 2)[1] == "6" and contexts[0] is False and contexts[1] is True


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_processes_for_cuda_1_open_nothing_on_gpu_0(tmp_path, medium_vae):
    """Sampled with nvidia-smi while ``--devices cuda:1,cuda:1`` runs: no process of the run appears on GPU 0."""
    import shutil
    import threading

    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("needs nvidia-smi")
    uuids = subprocess.run([smi, "--query-gpu=index,uuid", "--format=csv,noheader"], capture_output=True, text=True)
    gpu0 = next(line.split(", ")[1] for line in uuids.stdout.splitlines() if line.startswith("0,"))
    ds = _dataset(tmp_path / "ds", 48, (512, 512))
    seen, stop = set(), threading.Event()

    def sample():
        while not stop.wait(0.1):
            apps = subprocess.run([smi, "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"],
                                  capture_output=True, text=True).stdout  # fmt: skip
            seen.update(tuple(line.split(", ")) for line in apps.splitlines() if line)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cfg = make_cfg(ds, tmp_path / "c", medium_vae, device=None, devices=("cuda:1", "cuda:1"), batch_size=1)
    try:
        assert build_latents(cfg).done == 48
    finally:
        stop.set()
        sampler.join()
    on_gpu0 = [pid for pid, uuid in seen if uuid == gpu0 and pid != str(os.getpid())]  # this test's own is earlier
    assert not on_gpu0 and any(uuid != gpu0 for _, uuid in seen), seen  # the device processes were seen, on GPU 1


# -- 3. nothing of the model stays allocated ---------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [2, None], ids=["fixed", "auto"])
def test_device_memory_is_back_where_it_started_after_a_run(tmp_path, medium_vae, batch_size):
    """A 53 MiB model: less than 1 MiB left means the model is gone (a tiny VAE would pass while staying)."""
    ds = _dataset(tmp_path / "ds", 6)
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    cfg = make_cfg(ds, tmp_path / "c", medium_vae, device="cuda", batch_size=batch_size, dtype=DType.FP16)
    assert build_latents(cfg).done == 6
    assert torch.cuda.memory_allocated() - start < 1 << 20
    assert torch.cuda.memory_reserved() - start < 64 << 20  # cached blocks given back too (a few may stay)


def test_memory_is_back_after_a_run_that_kept_fp32_weights(tmp_path, medium_vae):
    ds = _dataset(tmp_path / "ds", 4)
    hot = _hot_vae(medium_vae, tmp_path / "hot")
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    summary = build_latents(make_cfg(ds, tmp_path / "c", hot, device="cuda", batch_size=2, dtype=DType.FP16))
    assert summary.fp32_conversions == 1 and torch.cuda.memory_allocated() - start < 1 << 20


# -- 4. one device sync per batch --------------------------------------------------------------------------------


def test_the_hot_loop_syncs_the_device_once_per_batch(tmp_path, medium_vae, monkeypatch):
    from cachebuild.engines import local

    ds = _dataset(tmp_path / "ds", 16)
    counted: list[int] = []
    original = local.drive_device

    def counting(*args, **kwargs):  # the loop alone: loading the model syncs, as it should
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                original(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counted.append(sum("synchronizing" in str(w.message) for w in caught))

    monkeypatch.setattr(local, "drive_device", counting)
    cfg = make_cfg(ds, tmp_path / "c", medium_vae, device="cuda", batch_size=4, workers=1)
    assert build_latents(cfg).done == 16
    assert counted and counted[0] <= 16 // 4, counted  # the finite flags of each batch, read together


# -- 5. trims and 6. auto's batch sizes at a real budget; 6. the dtype auto picks -----------------------------------


def test_auto_batch_sizes_need_no_split_and_no_trim_per_batch(tmp_path, medium_vae):
    from cachebuild.cache.manifest import Manifest

    ds = _dataset(tmp_path / "ds", 24)
    cfg = make_cfg(ds, tmp_path / "c", medium_vae, device="cuda", batch_size=None, buckets=BUCKETS)
    summary = build_latents(cfg)
    with Manifest.open(cfg.out, create=False) as m:
        found = m.get_meta("auto_batch:latents")
    assert summary.done == 24 and found and all(v["batch"] >= 1 for v in found.values())
    assert summary.oom_splits == 0  # the sizes found fit
    assert summary.allocator_trims <= len(found)  # not one per batch


def test_auto_dtype_follows_the_hardware():
    major, minor = torch.cuda.get_device_capability(0)
    expected = DType.BF16 if (major, minor) >= (8, 0) else DType.FP16
    assert resolve_dtype(DType.AUTO, torch.device("cuda:0")) is expected


# -- 7. the allocator setting ---------------------------------------------------------------------------------------


def test_expandable_segments_are_on_and_no_deprecation_is_printed():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    code = """
import torch
from cachebuild.engines.device import prefer_expandable_segments
prefer_expandable_segments()
torch.zeros(1, device="cuda")
settings = torch.cuda.memory._snapshot().get("allocator_settings", {})
print("EXPANDABLE", settings.get("expandable_segments", "unknown"))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**env, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "deprecated" not in proc.stderr, proc.stderr
    assert "EXPANDABLE False" not in proc.stdout, proc.stdout  # True, or a torch that does not report it


# -- 8. out-of-memory errors by message on the device ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"]
)
def test_an_out_of_memory_error_by_message_splits_on_the_gpu(medium_vae, monkeypatch, text):
    from diffusers import AutoencoderKL

    from cachebuild.families.vae import VaeEncoder
    from tests.test_encode import FAMILY

    cuda = torch.device("cuda")
    vae = AutoencoderKL.from_pretrained(medium_vae).to(cuda).eval().requires_grad_(False)
    pixels = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    reference = VaeEncoder(vae, FAMILY, cuda, DType.FP32, LatentsMode.MEAN, False, 0).encode(list("abcd"), pixels)
    original = VaeEncoder._raw
    error = getattr(torch, "AcceleratorError", RuntimeError)

    def raw(self, px, dtype):
        if len(px) > 1:
            raise error(text)
        return original(self, px, dtype)

    monkeypatch.setattr(VaeEncoder, "_raw", raw)
    enc = VaeEncoder(vae, FAMILY, cuda, DType.FP32, LatentsMode.MEAN, False, 0)
    results = enc.encode(list("abcd"), pixels)
    assert enc.oom_splits == 3
    for got, want in zip(results, reference, strict=True):
        torch.testing.assert_close(got.tensors["latents"], want.tensors["latents"], atol=1e-3, rtol=1e-3)


# -- 9. pixels normalised in fp32; outputs out of pinned memory ------------------------------------------------------


def test_pixels_are_normalised_in_fp32_on_the_gpu_and_outputs_leave_pinned_memory():
    import numpy as np

    from cachebuild.engines.device import DeviceStreams
    from cachebuild.families.vae import VaeEncoder
    from tests.test_encode import FAMILY
    from tests.test_encode_guards import RecordingVae

    cuda = torch.device("cuda")
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(1, 16, 16, 3).contiguous()
    vae = RecordingVae()
    VaeEncoder(vae, FAMILY, cuda, DType.BF16, LatentsMode.MEAN, False, 0).encode_raw(pixels.to(cuda))
    expected = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(torch.bfloat16)
    assert torch.equal(vae.seen[0].cpu(), expected)

    streams = DeviceStreams(cuda)
    staged = streams.stage(np.zeros((2, 8, 8, 3), np.uint8))
    assert staged.wait().device.type == "cuda"
    out = streams.to_host([{"latents": torch.ones(4, 2, 2, device=cuda)}, "a reason"]).ready()
    assert out[1] == "a reason" and not out[0]["latents"].is_pinned()
    assert torch.equal(out[0]["latents"], torch.ones(4, 2, 2))


# -- 10. streamed weights ------------------------------------------------------------------------------------------


def test_streamed_t5_equals_resident_bit_for_bit_and_holds_at_most_two_blocks(tmp_path):
    from transformers import T5EncoderModel

    from cachebuild.offload import stream_from_host, streamer_of
    from cachebuild.testing import make_tiny_t5

    cuda = torch.device("cuda")
    path = make_tiny_t5(tmp_path / "t5", d_model=512, layers=6, d_kv=64)
    ids = torch.randint(2, 100, (4, 32)).to(cuda)
    resident = T5EncoderModel.from_pretrained(path, dtype=torch.bfloat16).to(cuda).eval()
    with torch.inference_mode():
        want = resident(input_ids=ids).last_hidden_state
    block = sum(p.nbytes for p in resident.encoder.block[0].parameters())
    del resident
    torch.cuda.empty_cache()
    model = stream_from_host(T5EncoderModel.from_pretrained(path, dtype=torch.bfloat16).eval(), cuda)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        for _ in range(2):  # the second forward copies ahead
            got = model(input_ids=ids).last_hidden_state
            assert streamer_of(model).loaded_units() == 0
    assert torch.equal(got, want)
    weights_at_peak = torch.cuda.max_memory_allocated() - base - got.nbytes
    print(f"block {block / 2**20:.1f} MiB, streamed peak over base {weights_at_peak / 2**20:.1f} MiB")
    assert weights_at_peak < 2 * block + (64 << 20)  # two blocks' weights (one running, one on its way) + activations
