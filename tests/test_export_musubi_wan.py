"""musubi export of Wan caches (``--arch wan``): clips of an image-to-video cache with Wan 2.1's CLIP embeddings and
their videos' text, read back by musubi-tuner's own rules (``VideoDataset.prepare_for_training``: start, frames and
size parsed from the name, the text file paired by the video's stem, the bucket recomputed from the size; then
``BucketBatchManager.__getitem__``'s collation) and compared with what the cache's ``pipeline_inputs`` hand the
pipeline, after musubi's dtypes; a cache of still images under musubi's image names; the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.images.musubi_buckets import musubi_bucket
from cachebuild.testing import make_tiny_text_pipeline
from cachebuild.testing.i2v import make_tiny_i2v_pipeline
from cachebuild.testing.videos import clip_frames, write_video
from tests.conftest import write_image
from tests.test_export_musubi import DTYPE_NAMES

RESOLUTION = (32, 32)
VIDEOS = {"walk": (10, (32, 32)), "run/fast_one": (6, (48, 32)), "other/walk": (6, (32, 32))}  # frames, (W, H)
ARGS = ["--buckets", "musubi", "--resolution", "32", "--latents", "mean", "--workers", "0", "--device", "cpu"]
ARGS += ["--dtype", "fp32", "--quiet"]


def invoke(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def i2v_cache(tmp_path_factory) -> Path:
    """Wan 2.1 I2V latents of 5- and 9-frame clips with their conditions, and UMT5 text of the videos' captions."""
    root = tmp_path_factory.mktemp("musubi-wan")
    data = root / "data"
    for i, (key, (n, size)) in enumerate(VIDEOS.items()):
        write_video(data / f"{key}.mkv", clip_frames(n, size, seed=i))
        (data / f"{key}.txt").write_text(f"caption of {key}")
    write_video(data / "turned.mkv", clip_frames(5, (32, 32), seed=9), rotation=90)  # shown rotated
    (data / "turned.txt").write_text("caption of turned")
    pipe = make_tiny_i2v_pipeline(root / "pipe", "wan2.1-i2v", channels=16)  # musubi's Wan: 16 channels
    text = make_tiny_text_pipeline(root / "text", "wan")
    out = root / "cache"
    invoke("latents", str(data), "--model", str(pipe), "--out", str(out), "--frames", "5,9", *ARGS)
    invoke("textenc", str(data), "--model", str(text), "--out", str(out), "--device", "cpu", "--quiet")
    return out


def musubi_video_load(folder: Path) -> dict[tuple, list[dict]]:
    """musubi-tuner's VideoDataset.prepare_for_training and BucketBatchManager.__getitem__, restated: each
    ``*_wan.safetensors`` is a clip whose name gives its start, frame count and size; its text file is
    ``<video stem>_wan_te.safetensors`` (none: skipped); its bucket is recomputed from the size, with the frame count;
    keys lose ``varlen_`` and their dtype, latents their FxHxW; a bucket's non-varlen tensors are stacked."""
    buckets: dict[tuple, list[dict]] = {}
    for path in sorted(folder.glob("*_wan.safetensors")):
        tokens = path.name.split("_")
        width, height = map(int, tokens[-2].split("x"))
        start, frames = map(int, tokens[-3].split("-")[:2])
        item_key = "_".join(tokens[:-3])
        te = folder / f"{item_key}_wan_te.safetensors"
        if not te.exists():
            continue
        item: dict = {"item_key": item_key, "start": start, "frames": frames, "size": (width, height), "meta": {}}
        for file in (path, te):
            with safe_open(str(file), framework="pt") as f:
                item["meta"][file.name] = f.metadata()
                for key in f.keys():  # noqa: SIM118
                    role = key.replace("varlen_", "", 1)
                    role = role[: -len(next(d for d in DTYPE_NAMES if role.endswith("_" + d))) - 1]
                    role = role.rsplit("_", 1)[0] if role.startswith("latents_") else role
                    item[role], item[role + ":key"], item[role + ":varlen"] = f.get_tensor(key), key, "varlen" in key
        bucket = (*musubi_bucket((width, height), RESOLUTION), frames)
        buckets.setdefault(bucket, []).append(item)
    for items in buckets.values():  # the collation stacks every non-varlen role: shapes must agree in a bucket
        for role in [r for r in items[0] if ":" not in r and isinstance(items[0][r], torch.Tensor)]:
            if not items[0][role + ":varlen"]:
                torch.stack([it[role] for it in items])
    return buckets


def test_clips_conditions_and_text_load_by_musubi_rules(i2v_cache, tmp_path):
    folder = tmp_path / "musubi"
    summary = json.loads(invoke("export", str(i2v_cache), "--format", "musubi", "--to", str(folder), "--json"))
    assert summary["family"] == "wan"  # told from the cache
    refused = {s["key"]: s["reason"] for s in summary["skipped"]}
    assert sorted(refused) == ["turned@00000-005", "walk@00000-005", "walk@00000-009"]
    assert "same file stem" in refused["walk@00000-005"] and "rotated" in refused["turned@00000-005"]
    assert any("centre 224 crop" in w for w in summary["warnings"])
    cache = open_cache(i2v_cache)
    buckets = musubi_video_load(folder)
    items = {(it["item_key"], it["start"], it["frames"]): it for group in buckets.values() for it in group}
    # other/walk came first (keys sort): its clip is named walk; the later walk clips have its stem
    assert sorted(items) == [("fast_one", 0, 5), ("walk", 0, 5)]
    assert len(list(folder.glob("*_te.safetensors"))) == 2 and summary["written"] == 4  # one text per video
    for (stem, start, frames), item in items.items():
        key = {"fast_one": "run/fast_one", "walk": "other/walk"}[stem] + f"@{start:05d}-{frames:03d}"
        want = cache.pipeline_inputs(key, family="wan")
        w, h = cache.record(key)["bucket"]
        assert item["size"] == (w, h) and musubi_bucket((w, h), RESOLUTION) == (w, h)
        f, lh, lw = want["latents"].shape[1:]
        assert item["latents:key"] == f"latents_{f}x{lh}x{lw}_bfloat16"
        assert torch.equal(item["latents"], want["latents"].to(torch.bfloat16))  # normalised, as musubi's WanVAE
        assert item["latents_image:key"] == f"latents_image_{f}x{lh}x{lw}_bfloat16"
        assert item["latents_image"].shape == (20, f, lh, lw)  # Wan's y: mask 4 + latents 16
        assert torch.equal(item["latents_image"], want["condition"].to(torch.bfloat16))
        assert item["clip:key"] == "clip_bfloat16" and item["clip"].dtype == torch.float16  # as musubi writes it
        assert torch.equal(item["clip"], want["image_embeds"].to(torch.float16))
        rec = cache.record(key)
        assert item["t5:key"] == "varlen_t5_bfloat16"
        assert torch.equal(item["t5"], rec["umt5"][rec["umt5_mask"].bool()].to(torch.bfloat16))
        meta = item["meta"][f"{stem}_{start:05d}-{frames:03d}_{w:04d}x{h:04d}_wan.safetensors"]
        assert meta == {"architecture": "wan", "width": str(w), "height": str(h), "format_version": "1.0.1",
                        "frame_count": str(frames)}  # fmt: skip
        te = item["meta"][f"{stem}_wan_te.safetensors"]
        assert te == {"architecture": "wan", "caption1": cache.caption(key), "format_version": "1.0.1"}
    again = json.loads(invoke("export", str(i2v_cache), "--format", "musubi", "--arch", "wan", "--to", str(folder),
                              "--json"))  # fmt: skip
    assert again["written"] == 0 and again["unchanged"] == 4


def test_stills_t2v_and_refusals(tmp_path):
    """A cache of still images exports under musubi's image names (their own size, ``latents_1x...``, no
    frame_count); TI2V-5B latents and ``--last-frame`` conditions are refused in one line."""
    data = tmp_path / "stills"
    for i, size in enumerate([(32, 32), (48, 32)]):
        write_image(data / f"img{i}.png", size, seed=i)
    out = tmp_path / "t2v"
    vae = make_tiny_i2v_pipeline(tmp_path / "t2v-pipe", "wan2.2-i2v", channels=16) / "vae"  # its VAE alone
    invoke("latents", str(data), "--vae", str(vae), "--out", str(out), *ARGS)
    folder = tmp_path / "musubi"
    summary = json.loads(invoke("export", str(out), "--format", "musubi", "--to", str(folder), "--json"))
    assert summary["written"] == 2 and not summary["skipped"], summary
    reader = open_cache(out)
    for i, size in enumerate([(32, 32), (48, 32)]):
        path = folder / f"img{i}_{size[0]:04d}x{size[1]:04d}_wan.safetensors"
        with safe_open(str(path), framework="pt") as f:
            (name,) = f.keys()
            z = reader.pipeline_inputs(f"img{i}", family="wan")["latents"]
            assert name == f"latents_1x{z.shape[2]}x{z.shape[3]}_bfloat16" and "frame_count" not in f.metadata()
            assert torch.equal(f.get_tensor(name), z.to(torch.bfloat16))
    ti2v = make_tiny_i2v_pipeline(tmp_path / "ti2v", "wan2.2-ti2v")
    invoke("latents", str(data), "--model", str(ti2v), "--out", str(tmp_path / "c-ti2v"), *ARGS)
    output = invoke("export", str(tmp_path / "c-ti2v"), "--format", "musubi", "--to", str(folder), code=2)
    assert "TI2V-5B" in output
    video = tmp_path / "video"
    write_video(video / "v.mkv", clip_frames(5, (32, 32)))
    pipe = tmp_path / "t2v-pipe"
    invoke("latents", str(video), "--model", str(pipe), "--out", str(tmp_path / "c-last"), "--frames", "5",
           "--last-frame", *ARGS)  # fmt: skip
    output = invoke("export", str(tmp_path / "c-last"), "--format", "musubi", "--to", str(folder), code=2)
    assert "--last-frame" in output
