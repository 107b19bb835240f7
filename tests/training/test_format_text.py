"""The text format's check as plain function calls: bytes and BPE tokens, what it refuses."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from swarmtrain.common import formats
from swarmtrain.common.events import DataSpec, TokenizerSpec
from swarmtrain.training import data
from swarmtrain.training.formats import FORMATS, Limits, Rejected, UploadOptions
from swarmtrain.training.formats.text import preview_lines
from tests.training.formatdata import corpus, jsonl

TEXT = FORMATS.get("text")


def check(raw: bytes, vocab_size: int | None = None) -> object:
    return TEXT.check(io.BytesIO(raw), UploadOptions(vocab_size=vocab_size), Limits())


def test_a_txt_corpus_in_bytes(tmp_path: Path) -> None:
    lines = corpus(50)
    raw = ("\n".join(lines) + "\n\n").encode()
    assert formats.detect(raw[:512]) == "csv"  # a .txt is uploaded with format=text
    summary = check(raw)
    assert (summary.rows, summary.tokens) == (50, sum(len(line.encode()) for line in lines))  # type: ignore[attr-defined]
    assert summary.data == DataSpec(format="text", tokenizer=TokenizerSpec())  # type: ignore[attr-defined]
    assert summary.tokenizer_json is None  # type: ignore[attr-defined]
    path = tmp_path / "c.text"
    path.write_bytes(raw)
    assert preview_lines(path, 3) == lines[:3]
    with pytest.raises(data.DataError, match="language model"):
        data.load(path, summary.data, "text")  # type: ignore[attr-defined]


def test_a_jsonl_corpus_with_a_bpe_trained_at_upload() -> None:
    lines = corpus(300)
    raw = jsonl(lines)
    assert formats.detect(raw[:512]) == "text"
    summary = check(raw, vocab_size=300)
    spec = summary.data.tokenizer  # type: ignore[attr-defined]
    assert spec.kind == "bpe" and 256 < spec.vocab_size <= 300
    tokenizer = Tokenizer.from_str(summary.tokenizer_json)  # type: ignore[attr-defined]
    assert summary.tokens == sum(len(tokenizer.encode(line).ids) for line in lines)  # type: ignore[attr-defined]
    assert summary.tokens < sum(len(line.encode()) for line in lines)  # type: ignore[attr-defined]
    assert tokenizer.decode(tokenizer.encode(lines[0]).ids) == lines[0]
    assert check(raw, vocab_size=300).tokenizer_json == summary.tokenizer_json  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("raw", "vocab", "needle"),
    [
        ("caf\u00e9\n".encode("latin-1") * 10, None, "not UTF-8 text"),
        (b"", None, "the corpus is empty"),
        (b"\n \n", None, "the corpus is empty"),
        (b'{"text": "a"}\n{"body": "b"}\n', None, "line 2: not a JSON object with a string 'text' field"),
        (b'{"text": 3}\n', None, "line 1"),
        (b"hello\x00world\n", None, "NUL"),
        (b"hello world\n" * 20, 100, "vocab_size must be 257"),
    ],
)
def test_refuses_with_a_reason(raw: bytes, vocab: int | None, needle: str) -> None:
    with pytest.raises(Rejected) as caught:
        check(raw, vocab)
    assert needle in str(caught.value)
