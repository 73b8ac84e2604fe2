"""One huge caption among normal ones: what is read and tokenized does not grow with its size (counted, not
timed); a caption over the hard limit fails with its size and the limit, one over --caption-max-bytes is cut
there and reported as truncated."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from cachebuild.cache.manifest import Manifest
from cachebuild.cli import cli
from cachebuild.config import CAPTION_FILE_LIMIT_BYTES, CAPTION_MAX_BYTES
from cachebuild.jobs import textenc_plan
from cachebuild.sources import captions
from cachebuild.testing import make_tiny_text_pipeline

TEMPLATE_MARGIN = 1024  # characters a family's template or prefix may add around a caption


@pytest.fixture
def counted(monkeypatch) -> dict:
    """Bytes read per caption file, and the longest text handed to a tokenizer; a longer one than a caption may
    be fails at once (a run without the bound would take minutes and gigabytes in the tokenizer)."""
    seen = {"read": {}, "longest": 0}
    real_open, real_tokenize = open, textenc_plan.tokenize

    def counting_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        name = os.path.basename(path)
        real_read = fh.read

        def read(n=-1):
            data = real_read(n)
            seen["read"][name] = seen["read"].get(name, 0) + len(data)
            return data

        fh.read = read
        return fh

    def tokenize(tokenizer, spec, texts):
        longest = max((len(t) for t in texts), default=0)
        seen["longest"] = max(seen["longest"], longest)
        assert longest <= CAPTION_MAX_BYTES + TEMPLATE_MARGIN, f"a text of {longest} characters reached a tokenizer"
        return real_tokenize(tokenizer, spec, texts)

    monkeypatch.setattr(captions, "open", counting_open, raising=False)
    monkeypatch.setattr(textenc_plan, "tokenize", tokenize)
    return seen


def write_huge(path: Path, size: int) -> None:
    """``size`` bytes of caption-like words, written in pieces (never held whole)."""
    piece = ("a photo of a cat sitting on a red chair " * 1000).encode()
    with open(path, "wb") as fh:
        for _ in range(size // len(piece)):
            fh.write(piece)
        fh.write(piece[: size % len(piece)])


def test_huge_captions_are_cut_or_failed_and_cost_the_same_whatever_their_size(tmp_path, counted):
    model = make_tiny_text_pipeline(tmp_path / "sd15", "sd15")
    source = tmp_path / "captions"
    source.mkdir()
    for i in range(20):
        (source / f"im{i:02d}.txt").write_text(f"caption number {i} of a small set", encoding="utf-8")
    write_huge(source / "long.txt", 12 * 2**20)  # under the hard limit: read up to --caption-max-bytes
    write_huge(source / "longer.txt", 3 * 2**20)
    write_huge(source / "huge.txt", CAPTION_FILE_LIMIT_BYTES + 20 * 2**20)  # over it: fails, never read
    out = tmp_path / "cache"
    result = CliRunner().invoke(
        cli, ["textenc", str(source), "--model", str(model), "--out", str(out), "--device", "cpu", "--json"]
    )
    assert result.exit_code == 3, result.output  # one item failed
    summary = json.loads(result.stdout)
    assert summary["done"] == 22 and summary["truncated"] == 1  # the two cut captions share one text

    read = counted["read"]
    assert "huge.txt" not in read  # its size alone fails it
    assert read["long.txt"] == read["longer.txt"] == CAPTION_MAX_BYTES + 1  # the same, whatever the size
    assert counted["longest"] <= CAPTION_MAX_BYTES + TEMPLATE_MARGIN
    with Manifest.open(out, create=False) as m:
        rows = {r.key: r for r in m.items("textenc")}
    reason = rows["huge"].reason
    assert rows["huge"].status == "failed" and "36.0 MiB" in reason and "16 MiB limit" in reason, reason
    assert rows["long"].info["truncated"] and rows["longer"].info["truncated"]
    assert rows["long"].info["text_id"] == rows["longer"].info["text_id"]  # the same first 64 KiB: one text


def test_a_huge_metadata_caption_is_cut_and_caption_max_bytes_is_checked(tmp_path):
    rows = [{"file_name": "a.png", "text": "é" * 40}, {"file_name": "b.png", "text": "x" * 5000}]
    meta = tmp_path / "metadata.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    found = captions.scan_captions(meta, max_bytes=25)
    assert found.texts == {"a": "é" * 12, "b": "x" * 25}  # cut at a character boundary (é is two bytes)
    assert found.cut == ["a", "b"]
    result = CliRunner().invoke(cli, ["textenc", str(meta), "--model", "sd15", "--out", str(tmp_path / "c"),
                                      "--caption-max-bytes", "0"])  # fmt: skip
    assert result.exit_code == 2 and "--caption-max-bytes must be between 1 and" in result.output
