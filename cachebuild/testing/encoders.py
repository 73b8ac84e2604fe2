"""Tiny text encoders: CLIP, T5 and the LLMs (Qwen3, Llama, Qwen2.5-VL, Mistral3, Gemma2) for the tiny tokenizers."""

from __future__ import annotations

from pathlib import Path

from cachebuild.testing.tokenizers import WORDS, _clip_vocab


def make_tiny_clip(
    path: Path,
    projection: bool = False,
    hidden_size: int = 32,
    seed: int = 0,
    layers: int = 3,
    heads: int = 4,
    init_scale: float = 1.0,
    positions: int = 77,
) -> Path:
    """A small CLIP text encoder (with a text projection when ``projection``) for the tiny tokenizer; ``positions``
    is its position table's length (HiDream's CLIPs hold 248).

    ``init_scale`` multiplies the initial weights' spread: with transformers' default (1) the layers of a tiny
    random encoder come out nearly equal, so only a larger one (e.g. 15) makes a wrong layer visible."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    n = len(_clip_vocab()[0])  # BOS and EOS are its last two ids
    config = CLIPTextConfig(
        vocab_size=n,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=positions,
        projection_dim=24,
        bos_token_id=n - 2,
        eos_token_id=n - 1,
        pad_token_id=n - 1,
        initializer_range=0.02 * init_scale,
        initializer_factor=init_scale,
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    model.save_pretrained(path)
    return path


def make_tiny_t5(
    path: Path, seed: int = 0, d_model: int = 32, layers: int = 2, d_kv: int = 8, init_scale: float = 1.0
) -> Path:
    """A small T5 encoder for the tiny ``t5`` tokenizer (``d_model`` wide: the width of what it outputs);
    ``init_scale`` as for :func:`make_tiny_clip`."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(WORDS) + 3,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=37,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        initializer_factor=init_scale,
    )
    T5EncoderModel(config).save_pretrained(path)
    return path


def make_tiny_qwen3(path: Path, tokenizer: Path, seed: int = 0, init_scale: float = 1.0, layers: int = 3) -> Path:
    """A ``layers``-layer (default 3) Qwen3 for the tokenizer saved at ``tokenizer``, saved as ``Qwen3ForCausalLM``
    with tied embeddings as Z-Image's text encoder is (the pipeline loads it as ``Qwen3Model``); ``init_scale`` as
    for :func:`make_tiny_clip`."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    text = _llm_text_config(tok, init_scale, layers, max_position_embeddings=512, bos_token_id=None)
    Qwen3ForCausalLM(Qwen3Config(**text, tie_word_embeddings=True)).save_pretrained(path)
    return path


def make_tiny_llama(path: Path, tokenizer: Path, seed: int = 0, init_scale: float = 1.0) -> Path:
    """A 3-layer Llama for the tokenizer saved at ``tokenizer``, saved as ``LlamaForCausalLM`` (untied LM head) as
    HiDream's text_encoder_4 is; ``init_scale`` as for :func:`make_tiny_clip`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    text = _llm_text_config(tok, init_scale, 3, max_position_embeddings=256, pad_token_id=None)  # pads with EOS
    LlamaForCausalLM(LlamaConfig(**text, tie_word_embeddings=False)).save_pretrained(path)
    return path


def make_tiny_qwen25vl(path: Path, tokenizer: Path, seed: int = 0, init_scale: float = 1.0) -> Path:
    """A 3-layer ``Qwen2_5_VLForConditionalGeneration`` for the tokenizer saved at ``tokenizer``, with the one-block
    vision tower the class needs (text prompts never run it); ``init_scale`` as for :func:`make_tiny_clip`."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    text = _llm_text_config(tok, init_scale, 3, max_position_embeddings=2048, bos_token_id=None)
    del text["head_dim"]  # not a field of this config: 32 / 4 = 8, and the rotary sections below sum to 8 / 2
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}
    vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32, patch_size=2)
    vision |= dict(spatial_merge_size=1, temporal_patch_size=1, window_size=4, fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, initializer_range=0.02 * init_scale)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    return path


KLEIN_TINY_LAYERS = 28  # Flux2KleinPipeline reads hidden_states 9, 18 and 27
MISTRAL_TINY_LAYERS = 31  # Flux2Pipeline reads hidden_states 10, 20 and 30


def make_tiny_mistral3(path: Path, tokenizer: Path, seed: int = 0, init_scale: float = 1.0) -> Path:
    """A Mistral3ForConditionalGeneration (Flux.2's text encoder class) for the tokenizer at ``tokenizer``: a
    :data:`MISTRAL_TINY_LAYERS`-layer Mistral text model and a one-layer Pixtral vision tower, which its config
    needs though text never reaches it; ``init_scale`` as for :func:`make_tiny_clip`."""
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    tok = TokenizersBackend.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    text = MistralConfig(**_llm_text_config(tok, init_scale, MISTRAL_TINY_LAYERS, max_position_embeddings=512))
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, head_dim=8, image_size=32
    )
    config = Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    Mistral3ForConditionalGeneration(config).save_pretrained(path)
    return path


def make_tiny_gemma2(path: Path, tokenizer: Path, seed: int = 0, init_scale: float = 1.0) -> Path:
    """A 3-layer ``Gemma2Model`` (Lumina 2's and Sana's text encoder class) for the tokenizer at ``tokenizer``;
    ``init_scale`` as for :func:`make_tiny_clip`."""
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2Model

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    text = _llm_text_config(tok, init_scale, 3, max_position_embeddings=8192, query_pre_attn_scalar=8)
    Gemma2Model(Gemma2Config(**text)).save_pretrained(path)
    return path


def _llm_text_config(tok, init_scale: float, layers: int, **overrides) -> dict:
    """The text-model fields every tiny LLM here shares, with ``overrides`` on top: ``tok``'s vocabulary and special
    ids, 32 wide, four 8-wide query heads over two key/value heads, and the initial spread scaled by ``init_scale``."""
    fields = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        initializer_range=0.02 * init_scale,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return fields | overrides


def make_tiny_umt5(path: Path, tokenizer: Path, seed: int = 0, init_scale: float = 1.0) -> Path:
    """A 2-layer ``UMT5EncoderModel`` (Wan's text encoder class: a relative position bias in every layer) for the
    tiny ``t5`` tokenizer saved at ``tokenizer`` (the same ids as :func:`make_tiny_t5`'s); ``init_scale`` as for
    :func:`make_tiny_clip`."""
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    from cachebuild.testing.tokenizers import make_tiny_tokenizer

    make_tiny_tokenizer(tokenizer, "t5")
    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        initializer_factor=init_scale,
    )  # fmt: skip
    UMT5EncoderModel(config).save_pretrained(path)
    return path


def make_tiny_byt5(path: Path, tokenizer: Path, seed: int = 0, init_scale: float = 1.0) -> Path:
    """A 2-layer, 24-wide ``T5EncoderModel`` over bytes and a ``ByT5Tokenizer`` saved at ``tokenizer`` (HunyuanVideo
    1.5's glyph encoder: 256 bytes and its 3 + 125 special ids); ``init_scale`` as for :func:`make_tiny_clip`."""
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tok = ByT5Tokenizer()
    tok.save_pretrained(tokenizer)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tok), d_model=24, d_kv=8, d_ff=37, num_layers=2, num_heads=3, relative_attention_num_buckets=8,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, initializer_factor=init_scale,
    )  # fmt: skip
    T5EncoderModel(config).save_pretrained(path)
    return path


def make_tiny_qwen25vl_text(path: Path, tokenizer: Path, seed: int = 0, init_scale: float = 1.0) -> Path:
    """A 4-layer ``Qwen2_5_VLTextModel`` (HunyuanVideo 1.5's text encoder class: Qwen2.5-VL without its vision
    tower or LM head) for the tokenizer at ``tokenizer``; 4 layers, so that ``hidden_states[-3]`` is neither the
    embeddings nor the last; ``init_scale`` as for :func:`make_tiny_clip`."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    text = _llm_text_config(tok, init_scale, 4, max_position_embeddings=2048, bos_token_id=None)
    del text["head_dim"]  # 32 / 4 = 8; the rotary sections below sum to 8 / 2
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}
    Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**text)).save_pretrained(path)
    return path


def make_tiny_gemma3(path: Path, tokenizer: Path, seed: int = 0, init_scale: float = 1.0) -> Path:
    """A ``Gemma3ForConditionalGeneration`` (LTX-2's text encoder class) for the tokenizer at ``tokenizer``: a 3-layer
    Gemma 3 text model whose sliding window (16) is shorter than LTX-2's 1024 positions, and the one-layer SigLIP
    tower the class needs; ``init_scale`` as for :func:`make_tiny_clip`."""
    import torch
    from transformers import (
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    text = _llm_text_config(
        tok, init_scale, 3, max_position_embeddings=2048, query_pre_attn_scalar=8, sliding_window=16
    )
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    config = Gemma3Config(
        text_config=Gemma3TextConfig(**text), vision_config=vision, mm_tokens_per_image=4, image_token_index=len(tok)
    )
    Gemma3ForConditionalGeneration(config).save_pretrained(path)
    return path
