"""The text format: a UTF-8 corpus for language modelling, a ``.txt`` (every non-blank line a row)
or a ``.jsonl`` (one JSON object a line, its ``text`` field a row; recognised by its first ``{``).

The check decodes the whole stream strictly (a byte that is not UTF-8 is refused with its line),
reads each ``.jsonl`` line as a JSON object with a string ``text``, and counts the corpus's tokens:
by default the byte tokenizer (a token is a UTF-8 byte, vocabulary 256, nothing to download or
store); with ``vocab_size`` a byte-level BPE tokenizer trained on the corpus at upload with the
``tokenizers`` library, whose JSON the gateway stores beside the dataset (``blobkeys.tokenizer``),
so that every peer and every replay tokenises with the same one.

The reader turns the corpus into its token stream (each row's tokens, then a newline's) and cuts
it into non-overlapping windows of the session's ``DataSpec.context`` tokens: a row of the dataset
is one window, its features the ``context`` token ids from ``i * context`` (float32, exact up to
``MAX_VOCAB``), its label the ``context`` tokens one further on (int64), so a language model learns
the next token at every position. The seeded split of ``data.split_indices`` then holds out whole
windows, disjoint token ranges; :func:`read_windows` reads only the windows asked for (a fedavg
peer's shard) in one streamed pass, its memory growing with those windows, not the corpus. Only
the byte tokenizer trains yet: a BPE corpus is refused (its tokenizer does not travel to peers).
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
NO_CONTEXT = "a text corpus is cut into windows of the model's context: the read names no context"
NO_BPE = "a corpus tokenized by a BPE (vocab_size at upload) is not trainable yet: upload it without vocab_size"
NEWLINE = b"\n"
"""The token between two rows (the byte tokenizer's newline)."""
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
        tokens += len(row.encode()) + len(NEWLINE)
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
        tokens += rows * len(tokenizer.encode("\n").ids)
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
        target="language_modeling",
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


def _byte_chunks(path: Path, spec: DataSpec) -> Iterator[bytes]:
    """The corpus's token stream as bytes (the byte tokenizer: a token a byte), a row at a time."""
    if spec.tokenizer is not None and spec.tokenizer.kind != "byte":
        raise DataError(NO_BPE)
    with path.open("rb") as f:
        try:
            for row in _rows(f):
                yield row.encode() + NEWLINE
        except Rejected as exc:
            raise DataError(str(exc)) from None


def corpus_tokens(path: Path, spec: DataSpec) -> np.ndarray:
    """Every token id of the corpus in order (uint8: the byte tokenizer)."""
    return np.frombuffer(b"".join(_byte_chunks(path, spec)), dtype=np.uint8)


def window_count(tokens: int, context: int) -> int:
    """Windows of ``context`` tokens (and the next) in a stream of ``tokens``."""
    return max(0, (tokens - 1) // context) if context >= 1 else 0


def _context(spec: DataSpec) -> int:
    if spec.context < 1:
        raise DataError(NO_CONTEXT)
    return spec.context


def cut_windows(tokens: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of ``tokens``: ``(x float32, y int64)``, both ``(windows, context)``,
    ``y`` the tokens one after ``x``'s. A DataError when not one window fits."""
    rows = window_count(len(tokens), context)
    if rows < 1:
        raise DataError(f"the corpus's {len(tokens)} tokens hold no window of {context} tokens and the next")
    span = rows * context
    x = tokens[:span].reshape(rows, context).astype(np.float32)
    y = tokens[1 : span + 1].reshape(rows, context).astype(np.int64)
    return x, y


def read_windows(path: Path, spec: DataSpec, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``rows`` (sorted, unique window indexes) of the corpus, as :func:`cut_windows` cuts
    them, in one streamed pass holding only those windows and a row of text."""
    context = _context(spec)
    rows = np.asarray(rows, dtype=np.int64)
    x = np.empty((len(rows), context), dtype=np.float32)
    y = np.empty((len(rows), context), dtype=np.int64)
    # window w spans tokens [w * context, (w + 1) * context]: its x the first context, y the last
    starts = rows * context
    pending = bytearray()  # the stream from token `base` on, kept while a wanted window may need it
    base = 0
    nxt = 0
    for chunk in _byte_chunks(path, spec):
        pending += chunk
        while nxt < len(rows) and starts[nxt] + context + 1 <= base + len(pending):
            at = int(starts[nxt] - base)
            span = np.frombuffer(bytes(pending[at : at + context + 1]), dtype=np.uint8)
            x[nxt], y[nxt] = span[:-1], span[1:]
            nxt += 1
        keep_from = int(starts[nxt]) if nxt < len(rows) else base + len(pending)
        if keep_from > base:
            drop = min(keep_from - base, len(pending))
            del pending[:drop]
            base += drop
    total = base + len(pending)
    if nxt < len(rows):
        raise DataError(
            f"the corpus has {window_count(total, context)} windows of {context} tokens:"
            f" window {int(rows[nxt])} asked for"
        )
    return x, y


class TextFormat:
    """``text``: a UTF-8 corpus, tokenised by bytes (or a BPE trained at upload, not trainable yet),
    read as windows of ``DataSpec.context`` tokens."""

    def check(self, stream: BinaryIO, options: UploadOptions, limits: Limits) -> Summary:
        return check_text(stream, options, limits)

    def load(self, path: Path, spec: DataSpec, label_column: str) -> Table:
        x, y = cut_windows(corpus_tokens(path, spec), _context(spec))
        return Table(
            features=x,
            labels=y,
            classes=[],
            feature_names=[],
            label_column="text",
            target="language_modeling",
            vocab=BYTE_VOCAB,
        )

    def index(self, path: Path, spec: DataSpec, label_column: str) -> Index:
        context = _context(spec)
        windows = window_count(sum(len(c) for c in _byte_chunks(path, spec)), context)
        return Index(labels=np.zeros(windows, dtype=np.int64), classes=[], feature_names=[], label_column="text")

    def scan(self, path: Path, spec: DataSpec, label_column: str, rows: np.ndarray) -> Blocks:
        x, _ = read_windows(path, spec, rows)
        yield np.asarray(rows, dtype=np.int64), x

    def preview(self, path: Path, spec: DataSpec, label_column: str) -> Preview:
        return Preview(lines=[line[:400] for line in preview_lines(path, PREVIEW_ROWS)])


FORMATS.add("text", TextFormat())
