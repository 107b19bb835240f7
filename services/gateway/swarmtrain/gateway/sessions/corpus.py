"""What a session trains on, read from its dataset's row: a table's rows, features and outputs, or
a text corpus's windows.

A corpus is cut into non-overlapping windows of the model's ``context`` tokens (the ``transformer``
and ``layers`` kinds state one): a window is a row, its ``context`` token ids the features, the
vocabulary the outputs (a language model: ``language_modeling``, whatever the upload recorded).
The peers read the same windows from ``DataSpec.context`` (``training.formats.text``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import msgspec
from litestar.exceptions import ClientException

from swarmtrain.common import formats, models, tasks
from swarmtrain.common.events import BYTE_VOCAB, DataSpec, ModelSpec
from swarmtrain.gateway.datasets import stored_tokenizer

LANGUAGE_MODELING: Final = "language_modeling"


@dataclass(frozen=True, kw_only=True)
class TrainingView:
    """A dataset as a session's model sees it."""

    rows: int
    features: int
    outputs: int
    target: str
    shape: models.DataShape
    data: DataSpec


def windows(tokens: int, context: int) -> int:
    """Windows of ``context`` tokens and the next in ``tokens`` (``formats.text.window_count``)."""
    return max(0, (tokens - 1) // context)


def training_view(dataset: Any, model: ModelSpec) -> TrainingView:
    """``dataset`` (its read-model row) as ``model`` trains on it; a 400 for a corpus the model
    cannot train on (no ``context``, a BPE tokenizer, not one window)."""
    recorded = msgspec.json.decode(dataset["shape"])
    if dataset["format"] != "text":
        target = dataset["target"]
        outputs = tasks.rules(target).outputs(dataset["classes"])
        return TrainingView(
            rows=dataset["rows"],
            features=dataset["features"],
            outputs=outputs,
            target=target,
            shape=models.data_shape(dataset["features"], outputs, recorded, task=target),
            data=formats.data_spec(dataset["format"], recorded, target=target),
        )
    context = int(getattr(model, "context", 0) or 0)
    if context < 1:
        raise ClientException(
            f"model: a text corpus trains a language model of token ids: use a transformer (or layers starting"
            f" with an embedding), not a {model.kind}"
        )
    tokenizer = stored_tokenizer(dataset["tokenizer"])
    if tokenizer is not None and tokenizer.kind != "byte":
        raise ClientException(
            "a corpus tokenized by a BPE (vocab_size at upload) is not trainable yet: upload it without vocab_size"
        )
    rows = windows(int(dataset["tokens"] or 0), context)
    if rows < 2:
        raise ClientException(
            f"the corpus's {dataset['tokens'] or 0} tokens hold {rows} window(s) of the model's context"
            f" ({context}) and the next token: at least 2 are needed (a smaller context, or more text)"
        )
    return TrainingView(
        rows=rows,
        features=context,
        outputs=0,
        target=LANGUAGE_MODELING,
        shape=models.DataShape(features=context, classes=0, task=LANGUAGE_MODELING, vocab=BYTE_VOCAB),
        data=DataSpec(format="text", tokenizer=tokenizer, task=LANGUAGE_MODELING, context=context),
    )
