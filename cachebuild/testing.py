"""Tiny random-weight models for tests, examples and offline trials.

They are built from configs and saved with ``save_pretrained``, so they load through exactly the path a
hub id or a local folder takes. Their latents are meaningless; their shapes and code paths are real.

    python -m cachebuild.testing vae ./examples/tiny-vae
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

TINY_VAE_LAYOUT = dict(  # two blocks (downsampling 2), a few thousand parameters: fast on a CPU
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
    mid_block_add_attention=False,  # attention over (H/2 * W/2) tokens would dominate CPU test time
)


def make_tiny_vae(
    path: Path,
    latent_channels: int = 4,
    scaling_factor: float = 0.13025,
    shift_factor: float | None = None,
    seed: int = 0,
) -> Path:
    """Save a ~40k-parameter AutoencoderKL (downsampling 2: two blocks) to ``path``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        **TINY_VAE_LAYOUT,
    )
    vae.save_pretrained(path)
    return path


def make_tiny_qwen_vae(path: Path, z_dim: int = 4, seed: int = 0) -> Path:
    """Save a tiny AutoencoderKLQwenImage (causal 3D, downsampling 2: one spatial stage) to ``path``, with
    per-channel ``latents_mean``/``latents_std`` far from 0 and 1 so that normalisation shows."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=torch.linspace(-1.0, 1.0, z_dim).tolist(),
        latents_std=torch.linspace(0.5, 3.0, z_dim).tolist(),
    )
    vae.save_pretrained(path)
    return path


def make_tiny_flux2_vae(path: Path, latent_channels: int = 4, seed: int = 0) -> Path:
    """Save a tiny AutoencoderKLFlux2 (downsampling 2) to ``path``; its batch norm over the 4C patch channels
    gets random running statistics (a fresh one has mean 0, variance 1) so that normalisation shows."""
    import torch
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(latent_channels=latent_channels, **TINY_VAE_LAYOUT)
    n = vae.bn.num_features
    vae.bn.running_mean.copy_(torch.randn(n))
    vae.bn.running_var.copy_(torch.rand(n) * 3.0 + 0.25)
    vae.save_pretrained(path)
    return path


def make_tiny_taesd(path: Path, seed: int = 0) -> Path:
    """Save a tiny AutoencoderTiny (downsampling 8) to ``path``."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )
    vae.save_pretrained(path)
    return path


def make_synthetic_manifest(root: Path, n: int) -> Path:
    """A latent cache index of ``n`` done items in 100-item shards, with no shard file on disk: for timing
    and testing what opening a large cache costs without building one."""
    from cachebuild.cache.manifest import Manifest

    fingerprint = {"vae": {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16}}
    info = json.dumps({"original_size": [1200, 800], "bucket": [1216, 832], "crop": [0, 3], "flip": False})
    buckets = ["1024x1024", "1216x832", "832x1216"]
    rows = [
        (
            "latents",
            f"d{i // 1000:03d}/img{i:06d}",
            f"img{i}.jpg",
            "done",
            f"shard-{i // 100:05d}.st",
            buckets[i % 3],
            info,
            0.0,
        )
        for i in range(n)
    ]
    with Manifest.open(root) as m:
        m.set_fingerprint("latents", fingerprint)
        with m.transaction() as c:
            c.executemany(
                "INSERT INTO items (store, key, path, status, shard, bucket, info, updated) VALUES (?,?,?,?,?,?,?,?)",
                rows,
            )
    return root


WORDS = (
    "a",
    "photo",
    "of",
    "the",
    "cat",
    "dog",
    "on",
    "in",
    "with",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "tree",
    "house",
    "car",
    "person",
    "sky",
    "sunset",
    "river",
    "mountain",
    "portrait",
    "painting",
    "style",
    "old",
    "young",
    "man",
    "woman",
    "sitting",
    "standing",
    "near",
    "under",
    "beautiful",
    "dark",
    "light",
    "night",
    "day",
)  # the tiny tokenizers' vocabulary; other words map to <unk>


def make_tiny_tokenizer(path: Path, kind: str = "clip", max_length: int | None = None) -> Path:
    """A tokenizer of the class the pipelines load, saved like a real one, knowing :data:`WORDS` as whole tokens.
    ``clip``: a ``CLIPTokenizer`` (byte-pair merges with ``</w>`` word ends, lower-casing and CLIP's own text
    clean-up; unknown characters become ``<|endoftext|>``), BOS/EOS around the text, padded with EOS, 77 tokens;
    ``t5``: a ``T5Tokenizer`` (unigram over ``▁``-prefixed words, T5's whitespace handling), EOS after the text,
    padded with <pad>, 512 tokens. A generic fast tokenizer would not do: reloaded as the pipeline's class it
    tokenizes some texts (double spaces, for one) differently."""
    from transformers import CLIPTokenizer, T5Tokenizer

    if kind == "clip":
        vocab, merges = _clip_vocab()
        tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length or 77)
    else:  # ids as make_tiny_t5 expects: <pad> 0, </s> 1, <unk> 2, then the words
        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
        tok = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length or 512)
    tok.save_pretrained(path)
    return path


@functools.cache
def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style byte-pair vocabulary and merges learnt from :data:`WORDS` (each word one ``word</w>`` token),
    with ``<|startoftext|>`` and ``<|endoftext|>`` last, as in CLIP's own vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator([" ".join(WORDS)], trainers.BpeTrainer(end_of_word_suffix="</w>", show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    return vocab, [tuple(m) for m in model["merges"]]


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


QWEN_CHAT_TEMPLATE = (  # Qwen3's shape in short: user/assistant turns; enable_thinking=False adds an empty think block
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def make_tiny_qwen_tokenizer(path: Path) -> Path:
    """A byte-level BPE ``Qwen2Tokenizer`` (the class Qwen3 checkpoints name) with merges for :data:`WORDS`, the
    chat special tokens and :data:`QWEN_CHAT_TEMPLATE`; any text tokenizes (bytes at worst), nothing maps to unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator([" ".join(WORDS), "user assistant"], trainer)
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=512,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["<think>", "</think>"])
    tok.save_pretrained(path)
    return path


def make_tiny_qwen3(path: Path, tokenizer: Path, seed: int = 0, init_scale: float = 1.0, layers: int = 3) -> Path:
    """A ``layers``-layer (default 3) Qwen3 for the tokenizer saved at ``tokenizer``, saved as ``Qwen3ForCausalLM``
    with tied embeddings
    as Z-Image's text encoder is (the pipeline loads it as ``Qwen3Model``); ``init_scale`` as for
    :func:`make_tiny_clip`."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        initializer_range=0.02 * init_scale,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
    )
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


def make_tiny_llama_tokenizer(path: Path) -> Path:
    """A byte-level BPE ``PreTrainedTokenizerFast`` shaped like Llama 3.1 Instruct's: ``<|begin_of_text|>`` put
    before the text, EOS ``<|eot_id|>``, no pad token (HiDream's pipeline pads with EOS), 131072 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, end = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=alphabet, special_tokens=[bos, end, eos], show_progress=False
    )
    bpe.train_from_iterator([" ".join(WORDS)], trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, model_max_length=131072)
    fast.save_pretrained(path)
    return path


def make_tiny_llama(path: Path, tokenizer: Path, seed: int = 0, init_scale: float = 1.0) -> Path:
    """A 3-layer Llama for the tokenizer saved at ``tokenizer``, saved as ``LlamaForCausalLM`` (untied LM head) as
    HiDream's text_encoder_4 is; ``init_scale`` as for :func:`make_tiny_clip`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        initializer_range=0.02 * init_scale,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


TEXT_PIPELINES = {
    # family: (pipeline class, [(encoder folder, tokenizer folder, kind)]); kind: clip, clip_h, clip_proj, t5, qwen3
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
}
TEXT_PIPELINES |= {
    "flux2": ("Flux2Pipeline", [("text_encoder", "tokenizer", "mistral3")]),
    "flux2-klein": ("Flux2KleinPipeline", [("text_encoder", "tokenizer", "qwen3_klein")]),
}
COMPONENT_CLASSES = {  # kind -> the (encoder, tokenizer) classes a pipeline's model_index.json names for it
    "clip": ("CLIPTextModel", "CLIPTokenizer"),
    "clip_h": ("CLIPTextModel", "CLIPTokenizer"),
    "clip_proj": ("CLIPTextModelWithProjection", "CLIPTokenizer"),
    "t5": ("T5EncoderModel", "T5TokenizerFast"),
    "qwen3": ("Qwen3Model", "Qwen2Tokenizer"),
    "clip_long": ("CLIPTextModelWithProjection", "PreTrainedTokenizerFast"),  # 248 positions
    "llama": ("LlamaForCausalLM", "PreTrainedTokenizerFast"),
}
TEXT_PIPELINES["qwen-image"] = ("QwenImagePipeline", [("text_encoder", "tokenizer", "qwen25vl")])  # + vae/
COMPONENT_CLASSES["qwen25vl"] = ("Qwen2_5_VLForConditionalGeneration", "Qwen2Tokenizer")
PIPELINE_VAES = {"qwen-image": ("AutoencoderKLQwenImage", make_tiny_qwen_vae)}  # family: its VAE, saved as vae/


def make_tiny_qwen25vl(path: Path, tokenizer: Path, seed: int = 0, init_scale: float = 1.0) -> Path:
    """A 3-layer ``Qwen2_5_VLForConditionalGeneration`` for the tokenizer saved at ``tokenizer``, with the one-block
    vision tower the class needs (text prompts never run it); ``init_scale`` as for :func:`make_tiny_clip`."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # head_dim 8: the multimodal rotary sections below sum to head_dim / 2
        max_position_embeddings=2048,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        initializer_range=0.02 * init_scale,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32, patch_size=2)
    vision |= dict(spatial_merge_size=1, temporal_patch_size=1, window_size=4, fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, initializer_range=0.02 * init_scale)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    return path


COMPONENT_CLASSES |= {  # what the Flux.2 repositories name: a processor folder for Mistral3, Qwen3 as a causal LM
    "mistral3": ("Mistral3ForConditionalGeneration", "PixtralProcessor"),
    "qwen3_klein": ("Qwen3ForCausalLM", "Qwen2TokenizerFast"),
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
        if kind == "qwen3":
            make_tiny_qwen_tokenizer(path / tok)
            make_tiny_qwen3(path / enc, path / tok, seed=i, init_scale=init_scale)
        elif kind == "qwen25vl":
            make_tiny_qwen_tokenizer(path / tok)
            make_tiny_qwen25vl(path / enc, path / tok, seed=i, init_scale=init_scale)
        elif kind == "llama":
            make_tiny_llama_tokenizer(path / tok)
            make_tiny_llama(path / enc, path / tok, seed=i, init_scale=init_scale)
        elif kind == "qwen3_klein":  # deeper than Flux2KleinPipeline's layer 27, so that none of 9/18/27 is the last
            make_tiny_qwen_tokenizer(path / tok)
            make_tiny_qwen3(path / enc, path / tok, seed=i, init_scale=init_scale, layers=KLEIN_TINY_LAYERS)
        elif kind == "gemma2":
            make_tiny_gemma_tokenizer(path / tok)
            make_tiny_gemma2(path / enc, path / tok, seed=i, init_scale=init_scale)
        elif kind == "mistral3":
            make_tiny_mistral_tokenizer(path / tok)
            make_tiny_mistral3(path / enc, path / tok, seed=i, init_scale=init_scale)
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


KLEIN_TINY_LAYERS = 28  # Flux2KleinPipeline reads hidden_states 9, 18 and 27
MISTRAL_TINY_LAYERS = 31  # Flux2Pipeline reads hidden_states 10, 20 and 30
MISTRAL_SPECIALS = (  # Tekken's first control tokens, in its order: <unk> 0, <s> 1, </s> 2, ..., <pad> 11
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
)
MISTRAL_CHAT_TEMPLATE = (  # Mistral Small 3.1's shape in short: BOS, the system turn, then [INST] user turns
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.content is string %}{% set text = message.content %}"
    "{% else %}{% set text = message.content | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}"
    "{% endif %}"
    "{% if message.role == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message.role == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)


def make_tiny_mistral_tokenizer(path: Path) -> Path:
    """A byte-level BPE tokenizer saved like FLUX.2-dev's ``tokenizer/`` processor folder: a tokenizer.json that adds
    BOS, Tekken's control tokens, a tokenizer_config naming ``LlamaTokenizer`` and ``PixtralProcessor`` (as the real
    one does) and :data:`MISTRAL_CHAT_TEMPLATE` as ``chat_template.jinja``; any text tokenizes, nothing maps to unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(MISTRAL_SPECIALS), initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator([" ".join(WORDS), "You are an AI that reasons about image descriptions."], trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = TokenizersBackend(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.save_pretrained(path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config |= {"tokenizer_class": "LlamaTokenizer", "processor_class": "PixtralProcessor"}
    config_path.write_text(json.dumps(config, indent=2))
    (path / "chat_template.jinja").write_text(MISTRAL_CHAT_TEMPLATE)
    return path


def make_tiny_mistral3(path: Path, tokenizer: Path, seed: int = 0, init_scale: float = 1.0) -> Path:
    """A Mistral3ForConditionalGeneration (Flux.2's text encoder class) for the tokenizer at ``tokenizer``: a
    :data:`MISTRAL_TINY_LAYERS`-layer Mistral text model and a one-layer Pixtral vision tower, which its config
    needs though text never reaches it; ``init_scale`` as for :func:`make_tiny_clip`."""
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    tok = TokenizersBackend.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    text = MistralConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=MISTRAL_TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        initializer_range=0.02 * init_scale,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
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


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Gemma's own ids 0-4


def make_tiny_gemma_tokenizer(path: Path) -> Path:
    """A ``GemmaTokenizer`` (the class Lumina 2 and Sana load, ``GemmaTokenizerFast`` in transformers 4): BPE over
    "▁"-joined words with byte fallback, <bos> first and right-padding not its default (Gemma pads left). Its merges
    are learnt from :data:`WORDS` and the prompts Lumina 2 and Sana put before a caption, so those take a few
    hundred tokens, not one per byte; any other text tokenizes to bytes at worst."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    from cachebuild.families import lumina2, sana

    corpus = [" ".join(WORDS), lumina2.prompt_prefix(), sana.prompt_prefix()]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # merges stay inside words
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=GEMMA_SPECIALS, show_progress=False)
    bpe.train_from_iterator([c.lower() for c in corpus] + corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab |= {f"<0x{b:02X}>": len(vocab) + b for b in range(256)}  # byte fallback pieces
    merges = [tuple(m) for m in model["merges"]]
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=8192)
    tok.save_pretrained(path)
    return path


def make_tiny_gemma2(path: Path, tokenizer: Path, seed: int = 0, init_scale: float = 1.0) -> Path:
    """A 3-layer ``Gemma2Model`` (Lumina 2's and Sana's text encoder class) for the tokenizer at ``tokenizer``;
    ``init_scale`` as for :func:`make_tiny_clip`."""
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2Model

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        max_position_embeddings=8192,
        initializer_range=0.02 * init_scale,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    Gemma2Model(config).save_pretrained(path)
    return path


def make_tiny_dc_vae(path: Path, latent_channels: int = 4, scaling_factor: float = 0.41407, seed: int = 0) -> Path:
    """Save a tiny ``AutoencoderDC`` (Sana's VAE kind: no posterior) with two stages, downsampling 2, to ``path``."""
    import torch
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    vae = AutoencoderDC(
        latent_channels=latent_channels,
        attention_head_dim=8,
        encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()),
        scaling_factor=scaling_factor,
    )
    vae.save_pretrained(path)
    return path


TEXT_PIPELINES |= {
    "lumina2": ("Lumina2Pipeline", [("text_encoder", "tokenizer", "gemma2")]),
    "sana": ("SanaPipeline", [("text_encoder", "tokenizer", "gemma2")]),
}
COMPONENT_CLASSES["gemma2"] = ("Gemma2Model", "GemmaTokenizerFast")


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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
