"""The text format: a UTF-8 corpus for language modelling, a ``.txt`` (every non-blank line a row)
or a ``.jsonl`` (one JSON object a line, its ``text`` field a row; recognised by its first ``{``).

The check decodes the whole stream strictly (a byte that is not UTF-8 is refused with its line),
reads each ``.jsonl`` line as a JSON object with a string ``text``, and counts the corpus's tokens:
by default the byte tokenizer (a token is a UTF-8 byte, vocabulary 256, nothing to download or
store); with ``vocab_size`` a byte-level BPE tokenizer trained on the corpus at upload with the
``tokenizers`` library, whose JSON the gateway stores beside the dataset (``blobkeys.tokenizer``),
so that every peer and every replay tokenises with the same one.

A corpus trains a language model, a model kind no peer builds yet (the transformer of issue 22):
the reader refuses, and a session on a text dataset is refused at the gateway.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import msgspec
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from swarmtrain.common.events import BYTE_VOCAB, MAX_VOCAB, DataSpec, TokenizerSpec
from swarmtrain.training.formats.base import (
    FORMATS,
    PREVIEW_ROWS,
    Blocks,
    DataError,
    Index,
    Limits,
    Preview,
    RawStream,
    Rejected,
    Summary,
    Table,
    UploadOptions,
)

MAX_LINE_CHARS = 1 << 22
NO_READER = "a text corpus trains a language model: no model kind for it yet (the transformer of issue 22)"
_READ_CHUNK = 1 << 16
_ENCODE_BATCH = 1024


class _Record(msgspec.Struct):
    text: str


_record = msgspec.json.Decoder(_Record)


def _rows(stream: BinaryIO) -> Iterator[str]:
    """The corpus's rows, from the stream's start: lines of a .txt, ``text`` fields of a .jsonl."""
    stream.seek(0)
    text = io.TextIOWrapper(io.BufferedReader(RawStream(stream), _READ_CHUNK), encoding="utf-8-sig", newline=None)
    jsonl: bool | None = None
    number = 0
    try:
        while line := text.readline(MAX_LINE_CHARS):
            number += 1
            if len(line) >= MAX_LINE_CHARS and not line.endswith("\n"):
                raise Rejected(f"line {number} is longer than {MAX_LINE_CHARS:,} characters")
            if "\x00" in line:
                raise Rejected(f"not text: line {number} contains NUL bytes (a binary file?)")
            body = line.strip()
            if not body:
                continue
            if jsonl is None:
                jsonl = body.startswith("{")
            if not jsonl:
                yield line.rstrip("\n")
                continue
            try:
                yield _record.decode(body).text
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise Rejected(f"line {number}: not a JSON object with a string 'text' field ({exc})") from None
    except UnicodeDecodeError as exc:
        raise Rejected(
            f"not UTF-8 text: line {number + 1} holds the byte {exc.object[exc.start : exc.start + 1]!r}"
        ) from None
    finally:
        text.detach()


def _bpe(stream: BinaryIO, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(_rows(stream), trainer)
    return tokenizer


def check_text(stream: BinaryIO, options: UploadOptions, limits: Limits) -> Summary:
    rows = 0
    tokens = 0
    for row in _rows(stream):
        rows += 1
        tokens += len(row.encode())
    if not tokens:
        raise Rejected("no text: the corpus is empty")
    tokenizer_json: str | None = None
    spec = TokenizerSpec()
    if options.vocab_size is not None:
        if not BYTE_VOCAB < options.vocab_size <= MAX_VOCAB:
            raise Rejected(f"vocab_size must be {BYTE_VOCAB + 1} to {MAX_VOCAB} (a BPE over the 256 bytes)")
        tokenizer = _bpe(stream, options.vocab_size)
        tokens = 0
        batch: list[str] = []
        for row in _rows(stream):
            batch.append(row)
            if len(batch) == _ENCODE_BATCH:
                tokens += sum(len(e.ids) for e in tokenizer.encode_batch(batch))
                batch = []
        tokens += sum(len(e.ids) for e in tokenizer.encode_batch(batch))
        tokenizer_json = tokenizer.to_str()
        spec = TokenizerSpec(kind="bpe", vocab_size=tokenizer.get_vocab_size())
    return Summary(
        rows=rows,
        features=0,
        classes=0,
        columns=[],
        label_column="text",
        shape=[],
        data=DataSpec(format="text", tokenizer=spec),
        tokens=tokens,
        tokenizer_json=tokenizer_json,
    )


def preview_lines(path: Path, limit: int) -> list[str]:
    """The corpus's first ``limit`` rows."""
    out: list[str] = []
    with path.open("rb") as f:
        for row in _rows(f):
            out.append(row)
            if len(out) >= limit:
                break
    return out


class TextFormat:
    """``text``: a UTF-8 corpus, tokenised by bytes or a BPE trained at upload."""

    def check(self, stream: BinaryIO, options: UploadOptions, limits: Limits) -> Summary:
        return check_text(stream, options, limits)

    def load(self, path: Path, spec: DataSpec, label_column: str) -> Table:
        raise DataError(NO_READER)

    def index(self, path: Path, spec: DataSpec, label_column: str) -> Index:
        raise DataError(NO_READER)

    def scan(self, path: Path, spec: DataSpec, label_column: str, rows: np.ndarray) -> Blocks:
        raise DataError(NO_READER)

    def preview(self, path: Path, spec: DataSpec, label_column: str) -> Preview:
        return Preview(lines=[line[:400] for line in preview_lines(path, PREVIEW_ROWS)])


FORMATS.add("text", TextFormat())
