"""Tiny tokenizers of the classes the pipelines load, saved like real ones and trained on :data:`WORDS`."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

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
    from tokenizers import models, pre_tokenizers

    words = models.BPE(end_of_word_suffix="</w>")
    bpe = _train_bpe([" ".join(WORDS)], pre_tokenizers.Whitespace(), words, end_of_word_suffix="</w>")
    vocab, merges = _vocab_and_merges(bpe)
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    return vocab, merges


QWEN_CHAT_TEMPLATE = (  # Qwen3's shape in short: user/assistant turns; enable_thinking=False adds an empty think block
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def make_tiny_qwen_tokenizer(path: Path) -> Path:
    """A byte-level BPE ``Qwen2Tokenizer`` (the class Qwen3 checkpoints name) with merges for :data:`WORDS`, the
    chat special tokens and :data:`QWEN_CHAT_TEMPLATE`; any text tokenizes (bytes at worst), nothing maps to unk."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _vocab_and_merges(_train_byte_level_bpe([" ".join(WORDS), "user assistant"]))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, chat_template=QWEN_CHAT_TEMPLATE, model_max_length=512)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["<think>", "</think>"])
    tok.save_pretrained(path)
    return path


def make_tiny_llama_tokenizer(path: Path) -> Path:
    """A byte-level BPE ``PreTrainedTokenizerFast`` shaped like Llama 3.1 Instruct's: ``<|begin_of_text|>`` put
    before the text, EOS ``<|eot_id|>``, no pad token (HiDream's pipeline pads with EOS), 131072 tokens."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bos, eos, end = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
    bpe = _train_byte_level_bpe([" ".join(WORDS)], special_tokens=[bos, end, eos])
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, model_max_length=131072)
    fast.save_pretrained(path)
    return path


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
    from tokenizers import processors
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    corpus = [" ".join(WORDS), "You are an AI that reasons about image descriptions."]
    bpe = _train_byte_level_bpe(corpus, special_tokens=MISTRAL_SPECIALS)
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


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Gemma's own ids 0-4


def make_tiny_gemma_tokenizer(path: Path) -> Path:
    """A ``GemmaTokenizer`` (the class Lumina 2 and Sana load, ``GemmaTokenizerFast`` in transformers 4): BPE over
    "▁"-joined words with byte fallback, <bos> first and right-padding not its default (Gemma pads left). Its merges
    are learnt from :data:`WORDS` and the prompts Lumina 2 and Sana put before a caption, so those take a few
    hundred tokens, not one per byte; any other text tokenizes to bytes at worst."""
    from tokenizers import models, normalizers, pre_tokenizers
    from transformers import GemmaTokenizer

    from cachebuild.families import lumina2, sana

    corpus = [" ".join(WORDS), lumina2.prompt_prefix(), sana.prompt_prefix()]
    bpe = _train_bpe(
        [c.lower() for c in corpus] + corpus,
        pre_tokenizers.Split("▁", behavior="merged_with_next"),  # merges stay inside words
        models.BPE(unk_token="<unk>", byte_fallback=True),
        normalizer=normalizers.Replace(" ", "▁"),
        vocab_size=600,
        special_tokens=GEMMA_SPECIALS,
    )
    vocab, merges = _vocab_and_merges(bpe)
    vocab |= {f"<0x{b:02X}>": len(vocab) + b for b in range(256)}  # byte fallback pieces
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=8192)
    tok.save_pretrained(path)
    return path


def _train_bpe(corpus: list[str], pre_tokenizer, model=None, normalizer=None, **trainer_options):
    """A ``tokenizers.Tokenizer`` over ``model`` (default: a plain BPE) whose merges are learnt from the texts in
    ``corpus``; ``trainer_options`` go to ``BpeTrainer`` (``vocab_size``, ``special_tokens``, ...)."""
    from tokenizers import Tokenizer, models, trainers

    bpe = Tokenizer(model or models.BPE())
    if normalizer is not None:
        bpe.normalizer = normalizer
    bpe.pre_tokenizer = pre_tokenizer
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(show_progress=False, **trainer_options))
    return bpe


def _train_byte_level_bpe(corpus: list[str], special_tokens: Sequence[str] = ()):
    """:func:`_train_bpe` the GPT-2 way (Qwen's, Llama 3's, Tekken's): all 256 bytes in the alphabet, so that any
    text tokenizes and nothing maps to unk, a 400-token vocabulary and a byte-level decoder."""
    from tokenizers import decoders, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = _train_bpe(
        corpus,
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        vocab_size=400,
        initial_alphabet=alphabet,
        special_tokens=list(special_tokens),
    )
    bpe.decoder = decoders.ByteLevel()
    return bpe


def _vocab_and_merges(bpe) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of a trained BPE ``tokenizers.Tokenizer``, as the slow-tokenizer classes take them."""
    model = json.loads(bpe.to_str())["model"]
    return dict(model["vocab"]), [tuple(m) for m in model["merges"]]
