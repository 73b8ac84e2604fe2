"""Text-encoder caches: per-family parity with direct transformers calls, dedup, trimming, resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cachebuild.cache.manifest import Manifest
from cachebuild.config import DType, TextencConfig, TextFamily
from cachebuild.errors import ConfigError, FingerprintMismatch
from cachebuild.families import text as text_families
from cachebuild.families.text import pad_tokens
from cachebuild.jobs import textenc
from cachebuild.jobs.textenc import build_textenc
from cachebuild.testing import make_tiny_clip, make_tiny_text_pipeline, make_tiny_tokenizer
from tests.conftest import done_count, kill_while_running

CAPTIONS = {
    "img000": "a photo of a cat",
    "img001": "a photo of a cat",  # the same text: stored once
    "sub/img002": "red car near the river at sunset in the old mountain house",
    "img003": "portrait of a young woman sitting under a tree",
    "img004": "",
}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text-pipelines")
    return {f: make_tiny_text_pipeline(root / f, f) for f in ("sd15", "sd2", "sdxl", "sd3", "flux")}


@pytest.fixture
def captions(tmp_path) -> Path:
    root = tmp_path / "captions"
    for key, text in CAPTIONS.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / f"{key}.txt").write_text(text + "\n", encoding="utf-8")
    return root


def cfg_for(source: Path, out: Path, model: Path, **kw) -> TextencConfig:
    base = dict(model=str(model), device="cpu", dtype=DType.FP32, dtype_out=DType.FP32, batch_size=2)
    if model.name == "sd2":  # the tiny OpenCLIP-H is not 1024 wide, so name the family (others are detected)
        base["family"] = TextFamily.SD2
    return TextencConfig(source=source, out=out, **(base | kw))


def read_text_cache(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{item key: {tensor name: tensor}} following each item's text id to its shard."""
    with Manifest.open(out, create=False) as m:
        rows = m.items("textenc", "done")
    result = {}
    for row in rows:
        tid = row.info["text_id"]
        with safe_open(str(out / "textenc" / row.shard), framework="pt") as f:
            names = [n for n in f.keys() if n.startswith(tid + "/")]  # noqa: SIM118
            result[row.key] = {n.split("/", 1)[1]: f.get_tensor(n) for n in names}
    return result


def direct(folder: Path, cls: str, text: str, max_length: int, mask: bool = False, output: str = "last"):
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder.parent / folder.name.replace("text_encoder", "tokenizer"))
    enc = tok([text], padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    model = getattr(transformers, cls).from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(enc["input_ids"], attention_mask=enc["attention_mask"] if mask else None, output_hidden_states=True)
    return out, enc["attention_mask"][0], model


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd15_last_or_penultimate_layer(tmp_path, captions, pipelines, clip_skip):
    build_textenc(cfg_for(captions, tmp_path / "c", pipelines["sd15"], clip_skip=clip_skip))
    got = read_text_cache(tmp_path / "c")["img003"]
    out, _, model = direct(pipelines["sd15"] / "text_encoder", "CLIPTextModel", CAPTIONS["img003"], 77)
    expected = out.last_hidden_state[0]
    if clip_skip == 2:  # penultimate layer through the final layer norm, as trainers feed SD1.5
        norm = getattr(model, "text_model", model).final_layer_norm  # moved in transformers 5
        expected = norm(out.hidden_states[-2])[0]
    assert set(got) == {"clip_l"} and got["clip_l"].shape == (77, 32)
    torch.testing.assert_close(got["clip_l"], expected, rtol=1e-5, atol=1e-5)


def test_sd2_uses_the_diffusers_encoders_last_layer(tmp_path, captions, pipelines):
    build_textenc(cfg_for(captions, tmp_path / "c", pipelines["sd2"]))
    got = read_text_cache(tmp_path / "c")["img000"]
    out, _, _ = direct(pipelines["sd2"] / "text_encoder", "CLIPTextModel", CAPTIONS["img000"], 77)
    torch.testing.assert_close(got["clip_h"], out.last_hidden_state[0], rtol=1e-5, atol=1e-5)


def test_sdxl_penultimate_layers_and_pooled_projection(tmp_path, captions, pipelines):
    build_textenc(cfg_for(captions, tmp_path / "c", pipelines["sdxl"]))
    got = read_text_cache(tmp_path / "c")["sub/img002"]
    text = CAPTIONS["sub/img002"]
    out_l, _, _ = direct(pipelines["sdxl"] / "text_encoder", "CLIPTextModel", text, 77)
    out_g, _, _ = direct(pipelines["sdxl"] / "text_encoder_2", "CLIPTextModelWithProjection", text, 77)
    assert set(got) == {"clip_l", "clip_g", "clip_g_pooled"}
    torch.testing.assert_close(got["clip_l"], out_l.hidden_states[-2][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["clip_g"], out_g.hidden_states[-2][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["clip_g_pooled"], out_g.text_embeds[0], rtol=1e-5, atol=1e-5)


def test_sd3_t5_by_default_unmasked_and_whole(tmp_path, captions, pipelines):
    build_textenc(cfg_for(captions, tmp_path / "c", pipelines["sd3"], t5_max_length=32))
    got = read_text_cache(tmp_path / "c")["img003"]
    out_t5, _, _ = direct(pipelines["sd3"] / "text_encoder_3", "T5EncoderModel", CAPTIONS["img003"], 32, mask=False)
    assert got["t5"].shape == (32, 32)  # every position, as the pipeline runs it
    torch.testing.assert_close(got["t5"], out_t5.last_hidden_state[0], rtol=1e-5, atol=1e-5)


def test_sd3_clips_and_trimmed_t5_with_t5_mask(tmp_path, captions, pipelines):
    build_textenc(cfg_for(captions, tmp_path / "c", pipelines["sd3"], t5_max_length=32, t5_mask=True))
    got = read_text_cache(tmp_path / "c")["img003"]
    text = CAPTIONS["img003"]
    assert set(got) == {"clip_l", "clip_l_pooled", "clip_g", "clip_g_pooled", "t5"}
    out_l, _, _ = direct(pipelines["sd3"] / "text_encoder", "CLIPTextModelWithProjection", text, 77)
    torch.testing.assert_close(got["clip_l"], out_l.hidden_states[-2][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["clip_l_pooled"], out_l.text_embeds[0], rtol=1e-5, atol=1e-5)
    out_t5, mask, _ = direct(pipelines["sd3"] / "text_encoder_3", "T5EncoderModel", text, 32, mask=True)
    n = int(mask.sum())
    assert got["t5"].shape == (n, 32)  # trimmed to the real tokens (words + EOS)
    torch.testing.assert_close(got["t5"], out_t5.last_hidden_state[0, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_length", [16, 64])
def test_flux_pooled_clip_and_t5_padded_back_to_any_length(tmp_path, captions, pipelines, max_length):
    build_textenc(cfg_for(captions, tmp_path / "c", pipelines["flux"], t5_max_length=64, t5_mask=True))
    got = read_text_cache(tmp_path / "c")["sub/img002"]
    text = CAPTIONS["sub/img002"]
    out_l, _, _ = direct(pipelines["flux"] / "text_encoder", "CLIPTextModel", text, 77)
    assert set(got) == {"clip_l_pooled", "t5"}
    torch.testing.assert_close(got["clip_l_pooled"], out_l.pooler_output[0], rtol=1e-5, atol=1e-5)
    padded, mask = pad_tokens(got["t5"], max_length)
    out_t5, direct_mask, _ = direct(pipelines["flux"] / "text_encoder_2", "T5EncoderModel", text, max_length, mask=True)
    assert torch.equal(mask, direct_mask)
    keep = mask.bool()
    torch.testing.assert_close(padded[keep], out_t5.last_hidden_state[0][keep], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(padded[~keep]) == 0


def test_identical_captions_are_stored_once(tmp_path, captions, pipelines):
    out = tmp_path / "c"
    summary = build_textenc(cfg_for(captions, out, pipelines["sdxl"]))
    assert summary.done == 5
    with Manifest.open(out, create=False) as m:
        assert m.distinct_done("textenc", "text_id") == 4
        rows = {r.key: r for r in m.items("textenc")}
    assert rows["img000"].info["text_id"] == rows["img001"].info["text_id"]
    with safe_open(str(out / "textenc" / rows["img000"].shard), framework="pt") as f:
        assert sum(1 for n in f.keys() if n.endswith("/clip_l")) == 4  # noqa: SIM118
    # a later caption with the same text points at the stored tensors without encoding
    (captions / "img009.txt").write_text("a photo of a cat")
    again = build_textenc(cfg_for(captions, out, pipelines["sdxl"]))
    assert again.encoded == 1 and again.shards_written == 0 and not again.model_loaded


def test_dreambooth_set_stores_one_embedding(tmp_path, pipelines):
    root = tmp_path / "db"
    root.mkdir()
    for i in range(50):
        (root / f"img{i:03d}.txt").write_text("a photo of the dog")
    build_textenc(cfg_for(root, tmp_path / "c", pipelines["flux"]))
    with Manifest.open(tmp_path / "c", create=False) as m:
        assert m.counts("textenc")["done"] == 50 and m.distinct_done("textenc", "text_id") == 1


def test_edited_caption_alone_is_reencoded_and_touching_changes_nothing(tmp_path, captions, pipelines):
    out = tmp_path / "c"
    build_textenc(cfg_for(captions, out, pipelines["sdxl"]))
    before = read_text_cache(out)
    (captions / "img003.txt").write_text("a photo of a big green tree")
    (captions / "img000.txt").write_text(CAPTIONS["img000"] + "\n")  # rewritten, same text
    summary = build_textenc(cfg_for(captions, out, pipelines["sdxl"]))
    assert (summary.changed, summary.encoded) == (1, 1)
    after = read_text_cache(out)
    assert not torch.equal(after["img003"]["clip_l"], before["img003"]["clip_l"])
    for key in set(before) - {"img003"}:
        assert torch.equal(after[key]["clip_l"], before[key]["clip_l"])
    rerun = build_textenc(cfg_for(captions, out, pipelines["sdxl"]))
    assert rerun.nothing_to_do and not rerun.model_loaded


def test_changed_encoder_settings_are_refused(tmp_path, captions, pipelines):
    out = tmp_path / "c"
    build_textenc(cfg_for(captions, out, pipelines["flux"], t5_max_length=64))
    with pytest.raises(FingerprintMismatch, match="max_length"):
        build_textenc(cfg_for(captions, out, pipelines["flux"], t5_max_length=128))


def test_zimage_chat_template_is_applied_and_fingerprinted_where_set(tmp_path, captions, pipelines):
    """Z-Image's captions go through the chat template (the real tokens counted with it); the fingerprint names
    the template's keywords, and a family without a template has no such key (older caches still match)."""
    zimage = make_tiny_text_pipeline(tmp_path / "z", "z-image")
    out = tmp_path / "c"
    build_textenc(cfg_for(captions, out, zimage))
    stored = read_text_cache(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zimage / "tokenizer")
    for key, text in CAPTIONS.items():
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        assert prompt.startswith("<|im_start|>user\n")
        assert stored[key]["qwen3"].shape == (len(tok(prompt).input_ids), 32)  # (T, D): template tokens included
    with Manifest.open(out, create=False) as m:
        zimage_print = m.fingerprint("textenc")["encoders"][0]
        _, flux_specs = text_families.resolve_encoders(cfg_for(captions, out, pipelines["flux"]), torch.device("cpu"))
        assert all("chat_template" not in s.fingerprint(m) for s in flux_specs)
    assert zimage_print["chat_template"] == {"add_generation_prompt": True, "enable_thinking": True}
    assert (zimage_print["class"], zimage_print["layer"], zimage_print["trim"]) == ("Qwen3Model", -2, True)


def test_stored_dtype_defaults_to_the_familys(tmp_path, captions, pipelines):
    """Without --dtype-out, an LLM encoder's hidden states (Z-Image's Qwen3) are stored in bf16 and CLIP/T5
    outputs in fp16, as before (so an existing cache's fingerprint still says fp16); --dtype-out wins."""
    zimage = make_tiny_text_pipeline(tmp_path / "z", "z-image")
    for model, out, want in ((zimage, tmp_path / "z-out", "bf16"), (pipelines["sdxl"], tmp_path / "x-out", "fp16")):
        build_textenc(cfg_for(captions, out, model, dtype_out=None))
        with Manifest.open(out, create=False) as m:
            assert m.fingerprint("textenc")["dtype_out"] == want
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[want]
        assert all(t.dtype == dtype for t in read_text_cache(out)["img000"].values())
    build_textenc(cfg_for(captions, tmp_path / "z-32", zimage, dtype_out=DType.FP32))
    assert read_text_cache(tmp_path / "z-32")["img000"]["qwen3"].dtype == torch.float32


def count_loads(monkeypatch) -> list[str]:
    """Every model transformers reads from disk in this process from now on (its folder's name), whoever asks."""
    import transformers

    loads: list[str] = []
    real = transformers.PreTrainedModel.from_pretrained.__func__

    def counted(cls, path, *args, **kwargs):
        loads.append(Path(path).name)
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(counted))
    return loads


def test_each_encoder_is_read_from_disk_once_however_many_chunks(tmp_path, pipelines, monkeypatch):
    """SD3's three encoders over 20 captions with the chunk budget scaled down as the default 2 GiB is to real
    widths (about 512 Flux captions of 4 MiB a chunk; here 2 captions of 26 KB): ten chunks, and still one read
    of each encoder's weights (once per chunk would be 30)."""
    root = tmp_path / "caps"
    root.mkdir()
    for i in range(20):
        (root / f"c{i:03d}.txt").write_text(" ".join(WORDS_FOR_CHUNKS[(i * k) % 10] for k in range(1, 3 + i % 7)))
    loads = count_loads(monkeypatch)
    cfg = cfg_for(root, tmp_path / "c", pipelines["sd3"], t5_max_length=32, chunk_mb=0.05)
    summary = build_textenc(cfg)
    stored = sum(t.numel() * t.element_size() for tensors in read_text_cache(tmp_path / "c").values()
                 for t in tensors.values())  # fmt: skip
    assert summary.done == 20 and stored > 9 * cfg.chunk_bytes  # ten chunks or more
    assert sorted(loads) == ["text_encoder", "text_encoder_2", "text_encoder_3"], loads
    assert summary.model_loads == 3


def test_a_current_keeper_keeps_the_encoders_between_runs(tmp_path, pipelines, monkeypatch):
    """cachebuild watch runs textenc again as captions arrive: under a current ModelKeeper the encoders are read
    once for both runs, and the second run reports no read of its own."""
    from cachebuild.keep import ModelKeeper, keeping

    root = tmp_path / "caps"
    root.mkdir()
    (root / "a.txt").write_text("a red car")
    loads = count_loads(monkeypatch)
    keeper = ModelKeeper(budget_bytes=2**30)
    cfg = cfg_for(root, tmp_path / "c", pipelines["sd3"], t5_max_length=32)
    with keeping(keeper):
        first = build_textenc(cfg)
        (root / "b.txt").write_text("a blue house by the river")
        second = build_textenc(cfg)
    assert (first.done, second.done) == (1, 2)
    assert (first.model_loads, second.model_loads) == (3, 0) and len(loads) == 3
    assert keeper.loads == 1 and keeper.held_bytes > 0 and keeper.release_all() == 1


WORDS_FOR_CHUNKS = ["cat", "dog", "red", "blue", "tree", "house", "car", "sky", "river", "night"]


def test_results_do_not_depend_on_the_caption_chunk(tmp_path, pipelines, monkeypatch):
    root = tmp_path / "caps"
    root.mkdir()
    words = ["cat", "dog", "red", "blue", "tree", "house", "car", "sky", "river", "night"]
    for i in range(20):  # lengths 1..9 words; every fourth caption repeats one from another chunk
        text = " ".join(words[(i * k) % len(words)] for k in range(1, 2 + i % 9)) if i % 4 else "a photo of a cat"
        (root / f"c{i:03d}.txt").write_text(text)
    (root / "c005.txt").write_bytes(b"\xff not utf-8")  # an unreadable caption inside a chunk
    whole = build_textenc(cfg_for(root, tmp_path / "whole", pipelines["flux"]))
    monkeypatch.setattr(textenc, "TEXT_CHUNK_CAPTIONS", 3)  # seven chunks
    seen = []
    chunked = build_textenc(cfg_for(root, tmp_path / "chunked", pipelines["flux"]), progress=seen.append)
    assert (chunked.done, chunked.failed) == (whole.done, whole.failed) == (19, 1)
    a, b = read_text_cache(tmp_path / "whole"), read_text_cache(tmp_path / "chunked")
    assert sorted(a) == sorted(b)
    for key in a:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)  # bit for bit
    with Manifest.open(tmp_path / "chunked", create=False) as m:
        distinct = m.distinct_done("textenc", "text_id")
    stored = 0
    for shard in (tmp_path / "chunked" / "textenc").glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            stored += sum(1 for n in f.keys() if n.endswith("/t5"))  # noqa: SIM118
    assert stored == distinct < 19  # the caption repeated across chunks is encoded and stored once
    assert seen[-1].processed == seen[-1].total == 20 * 2  # items times encoders (CLIP, T5)


def test_long_captions_are_truncated_and_counted(tmp_path, pipelines):
    root = tmp_path / "long"
    root.mkdir()
    (root / "long.txt").write_text(" ".join(["cat"] * 100))
    (root / "short.txt").write_text("a cat")
    summary = build_textenc(cfg_for(root, tmp_path / "c", pipelines["flux"], t5_max_length=32))
    assert summary.truncated == 1
    with Manifest.open(tmp_path / "c", create=False) as m:
        info = {r.key: r.info for r in m.items("textenc")}
    assert set(info["long"]["truncated"]) == {"clip_l", "t5"} and info["long"]["tokens"]["t5"] == 32
    assert info["short"]["truncated"] == []


def test_metadata_jsonl_and_bad_rows(tmp_path, pipelines):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "metadata.jsonl").write_text(
        '{"file_name": "a.jpg", "text": "a red car"}\n'
        '{"file_name": "sub/b.png", "text": "a blue car"}\n'
        "not json\n"
        '{"file_name": "c.jpg"}\n',
        encoding="utf-8",
    )
    summary = build_textenc(cfg_for(root, tmp_path / "c", pipelines["sd15"]))
    assert (summary.done, summary.failed) == (2, 2)
    with Manifest.open(tmp_path / "c", create=False) as m:
        rows = {r.key: r for r in m.items("textenc")}
    assert rows["a"].status == rows["sub/b"].status == "done"
    assert "'text'" in rows["c"].reason
    assert rows["metadata.jsonl:3"].reason.startswith("metadata.jsonl line 3 is not valid JSON")


def test_generic_encoder_with_layer_and_length(tmp_path, captions):
    enc = make_tiny_clip(tmp_path / "enc", projection=True)
    tok = make_tiny_tokenizer(tmp_path / "tok", "clip")
    cfg = TextencConfig(
        source=captions,
        out=tmp_path / "c",
        text_encoder=str(enc),
        tokenizer=str(tok),
        layer=-2,
        device="cpu",
        dtype=DType.FP32,
        dtype_out=DType.FP32,
    )
    build_textenc(cfg)
    got = read_text_cache(tmp_path / "c")["img000"]
    assert set(got) == {"te", "te_pooled"} and got["te"].shape == (77, 32)


def test_bad_arguments(tmp_path, captions, pipelines):
    with pytest.raises(ConfigError, match="--clip-skip"):
        cfg_for(captions, tmp_path / "c", pipelines["sd15"], clip_skip=3)
    with pytest.raises(ConfigError, match="--model"):
        TextencConfig(source=captions, out=tmp_path / "c")
    with pytest.raises(ConfigError, match="does not exist"):
        cfg_for(tmp_path / "missing", tmp_path / "c", pipelines["sd15"])


@pytest.mark.slow
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, pipelines):
    root = tmp_path / "caps"
    root.mkdir()
    words = ["cat", "dog", "red", "blue", "tree", "house", "car", "sky", "river", "night"]
    for i in range(100):
        text = " ".join(words[(i * k) % len(words)] for k in range(1, 2 + i % 9)) + f" {words[i % 10]}"
        (root / f"c{i:03d}.txt").write_text(text)
    args = [
        "-m",
        "cachebuild",
        "textenc",
        str(root),
        "--model",
        str(pipelines["flux"]),
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--batch-size",
        "4",
        "--shard-mb",
        "0.002",
        "--chunk-mb",
        "0.05",
        "--t5-max-length",
        "64",  # unmasked T5 is stored whole: a short max length keeps several captions in one chunk
        "-q",
    ]
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "whole")], check=True, capture_output=True)
    out = tmp_path / "killed"
    kills = kill_while_running([sys.executable, *args, "--out", str(out)], out, (8, 40))
    assert kills >= 1 and done_count(out) < 100
    subprocess.run([sys.executable, *args, "--out", str(out)], check=True, capture_output=True)
    whole, resumed = read_text_cache(tmp_path / "whole"), read_text_cache(out)
    assert sorted(whole) == sorted(resumed) and len(whole) == 100
    for key in whole:
        for name in whole[key]:
            assert torch.equal(whole[key][name], resumed[key][name]), (key, name)


def test_metadata_csv_with_another_caption_column(tmp_path, pipelines):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "metadata.csv").write_text('file_name,prompt\na.png,"a red car, at night"\nb.png,\n', encoding="utf-8")
    summary = build_textenc(cfg_for(root, tmp_path / "c", pipelines["sd15"], caption_column="prompt"))
    assert (summary.done, summary.failed) == (2, 0)  # an empty cell is the empty caption
    with Manifest.open(tmp_path / "c", read_only=True) as m:
        assert m.distinct_done("textenc", "text_id") == 2
