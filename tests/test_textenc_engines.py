"""engines.text: where a run's text encoders live (together, or turns from host memory), and text on every
device (``--devices cpu,cpu`` here, one process per device; Ray in tests/test_ray_engine.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from cachebuild.config import DType, Offload, TextencConfig
from cachebuild.engines import text as text_engine
from cachebuild.engines.text import EncoderSet
from cachebuild.families.text import resolve_encoders
from cachebuild.jobs import textenc
from cachebuild.jobs.textenc import build_textenc
from cachebuild.testing import make_tiny_text_pipeline
from tests.conftest import torch_threads
from tests.test_textenc import count_loads, read_text_cache

WORDS = ["cat", "dog", "red", "blue", "tree", "house", "car", "sky", "river", "night"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> Path:
    return make_tiny_text_pipeline(tmp_path_factory.mktemp("text-engines") / "sd3", "sd3")


def write_captions(root: Path, n: int) -> Path:
    """``n`` captions of 2-8 words; every fifth one is the same caption, so duplicates land in every page."""
    root.mkdir()
    for i in range(n):
        text = "a photo of a cat" if i % 5 == 0 else " ".join(WORDS[(i * k) % 10] for k in range(1, 3 + i % 7))
        (root / f"c{i:03d}.txt").write_text(text)
    return root


def cfg_for(source: Path, out: Path, model: Path, **kw) -> TextencConfig:
    base = dict(model=str(model), device="cpu", dtype=DType.FP32, dtype_out=DType.FP32, batch_size=2)
    return TextencConfig(source=source, out=out, **(base | {"t5_max_length": 32, "chunk_mb": 0.05} | kw))


def assert_same_text_cache(a: Path, b: Path, exact: bool = True) -> None:
    got, want = read_text_cache(a), read_text_cache(b)
    assert sorted(got) == sorted(want)
    for key in want:
        assert sorted(got[key]) == sorted(want[key]), key
        for name in want[key]:
            if exact:
                assert torch.equal(got[key][name], want[key][name]), (key, name)  # bit for bit
            else:
                torch.testing.assert_close(got[key][name], want[key][name], rtol=1e-6, atol=1e-6)


def stored_captions(out: Path) -> int:
    """How many captions' tensors the shards hold (each text id once if deduplication held)."""
    from safetensors import safe_open

    ids = []
    for shard in (out / "textenc").glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            ids += [n.split("/")[0] for n in f.keys() if n.endswith("/t5")]  # noqa: SIM118
    assert len(ids) == len(set(ids)), "a caption was stored twice"
    return len(ids)


def test_turns_from_host_memory_give_the_tensors_of_together_and_load_once(tmp_path, sd3, monkeypatch):
    """A device that cannot hold every encoder (forced here: the CPU always can): each encoder stays in host
    memory and takes its turn per chunk (four chunks here), each read once; the tensors are those of a run with
    them all resident. (Within CPU kernel noise: the host copies are aligned differently from the weights the
    loader maps, which moves the last bit of some CPU kernels; on a GPU both run on the same device copies.)"""
    source = write_captions(tmp_path / "caps", 8)
    together = build_textenc(cfg_for(source, tmp_path / "together", sd3))
    monkeypatch.setattr(text_engine, "_fit_together", lambda specs, device: False)
    loads = count_loads(monkeypatch)
    turns = build_textenc(cfg_for(source, tmp_path / "turns", sd3))
    assert turns.done == together.done == 8 and turns.model_loads == 3 and len(loads) == 3
    assert_same_text_cache(tmp_path / "turns", tmp_path / "together", exact=False)


def test_a_turn_puts_one_encoder_on_the_device_and_leaves_its_host_copy_untouched(tmp_path, sd3):
    """The swap itself, with the meta device standing in for a GPU: during a turn only that encoder's weights
    are on the device; after it they are the same host tensors as before (no copy back, nothing changed)."""
    cfg = cfg_for(write_captions(tmp_path / "caps", 1), tmp_path / "c", sd3)
    meta = torch.device("meta")
    _, specs = resolve_encoders(cfg, torch.device("cpu"))
    with EncoderSet(specs, meta, Offload.NEVER, together=False) as encoders:
        models = dict(encoders._models)
        before = {name: [p.data_ptr() for p in m.parameters()] for name, m in models.items()}
        assert encoders.loads == 3 and not encoders.pinned  # page-locking is for CUDA
        with encoders.turn(specs[2]):
            assert {p.device.type for p in models["t5"].parameters()} == {"meta"}
            assert {p.device.type for p in models["clip_l"].parameters()} == {"cpu"}
        for name, m in models.items():
            assert {p.device.type for p in m.parameters()} == {"cpu"}
            assert [p.data_ptr() for p in m.parameters()] == before[name], name


@pytest.mark.gpu
def test_turns_on_a_gpu_hold_one_encoder_and_leave_nothing(tmp_path, sd3):
    """Under turns, device memory during a turn is that encoder's weights alone, and nothing stays afterwards."""
    cfg = cfg_for(write_captions(tmp_path / "caps", 1), tmp_path / "c", sd3)
    cuda = torch.device("cuda")
    _, specs = resolve_encoders(cfg, cuda)
    start = torch.cuda.memory_allocated(cuda)
    with EncoderSet(specs, cuda, Offload.NEVER, together=False) as encoders:
        assert torch.cuda.memory_allocated(cuda) == start  # every encoder in host memory between turns
        assert encoders.pinned  # tiny weights: page-locked
        for spec in specs:
            model = encoders._models[spec.name]
            weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
            with encoders.turn(spec):
                torch.cuda.synchronize()
                assert torch.cuda.memory_allocated(cuda) - start <= weights + (1 << 20), spec.name
            assert torch.cuda.memory_allocated(cuda) == start
    assert torch.cuda.memory_allocated(cuda) == start


@pytest.mark.gpu
def test_turns_and_together_give_the_same_bytes_on_a_gpu(tmp_path, sd3, monkeypatch):
    source = write_captions(tmp_path / "caps", 12)
    together = build_textenc(cfg_for(source, tmp_path / "together", sd3, device="cuda"))
    monkeypatch.setattr(text_engine, "_fit_together", lambda specs, device: False)
    turns = build_textenc(cfg_for(source, tmp_path / "turns", sd3, device="cuda"))
    assert turns.model_loads == together.model_loads == 3
    assert_same_text_cache(tmp_path / "turns", tmp_path / "together")  # bit for bit: the same device copies


def test_a_caption_that_failed_fails_its_later_items_with_its_reason_unencoded(tmp_path, sd3, monkeypatch, caplog):
    """The repeated caption fails on its first page; its items in later pages fail with the same reason, and it is
    not encoded again (one encoder call per encoder for it in the whole run)."""
    source = write_captions(tmp_path / "caps", 12)  # "a photo of a cat" at c000, c005, c010
    monkeypatch.setattr(textenc, "TEXT_CHUNK_CAPTIONS", 4)
    real, calls = EncoderSet.encode, []

    def encode(self, spec, items, out_dtype):
        results = real(self, spec, items, out_dtype)
        calls.extend(spec.name for i in items if i.text == "a photo of a cat")
        return ["the encoder broke" if i.text == "a photo of a cat" else r for i, r in zip(items, results, strict=True)]

    monkeypatch.setattr(EncoderSet, "encode", encode)
    with caplog.at_level("INFO", logger="cachebuild.jobs.textenc_plan"):
        summary = build_textenc(cfg_for(source, tmp_path / "c", sd3))
    assert (summary.done, summary.failed, summary.pending) == (9, 3, 0)
    assert sorted(calls) == ["clip_g", "clip_l", "t5"] and "in flight or failed" in caplog.text
    failures = {f["key"]: f["reason"] for f in summary.failures}
    assert failures == dict.fromkeys(["c000", "c005", "c010"], "the encoder broke")


def _threads_of_one_of_two_cpu_devices():
    return torch_threads((os.cpu_count() or 1) // 2)


@pytest.mark.slow  # two spawned device processes each import torch and transformers
def test_two_cpu_devices_one_killed_give_the_tensors_of_one_deduplicated_read_once(tmp_path, sd3, monkeypatch, caplog):
    """``--devices cpu,cpu`` with pages of 4 captions and chunks of about 2, the second device's process killed
    once it has encoded something: the run finishes on the other with the bytes of one device, the repeated
    caption is stored once although its copies sit in pages planned while it was still on a device, and the
    device that finished read each encoder once for all its chunks (the killed one's count died with it)."""
    source = write_captions(tmp_path / "caps", 30)
    monkeypatch.setattr(textenc, "TEXT_CHUNK_CAPTIONS", 4)
    with _threads_of_one_of_two_cpu_devices():
        one = build_textenc(cfg_for(source, tmp_path / "one", sd3))
    killed, seen = [], []

    def kill_one(p) -> None:  # SIGKILL the second device's process once it has encoded something
        seen.append(p)
        if not killed and len(p.devices) == 2 and p.devices[1].processed > 0:
            os.kill(p.devices[1].pid, signal.SIGKILL)
            killed.append(p.devices[1].pid)

    cfg = cfg_for(source, tmp_path / "two", sd3, device=None, devices=("cpu", "cpu"), shard_mb=0.02)
    with caplog.at_level("INFO"):
        two = build_textenc(cfg, kill_one)
    assert killed and (one.done, two.done, two.failed, two.pending) == (30, 30, 0, 0)
    assert "died (signal 9 (SIGKILL))" in caplog.text
    assert "in flight or failed" in caplog.text  # the repeated caption, while on a device
    assert_same_text_cache(tmp_path / "two", tmp_path / "one")
    assert stored_captions(tmp_path / "two") == stored_captions(tmp_path / "one") == 25  # 30 items, 25 captions
    assert two.model_loads == 3
    assert seen[-1].processed == seen[-1].total == 30 * 3
    assert {tuple(d.name for d in p.devices) for p in seen if p.devices} == {("cpu#0", "cpu#1")}


def test_several_devices_with_a_url_out_or_an_edit_family_are_refused_in_one_line(tmp_path, sd3):
    from click.testing import CliRunner

    from cachebuild.cli import cli

    source = write_captions(tmp_path / "caps", 2)
    args = ["textenc", str(source), "--model", str(sd3), "--devices", "cpu,cpu"]
    result = CliRunner().invoke(cli, [*args, "--out", "memory://bucket/cache"])
    assert result.exit_code == 2 and "--devices with a URL --out is not supported" in result.output
    result = CliRunner().invoke(cli, [*args, "--device", "cpu", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "--device and --devices" in result.output
    result = CliRunner().invoke(cli, [*args[:4], "--engine", "ray", "--device", "cpu", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "drop --device" in result.output
    assert not (tmp_path / "c").exists()
