"""--offload: encoders whose weights stay in host memory and stream to the device block by block give the same
tensors as resident ones, are chosen only when they do not fit, and keep the out-of-memory split working."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachebuild import encode
from cachebuild.cli import cli
from cachebuild.config import DType, Offload
from cachebuild.encode import GuardedForward
from cachebuild.families import text as text_families
from cachebuild.families.text import encoder_forward, resident, resolve_encoders
from cachebuild.families.tokens import tokenize
from cachebuild.hub import weight_files
from cachebuild.offload import (
    ACTIVATION_MARGIN_BYTES,
    fp32_modules,
    free_bytes,
    is_streamed,
    needed_bytes,
    should_offload,
    streamer_of,
    weight_bytes,
)
from cachebuild.testing import make_tiny_text_pipeline
from tests.test_textenc import cfg_for, read_text_cache

CAPTIONS = {"a": "a photo of a cat", "b": "red car near the river at sunset", "c": ""}
CPU = torch.device("cpu")
FAMILIES = {"sdxl": ["clip_l", "clip_g"], "flux": ["clip_l", "t5"], "z-image": ["qwen3"]}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offload-pipelines")
    return {f: make_tiny_text_pipeline(root / f, f, init_scale=0.3) for f in FAMILIES}


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("offload-captions")
    for key, text in CAPTIONS.items():
        (root / f"{key}.txt").write_text(text, encoding="utf-8")
    return root


def _textenc(captions: Path, out: Path, pipe: Path, *extra: str) -> dict:
    args = ["textenc", str(captions), "--model", str(pipe), "--out", str(out), "--device", "cpu"]
    args += ["--dtype", "fp32", "--dtype-out", "fp32", "--batch-size", "2", "--json", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_offload_always_gives_bit_identical_tensors_through_the_cli(tmp_path, pipelines, captions, family):
    plain = _textenc(captions, tmp_path / "never", pipelines[family], "--offload", "never")
    streamed = _textenc(captions, tmp_path / "always", pipelines[family], "--offload", "always")
    assert plain["offloaded"] == [] and streamed["offloaded"] == FAMILIES[family]
    a, b = read_text_cache(tmp_path / "never"), read_text_cache(tmp_path / "always")
    assert sorted(a) == sorted(b) == sorted(CAPTIONS)
    for key in a:
        assert sorted(a[key]) == sorted(b[key])
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (family, key, name)  # bit for bit, not just close


def test_offload_is_not_in_the_fingerprint(tmp_path, pipelines, captions):
    out = tmp_path / "c"
    _textenc(captions, out, pipelines["sdxl"], "--offload", "never")
    again = _textenc(captions, out, pipelines["sdxl"], "--offload", "always")
    assert again["nothing_to_do"] and not again["model_loaded"]  # the same cache: nothing re-encoded


def test_auto_never_offloads_on_the_cpu(tmp_path, pipelines, captions, monkeypatch):
    monkeypatch.setattr(text_families, "free_bytes", lambda device: 0)  # even if it said nothing was free
    summary = _textenc(captions, tmp_path / "c", pipelines["flux"])  # --offload auto is the default
    assert summary["done"] == len(CAPTIONS) and summary["offloaded"] == []


def test_auto_decision():
    cuda, cpu, mps = torch.device("cuda"), CPU, torch.device("mps")
    assert should_offload(Offload.AUTO, cuda, needed=17 << 30, free=11 << 30)
    assert not should_offload(Offload.AUTO, cuda, needed=17 << 30, free=23 << 30)
    assert not should_offload(Offload.AUTO, cuda, needed=17 << 30, free=None)
    assert not should_offload(Offload.AUTO, cpu, needed=17 << 30, free=0)
    assert not should_offload(Offload.AUTO, mps, needed=17 << 30, free=0)
    assert not should_offload(Offload.NEVER, cuda, needed=17 << 30, free=0)
    assert should_offload(Offload.ALWAYS, cpu, needed=0, free=None)
    assert free_bytes(cpu) is None  # the host's memory: nothing to compare with


def test_auto_compares_the_weights_at_the_compute_dtype_with_a_faked_free_memory(pipelines, monkeypatch):
    _, (spec,) = resolve_encoders(cfg_for(Path("."), Path("out"), pipelines["z-image"], dtype=DType.BF16), CPU)
    files = weight_files(spec.folder)
    fp32, bf16 = weight_bytes(files, torch.float32), weight_bytes(files, torch.bfloat16)
    assert fp32 == 2 * bf16 and abs(fp32 - sum(f.stat().st_size for f in files)) < 64 << 10  # saved in fp32
    needed = needed_bytes(files, torch.bfloat16)
    assert needed == bf16 + ACTIVATION_MARGIN_BYTES  # a tiny model: the margin's floor
    cuda = torch.device("cuda")
    monkeypatch.setattr(text_families, "free_bytes", lambda device: needed - 1)
    assert text_families._choose_offload(spec, cuda, Offload.AUTO)
    monkeypatch.setattr(text_families, "free_bytes", lambda device: needed)
    assert not text_families._choose_offload(spec, cuda, Offload.AUTO)
    assert text_families._choose_offload(spec, cuda, Offload.ALWAYS)


def _guarded(spec, model):
    return GuardedForward(model, CPU, spec.dtype.torch, encoder_forward(model, spec, CPU), spec.name)


def _inputs(spec):
    from transformers import AutoTokenizer

    ids, mask, _ = tokenize(AutoTokenizer.from_pretrained(spec.tokenizer), spec, list(CAPTIONS.values()) * 2)
    return ids, mask


def test_out_of_memory_inside_a_streamed_block_splits_and_leaves_no_weights_behind(pipelines, monkeypatch):
    _, (spec,) = resolve_encoders(cfg_for(Path("."), Path("out"), pipelines["z-image"]), CPU)
    inputs = _inputs(spec)
    with resident(spec, CPU) as model:
        expected = _guarded(spec, model)(inputs)
    with resident(spec, CPU, Offload.ALWAYS) as model:
        assert is_streamed(model) and all(p.device.type == "meta" for p in model.parameters())
        block = model.layers[1]
        loaded = []

        def fail_big_batches(module, args, kwargs):  # inside the block, after its hook copied its weights in
            loaded.append(block.mlp.up_proj.weight.device.type)
            if (args[0] if args else kwargs["hidden_states"]).shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        block.self_attn.register_forward_pre_hook(fail_big_batches, with_kwargs=True)
        at_split = []  # when the guard frees memory before retrying: is any weight still on the device?
        monkeypatch.setattr(
            encode, "free_device_memory", lambda d: at_split.append({p.device.type for p in model.parameters()})
        )
        guard = _guarded(spec, model)
        got = guard(inputs)
        assert guard.oom_splits >= 1 and "meta" not in loaded
        assert at_split and all(types == {"meta"} for types in at_split), at_split
        assert all(p.device.type == "meta" for p in model.parameters())  # nothing left resident
    for g, e in zip(got, expected, strict=True):
        assert isinstance(g, dict) and all(torch.equal(g[n], e[n]) for n in e)


def test_fp32_redo_of_a_streamed_encoder_equals_the_resident_one(pipelines):
    _, (_, spec) = resolve_encoders(cfg_for(Path("."), Path("out"), pipelines["flux"], dtype=DType.BF16), CPU)
    inputs = _inputs(spec)

    def run(offload):
        with resident(spec, CPU, offload) as model:
            forward = encoder_forward(model, spec, CPU)

            def overflowing(batch, dtype):  # as an fp16 T5 does: non-finite unless redone in fp32
                out = forward(batch, dtype)
                return out if dtype == torch.float32 else [{k: v * float("inf") for k, v in o.items()} for o in out]

            guard = GuardedForward(model, CPU, torch.bfloat16, overflowing, spec.name)
            result = guard(inputs)
            assert guard.upcasts == len(inputs[0])
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # back in the run's dtype
            return result

    for s, r in zip(run(Offload.ALWAYS), run(Offload.NEVER), strict=True):
        assert all(torch.equal(s[n], r[n]) for n in r)


def test_the_next_block_is_copied_while_one_runs_and_at_most_two_are_loaded(pipelines):
    """The overlap: from the second forward on (the first records the order), block k + 1's weights are on their
    way while block k runs; no more than two units hold weights at any time, none after the forward."""
    _, (spec,) = resolve_encoders(cfg_for(Path("."), Path("out"), pipelines["z-image"]), CPU)
    with resident(spec, CPU, Offload.ALWAYS) as model:
        streamer = streamer_of(model)
        layers = list(model.layers)
        seen = []  # per block run: (its index, is the next block loaded, units loaded)

        def look(index):
            def hook(module, args):  # after the streamer's own hook: the block is loaded by now
                following = layers[index + 1].mlp.up_proj.weight if index + 1 < len(layers) else None
                ahead = following is not None and following.device.type != "meta"
                seen.append((index, ahead, streamer.loaded_units()))

            return hook

        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(look(i))
        forward = encoder_forward(model, spec, CPU)
        for _ in range(2):
            forward(_inputs(spec), torch.float32)
            assert streamer.loaded_units() == 0 and all(p.device.type == "meta" for p in model.parameters())
    n = len(layers)
    first, second = seen[:n], seen[n:]
    assert [ahead for _, ahead, _ in first] == [False] * n  # the first forward learns the order
    assert [ahead for _, ahead, _ in second] == [True] * (n - 1) + [False]
    assert max(loaded for _, _, loaded in seen) == 2


def test_modules_kept_in_fp32_count_at_fp32_in_the_bytes_needed(tmp_path):
    from cachebuild.testing import make_tiny_t5

    files = weight_files(make_tiny_t5(tmp_path / "t5"))
    assert fp32_modules("T5EncoderModel", torch.float16) == ("wo",)  # transformers keeps wo in fp32 in fp16 only
    assert fp32_modules("T5EncoderModel", torch.bfloat16) == ()
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        wo = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys() if ".wo." in k)  # noqa: SIM118
    fp16 = weight_bytes(files, torch.float16)
    assert wo > 0 and weight_bytes(files, torch.float16, ("wo",)) == fp16 + 2 * wo  # 4 bytes each instead of 2
    assert needed_bytes(files, torch.float16, ("wo",)) - needed_bytes(files, torch.float16) == 2 * wo


@pytest.mark.gpu
def test_auto_streams_a_model_larger_than_the_memory_cap_and_stays_under_it(tmp_path, captions):
    from cachebuild.config import TextencConfig
    from cachebuild.jobs.textenc import build_textenc
    from cachebuild.testing import make_tiny_t5, make_tiny_tokenizer

    encoder = make_tiny_t5(tmp_path / "t5", d_model=2048, layers=8, d_kv=256, init_scale=0.3)  # about 270 MB fp32
    tokenizer = make_tiny_tokenizer(tmp_path / "tok", "t5")
    model_bytes = weight_bytes(weight_files(encoder), torch.float32)
    cap = 160 << 20  # bytes: below the model, above one block (34 MB) plus activations and cuBLAS workspaces
    assert model_bytes > cap

    def build(device: str, out: str):
        cfg = TextencConfig(
            captions, tmp_path / out, text_encoder=str(encoder), tokenizer=str(tokenizer), max_length=32,
            device=device, dtype=DType.FP32, dtype_out=DType.FP32, batch_size=2,
        )  # fmt: skip
        return build_textenc(cfg)

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        summary = build("cuda", "gpu")
        peak = torch.cuda.max_memory_allocated()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    print(f"model {model_bytes / 2**20:.0f} MiB, cap {cap / 2**20:.0f} MiB, peak streamed {peak / 2**20:.1f} MiB")
    assert summary.offloaded == ["te"] and summary.failed == 0
    assert peak < cap
    reference = build("cpu", "cpu")
    assert reference.offloaded == []
    gpu, cpu = read_text_cache(tmp_path / "gpu"), read_text_cache(tmp_path / "cpu")
    assert sorted(gpu) == sorted(cpu) == sorted(CAPTIONS)
    for key in cpu:
        for name in cpu[key]:
            torch.testing.assert_close(gpu[key][name], cpu[key][name], rtol=1e-4, atol=1e-5)  # other kernels
