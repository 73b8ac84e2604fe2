"""How many rows a trimmed text encoder stores for a caption: shared by the text job and by ``verify``, which
reads it from a fingerprint without importing torch."""

from __future__ import annotations


def stored_rows(tokens: int, max_length: int, extra_rows: int = 0, drop_rows: int = 0, window: int = 0) -> int:
    """Rows stored for ``tokens`` real tokens (template, prefix and special tokens included).

    ``extra_rows``: rows past the real tokens that are kept too (Chroma's one padding row); ``drop_rows``:
    leading rows not kept (Qwen-Image's 34 template rows); ``window``: row 0 and the real rows among the last
    ``window - 1`` of ``max_length`` positions (Sana's select_index).

    Example:
        >>> stored_rows(122, 1058, drop_rows=34)
        88
    """
    if window:
        return 1 + max(0, tokens - (max_length - window + 1))
    return max(0, min(tokens + extra_rows, max_length) - drop_rows)
