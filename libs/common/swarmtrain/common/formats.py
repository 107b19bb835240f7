"""Each data format's static facts, stated once in the contract and read by everyone.

A format's name is in ``events.DataFormat``; its facts are here: what it is for a person, the
extension its blob and its peers' cached copy carry, and how an upload is recognised as it
(:func:`detect`, from the first bytes and, for an archive, its member names). Its upload check and
its reader are one module, ``swarmtrain/training/formats/<name>.py``, registered in
``training.formats.FORMATS``, which checks its names against these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import get_args

from swarmtrain.common.events import CLASSIFICATION, CSV, DataFormat, DataSpec, Task, TokenizerSpec
from swarmtrain.common.registry import Registry

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
"""A zip archive (a non-empty one, an empty one): ``.npz`` files are zips of ``.npy`` members."""
PARQUET_MAGIC = b"PAR1"
GZIP_MAGIC = b"\x1f\x8b"
TAR_MAGIC_AT = 257
"""A tar archive has ``ustar`` at this offset of its first header."""
SNIFF_BYTES = 512
"""How many leading bytes :func:`detect` looks at."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FormatRules:
    description: str
    """One line for a person choosing how to upload (the dashboard and ``--help`` show it)."""
    extension: str
    """The suffix of its blob (``datasets/<id>.<extension>``) and of a peer's cached copy."""
    media_type: str
    """The content type its blob is served with."""
    labelled: bool = True
    """Rows with a label a classifier trains on; False: a corpus, whose rows a session cuts into
    windows of its model's context (a language model's; ``gateway.sessions.corpus``)."""


RULES: Registry[FormatRules] = Registry("data format")
"""Every data format's facts by its contract name, in the contract's order."""

RULES.add(
    CSV,
    FormatRules(
        description="a CSV table with a header row: numeric feature columns and one label column",
        extension="csv",
        media_type="text/csv",
    ),
)
RULES.add(
    "parquet",
    FormatRules(
        description="a Parquet table: numeric and categorical feature columns and one label column",
        extension="parquet",
        media_type="application/vnd.apache.parquet",
    ),
)
RULES.add(
    "npz",
    FormatRules(
        description="a NumPy .npz with arrays x (rows x features, or images rows x C x H x W / H x W x C) and y",
        extension="npz",
        media_type="application/octet-stream",
    ),
)
RULES.add(
    "images",
    FormatRules(
        description="a zip or tar of <class>/<file> PNG or JPEG images (the ImageFolder layout)",
        extension="archive",
        media_type="application/octet-stream",
    ),
)
RULES.add(
    "text",
    FormatRules(
        description="a UTF-8 text corpus: .txt, or .jsonl with a text field, for language modelling",
        extension="text",
        media_type="text/plain; charset=utf-8",
        labelled=False,
    ),
)
RULES.check_names(get_args(DataFormat))
FORMATS: tuple[DataFormat, ...] = get_args(DataFormat)


def rules(data_format: str) -> FormatRules:
    """``data_format``'s facts; ``UnknownName`` for a name the contract does not have."""
    return RULES.get(data_format)


def detect(head: bytes, members: list[str] | None = None) -> DataFormat:
    """The format an upload's content is in: ``head`` its first ``SNIFF_BYTES`` bytes, ``members``
    the member names when it is a zip archive (None otherwise).

    Parquet opens with ``PAR1``; a zip whose members are all ``.npy`` arrays is an ``npz``, any other
    zip, a tar or a gzip (a ``.tar.gz``) a folder of ``images``; anything else is read as text, a
    CSV, or, when its first non-blank character is ``{``, a ``.jsonl`` corpus (``text``; a ``.txt``
    corpus is uploaded with ``format=text``). An upload's ``format`` field confirms the guess (or the
    upload is refused with both names)."""
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head.startswith(ZIP_MAGIC):
        return "npz" if members is not None and all(m.endswith(".npy") for m in members) else "images"
    if head.startswith(GZIP_MAGIC) or head[TAR_MAGIC_AT : TAR_MAGIC_AT + 5] == b"ustar":
        return "images"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        return "text"
    return CSV


def data_spec(
    data_format: str, shape: list[int], tokenizer: TokenizerSpec | None = None, target: str = CLASSIFICATION
) -> DataSpec:
    """How peers read a dataset, from what its ``DatasetUploaded`` recorded (``format``, ``shape``,
    ``tokenizer``, ``target``): for images, the size and channels the upload fixed (``shape`` is
    ``[C, H, W]``); for text, its tokenizer; the task its target is for (a classification: as before)."""
    task = next(t for t in get_args(Task) if t == target)
    if data_format == "images" and len(shape) == 3 and shape[0] in (1, 3):
        return DataSpec(format="images", image_size=[shape[1], shape[2]], channels=1 if shape[0] == 1 else 3, task=task)
    return DataSpec(format=next(f for f in FORMATS if f == data_format), tokenizer=tokenizer, task=task)


def is_zip(head: bytes) -> bool:
    return head.startswith(ZIP_MAGIC)


def as_json() -> dict[str, dict[str, object]]:
    """Every format's facts by name, in the contract's order (what the dashboard's pages get)."""
    return {f: asdict(RULES.get(f)) for f in FORMATS}
