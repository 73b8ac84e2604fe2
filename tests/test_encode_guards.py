"""encode's guards as real models meet them, on the CPU: the fp32 redo puts each tensor back in its own dtype and
keeps a small model's fp32 weights, one device read per batch, out-of-memory errors by message, pixels normalised
in fp32, the dtype auto picks and the device a thread uses."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from cachebuild import encode
from cachebuild.config import DType
from cachebuild.encode import GuardedForward, is_out_of_memory, resolve_dtype
from tests.test_encode import CPU, OverflowingVae, bright, direct, encoder, identity_forward, latents, make_pixels


@pytest.fixture(scope="module")
def vae(tiny_vae):
    return vae_of(tiny_vae)


# -- the fp32 redo keeps every tensor's own dtype, and a small model's fp32 weights ----------------------------


def dtypes(module) -> dict[str, torch.dtype]:
    """Every parameter's and buffer's dtype, non-persistent buffers included."""
    return {n: t.dtype for n, t in [*module.named_parameters(), *module.named_buffers()]}


def test_an_fp16_t5_overflow_is_redone_and_wo_stays_fp32(tmp_path):
    """A real fp16 overflow (the final norm's weight scaled past fp16's range for its output), in a T5 loaded in
    fp16, where transformers keeps each ``wo`` in fp32: after the redo every dtype is what loading made it."""
    from transformers import T5EncoderModel

    from cachebuild.testing import make_tiny_t5

    path = make_tiny_t5(tmp_path / "t5")
    model = T5EncoderModel.from_pretrained(path, dtype=torch.float16).eval()
    with torch.no_grad():
        model.encoder.final_layer_norm.weight.fill_(3e4)  # normalised rows of a few units: past 65504 in fp16
    loaded = dtypes(model)
    assert {d for n, d in loaded.items() if ".wo." in n} == {torch.float32}

    def forward(inputs, dtype):
        with torch.inference_mode():
            return list(model(input_ids=inputs[0]).last_hidden_state.float())

    guard = GuardedForward(model, CPU, torch.float16, forward, "t5")
    ids = torch.randint(2, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    out = guard((ids,))
    assert guard.upcasts == 3 and all(torch.isfinite(t).all() for t in out)
    assert dtypes(model) == loaded  # wo back in fp32, the rest in fp16


def test_an_fp32_buffer_of_a_bf16_model_stays_fp32_after_a_redo(tmp_path):
    """Qwen3's rotary ``inv_freq`` (a non-persistent fp32 buffer) in a bf16 load: a redo must not round it."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    Qwen3Model(config).save_pretrained(tmp_path / "qwen3")
    model = Qwen3Model.from_pretrained(tmp_path / "qwen3", dtype=torch.bfloat16).eval()
    loaded = dtypes(model)
    assert loaded["rotary_emb.inv_freq"] == torch.float32

    def forward(inputs, dtype):  # overflows unless redone in fp32
        with torch.inference_mode():
            h = model(input_ids=inputs[0]).last_hidden_state.float()
        return list(h if dtype == torch.float32 else h * float("inf"))

    guard = GuardedForward(model, CPU, torch.bfloat16, forward, "qwen3")
    guard((torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0)),))
    assert guard.upcasts == 2 and dtypes(model) == loaded


def test_an_fp16_vae_overflow_keeps_fp32_weights_once_and_each_dtype(tiny_vae):
    """The SDXL VAE's failure on a tiny VAE: its first conv scaled so that fp16 activations overflow (fp32 ones do
    not). Two overflowing batches convert the weights to fp32 once; each batch still runs in fp16 first."""
    from diffusers import AutoencoderKL

    model = AutoencoderKL.from_pretrained(tiny_vae, torch_dtype=torch.float16).eval().requires_grad_(False)
    with torch.no_grad():
        model.encoder.conv_in.weight.mul_(1e5)
    loaded = dtypes(model)
    enc = encoder(model, dtype=DType.FP16)
    first = enc.encode(["a", "b"], make_pixels(2, seed=20))
    second = enc.encode(["c", "d"], make_pixels(2, seed=21))
    assert enc.upcasts == 4 and enc.guard.fp32_conversions == 1  # kept after the first redo, not made again
    assert dtypes(model) == loaded
    reference = copy.deepcopy(model).float()  # fp16-rounded weights in fp32: what the redo computes with
    for results, seed in ((first, 20), (second, 21)):
        expected = direct(reference, make_pixels(2, seed=seed)).mean
        for got, want in zip(latents(results), expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_large_model_converts_per_redo_and_gives_the_fp32_weights_back(tiny_vae, monkeypatch):
    monkeypatch.setattr(encode, "KEEP_FP32_MAX_BYTES", 0)  # as a text encoder of billions of parameters
    wrapped = OverflowingVae(copy.deepcopy(vae_of(tiny_vae))).to(torch.float16)
    enc = encoder(wrapped, dtype=DType.FP16)
    for seed in (22, 23):
        enc.encode(["a", "b"], bright(make_pixels(2, seed=seed), 0))
    assert enc.upcasts == 2 and enc.guard.fp32_conversions == 2
    assert {p.dtype for p in wrapped.parameters()} == {torch.float16}


def vae_of(folder):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder).eval().requires_grad_(False)


# -- one read of the device per batch -------------------------------------------------------------------------


def count_host_reads(monkeypatch) -> list[str]:
    """Every read of a tensor's value by the host (what syncs a CUDA device), counted on the CPU."""
    reads: list[str] = []
    for name in ("__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def test_a_batch_reads_the_device_once_not_once_per_item(vae, monkeypatch):
    pixels = make_pixels(8, seed=24)
    x = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    reads = count_host_reads(monkeypatch)
    with torch.inference_mode():
        vae.encode(x)
    model_reads = len(reads)  # whatever the model itself reads (none for this VAE)
    reads.clear()
    out = encoder(vae).encode_raw(pixels)
    assert len(out) == 8 and len(reads) - model_reads == 1, reads  # the finite flags of the batch, together


# -- the out-of-memory guard recognises every name ----------------------------------------------------------

ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", RuntimeError)  # torch >= 2.8: a RuntimeError subclass
OOM_ERRORS = [
    (ACCELERATOR_ERROR, "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    (RuntimeError, "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    (ACCELERATOR_ERROR, "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
]


@pytest.mark.parametrize(("cls", "text"), OOM_ERRORS, ids=["launch", "cublas", "cudnn"])
def test_launch_cublas_and_cudnn_out_of_memory_split_the_batch(cls, text):
    assert is_out_of_memory(cls(text))

    def forward(inputs, dtype):
        if len(inputs[0]) > 1:
            raise cls(text)
        return identity_forward(inputs, dtype)

    guard = GuardedForward(None, CPU, torch.float32, forward, "VAE")
    assert [float(r) for r in guard((torch.arange(3.0)[:, None],))] == [0.0, 1.0, 2.0] and guard.oom_splits == 2


# -- pixels are normalised in fp32, then rounded once ---------------------------------------------------------


class RecordingVae(torch.nn.Module):
    """Records what the encoder hands the VAE."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def encode(self, x):
        self.seen.append(x.clone())
        return SimpleNamespace(latent_dist=SimpleNamespace(parameters=torch.zeros(len(x), 8, 1, 1, dtype=x.dtype)))


@pytest.mark.parametrize("dtype", [DType.BF16, DType.FP16])
def test_pixels_are_normalised_in_fp32_and_rounded_once(dtype):
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(1, 16, 16, 3).contiguous()
    vae = RecordingVae()
    encoder(vae, dtype=dtype).encode_raw(pixels)
    expected = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(dtype.torch)  # as the pipelines do it
    assert vae.seen[0].dtype == dtype.torch and torch.equal(vae.seen[0], expected)


# -- device and dtype choice ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 5), DType.FP16), ((7, 0), DType.FP16), ((8, 0), DType.BF16), ((9, 0), DType.BF16)],
    ids=["T4", "V100", "A100", "H100"],
)
def test_auto_dtype_is_bf16_only_where_the_hardware_has_it(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what torch says on a T4 too
    assert resolve_dtype(DType.AUTO, torch.device("cuda:1")) is expected


def test_use_device_makes_a_cuda_device_current_and_leaves_others_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    assert encode.use_device(torch.device("cuda:1")) == torch.device("cuda:1")
    assert encode.use_device(CPU) == CPU
    assert calls == [torch.device("cuda:1")]


@pytest.mark.parametrize("capability", [(7, 5), (7, 0)], ids=["T4", "V100"])
def test_auto_dtype_keeps_bf16_for_llm_text_encoders_on_older_cards(monkeypatch, tmp_path, capability):
    """An LLM text encoder's hidden states pass fp16's range as a rule: on a T4 or V100 `--dtype auto` runs it in
    (emulated) bf16, as its pipeline does, rather than fp16 that would send every item to an fp32 redo; the
    CLIP/T5 families keep fp16 there."""
    from cachebuild.config import TextencConfig
    from cachebuild.families.text import resolve_encoders
    from cachebuild.testing import make_tiny_text_pipeline

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_dtype(DType.AUTO, torch.device("cuda"), wide_range=True) is DType.BF16
    captions = tmp_path / "caps"
    captions.mkdir()
    for family, expected in (("z-image", DType.BF16), ("sdxl", DType.FP16)):
        model = make_tiny_text_pipeline(tmp_path / family, family)
        cfg = TextencConfig(captions, tmp_path / f"out-{family}", model=str(model), device="cuda")
        _, specs = resolve_encoders(cfg, torch.device("cuda"))
        assert {s.dtype for s in specs} == {expected}, family
