"""The text format's check as plain function calls: bytes and BPE tokens, what it refuses."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from swarmtrain.common import formats
from swarmtrain.common.events import DataSpec, TokenizerSpec
from swarmtrain.training import data
from swarmtrain.training.formats import FORMATS, Limits, Rejected, UploadOptions
from swarmtrain.training.formats.text import preview_lines, read_windows
from tests.training.formatdata import corpus, jsonl

TEXT = FORMATS.get("text")


def check(raw: bytes, vocab_size: int | None = None) -> object:
    return TEXT.check(io.BytesIO(raw), UploadOptions(vocab_size=vocab_size), Limits())


def test_a_txt_corpus_in_bytes(tmp_path: Path) -> None:
    lines = corpus(50)
    raw = ("\n".join(lines) + "\n\n").encode()
    assert formats.detect(raw[:512]) == "csv"  # a .txt is uploaded with format=text
    summary = check(raw)
    stream = "".join(line + "\n" for line in lines).encode()  # each row's bytes, then a newline
    assert (summary.rows, summary.tokens) == (50, len(stream))  # type: ignore[attr-defined]
    assert summary.data == DataSpec(format="text", tokenizer=TokenizerSpec())  # type: ignore[attr-defined]
    assert summary.target == "language_modeling"  # type: ignore[attr-defined]
    assert summary.tokenizer_json is None  # type: ignore[attr-defined]
    path = tmp_path / "c.text"
    path.write_bytes(raw)
    assert preview_lines(path, 3) == lines[:3]
    with pytest.raises(data.DataError, match="no context"):
        data.load(path, summary.data, "text")  # type: ignore[attr-defined]


def test_the_reader_cuts_the_token_stream_into_next_token_windows(tmp_path: Path) -> None:
    lines = corpus(80)
    stream = np.frombuffer("".join(line + "\n" for line in lines).encode(), dtype=np.uint8)
    path = tmp_path / "c.text"
    path.write_bytes(jsonl(lines))  # a .jsonl holds the same rows, so the same tokens
    spec = DataSpec(format="text", task="language_modeling", context=16)
    got = data.load(path, spec, "text")
    rows = (len(stream) - 1) // 16
    assert (len(got), got.vocab, got.target, got.classes) == (rows, 256, "language_modeling", [])
    assert got.features.dtype == torch.float32 and got.labels.dtype == torch.int64
    flat = torch.from_numpy(stream.astype(np.int64))
    assert torch.equal(got.features.long().reshape(-1), flat[: rows * 16])
    assert torch.equal(got.labels.reshape(-1), flat[1 : rows * 16 + 1])  # the next token at each position


def test_a_shard_reads_only_its_windows_exactly_as_the_whole_read(tmp_path: Path) -> None:
    path = tmp_path / "c.text"
    path.write_text("".join(line + "\n" for line in corpus(120, seed=4)))
    spec = DataSpec(format="text", task="language_modeling", context=24)
    whole = data.load(path, spec, "text")
    wanted = np.array([0, 1, 5, 17, len(whole) - 1])
    x, y = read_windows(path, spec, wanted)
    assert np.array_equal(x, whole.features.numpy()[wanted]) and np.array_equal(y, whole.labels.numpy()[wanted])
    assert torch.equal(data.read_rows(path, spec, "text", torch.tensor([17, 0, 5]), 24), whole.features[[17, 0, 5]])
    assert data.read_index(path, spec, "text").rows == len(whole)
    with pytest.raises(data.DataError, match="windows"):
        read_windows(path, spec, np.array([len(whole)]))


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (DataSpec(format="text", context=10_000), "no window of 10000 tokens"),
        (DataSpec(format="text", context=8, tokenizer=TokenizerSpec(kind="bpe", vocab_size=300)), "BPE"),
    ],
)
def test_the_reader_refuses_what_it_cannot_train_on(tmp_path: Path, spec: DataSpec, needle: str) -> None:
    path = tmp_path / "c.text"
    path.write_text("a few words\n")
    with pytest.raises(data.DataError, match=needle):
        data.load(path, spec, "text")


def test_a_jsonl_corpus_with_a_bpe_trained_at_upload() -> None:
    lines = corpus(300)
    raw = jsonl(lines)
    assert formats.detect(raw[:512]) == "text"
    summary = check(raw, vocab_size=300)
    spec = summary.data.tokenizer  # type: ignore[attr-defined]
    assert spec.kind == "bpe" and 256 < spec.vocab_size <= 300
    tokenizer = Tokenizer.from_str(summary.tokenizer_json)  # type: ignore[attr-defined]
    newlines = len(lines) * len(tokenizer.encode("\n").ids)
    assert summary.tokens == sum(len(tokenizer.encode(line).ids) for line in lines) + newlines  # type: ignore[attr-defined]
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
