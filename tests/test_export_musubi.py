"""musubi export: each file read back by musubi-tuner's own rules (file names, keys, dtype names, shapes,
metadata, bucket recomputed from the name) and its values checked against the cache after the per-arch
convention; refusals; re-runs; the musubi bucket rule; the CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open

from cachebuild.cli import cli
from cachebuild.config import BucketConfig, BucketRule, DType, LatentsMode, TextencConfig
from cachebuild.consumers.export.musubi import export_musubi
from cachebuild.consumers.reader import open_cache
from cachebuild.errors import ConfigError
from cachebuild.images.musubi_buckets import musubi_bucket, musubi_buckets
from cachebuild.jobs.latents import build_latents
from cachebuild.jobs.textenc import build_textenc
from cachebuild.testing import make_tiny_flux2_vae, make_tiny_qwen_vae, make_tiny_text_pipeline, make_tiny_vae
from tests.conftest import write_image
from tests.test_pipeline import make_cfg

MUSUBI = BucketConfig(resolution=(64, 64), rule=BucketRule.MUSUBI)
SIZES = {"a": (80, 48), "b": (48, 80), "c": (64, 64), "d": (100, 60), "sub/e": (70, 70), "f_x": (45, 75)}
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # torch names musubi's remove_dtype_suffix knows (among others)


def make_dataset(root: Path) -> Path:
    for i, (key, size) in enumerate(SIZES.items()):
        write_image(root / f"{key}.png", size, seed=i)
        (root / f"{key}.txt").write_text(f"caption number {i}", encoding="utf-8")
    img = Image.new("RGB", (80, 48), (200, 30, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # shown rotated: musubi reads it unrotated
    img.save(root / "rotated.jpg", exif=exif)
    (root / "rotated.txt").write_text("rotated", encoding="utf-8")
    write_image(root / "sub" / "a.png", (64, 64), seed=9)  # same stem as a.png: one flat musubi folder
    (root / "sub" / "a.txt").write_text("twin", encoding="utf-8")
    return root


def build(root: Path, vae: Path, buckets=MUSUBI, text: Path | None = None) -> Path:
    ds = make_dataset(root / "ds") if not (root / "ds").exists() else root / "ds"
    out = root / "cache"
    build_latents(make_cfg(ds, out, vae, buckets=buckets, latents=LatentsMode.MEAN))
    if text is not None:
        build_textenc(TextencConfig(ds, out, model=str(text), device="cpu", dtype=DType.FP32, dtype_out=DType.FP32))
    return out


@pytest.fixture(scope="module")
def zimage(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zi")
    vae = make_tiny_vae(root / "vae", latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    return build(root, vae, text=make_tiny_text_pipeline(root / "pipe", "z-image"))


def musubi_load(folder: Path, arch: str, resolution=(64, 64), no_upscale=False) -> dict[tuple, list[dict]]:
    """musubi-tuner's ImageDataset.prepare_for_training and BucketBatchManager.__getitem__, restated: glob the
    latent files, parse the size from the name, pair the _te file, recompute the bucket (split by the control
    latents' keys without their dtype, where there are some), collate by role."""
    buckets: dict[tuple, list[dict]] = {}
    for path in sorted(folder.glob(f"*_{arch}.safetensors")):
        tokens = path.name.split("_")
        width, height = map(int, tokens[-2].split("x"))
        item_key = "_".join(tokens[:-2])
        te = folder / f"{item_key}_{arch}_te.safetensors"
        bucket = musubi_bucket((width, height), resolution, no_upscale)
        batch: dict = {"item_key": item_key, "size": (width, height), "meta": {}}
        for file in (path, te) if te.exists() else (path,):
            with safe_open(str(file), framework="pt") as f:
                batch["meta"][file.name] = f.metadata()
                for key in f.keys():  # noqa: SIM118
                    content = key.replace("varlen_", "", 1) if key.startswith("varlen_") else key
                    if not content.endswith("_mask"):
                        dtype = next(d for d in DTYPE_NAMES if content.endswith("_" + d))  # a torch dtype name
                        content = content[: -len(dtype) - 1]
                        if content.startswith("latents_"):
                            content = content.rsplit("_", 1)[0]
                    batch[content] = f.get_tensor(key)
                    batch[content + ":key"] = key
        controls = sorted(batch[k].rsplit("_", 1)[0] for k in batch if k.endswith(":key") and "_control" in k)
        buckets.setdefault((*bucket, *controls), []).append(batch)
    for items in buckets.values():  # musubi stacks a bucket's latents (and controls): their shapes must agree
        for role in [r for r in items[0] if r.startswith("latents") and ":" not in r]:
            torch.stack([it[role] for it in items])
    return buckets


def items_of(buckets) -> dict[str, dict]:
    return {it["item_key"]: it for items in buckets.values() for it in items}


def test_zi_latents_and_text_load_by_musubi_rules(zimage, tmp_path):
    summary = export_musubi(zimage, tmp_path, arch="zi")
    refused = {s["key"]: s["reason"] for s in summary.skipped}
    assert "EXIF" in refused.pop("rotated") and "stem" in refused.pop("sub/a") and not refused
    reader, text = open_cache(zimage, text=False), open_cache(zimage)
    loaded = items_of(musubi_load(tmp_path, "zi"))
    assert sorted(loaded) == ["a", "b", "c", "d", "e", "f_x"]  # stems; underscores survive the name parsing
    assert summary.written == 2 * len(loaded) and not summary.conflicts
    keys = {os.path.basename(k): k for k in reader if k not in ("rotated", "sub/a")}
    for stem, item in loaded.items():
        key = keys[stem]
        info = reader.info(key)
        assert item["size"] == tuple(info["original_size"])
        bw, bh = info["bucket"]
        stored = reader.tensors(key)["latents"]  # raw, (16, h, w)
        assert item["latents:key"] == f"latents_1x{bh // 2}x{bw // 2}_float32"
        assert item["latents"].dtype == torch.float32 and torch.equal(item["latents"], stored.float())
        want = text.pipeline_inputs(key)["prompt_embeds"]  # (T, D): the real tokens
        assert item["llm_embed:key"] == f"varlen_llm_embed_{str(want.dtype).split('.')[-1]}"
        assert torch.equal(item["llm_embed"], want)
        w, h = info["original_size"]
        lat_meta = item["meta"][f"{stem}_{w:04d}x{h:04d}_zi.safetensors"]
        assert lat_meta == {"architecture": "z_image", "width": str(w), "height": str(h), "format_version": "1.0.1"}
        te_meta = item["meta"][f"{stem}_zi_te.safetensors"]
        assert te_meta == {"architecture": "z_image", "caption1": text.caption(key), "format_version": "1.0.1"}
        assert te_meta["caption1"].startswith("caption number")


def test_rerun_skips_identical_files_and_refuses_differing_ones(zimage, tmp_path):
    first = export_musubi(zimage, tmp_path, arch="zi")
    again = export_musubi(zimage, tmp_path, arch="zi")
    assert again.written == 0 and again.unchanged == first.written and not again.conflicts
    victim = next(tmp_path.glob("c_*_zi.safetensors"))
    victim.write_bytes(b"not this")
    refused = export_musubi(zimage, tmp_path, arch="zi")
    assert refused.conflicts == [victim.name] and victim.read_bytes() == b"not this"
    assert export_musubi(zimage, tmp_path, arch="zi", overwrite=True).written == 1


def test_qi_and_f2d_latents_follow_musubi_conventions(tmp_path):
    for arch, make in (("qi", make_tiny_qwen_vae), ("f2d", make_tiny_flux2_vae)):
        root = tmp_path / arch
        cache = build(root, make(root / "vae"))
        out = root / "export"
        if arch == "f2d":  # dev or klein: only the text encoder tells, so it must be named
            with pytest.raises(ConfigError, match="pass --arch"):
                export_musubi(cache, out)
        summary = export_musubi(cache, out, arch="f2d" if arch == "f2d" else None)  # qi: from the VAE
        assert summary.family == arch
        assert any("no text outputs" in w for w in summary.warnings) and not list(out.glob("*_te.safetensors"))
        reader = open_cache(cache)
        vae = reader.fingerprint["vae"]
        loaded = items_of(musubi_load(out, arch))
        assert len(loaded) == 6
        for stem, item in loaded.items():
            key = "sub/e" if stem == "e" else stem
            bw, bh = reader.info(key)["bucket"]
            z = reader.tensors(key)["latents"].float()  # raw (C, h, w), h = bh / 2 for the tiny VAEs
            if arch == "qi":  # (z - mean) / std per channel, (C, 1, h, w), bfloat16
                mean = torch.tensor(vae["latents_mean"]).view(-1, 1, 1)
                std = torch.tensor(vae["latents_std"]).view(-1, 1, 1)
                want = ((z - mean) * (1 / std))[:, None].to(torch.bfloat16)
                assert item["latents:key"] == f"latents_1x{bh // 2}x{bw // 2}_bfloat16"
            else:  # musubi's rearrange "c (i pi) (j pj) -> (c pi pj) i j", then the batch norm's running stats
                c, h, w = z.shape
                p = z.reshape(c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3).reshape(4 * c, h // 2, w // 2)
                mean = torch.tensor(vae["bn_running_mean"]).view(-1, 1, 1)
                var = torch.tensor(vae["bn_running_var"]).view(-1, 1, 1)
                want = (p - mean) / torch.sqrt(var + vae["batch_norm_eps"])
                assert item["latents:key"] == f"latents_{bh // 4}x{bw // 4}_float32"
            assert item["latents"].shape == want.shape
            torch.testing.assert_close(item["latents"], want, rtol=1e-6, atol=1e-6)


def test_a_kohya_bucket_cache_is_refused_item_by_item_with_the_reason(tmp_path):
    vae = make_tiny_vae(tmp_path / "vae", latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    kohya = BucketConfig(resolution=(64, 64), min_reso=32, max_reso=128, steps=32)
    cache = build(tmp_path, vae, buckets=kohya)
    summary = export_musubi(cache, tmp_path / "out", arch="zi")
    reasons = {s["key"]: s["reason"] for s in summary.skipped}
    assert "musubi recomputes 80x48" in reasons["a"] and "--buckets musubi" in reasons["a"]
    assert "c" not in reasons  # 64x64 is the same bucket under both rules: exported
    assert any("kohya's bucket rule" in w for w in summary.warnings)


def test_wrong_arch_and_missing_images_are_refused(zimage, tmp_path):
    with pytest.raises(ConfigError, match="AutoencoderKLQwenImage"):
        export_musubi(zimage, tmp_path, arch="qi")
    with pytest.raises(ConfigError, match="--arch must be one of"):
        export_musubi(zimage, tmp_path, arch="fp")  # FramePack: not exported
    with pytest.raises(ConfigError, match="AutoencoderKLWan"):
        export_musubi(zimage, tmp_path, arch="wan")
    with pytest.raises(ConfigError, match="--images"):
        export_musubi(zimage, tmp_path, arch="zi", images=tmp_path / "nope")


def test_musubi_bucket_rule_equals_musubi_tuner():
    """Values printed by musubi-tuner v0.3.4's own BucketSelector (get_bucket_resolution)."""
    sizes = [(1200, 800), (4000, 3000), (3024, 4032), (500, 2000), (1920, 1080), (700, 500)]
    expected = {
        ((1024, 1024), False): [(1248, 832), (1184, 880), (880, 1184), (512, 2048), (1360, 768), (1200, 864)],
        ((1328, 1328), False): [(1616, 1088), (1520, 1152), (1152, 1520), (656, 2688), (1776, 992), (1568, 1120)],
        ((960, 544), False): [(880, 592), (832, 624), (624, 832), (352, 1472), (960, 544), (848, 608)],
        ((1024, 1024), True): [(1200, 800), (1184, 880), (880, 1184), (496, 2000), (1360, 768), (688, 496)],
    }
    for (res, no_upscale), want in expected.items():
        assert [musubi_bucket(s, res, no_upscale) for s in sizes] == want
    assert musubi_buckets((64, 64)) == [(32, 128), (48, 80), (64, 64), (80, 48), (128, 32)]


def test_latents_buckets_musubi_plans_musubi_buckets(zimage):
    reader = open_cache(zimage, text=False)
    assert reader.fingerprint["buckets"] == {"rule": "musubi", "resolution": [64, 64], "no_upscale": False}
    for key in reader:
        assert tuple(reader.info(key)["bucket"]) == musubi_bucket(tuple(reader.info(key)["original_size"]), (64, 64))


def test_cli_musubi_export_and_bucket_option(zimage, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["export", str(zimage), "--format", "musubi", "--to", str(tmp_path), "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert "wrote 12" in ok.output and "refused 2 items" in ok.output and "EXIF" in ok.output
    again = runner.invoke(cli, ["export", str(zimage), "--format", "musubi", "--to", str(tmp_path), "--quiet"])
    assert "skipped 12 identical" in again.output
    assert "--buckets" in runner.invoke(cli, ["latents", "--help"]).output
    shutil.rmtree(tmp_path)


class _Text:
    """The reader surface the musubi text export reads: pipeline_inputs by the pipeline's names."""

    def __init__(self, family, inputs):
        self.text_fingerprint, self.inputs = {"family": family}, inputs

    def pipeline_inputs(self, key, family=None):
        assert family == self.text_fingerprint["family"]
        return self.inputs


def test_flux2_text_by_pipeline_names_and_widths():
    """(tests/test_export_musubi_families.py exports real Qwen-Image and Flux.2 text caches end to end.)"""
    from cachebuild.consumers.export.musubi import ARCHS, musubi_text_tensors

    ctx = torch.randn(512, 8, dtype=torch.bfloat16)
    f2 = musubi_text_tensors(_Text("flux2", {"prompt_embeds": ctx}), "k", ARCHS["f2d"])
    assert list(f2) == ["ctx_vec_bfloat16"] and torch.equal(f2["ctx_vec_bfloat16"], ctx)  # all 512 positions
    with pytest.raises(ConfigError, match="f2k4b"):  # a klein-4B-wide output under --arch f2d
        musubi_text_tensors(_Text("flux2", {"prompt_embeds": torch.zeros(512, 7680)}), "k", ARCHS["f2d"])
    with pytest.raises(ConfigError, match="no prompt_embeds"):
        musubi_text_tensors(_Text("flux2", {"latents": ctx}), "k", ARCHS["f2d"])
