"""Tiny random-weight models for tests, examples and offline trials.

They are built from configs and saved with ``save_pretrained``, so they load through exactly the path a
hub id or a local folder takes. Their latents are meaningless; their shapes and code paths are real.

    python -m cachebuild.testing vae ./examples/tiny-vae

Modules: ``vaes`` (the VAEs and a synthetic cache index), ``tokenizers`` (every tokenizer, over :data:`WORDS`),
``encoders`` (CLIP, T5 and the LLMs) and ``pipelines`` (whole pipeline folders, and :func:`main`).
"""

from cachebuild.testing.encoders import (
    KLEIN_TINY_LAYERS,
    MISTRAL_TINY_LAYERS,
    make_tiny_clip,
    make_tiny_gemma2,
    make_tiny_llama,
    make_tiny_mistral3,
    make_tiny_qwen3,
    make_tiny_qwen25vl,
    make_tiny_t5,
)
from cachebuild.testing.pipelines import (
    COMPONENT_CLASSES,
    LLM_MAKERS,
    PIPELINE_VAES,
    QWEN_VISION_TOKENS,
    TEXT_PIPELINES,
    main,
    make_tiny_qwen_edit_pipeline,
    make_tiny_text_pipeline,
)
from cachebuild.testing.tokenizers import (
    GEMMA_SPECIALS,
    MISTRAL_CHAT_TEMPLATE,
    MISTRAL_SPECIALS,
    QWEN_CHAT_TEMPLATE,
    WORDS,
    make_tiny_gemma_tokenizer,
    make_tiny_llama_tokenizer,
    make_tiny_mistral_tokenizer,
    make_tiny_qwen_tokenizer,
    make_tiny_tokenizer,
)
from cachebuild.testing.vaes import (
    TINY_VAE_LAYOUT,
    TINY_VIDEO_VAES,
    VIDEO_VAE_CONFIGS,
    build_video_vae,
    make_synthetic_manifest,
    make_tiny_dc_vae,
    make_tiny_flux2_vae,
    make_tiny_qwen_vae,
    make_tiny_taesd,
    make_tiny_vae,
    make_tiny_video_vae,
    video_vae_family,
)

__all__ = [
    "COMPONENT_CLASSES",
    "GEMMA_SPECIALS",
    "KLEIN_TINY_LAYERS",
    "LLM_MAKERS",
    "MISTRAL_CHAT_TEMPLATE",
    "MISTRAL_SPECIALS",
    "MISTRAL_TINY_LAYERS",
    "PIPELINE_VAES",
    "QWEN_CHAT_TEMPLATE",
    "QWEN_VISION_TOKENS",
    "TEXT_PIPELINES",
    "TINY_VAE_LAYOUT",
    "TINY_VIDEO_VAES",
    "VIDEO_VAE_CONFIGS",
    "WORDS",
    "build_video_vae",
    "main",
    "make_synthetic_manifest",
    "make_tiny_clip",
    "make_tiny_dc_vae",
    "make_tiny_flux2_vae",
    "make_tiny_gemma2",
    "make_tiny_gemma_tokenizer",
    "make_tiny_llama",
    "make_tiny_llama_tokenizer",
    "make_tiny_mistral3",
    "make_tiny_mistral_tokenizer",
    "make_tiny_qwen25vl",
    "make_tiny_qwen3",
    "make_tiny_qwen_edit_pipeline",
    "make_tiny_qwen_tokenizer",
    "make_tiny_qwen_vae",
    "make_tiny_t5",
    "make_tiny_taesd",
    "make_tiny_text_pipeline",
    "make_tiny_tokenizer",
    "make_tiny_vae",
    "make_tiny_video_vae",
    "video_vae_family",
]
