"""kohya export of Lumina 2 text: ``<stem>_lumina_te.npz`` built through the CLI, loaded by sd-scripts' rules
(``library/strategy_lumina.py``: the keys ``is_disk_cached_outputs_expected`` requires, ``load_outputs_npz``'s
arrays, ``LuminaTokenizeStrategy``'s ids and mask) and compared with the cache and with sd-scripts' encoding."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cachebuild.cli import cli
from cachebuild.consumers.export.kohya import export_kohya
from cachebuild.consumers.export.kohya_lumina import sd_scripts_gap
from cachebuild.consumers.reader import open_cache
from cachebuild.errors import ConfigError
from cachebuild.families import lumina2
from cachebuild.testing import make_tiny_text_pipeline, make_tiny_vae
from tests.conftest import write_image

CAPTIONS = {"a": "a red cat on a chair", "b": "two dogs", "sub/c": "a photo of a house " * 3}
SIZES = {"a": (80, 48), "b": (64, 64), "sub/c": (48, 80)}
COMMON = ["--device", "cpu", "--dtype", "fp32", "--dtype-out", "fp32", "--quiet"]
BUCKETS = ["--resolution", "64", "--min-bucket-reso", "32", "--max-bucket-reso", "128", "--bucket-reso-steps", "32"]
SD_SCRIPTS_KEYS = {"hidden_state", "attention_mask", "input_ids"}  # is_disk_cached_outputs_expected


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(dataset, cache, pipeline) with Flux-type latents and Lumina 2 text, built through the CLI."""
    root = tmp_path_factory.mktemp("lumina")
    ds = root / "ds"
    for i, (key, size) in enumerate(SIZES.items()):
        write_image(ds / f"{key}.png", size, seed=i)
        (ds / f"{key}.txt").write_text(CAPTIONS[key], encoding="utf-8")
    vae = make_tiny_vae(root / "vae", latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    pipe = make_tiny_text_pipeline(root / "pipe", "lumina2")
    out, runner = root / "cache", CliRunner()
    for args in (["latents", str(ds), "--vae", str(vae), "--latents", "mean", "--workers", "0", *BUCKETS],
                 ["textenc", str(ds), "--model", str(pipe)]):  # fmt: skip
        result = runner.invoke(cli, [*args, "--out", str(out), *COMMON])
        assert result.exit_code == 0, result.output
    return ds, out, pipe


def export_cli(built, ds: Path, *extra: str):
    return CliRunner().invoke(cli, ["export", str(built[1]), "--to", str(ds), "--json", *extra])


def sd_scripts_tokenize(tokenizer, system_prompt: str, caption: str, max_length: int = 256):
    """LuminaTokenizeStrategy.tokenize, as sd-scripts writes it."""
    prompt = f"{system_prompt} <Prompt Start> " if system_prompt else ""
    tokenizer.padding_side = "right"
    enc = tokenizer([prompt + caption], max_length=max_length, return_tensors="pt", padding="max_length",
                    truncation=True, pad_to_multiple_of=8)  # fmt: skip
    return enc.input_ids[0], enc.attention_mask[0]


def test_lumina_text_files_load_by_sd_scripts_rules(built, tmp_path):
    from transformers import AutoTokenizer, Gemma2Model

    ds = shutil.copytree(built[0], tmp_path / "ds")
    result = export_cli(built, ds, "--model", str(built[2]))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["family"] == "lumina" and summary["written"] == 2 * len(SIZES) and not summary["skipped"]
    system_prompt = lumina2.prompt_prefix()[: -len(" <Prompt Start> ")]
    assert any(f"--system_prompt {system_prompt!r}" in w for w in summary["warnings"])  # sd-scripts' default is ""
    tokenizer = AutoTokenizer.from_pretrained(built[2] / "tokenizer")
    gemma = Gemma2Model.from_pretrained(built[2] / "text_encoder").eval()
    text = open_cache(built[1])
    for key in text:
        path = ds / f"{os.path.splitext(text.source_paths()[key])[0]}_lumina_te.npz"  # get_outputs_npz_path
        with np.load(path) as npz:
            assert set(npz.files) == SD_SCRIPTS_KEYS  # and nothing else
            hidden, mask, ids = npz["hidden_state"], npz["attention_mask"], npz["input_ids"]  # load_outputs_npz
        assert hidden.dtype == np.float32 and mask.dtype == np.int64 and ids.dtype == np.int64
        assert hidden.shape == (256, 32) and mask.shape == ids.shape == (256,)
        stored = text.text_tensors(key)
        np.testing.assert_array_equal(hidden, stored["gemma2"].float().numpy())  # zeros past the real tokens
        np.testing.assert_array_equal(mask, stored["gemma2_mask"].numpy())
        assert mask.sum() == text.token_counts(key)["gemma2"]
        assert (mask == (ids != tokenizer.pad_token_id)).all() and ids[0] == tokenizer.bos_token_id
        caption = CAPTIONS[key].splitlines()[0].strip()  # train_util's read_caption: the first line, stripped
        want_ids, want_mask = sd_scripts_tokenize(tokenizer, system_prompt, caption)
        np.testing.assert_array_equal(ids, want_ids.numpy())  # sd-scripts' own tokens with that --system_prompt
        np.testing.assert_array_equal(mask, want_mask.numpy())
        with torch.no_grad():  # LuminaTextEncodingStrategy.encode_tokens: masked, hidden_states[-2]
            out = gemma(input_ids=want_ids[None], attention_mask=want_mask[None], output_hidden_states=True)
        keep = mask.astype(bool)  # the rows sd-scripts' NextDiT reads
        torch.testing.assert_close(torch.from_numpy(hidden[keep]), out.hidden_states[-2][0][keep], rtol=1e-4, atol=1e-5)
    again = json.loads(export_cli(built, ds, "--model", str(built[2])).stdout)
    assert again["written"] == 0 and again["unchanged"] == 2 * len(SIZES)


def test_without_the_model_the_latents_are_written_and_the_text_skipped_with_the_reason(built, tmp_path):
    ds = shutil.copytree(built[0], tmp_path / "ds")
    result = export_cli(built, ds)
    assert result.exit_code == 0 and "pass --model" in result.output, result.output
    assert list(ds.rglob("*_lumina.npz")) and not list(ds.rglob("*_lumina_te.npz"))


def test_lumina_text_refuses_another_tokenizer(built, tmp_path):
    ds = shutil.copytree(built[0], tmp_path / "ds")
    other = shutil.copytree(built[2], tmp_path / "pipe")
    config = other / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text().replace("{", '{"model_max_length_note": 1,', 1))
    result = export_cli(built, ds, "--model", str(other))
    assert result.exit_code == 2 and "another tokenizer" in result.output and "Traceback" not in result.output
    with pytest.raises(ConfigError, match="another tokenizer"):
        export_kohya(built[1], ds, model=str(other))


def test_lumina_text_refuses_a_changed_caption_item(built, tmp_path, monkeypatch):
    from cachebuild.consumers.reader import CacheReader

    ds = shutil.copytree(built[0], tmp_path / "ds")
    original = CacheReader.caption
    monkeypatch.setattr(CacheReader, "caption", lambda self, key: original(self, key) + (" and more" * (key == "b")))
    summary = export_kohya(built[1], ds, model=str(built[2]))
    assert [s["key"] for s in summary.skipped] == ["b"] and "tokenizes to" in summary.skipped[0]["reason"]
    assert summary.written == 2 * len(SIZES) - 1 and not (ds / "b_lumina_te.npz").exists()


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"layer": -1}, "hidden_states[-2]"),
        ({"attention_mask": False}, "without the mask"),
        ({"max_length": 300}, "multiple of 8"),
        ({"prefix": "a system prompt"}, "--system_prompt can give"),
    ],
)
def test_encodings_sd_scripts_cannot_give_are_named(change, reason):
    encoder = {"class": "Gemma2Model", "layer": -2, "attention_mask": True, "padding_side": "right",
               "max_length": 256, "prefix": lumina2.prompt_prefix()}  # fmt: skip
    assert sd_scripts_gap(encoder) is None
    assert reason in sd_scripts_gap(encoder | change)
