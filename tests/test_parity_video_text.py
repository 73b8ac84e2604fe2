"""Fidelity for the video families' text: ``open_cache(out).pipeline_inputs(key)`` after ``cachebuild textenc``
through the CLI equals what ``WanPipeline``, ``HunyuanVideo15Pipeline`` and ``LTX2Pipeline`` compute with their own
``encode_prompt`` (at ``__call__``'s lengths) on tiny random components; and a caption left uncleaned, a wrong
hidden layer, template, crop, mask, glyph rule, padding side or layer layout would each fail that comparison."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from cachebuild import open_cache
from cachebuild.cli import cli
from cachebuild.config import PRESET_FAMILY, PRESETS, DType, TextFamily
from cachebuild.families import hunyuanvideo15, wan
from cachebuild.families import text as text_families
from cachebuild.testing import make_tiny_text_pipeline, make_tiny_video_vae
from tests.conftest import write_image
from tests.test_parity_pipelines import INIT_SCALE, TOLERANCE, load, relative_difference, tokenizer

CAPTIONS = {
    "a": "a&amp;#32;cat near the ｄｏｇ",  # Wan's clean-up: an entity escaped twice, full-width letters (ftfy)
    "b": 'a cat holding a sign "open" and “closed”',  # quoted: ByT5's glyph text
    "c": "",  # empty: one space in HunyuanVideo 1.5's user turn, no ByT5 tokens
    "d": " ".join(["cat"] * 1100),  # past Wan's 512 tokens: truncated
}
KEYS = {"wan": "abcd", "hunyuanvideo-1.5": "abc", "ltx-2": "abc"}  # the other two run every caption at 1000 or
# 1024 positions and more, so they skip the long one
CPU = torch.device("cpu")
LATENT_INPUTS = ("latents", "cond_latents_concat", "mask_concat", "image_embeds", "latent_num_frames", "latent_height")
LATENT_INPUTS += ("latent_width", "frame_rate")  # a clip's: tests/test_parity_wan.py, test_parity_video_families.py


def reference_pipeline(family: str, root: Path, image_to_video: bool = False):
    """The family's pipeline (or its image-to-video one) with its text encoders and tokenizers (as model_index.json
    names them) only."""
    import diffusers

    if family == "wan":
        cls, extra = (diffusers.WanImageToVideoPipeline, {"image_encoder": None, "image_processor": None}) if (
            image_to_video) else (diffusers.WanPipeline, {})  # fmt: skip
        return cls(
            tokenizer=tokenizer(root / "tokenizer"), text_encoder=load(root / "text_encoder", "UMT5EncoderModel"),
            vae=None, scheduler=None, **extra,
        )  # fmt: skip
    if family == "ltx-2":
        cls = diffusers.LTX2ImageToVideoPipeline if image_to_video else diffusers.LTX2Pipeline
        return cls(
            scheduler=None, vae=None, audio_vae=None, connectors=None, transformer=None, vocoder=None,
            text_encoder=load(root / "text_encoder", "Gemma3ForConditionalGeneration"),
            tokenizer=tokenizer(root / "tokenizer"),
        )  # fmt: skip

    class NoVae(torch.nn.Module):  # __init__ reads the VAE's ratios and channels; text needs nothing else
        config = SimpleNamespace(latent_channels=32)
        temporal_compression_ratio, spatial_compression_ratio = 4, 16

    cls, extra = (diffusers.HunyuanVideo15ImageToVideoPipeline, {"image_encoder": None, "feature_extractor": None}) if (
        image_to_video) else (diffusers.HunyuanVideo15Pipeline, {})  # fmt: skip
    return cls(
        text_encoder=load(root / "text_encoder", "Qwen2_5_VLTextModel"), tokenizer=tokenizer(root / "tokenizer"),
        text_encoder_2=load(root / "text_encoder_2", "T5EncoderModel"), tokenizer_2=tokenizer(root / "tokenizer_2"),
        transformer=None, vae=NoVae(), scheduler=None, guider=None, **extra,
    )  # fmt: skip


def encode_prompt(family: str, pipe, text: str) -> dict[str, torch.Tensor]:
    """What the pipeline hands on for ``text`` at ``__call__``'s settings, batch dimension dropped."""
    with torch.no_grad():
        if family == "wan":  # __call__ passes max_sequence_length=512; encode_prompt's own default is 226
            embeds, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=512, device=CPU)
            return {"prompt_embeds": embeds[0]}
        if family == "ltx-2":
            embeds, mask, _, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False, device=CPU)
            return {"prompt_embeds": embeds[0], "prompt_attention_mask": mask[0]}
        embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(text, device=CPU)
    names = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")
    return {n: t[0] for n, t in zip(names, (embeds, mask, embeds_2, mask_2), strict=True)}


class Built:
    """One family's cache built through the CLI, its reference pipeline, and that pipeline's outputs per caption
    (each computed once)."""

    def __init__(self, family: str, folder: Path, out: Path):
        self.family, self.folder, self.out, self.keys = family, folder, out, KEYS[family]
        self.pipe, self._wanted = reference_pipeline(family, folder), {}

    def want(self, key: str) -> dict[str, torch.Tensor]:
        if key not in self._wanted:
            self._wanted[key] = encode_prompt(self.family, self.pipe, CAPTIONS[key])
        return self._wanted[key]


@pytest.fixture(scope="module", params=["wan", "hunyuanvideo-1.5", "ltx-2"])
def built(request, tmp_path_factory) -> Built:
    """The family's cache: text through the CLI, the latents a tiny VAE's (open_cache needs some)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    pipe = make_tiny_text_pipeline(root / "pipe", family, init_scale=INIT_SCALE)
    data, out = root / "data", root / "cache"
    for i, key in enumerate(KEYS[family]):
        write_image(data / f"{key}.png", (16, 16), seed=i)
        (data / f"{key}.txt").write_text(CAPTIONS[key], encoding="utf-8")
    common = ["--out", str(out), "--device", "cpu", "--dtype", "fp32", "--dtype-out", "fp32", "--quiet"]
    kind = {"wan": "wan2.1", "hunyuanvideo-1.5": "hunyuanvideo-1.5", "ltx-2": "ltx-2"}[family]
    vae = make_tiny_video_vae(root / "vae", kind)  # each family normalises its own VAE's latents
    latents = ["latents", str(data), "--vae", str(vae), "--latents", "mean", "--workers", "0"]
    latents += ["--resolution", "16", "--min-bucket-reso", "16", "--bucket-reso-steps", "16"]
    for args in (latents, ["textenc", str(data), "--model", str(pipe)]):
        result = CliRunner().invoke(cli, [*args, *common])
        assert result.exit_code == 0, result.output
    return Built(family, pipe, out)


def test_pipeline_inputs_equal_the_family_pipeline(built):
    family, out, cache = built.family, built.out, open_cache(built.out)
    for key in built.keys:
        got, want = cache.pipeline_inputs(key), built.want(key)
        got = {n: v for n, v in got.items() if n not in LATENT_INPUTS}
        assert set(got) <= set(inspect.signature(type(built.pipe).__call__).parameters)  # __call__'s own names
        assert sorted(got) == sorted(want), key
        for name in [n for n in want if "mask" in n]:  # the masks: same values and dtype
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), (key, name)
        for name in [n for n in want if "mask" not in n]:
            mask_name = {"prompt_embeds_2": "prompt_embeds_mask_2", "prompt_embeds": "prompt_embeds_mask"}[name]
            mask = want.get(mask_name, want.get("prompt_attention_mask"))
            keep = torch.ones(want[name].shape[0], dtype=torch.bool) if mask is None else mask.bool()
            assert got[name].shape == want[name].shape, (key, name)
            if keep.any():
                assert relative_difference(got[name][keep], want[name][keep]) <= TOLERANCE, (key, name)
            if family == "wan":  # the pipeline's own rows past the real tokens are exact zeros, as the reader's
                assert torch.equal(got[name], want[name]), key
            assert not got[name][~keep].abs().sum()  # where the pipeline's padding rows reach nothing: zeros
    result = CliRunner().invoke(cli, ["verify", str(out)])  # stored row counts and dtypes as verify expects
    assert result.exit_code == 0, result.output
    image_to_video = encode_prompt(family, reference_pipeline(family, built.folder, image_to_video=True), CAPTIONS["b"])
    for name, tensor in built.want("b").items():  # the image-to-video pipeline's text is the same
        assert torch.equal(image_to_video[name], tensor), name


@pytest.mark.parametrize("built", ["wan"], indirect=True)
def test_wan_cleaning_length_and_zeros_would_fail(built):
    out, pipe = built.out, built.pipe
    got = open_cache(out).pipeline_inputs("a")["prompt_embeds"]
    assert wan.prompt_clean(CAPTIONS["a"]) == "a cat near the dog"
    raw = pipe.tokenizer([CAPTIONS["a"]], padding="max_length", max_length=512, return_tensors="pt")
    with torch.no_grad():  # the caption as written, masked, and then unmasked over all 512 positions
        masked = pipe.text_encoder(raw.input_ids, raw.attention_mask).last_hidden_state[0]
        clean = pipe.tokenizer(
            [wan.prompt_clean(CAPTIONS["a"])], padding="max_length", max_length=512, return_tensors="pt"
        )
        unmasked = pipe.text_encoder(clean.input_ids).last_hidden_state[0]
    n = int(clean.attention_mask.sum())
    assert int(raw.attention_mask.sum()) != n or relative_difference(masked[:n], got[:n]) > 0.1  # uncleaned
    assert relative_difference(unmasked[:n], got[:n]) > 100 * TOLERANCE  # no mask
    assert unmasked[n:].abs().sum() > 0 and not got[n:].abs().sum()  # not cut and padded back with zeros
    with torch.no_grad():
        short, _ = pipe.encode_prompt(CAPTIONS["a"], do_classifier_free_guidance=False, device=CPU)
    assert short.shape[1] == 226 != got.shape[0]  # encode_prompt's own default length is not __call__'s


@pytest.mark.parametrize("built", ["hunyuanvideo-1.5"], indirect=True)
def test_hunyuanvideo15_layer_template_crop_and_glyphs_would_fail(built):
    out, pipe = built.out, built.pipe
    got = open_cache(out).pipeline_inputs("b")
    keep = got["prompt_embeds_mask"].bool()
    right = got["prompt_embeds"][keep]

    def rows(system: str, layer: int, crop: int) -> torch.Tensor:
        embeds, mask = pipe._get_mllm_prompt_embeds(  # 500: the caption's rows fit, and right padding with the
            pipe.text_encoder,
            pipe.tokenizer,
            CAPTIONS["b"],
            CPU,
            500,
            -layer - 1,
            system,
            crop,  # mask changes none
        )
        return embeds[0][mask[0].bool()]

    with torch.no_grad():
        assert relative_difference(rows(hunyuanvideo15.SYSTEM_MESSAGE, -3, 108), right) <= TOLERANCE  # the reference
        for layer in (-2, -4, -1):
            assert relative_difference(rows(hunyuanvideo15.SYSTEM_MESSAGE, layer, 108), right) > 100 * TOLERANCE
        bare = rows("", -3, 108)  # no system message: another template, other rows
        assert bare.shape != right.shape or relative_difference(bare, right) > 0.1
        assert rows(hunyuanvideo15.SYSTEM_MESSAGE, -3, 34).shape[0] == right.shape[0] + 74  # Qwen-Image's crop
        caption = pipe.tokenizer_2([CAPTIONS["b"]], padding="max_length", max_length=256, return_tensors="pt")
        whole = pipe.text_encoder_2(caption.input_ids, attention_mask=caption.attention_mask)[0][0]
    keep_2 = got["prompt_embeds_mask_2"].bool()
    assert int(keep_2.sum()) == len(hunyuanvideo15.glyph_text(CAPTIONS["b"]).encode()) + 1  # bytes and </s>
    whole = whole[caption.attention_mask[0].bool()]  # the whole caption instead of its quoted text
    assert whole.shape != got["prompt_embeds_2"][keep_2].shape
    empty = open_cache(out).pipeline_inputs("c")
    assert not empty["prompt_embeds_mask_2"].any() and not empty["prompt_embeds_2"].any()  # nothing quoted
    assert pipe.system_message == hunyuanvideo15.SYSTEM_MESSAGE


@pytest.mark.parametrize("built", ["ltx-2"], indirect=True)
def test_ltx2_layer_layout_would_fail(built):
    out, pipe = built.out, built.pipe
    got = open_cache(out).pipeline_inputs("b")
    keep = got["prompt_attention_mask"].bool()
    enc = pipe.tokenizer([CAPTIONS["b"]], padding="max_length", max_length=1024, return_tensors="pt")
    assert torch.equal(enc.attention_mask[0], got["prompt_attention_mask"])  # left: the real tokens last
    with torch.no_grad():
        states = pipe.text_encoder(**enc, output_hidden_states=True).hidden_states
    layout = {
        "stacked": torch.stack(states, dim=-1).flatten(2)[0],  # the pipeline's: per channel
        "concatenated": torch.cat(states, dim=-1)[0],  # per layer
        "layers only": torch.stack(states[1:], dim=-1).flatten(2)[0],  # without the embeddings
    }
    rows = {name: h[keep] for name, h in layout.items()}
    assert relative_difference(rows["stacked"], got["prompt_embeds"][keep]) <= TOLERANCE
    assert relative_difference(rows["concatenated"], got["prompt_embeds"][keep]) > 0.1
    assert rows["layers only"].shape[1] < got["prompt_embeds"].shape[1]


@pytest.mark.parametrize("built", ["ltx-2"], indirect=True)
def test_ltx2_connectors_read_the_cache_as_the_pipelines_rows(built):
    """LTX2TextConnectors on the cached rows (zeros at the left padding) give the pipeline's connector outputs:
    the padding rows, which the cache does not hold, reach nothing."""
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    out = built.out
    torch.manual_seed(0)
    heads = dict(num_attention_heads=2, attention_head_dim=16, num_layers=1)
    both = {f"{side}_connector_{k}": v for side in ("video", "audio") for k, v in heads.items()}
    connectors = LTX2TextConnectors(caption_channels=32, text_proj_in_factor=4, **both).eval()  # the tiny Gemma:
    # 32 wide, the embeddings and 3 layers
    cache = open_cache(out)
    for key in ("a", "b"):
        want, got = built.want(key), cache.pipeline_inputs(key)
        noisy = got["prompt_embeds"].clone()  # whatever sits in the padding rows
        noisy[~got["prompt_attention_mask"].bool()] = torch.randn_like(noisy[~got["prompt_attention_mask"].bool()])
        with torch.no_grad():
            a = connectors(want["prompt_embeds"][None], want["prompt_attention_mask"][None])
            b = connectors(got["prompt_embeds"][None], got["prompt_attention_mask"][None])
            c = connectors(noisy[None], got["prompt_attention_mask"][None])
        for x, y, z in zip(a, b, c, strict=True):
            assert relative_difference(y, x) <= TOLERANCE and relative_difference(z, x) <= TOLERANCE, key
    n = int(got["prompt_attention_mask"].sum())  # the rows padded on the right instead: the connectors, told the
    right = torch.zeros_like(got["prompt_embeds"])  # pipeline's left padding, normalise over the wrong rows
    right[:n] = got["prompt_embeds"][-n:]
    with torch.no_grad():
        wrong = connectors(right[None], got["prompt_attention_mask"].flip(0)[None])
    assert relative_difference(wrong[0][0, :n], a[0][0, :n]) > 0.1


def test_encoder_settings_dtype_and_fingerprint(built):
    from cachebuild.cache.manifest import Manifest

    family, out = built.family, built.out
    with Manifest.open(out, create=False, read_only=True) as m:
        fp = m.fingerprint("textenc")
    encoders = {e["name"]: e for e in fp["encoders"]}
    if family == "wan":
        assert fp["dtype_out"] == "fp32" and set(encoders) == {"umt5"}
        assert encoders["umt5"]["prepare"] == "cachebuild.families.wan.prompt_clean"
        assert encoders["umt5"]["max_length"] == 512 and encoders["umt5"]["trim"]
        assert text_families.stored_dtype(TextFamily.WAN).value == "fp16"
    elif family == "hunyuanvideo-1.5":
        assert encoders["qwen25vl"]["layer"] == -3 and encoders["qwen25vl"]["drop_rows"] == 108
        assert encoders["qwen25vl"]["system_message"] == hunyuanvideo15.SYSTEM_MESSAGE
        assert encoders["byt5"]["prepare"].endswith("hunyuanvideo15.glyph_text")
        assert text_families.stored_dtype(TextFamily.HUNYUANVIDEO15).value == "bf16"
    else:
        assert encoders["gemma3"]["padding_side"] == "left" and encoders["gemma3"]["per_channel_layers"]
        assert text_families.stored_dtype(TextFamily.LTX2).value == "bf16"
    if family != "ltx-2":  # a setting enters the fingerprint only where it is set
        assert not {"padding_side", "per_channel_layers"} & {k for e in encoders.values() for k in e}
    else:
        assert "prepare" not in encoders["gemma3"]


def test_presets_pipeline_classes_and_real_widths(tmp_path):
    """Each preset names its family; each pipeline class is detected; the stored width of an LTX-2 row at the real
    Gemma 3 12B config is 3840 x 49."""
    families = {"wan": "wan", "hunyuanvideo-1.5": "hunyuanvideo-1.5", "ltx-2": "ltx-2"}
    for preset in PRESETS:
        family = PRESET_FAMILY.get(preset, preset)
        if family in families:
            assert text_families._detect_family(preset, tmp_path) is TextFamily(family)
    assert sum(PRESET_FAMILY.get(p) == "wan" for p in PRESETS) == 7
    assert PRESETS["wan2.1-t2v-14b"] == "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    classes = {"WanPipeline": "wan", "WanImageToVideoPipeline": "wan", "LTX2Pipeline": "ltx-2"}
    classes |= {"HunyuanVideo15Pipeline": "hunyuanvideo-1.5", "HunyuanVideo15ImageToVideoPipeline": "hunyuanvideo-1.5"}
    classes |= {"LTX2ImageToVideoPipeline": "ltx-2"}
    for cls, family in classes.items():
        (tmp_path / "model_index.json").write_text(f'{{"_class_name": "{cls}"}}')
        assert text_families._detect_family(str(tmp_path), tmp_path) is TextFamily(family)
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text('{"text_config": {"hidden_size": 3840, "num_hidden_layers": 48}}')
    spec = text_families.EncoderSpec("gemma3", folder, folder, "x", -1, False, True, None, 1024, True, DType.BF16,
                                     per_channel_layers=True)  # fmt: skip
    assert text_families.output_dims(spec)[0] == 3840 * 49
