"""Tiny pipeline folders (model_index.json, text encoders, tokenizers, a VAE where the family needs one), and the
``python -m cachebuild.testing`` command that saves any of them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cachebuild.testing.encoders import (
    KLEIN_TINY_LAYERS,
    make_tiny_byt5,
    make_tiny_clip,
    make_tiny_gemma2,
    make_tiny_gemma3,
    make_tiny_llama,
    make_tiny_mistral3,
    make_tiny_qwen3,
    make_tiny_qwen25vl,
    make_tiny_qwen25vl_text,
    make_tiny_t5,
    make_tiny_umt5,
)
from cachebuild.testing.tokenizers import (
    make_tiny_gemma_tokenizer,
    make_tiny_llama_tokenizer,
    make_tiny_mistral_tokenizer,
    make_tiny_qwen_tokenizer,
    make_tiny_tokenizer,
)
from cachebuild.testing.vaes import (
    make_tiny_dc_vae,
    make_tiny_flux2_vae,
    make_tiny_qwen_vae,
    make_tiny_taesd,
    make_tiny_vae,
)

TEXT_PIPELINES = {
    # family: (pipeline class, [(encoder folder, tokenizer folder, kind)]); kinds: the keys of COMPONENT_CLASSES
    "sd15": ("StableDiffusionPipeline", [("text_encoder", "tokenizer", "clip")]),
    "sd2": ("StableDiffusionPipeline", [("text_encoder", "tokenizer", "clip_h")]),
    "sdxl": (
        "StableDiffusionXLPipeline",
        [("text_encoder", "tokenizer", "clip"), ("text_encoder_2", "tokenizer_2", "clip_proj")],
    ),
    "sd3": (
        "StableDiffusion3Pipeline",
        [
            ("text_encoder", "tokenizer", "clip_proj"),
            ("text_encoder_2", "tokenizer_2", "clip_proj"),
            ("text_encoder_3", "tokenizer_3", "t5"),
        ],
    ),
    "flux": ("FluxPipeline", [("text_encoder", "tokenizer", "clip"), ("text_encoder_2", "tokenizer_2", "t5")]),
    "chroma": ("ChromaPipeline", [("text_encoder", "tokenizer", "t5")]),
    "z-image": ("ZImagePipeline", [("text_encoder", "tokenizer", "qwen3")]),
    "hidream": (
        "HiDreamImagePipeline",
        [
            ("text_encoder", "tokenizer", "clip_long"),
            ("text_encoder_2", "tokenizer_2", "clip_long"),
            ("text_encoder_3", "tokenizer_3", "t5"),
            ("text_encoder_4", "tokenizer_4", "llama"),
        ],
    ),
    "flux2": ("Flux2Pipeline", [("text_encoder", "tokenizer", "mistral3")]),
    "flux2-klein": ("Flux2KleinPipeline", [("text_encoder", "tokenizer", "qwen3_klein")]),
    "qwen-image": ("QwenImagePipeline", [("text_encoder", "tokenizer", "qwen25vl")]),  # + vae/
    "lumina2": ("Lumina2Pipeline", [("text_encoder", "tokenizer", "gemma2")]),
    "sana": ("SanaPipeline", [("text_encoder", "tokenizer", "gemma2")]),
    "wan": ("WanPipeline", [("text_encoder", "tokenizer", "umt5")]),
    "hunyuanvideo-1.5": (
        "HunyuanVideo15Pipeline",
        [("text_encoder", "tokenizer", "qwen25vl_text"), ("text_encoder_2", "tokenizer_2", "byt5")],
    ),
    "ltx-2": ("LTX2Pipeline", [("text_encoder", "tokenizer", "gemma3")]),
    "flux-kontext": (  # + vae/: the condition images' VAE
        "FluxKontextPipeline",
        [("text_encoder", "tokenizer", "clip"), ("text_encoder_2", "tokenizer_2", "t5")],
    ),
}
COMPONENT_CLASSES = {  # kind -> the (encoder, tokenizer) classes a pipeline's model_index.json names for it
    "clip": ("CLIPTextModel", "CLIPTokenizer"),
    "clip_h": ("CLIPTextModel", "CLIPTokenizer"),
    "clip_proj": ("CLIPTextModelWithProjection", "CLIPTokenizer"),
    "t5": ("T5EncoderModel", "T5TokenizerFast"),
    "qwen3": ("Qwen3Model", "Qwen2Tokenizer"),
    "clip_long": ("CLIPTextModelWithProjection", "PreTrainedTokenizerFast"),  # 248 positions
    "llama": ("LlamaForCausalLM", "PreTrainedTokenizerFast"),
    "qwen25vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2Tokenizer"),
    # what the Flux.2 repositories name: a processor folder for Mistral3, Qwen3 as a causal LM
    "mistral3": ("Mistral3ForConditionalGeneration", "PixtralProcessor"),
    "qwen3_klein": ("Qwen3ForCausalLM", "Qwen2TokenizerFast"),
    "gemma2": ("Gemma2Model", "GemmaTokenizerFast"),
    "umt5": ("UMT5EncoderModel", "T5TokenizerFast"),  # what the Wan repositories name
    "qwen25vl_text": ("Qwen2_5_VLTextModel", "Qwen2Tokenizer"),
    "byt5": ("T5EncoderModel", "ByT5Tokenizer"),
    "gemma3": ("Gemma3ForConditionalGeneration", "GemmaTokenizerFast"),
}
ENCODER_MAKERS = {"umt5": make_tiny_umt5, "byt5": make_tiny_byt5}  # kind -> maker(encoder, tokenizer, seed, scale)
# of an encoder that saves its own tokenizer
LLM_MAKERS = {  # kind -> (its tokenizer's maker, its encoder's maker, the encoder maker's own options)
    "qwen3": (make_tiny_qwen_tokenizer, make_tiny_qwen3, {}),
    "qwen25vl": (make_tiny_qwen_tokenizer, make_tiny_qwen25vl, {}),
    "llama": (make_tiny_llama_tokenizer, make_tiny_llama, {}),
    # deeper than Flux2KleinPipeline's layer 27, so that none of 9/18/27 is the last
    "qwen3_klein": (make_tiny_qwen_tokenizer, make_tiny_qwen3, {"layers": KLEIN_TINY_LAYERS}),
    "gemma2": (make_tiny_gemma_tokenizer, make_tiny_gemma2, {}),
    "mistral3": (make_tiny_mistral_tokenizer, make_tiny_mistral3, {}),
    "qwen25vl_text": (make_tiny_qwen_tokenizer, make_tiny_qwen25vl_text, {}),
    "gemma3": (make_tiny_gemma_tokenizer, make_tiny_gemma3, {}),
}
PIPELINE_VAES = {  # family: its VAE, saved as vae/
    "qwen-image": ("AutoencoderKLQwenImage", make_tiny_qwen_vae),
    "flux-kontext": ("AutoencoderKL", lambda p: make_tiny_vae(p, 16, 0.3611, 0.1159)),  # Flux.1's factors
}


def make_tiny_text_pipeline(path: Path, family: str, init_scale: float = 1.0) -> Path:
    """A pipeline folder with the text encoders and tokenizers of ``family``, no UNet, and a VAE only for the
    families in :data:`PIPELINE_VAES`; ``init_scale`` as for :func:`make_tiny_clip` (parity tests raise it so
    that a wrong layer or mask shows)."""
    cls, parts = TEXT_PIPELINES[family]
    path.mkdir(parents=True, exist_ok=True)
    index: dict = {"_class_name": cls}
    for enc, tok, kind in parts:
        index[enc], index[tok] = (["transformers", c] for c in COMPONENT_CLASSES[kind])
    if family in PIPELINE_VAES:
        index["vae"] = ["diffusers", PIPELINE_VAES[family][0]]
        PIPELINE_VAES[family][1](path / "vae")
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    for i, (enc, tok, kind) in enumerate(parts):
        if kind in LLM_MAKERS:
            make_tokenizer, make_encoder, options = LLM_MAKERS[kind]
            make_tokenizer(path / tok)
            make_encoder(path / enc, path / tok, seed=i, init_scale=init_scale, **options)
        elif kind in ENCODER_MAKERS:
            ENCODER_MAKERS[kind](path / enc, path / tok, seed=i, init_scale=init_scale)
        elif kind == "t5":
            make_tiny_t5(path / enc, seed=i, init_scale=init_scale)
            make_tiny_tokenizer(path / tok, "t5")
        else:
            hidden = 40 if kind == "clip_h" or enc == "text_encoder_2" else 32
            make_tiny_clip(
                path / enc,
                projection=kind in ("clip_proj", "clip_long"),
                hidden_size=hidden,
                seed=i,
                init_scale=init_scale,
                positions=248 if kind == "clip_long" else 77,
            )
            make_tiny_tokenizer(path / tok, "clip")
    return path


QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def make_tiny_qwen_edit_pipeline(
    path: Path, init_scale: float = 1.0, max_pixels: int = 24 * 24, cls: str = "QwenImageEditPipeline"
) -> Path:
    """A ``QwenImageEditPipeline`` folder holding its text half: ``tokenizer/`` and ``processor/`` (the tiny Qwen
    tokenizer with Qwen2.5-VL's vision tokens, and a Qwen2-VL image processor whose 2-pixel patches, unmerged,
    match the tiny vision tower, at most ``max_pixels`` pixels), ``text_encoder/`` (a 3-layer Qwen2.5-VL whose
    one-block vision tower runs on those patches) and ``vae/``."""
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path.mkdir(parents=True, exist_ok=True)
    make_tiny_qwen_tokenizer(path / "tokenizer")
    tok = AutoTokenizer.from_pretrained(path / "tokenizer")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *QWEN_VISION_TOKENS]})
    tok.save_pretrained(path / "tokenizer")
    tok.save_pretrained(path / "processor")
    image = Qwen2VLImageProcessorPil(
        patch_size=2, temporal_patch_size=1, merge_size=1, min_pixels=8 * 8, max_pixels=max_pixels
    )
    image.save_pretrained(path / "processor")
    config_file = path / "processor" / "preprocessor_config.json"  # the class name a hub processor folder gives
    config = json.loads(config_file.read_text()) | {"processor_class": "Qwen2VLProcessor"}
    config_file.write_text(json.dumps(config | {"image_processor_type": "Qwen2VLImageProcessor"}, indent=2))
    make_tiny_qwen25vl(path / "text_encoder", path / "tokenizer", init_scale=init_scale)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VISION_TOKENS}
    model_config = Qwen2_5_VLConfig.from_pretrained(path / "text_encoder")
    model_config.vision_start_token_id = ids["<|vision_start|>"]
    model_config.vision_end_token_id = ids["<|vision_end|>"]
    model_config.image_token_id = ids["<|image_pad|>"]
    model_config.video_token_id = ids["<|video_pad|>"]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path / "text_encoder", config=model_config)
    model.save_pretrained(path / "text_encoder")
    make_tiny_qwen_vae(path / "vae")
    index = {
        "_class_name": cls,  # or QwenImageEditPlusPipeline
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "processor": ["transformers", "Qwen2VLProcessor"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def main(argv: list[str]) -> int:
    makers = {"vae": make_tiny_vae, "taesd": make_tiny_taesd}
    makers |= {"qwen-image-vae": make_tiny_qwen_vae, "flux2-vae": make_tiny_flux2_vae, "dc-vae": make_tiny_dc_vae}
    makers |= {f"text-{f}": (lambda p, f=f: make_tiny_text_pipeline(p, f)) for f in TEXT_PIPELINES}
    makers["text-qwen-image-edit"] = make_tiny_qwen_edit_pipeline
    if len(argv) != 2 or argv[0] not in makers:
        print(f"usage: python -m cachebuild.testing {{{'|'.join(makers)}}} OUT_FOLDER", file=sys.stderr)
        return 2
    print(makers[argv[0]](Path(argv[1])))
    return 0
