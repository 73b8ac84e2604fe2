"""store: safetensors shards read back with plain safetensors, durable writes, shard naming."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from cachebuild.cache.files import TMP_SUFFIX, ShardInfo, shard_index, shard_name, write_durably
from cachebuild.cache.shards import SafetensorsShardWriter, open_writer


def sample_items() -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    g = torch.Generator().manual_seed(0)
    return {
        "img000": (
            {"latents": torch.randn(4, 8, 6, generator=g), "latents_flipped": torch.randn(4, 8, 6, generator=g)},
            {"bucket": [48, 64], "crop": [0, 3], "original_size": [50, 70]},
        ),
        "sub/img001": (
            {"latents": torch.randn(4, 6, 8, generator=g).half(), "latents_flipped": torch.randn(4, 6, 8).half()},
            {"bucket": [64, 48], "crop": [1, 0], "original_size": [90, 66]},
        ),
    }


def write_shard(folder, items, header=None) -> ShardInfo:
    writer = SafetensorsShardWriter(folder / shard_name(0, ".safetensors"), header or {})
    for key, (tensors, meta) in items.items():
        writer.write(key, tensors, meta)
    return writer.close()


def test_round_trip_with_plain_safetensors(tmp_path):
    items = sample_items()
    header = {"store": "latents", "scaling_factor": 0.13025, "latent_channels": 4}
    info = write_shard(tmp_path, items, header)
    path = tmp_path / info.name
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        assert names == {f"{k}/{n}" for k, (tensors, _) in items.items() for n in tensors}
        for key, (tensors, _) in items.items():
            for name, t in tensors.items():
                got = f.get_tensor(f"{key}/{name}")
                assert got.dtype == t.dtype and got.shape == t.shape
                assert torch.equal(got, t)
        meta = f.metadata()
    assert json.loads(meta["items"]) == {k: m for k, (_, m) in items.items()}
    assert meta["cachebuild"] == "1"
    assert meta["store"] == "latents" and float(meta["scaling_factor"]) == 0.13025 and meta["latent_channels"] == "4"


def test_shard_info_matches_the_file_on_disk(tmp_path):
    info = write_shard(tmp_path, sample_items())
    data = (tmp_path / info.name).read_bytes()
    assert info.name == "shard-00000.safetensors"
    assert info.keys == ("img000", "sub/img001")  # in write order
    assert info.bytes == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()


def test_no_temporary_file_is_left(tmp_path):
    info = write_shard(tmp_path, sample_items())
    assert [p.name for p in tmp_path.iterdir()] == [info.name]


def test_nothing_is_on_disk_before_close(tmp_path):
    writer = SafetensorsShardWriter(tmp_path / shard_name(3, ".safetensors"), {})
    writer.write("a", {"latents": torch.zeros(4, 2, 2)}, {})
    assert list(tmp_path.iterdir()) == []
    writer.close()
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00003.safetensors"]


def test_views_of_one_batch_tensor_round_trip(tmp_path):
    """The encoder hands out per-item views of one batch output; each must be stored as its own slice."""
    batch = torch.arange(3 * 8 * 2 * 2, dtype=torch.float32).reshape(3, 8, 2, 2)
    writer = SafetensorsShardWriter(tmp_path / "shard-00000.safetensors", {})
    for i in range(3):
        mean, _logvar = batch[i].chunk(2, dim=0)
        writer.write(f"k{i}", {"latents": mean}, {})
    info = writer.close()
    with safe_open(str(tmp_path / info.name), framework="pt") as f:
        for i in range(3):
            assert torch.equal(f.get_tensor(f"k{i}/latents"), batch[i, :4])


def test_nbytes_counts_tensor_bytes(tmp_path):
    writer = SafetensorsShardWriter(tmp_path / "shard-00000.safetensors", {})
    assert writer.nbytes == 0
    writer.write("a", {"latents": torch.zeros(4, 8, 8)}, {})
    writer.write("b", {"latents": torch.zeros(4, 8, 8, dtype=torch.float16), "x": torch.zeros(2)}, {})
    assert writer.nbytes == 4 * 64 * 4 + 4 * 64 * 2 + 2 * 4


def test_writing_a_key_twice_raises(tmp_path):
    writer = SafetensorsShardWriter(tmp_path / "shard-00000.safetensors", {})
    writer.write("a", {"latents": torch.zeros(1)}, {})
    with pytest.raises(ValueError, match="'a'"):
        writer.write("a", {"latents": torch.ones(1)}, {})


def test_context_manager_writes_on_success_only(tmp_path):
    with SafetensorsShardWriter(tmp_path / "shard-00000.safetensors", {}) as w:
        w.write("a", {"latents": torch.zeros(2)}, {"n": 1})
    assert (tmp_path / "shard-00000.safetensors").is_file()
    with pytest.raises(RuntimeError), SafetensorsShardWriter(tmp_path / "shard-00001.safetensors", {}) as w:
        w.write("a", {"latents": torch.zeros(2)}, {})
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.safetensors"]


def test_open_writer_names_the_shard(tmp_path):
    writer = open_writer("safetensors", tmp_path, 42, {"store": "latents"})
    assert isinstance(writer, SafetensorsShardWriter)
    assert writer.path == tmp_path / "shard-00042.safetensors"


def test_shard_names_are_zero_padded_and_sort_in_write_order():
    indices = [0, 1, 2, 9, 10, 11, 99, 100, 1234, 99999]
    names = [shard_name(i, ".safetensors") for i in indices]
    assert names[0] == "shard-00000.safetensors" and names[-1] == "shard-99999.safetensors"
    assert sorted(names) == names
    assert sorted(reversed(names)) == names


@pytest.mark.parametrize(
    "name,index",
    [
        ("shard-00000.safetensors", 0),
        ("shard-00042.safetensors", 42),
        ("shard-12345.h5", 12345),
        ("shard-00007", 7),
        ("manifest.sqlite", None),
        (".lock", None),
        ("shard-.safetensors", None),
        ("shard-00x1.safetensors", None),
        ("myshard-00001.safetensors", None),
        ("shard--0001.safetensors", None),
    ],
)
def test_shard_index(name, index):
    assert shard_index(name) == index


def test_shard_index_inverts_shard_name():
    for i in [0, 5, 10, 31337, 99999]:
        assert shard_index(shard_name(i, ".safetensors")) == i


def test_write_durably_replaces_atomically(tmp_path):
    target = tmp_path / "file.bin"
    write_durably(target, b"first")
    write_durably(target, b"second")
    assert target.read_bytes() == b"second"
    assert not (tmp_path / ("file.bin" + TMP_SUFFIX)).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
