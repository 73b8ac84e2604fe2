"""musubi export of HunyuanVideo 1.5 clips (``--arch hv15``): each file read back by musubi-tuner's own rules, restated
from v0.3.4 (``VideoDataset.prepare_for_training``: the glob, the name parsed on "_", the bucket recomputed from W x H,
the text file paired by the video's name; ``BucketBatchManager.__getitem__``: keys by role, ``varlen_`` rows never
stacked; ``hv_1_5_train_network``: latents scaled by 1.03682 there, text padded per batch with a mask of the real
rows), and its values checked against the cache; what musubi's trainer would read otherwise refused."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.consumers.export.musubi_hv15 import SCALING, _refusal, check_hv15_cache, export_hv15
from cachebuild.errors import ConfigError
from cachebuild.images.musubi_buckets import musubi_bucket
from cachebuild.testing.videos import clip_frames, write_video
from tests.test_export_musubi import DTYPE_NAMES
from tests.test_parity_video_families import CAPTIONS

RESOLUTION = (32, 32)  # the cache's --resolution: musubi's dataset config must say the same


def musubi_load_clips(folder: Path, resolution=RESOLUTION) -> dict[tuple, list[dict]]:
    """musubi-tuner's VideoDataset.prepare_for_training and BucketBatchManager.__getitem__, restated."""
    buckets: dict[tuple, list[dict]] = {}
    for path in sorted(folder.glob("*_hv15.safetensors")):
        tokens = path.name.split("_")
        width, height = map(int, tokens[-2].split("x"))
        start, frames = map(int, tokens[-3].split("-")[:2])
        item_key = "_".join(tokens[:-3])
        te = folder / f"{item_key}_hv15_te.safetensors"
        if not te.exists():
            continue  # musubi warns and leaves the clip out
        item: dict = {"item_key": item_key, "start": start, "frames": frames, "size": (width, height), "meta": {}}
        for file in (path, te):
            with safe_open(str(file), framework="pt") as f:
                item["meta"][file.name] = f.metadata()
                for key in f.keys():  # noqa: SIM118
                    content = key.replace("varlen_", "", 1) if key.startswith("varlen_") else key
                    dtype = next(d for d in DTYPE_NAMES if content.endswith("_" + d))
                    content = content[: -len(dtype) - 1]
                    if content.startswith("latents_"):
                        content = content.rsplit("_", 1)[0]  # the F x H x W
                    item[content], item[content + ":key"] = f.get_tensor(key), key
        bucket = (*musubi_bucket((width, height), resolution), frames)
        buckets.setdefault(bucket, []).append(item)
    for items in buckets.values():  # a bucket's latents are stacked: their shapes must agree
        torch.stack([it["latents"] for it in items])
    return buckets


def pad_varlen(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """hv_1_5_train_network's pad_varlen: zeros to the batch's longest, a mask of the real rows."""
    longest = max(r.shape[0] for r in rows)
    padded = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, longest - r.shape[0])) for r in rows])
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, r in enumerate(rows):
        mask[i, : r.shape[0]] = True
    return padded, mask


@pytest.fixture(scope="module")
def exported(video_family_caches, tmp_path_factory):
    cache = video_family_caches["hunyuanvideo-1.5"].cache
    to = tmp_path_factory.mktemp("hv15")
    result = CliRunner().invoke(cli, ["export", str(cache), "--format", "musubi", "--to", str(to), "--json"])
    assert result.exit_code == 0, result.output
    return cache, to, json.loads(result.output)


def test_clips_and_their_videos_text_load_by_musubis_rules(exported):
    cache, folder, summary = exported
    assert summary["family"] == "hv15"  # told from the VAE: no --arch needed
    assert [s["key"] for s in summary["skipped"]] == ["still"] and "image dataset" in summary["skipped"][0]["reason"]
    reader, text = open_cache(cache, text=False), open_cache(cache)
    loaded = musubi_load_clips(folder)
    items = {f"{it['item_key']}@{it['start']:05d}-{it['frames']:03d}": it for b in loaded.values() for it in b}
    assert sorted(items) == [k for k in reader if k != "still"]
    assert summary["written"] == len(items) + 1  # one text file for the video's five clips
    for key, item in items.items():
        info, stored = reader.info(key), reader[key]["latents"]  # raw (32, F', h, w)
        assert item["size"] == tuple(info["bucket"]) and item["frames"] == info["frames"]
        assert item["latents:key"] == f"latents_{stored.shape[1]}x8x8_float16"
        assert torch.equal(item["latents"], stored.to(torch.float16))  # unscaled: the trainer scales
        scaled = text.pipeline_inputs(key)["latents"]  # the pipeline's: raw x 1.03682
        assert torch.allclose(item["latents"].float() * SCALING, scaled, rtol=1e-3, atol=1e-3)
        latent_file = f"walk_{key[-9:]}_0032x0032_hv15.safetensors"
        assert item["meta"][latent_file] == {
            "architecture": "hunyuan_video_1_5", "width": "32", "height": "32", "format_version": "1.0.1",
            "frame_count": str(info["frames"]),
        }  # fmt: skip
        want = text.pipeline_inputs(key)
        assert item["vl_embed:key"] == "varlen_vl_embed_bfloat16" and item["byt5_embed:key"].startswith("varlen_byt5")
        assert torch.equal(item["vl_embed"], want["prompt_embeds"][want["prompt_embeds_mask"].bool()])
        assert torch.equal(item["byt5_embed"], want["prompt_embeds_2"][want["prompt_embeds_mask_2"].bool()])
        assert item["meta"]["walk_hv15_te.safetensors"]["caption1"] == CAPTIONS["walk"]
    batch = [items["walk@00000-005"]["vl_embed"], items["walk@00000-005"]["vl_embed"][:3]]
    padded, mask = pad_varlen(batch)  # what the trainer attends to: the real rows, and only those
    assert torch.equal(padded[0][mask[0]], batch[0]) and int(mask[1].sum()) == 3


def test_a_rerun_writes_nothing_and_a_caption_without_quotes_gives_no_byt5_rows(exported, video_family_caches):
    cache, folder, first = exported
    again = export_hv15(cache, folder)
    assert again.written == 0 and again.unchanged == first["written"] and not again.conflicts
    from cachebuild.consumers.export.musubi_hv15 import hv15_text_tensors

    still = hv15_text_tensors(open_cache(cache), "still")  # "a still photo": nothing quoted
    assert still["varlen_byt5_embed_bfloat16"].shape == (0, still["varlen_byt5_embed_bfloat16"].shape[1])


def test_what_the_trainer_would_read_otherwise_is_refused(video_family_caches, tmp_path):
    """Per clip: a video shown rotated, a second video of one name; per cache: another VAE's latents, another channel
    count or scaling factor; a bucket musubi recomputes otherwise."""
    built = video_family_caches["hunyuanvideo-1.5"]
    data = tmp_path / "data"
    write_video(data / "walk.mkv", clip_frames(5, (32, 32), seed=4))
    write_video(data / "sub" / "walk.mkv", clip_frames(5, (32, 32), seed=5))
    write_video(data / "turned.mkv", clip_frames(5, (32, 32), seed=6), rotation=90)
    out = tmp_path / "cache"
    assert CliRunner().invoke(cli, built.args(data, built.vae, out, "5")).exit_code == 0
    summary = export_hv15(out, tmp_path / "m")
    refused = {s["key"]: s["reason"] for s in summary.skipped}
    assert "same video name as sub/walk.mkv" in refused.pop("walk@00000-005")  # sub/walk sorts first
    assert "rotated (90 degrees): musubi decodes its frames unrotated" in refused.pop("turned@00000-005")
    assert not refused and summary.written == 1
    assert any("no text outputs" in w for w in summary.warnings)
    fingerprint = open_cache(out).fingerprint
    for change, message in (
        ({"class": "AutoencoderKLWan"}, "needs latents of AutoencoderKLHunyuanVideo15"),
        ({"latent_channels": 4}, "reads 32-channel latents and scales them by 1.03682"),
        ({"scaling_factor": 1.0}, "reads 32-channel latents and scales them by 1.03682"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_hv15_cache(fingerprint | {"vae": fingerprint["vae"] | change})
    kohya = SimpleNamespace(
        fingerprint={"buckets": {"resolution": [64, 64]}},
        info=lambda key: {"bucket": [96, 32], "original_size": [96, 32], "crop": [0, 0]},
    )  # a kohya bucket at 64 px, not musubi's: its trainer would put the clip in 128x32 with others of that shape
    assert "rebuild the latents with --buckets musubi" in _refusal(kohya, "x")
