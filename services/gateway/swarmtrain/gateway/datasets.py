"""Datasets: uploads (recognise the format, validate the file with that format's check, copy it
into the blob store, append the event) and the owner's reads.

Litestar spools the multipart file to disk; the handler recognises its format from its content
(``common.formats.detect``, confirmed by the optional ``format`` field) and validates it in a
worker thread with the format's check (``training.formats``: one pass, bounded memory), then
streams it into the store (hashing as it goes). A rejected file never reaches
the store; a failure after the copy deletes the object again. A dataset is visible to its owner
only: anyone else gets 404, as for one that does not exist.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Any, BinaryIO, cast, get_args

import asyncpg
import msgspec
from litestar import Controller, Request, get, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.exceptions import ClientException
from litestar.params import FromPath, MultipartBody, QueryParameter
from litestar.security.jwt import Token

from swarmtrain.common import blobkeys, formats
from swarmtrain.common.blob import BlobRef, BlobStore
from swarmtrain.common.events import (
    CLASSIFICATION,
    MAX_IMAGE_SIDE,
    MAX_LABEL_COLUMN,
    DataFormat,
    DatasetUploaded,
    DataSpec,
    Task,
    TokenizerSpec,
    new_id,
)
from swarmtrain.common.settings import Settings
from swarmtrain.gateway.auth import BEARER, User
from swarmtrain.gateway.errors import Unavailable, documented
from swarmtrain.gateway.inputs import printable, storable
from swarmtrain.gateway.ownership import owned
from swarmtrain.gateway.state import Gateway
from swarmtrain.training.formats import FORMATS, DataError, Limits, Preview, Rejected, Summary, UploadOptions

DEFAULT_LABEL = "label"
MAX_PAGE = 1000
Limit = Annotated[int, QueryParameter(ge=1, le=MAX_PAGE, description=f"Page size (at most {MAX_PAGE}).")]
Offset = Annotated[int, QueryParameter(ge=0, le=2**31 - 1, description="How many items to skip.")]


@dataclass
class DatasetForm:
    file: UploadFile
    label_column: str = DEFAULT_LABEL
    format: str | None = None
    """One of ``formats.FORMATS``: confirms what the content is recognised as; unset, it decides."""
    image_size: str | None = None
    """images: ``HxW`` (or ``N`` for NxN) to resize every image to; unset, their one common size."""
    vocab_size: int | None = None
    """text: train a BPE tokenizer of this vocabulary at upload; unset, the byte tokenizer (256)."""


class DatasetOut(msgspec.Struct, kw_only=True):
    dataset_id: str
    rows: int
    features: int
    classes: int
    sha256: str
    size_bytes: int
    name: str
    label_column: str
    created_at: datetime
    format: DataFormat = "csv"
    shape: list[int] = msgspec.field(default_factory=list)
    """One row's feature shape: ``[features]`` for a table, ``[C, H, W]`` for images."""
    class_counts: dict[str, int] = msgspec.field(default_factory=dict)
    """Rows per class (empty when there are too many classes to show)."""
    tokens: int = 0
    """text: the corpus's length in tokens of its tokenizer."""
    tokenizer: TokenizerSpec | None = None
    """text: the tokenizer fixed at upload (``byte``, or ``bpe`` stored beside the dataset)."""
    target: Task = CLASSIFICATION
    """What the label is for: ``classification`` (classes), ``regression`` (a number), ``language_modeling``."""
    target_range: list[float] = msgspec.field(default_factory=list)
    """regression: ``[min, max]`` of the target; empty otherwise."""


class PreviewOut(msgspec.Struct, kw_only=True):
    """What the dashboard's dataset page and ``swarmtrain datasets show`` print: the first rows of a
    table, thumbnails per class for images (PNG, base64), the first lines of a corpus, with the
    class counts and the token count."""

    dataset_id: str
    format: DataFormat
    columns: list[str]
    rows: list[list[str]]
    thumbnails: dict[str, list[str]]
    lines: list[str]
    class_counts: dict[str, int]
    tokens: int


def dataset_out(event: DatasetUploaded) -> DatasetOut:
    return DatasetOut(
        dataset_id=event.dataset_id,
        rows=event.rows,
        features=event.features,
        classes=event.classes,
        sha256=event.sha256,
        size_bytes=event.size_bytes,
        name=event.name,
        label_column=event.label_column,
        created_at=event.occurred_at,
        format=event.format,
        shape=list(event.shape) or ([event.features] if formats.rules(event.format).labelled else []),
        class_counts=dict(event.class_counts),
        tokens=event.tokens,
        tokenizer=event.tokenizer,
        target=event.target,
        target_range=list(event.target_range),
    )


def _dataset_row_out(row: asyncpg.Record) -> DatasetOut:
    fields = {name: row[name] for name in DatasetOut.__struct_fields__}
    fields["shape"] = msgspec.json.decode(fields["shape"])
    fields["class_counts"] = msgspec.json.decode(fields["class_counts"])
    fields["target_range"] = msgspec.json.decode(fields["target_range"])
    fields["tokenizer"] = stored_tokenizer(fields["tokenizer"])
    out = DatasetOut(**fields)
    if not out.shape and formats.rules(out.format).labelled:  # uploaded before shapes were recorded: a table
        out.shape = [out.features]
    return out


def stored_tokenizer(raw: str | None) -> TokenizerSpec | None:
    return None if raw is None else msgspec.json.decode(raw, type=TokenizerSpec)


async def reject_unknown_form_fields(request: Request[Any, Any, Any], allowed: set[str]) -> None:
    """A form field the route does not define is a 400, as an unknown JSON field is."""
    unknown = sorted(set((await request.form()).keys()) - allowed)
    if unknown:
        raise ClientException(f"unknown form field {printable(unknown[0])}: expected {', '.join(sorted(allowed))}")


def clean_label_column(label_column: str | None) -> str:
    label = (label_column or DEFAULT_LABEL).strip()
    if not label or len(label) > MAX_LABEL_COLUMN or not storable(label):
        raise ClientException(f"label_column must be 1 to {MAX_LABEL_COLUMN} printable characters")
    return label


def _clean_name(filename: str | None, fallback: str) -> str:
    name = "".join(ch for ch in os.path.basename(filename or "") if storable(ch))[:200]
    return name or fallback


def clean_format(data_format: str | None) -> DataFormat | None:
    if data_format is None or not data_format.strip():
        return None
    name = data_format.strip().lower()
    if name not in formats.FORMATS:
        raise ClientException(f"format {printable(name[:40])}: one of {', '.join(formats.FORMATS)}")
    return next(f for f in formats.FORMATS if f == name)


def clean_image_size(image_size: str | None) -> tuple[int, int] | None:
    if image_size is None or not image_size.strip():
        return None
    parts = image_size.strip().lower().split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() for p in parts):
        sides = [int(p) for p in parts]
        if all(1 <= side <= MAX_IMAGE_SIDE for side in sides):
            return (sides[0], sides[-1])
    raise ClientException(
        f"image_size must be HxW (or N), sides 1 to {MAX_IMAGE_SIDE}: got {printable(image_size[:40])}"
    )


def limits(settings: Settings) -> Limits:
    return Limits(max_uncompressed_bytes=settings.max_uncompressed_mb << 20, max_members=settings.max_archive_members)


def recognise(stream: BinaryIO, requested: DataFormat | None) -> DataFormat:
    """The upload's format from its content, confirmed by ``requested``: a file recognised as one
    format and asked for as another is refused with both names; one recognised as nothing in
    particular (text) is checked as ``requested``, whose check then says what is wrong."""
    stream.seek(0)
    head = stream.read(formats.SNIFF_BYTES)
    members: list[str] | None = None
    if formats.is_zip(head):
        stream.seek(0)
        try:
            with zipfile.ZipFile(stream) as archive:
                members = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            members = None
    detected = formats.detect(head, members)
    if requested is None or requested == detected or detected == "csv":
        return requested or detected
    raise Rejected(f"the file was uploaded as {requested} but its content is {detected}")


def _validate(stream: IO[bytes], options: UploadOptions, requested: DataFormat | None, limits: Limits) -> Summary:
    raw = cast(BinaryIO, stream)
    data_format = recognise(raw, requested)
    raw.seek(0)
    return FORMATS.get(data_format).check(raw, options, limits)


def _copy(store: BlobStore, key: str, stream: IO[bytes]) -> BlobRef:
    stream.seek(0, os.SEEK_END)
    length = stream.tell()
    stream.seek(0)
    return store.put_stream(key, cast(BinaryIO, stream), length)


async def store_dataset(
    upload: UploadFile,
    label_column: str | None,
    owner_id: str,
    gw: Gateway,
    check: Callable[[Summary], None] | None = None,
    data_format: str | None = None,
    image_size: str | None = None,
    vocab_size: int | None = None,
) -> DatasetUploaded:
    """Validate and store an uploaded dataset; returns the (not yet appended) ``DatasetUploaded``.

    Raises ``ClientException`` (400) for a file that is not a usable dataset of its format (or of
    ``data_format``, when given), or that ``check`` (given its shape) refuses, with nothing left in
    the store. The caller appends the event with ``append_or_discard``.
    """
    label = clean_label_column(label_column)
    requested = clean_format(data_format)
    options = UploadOptions(label_column=label, image_size=clean_image_size(image_size), vocab_size=vocab_size)
    try:
        summary = await asyncio.to_thread(_validate, upload.file, options, requested, limits(gw.settings))
    except Rejected as exc:
        raise ClientException(str(exc)) from None
    if check is not None:
        check(summary)
    dataset_id = new_id()
    data = summary.data
    key = blobkeys.dataset(dataset_id, data.format)
    tokenizer = data.tokenizer
    try:
        ref = await asyncio.to_thread(_copy, gw.store, key, upload.file)
        if summary.tokenizer_json is not None and tokenizer is not None:
            tok = await asyncio.to_thread(
                gw.store.put_bytes, blobkeys.tokenizer(dataset_id), summary.tokenizer_json.encode()
            )
            tokenizer = msgspec.structs.replace(tokenizer, uri=tok.uri, sha256=tok.sha256)
    except BaseException:
        await discard_dataset(gw, dataset_id, data.format, summary.tokenizer_json is not None)
        raise
    return DatasetUploaded(
        dataset_id=dataset_id,
        owner_id=owner_id,
        name=_clean_name(upload.filename, f"{dataset_id}.{formats.rules(data.format).extension}"),
        uri=ref.uri,
        sha256=ref.sha256,
        size_bytes=ref.size,
        rows=summary.rows,
        features=summary.features,
        classes=summary.classes,
        label_column=summary.label_column,
        format=data.format,
        shape=summary.shape,
        class_counts=summary.class_counts,
        tokens=summary.tokens,
        tokenizer=tokenizer,
        target=next(t for t in get_args(Task) if t == summary.target),
        target_range=summary.target_range,
    )


async def discard(gw: Gateway, key: str) -> None:
    await asyncio.shield(asyncio.to_thread(gw.store.delete, key))


async def discard_dataset(gw: Gateway, dataset_id: str, data_format: str, tokenizer: bool) -> None:
    """Delete every object an upload stored: the dataset, and (``tokenizer``) its BPE tokenizer."""
    await discard(gw, blobkeys.dataset(dataset_id, data_format))
    if tokenizer:
        await discard(gw, blobkeys.tokenizer(dataset_id))


async def append_or_discard(gw: Gateway, event: DatasetUploaded) -> None:
    """Append ``event``; if that fails (or is cancelled), delete the object it names, so no blob is
    left that no event refers to."""
    try:
        await gw.append(event)
    except BaseException:
        await discard_dataset(gw, event.dataset_id, event.format, bool(event.tokenizer and event.tokenizer.uri))
        raise


_COLUMNS = (
    "dataset_id, rows, features, classes, sha256, size_bytes, name, label_column, created_at, format, shape,"
    " class_counts, tokens, tokenizer, target, target_range"
)


async def owned_dataset(gw: Gateway, owner_id: str, dataset_id: str) -> asyncpg.Record:
    """The dataset's row (``DatasetOut``'s columns and its ``uri``); 404 unless it is ``owner_id``'s."""

    async def find(dataset_id: str) -> asyncpg.Record | None:
        return await gw.pool.fetchrow(
            f"SELECT uri, {_COLUMNS} FROM datasets WHERE dataset_id = $1 AND owner_id = $2", dataset_id, owner_id
        )

    return await owned("dataset", dataset_id, find)


def _preview(gw: Gateway, uri: str, sha256: str, spec: DataSpec, label_column: str) -> Preview:
    """The stored dataset's preview: downloaded (checked, capped) into a temporary folder and looked at."""
    with tempfile.TemporaryDirectory(prefix="swarmtrain-preview-") as tmp:
        path = Path(tmp) / f"data.{formats.rules(spec.format).extension}"
        cap = gw.settings.blob_max_download_mb << 20
        gw.store.download(gw.store.key_of(uri), path, sha256=sha256, max_bytes=cap)
        return FORMATS.get(spec.format).preview(path, spec, label_column)


class DatasetController(Controller):
    path = "/datasets"
    tags = ["datasets"]
    security = BEARER

    @post(
        "/",
        status_code=201,
        summary="Upload a dataset",
        description="A CSV, a Parquet table, a NumPy .npz or a zip/tar of <class>/<file> images, recognised "
        "from its content (images are resized to `image_size` HxW, else must share one size), or a UTF-8 "
        "text corpus (`format=text`; a .jsonl is recognised; tokenised by bytes, or by a BPE of `vocab_size` "
        "trained at upload); the optional "
        "`format` field (" + ", ".join(formats.FORMATS) + ") confirms it. A file that is not a usable "
        "dataset of its format is a 400 with the reason, and nothing is stored.",
        responses=documented(400, 401, 413),
    )
    async def upload(
        self,
        request: Request[User, Token, Any],
        data: MultipartBody[DatasetForm],
        gw: NamedDependency[Gateway],
    ) -> DatasetOut:
        try:
            await reject_unknown_form_fields(request, {"file", "label_column", "format", "image_size", "vocab_size"})
            event = await store_dataset(
                data.file,
                data.label_column,
                request.user.user_id,
                gw,
                data_format=data.format,
                image_size=data.image_size,
                vocab_size=data.vocab_size,
            )
            await append_or_discard(gw, event)
        finally:
            await data.file.close()
        return dataset_out(event)

    @get(
        "/",
        summary="My datasets, newest first",
        description=f"Paginated with `limit` (default 100, at most {MAX_PAGE}) and `offset`.",
        responses=documented(400, 401),
    )
    async def list_datasets(
        self, request: Request[User, Token, Any], gw: NamedDependency[Gateway], limit: Limit = 100, offset: Offset = 0
    ) -> list[DatasetOut]:
        rows = await gw.pool.fetch(
            f"""SELECT {_COLUMNS} FROM datasets WHERE owner_id = $1
                ORDER BY created_at DESC, dataset_id LIMIT $2 OFFSET $3""",
            request.user.user_id,
            limit,
            offset,
        )
        return [_dataset_row_out(row) for row in rows]

    @get(
        "/{dataset_id:str}/preview",
        summary="A look at one of my datasets before training",
        description="The first rows of a table, up to 4 thumbnails (PNG, base64) for each of up to 20 classes of "
        "images, the first lines of a corpus; with the class counts and the token count.",
        responses=documented(400, 401, 404, 503),
    )
    async def preview(
        self, request: Request[User, Token, Any], dataset_id: FromPath[str], gw: NamedDependency[Gateway]
    ) -> PreviewOut:
        row = await owned_dataset(gw, request.user.user_id, dataset_id)
        out = _dataset_row_out(row)
        spec = formats.data_spec(out.format, out.shape, out.tokenizer, out.target)
        try:
            look = await asyncio.to_thread(_preview, gw, row["uri"], out.sha256, spec, out.label_column)
        except (DataError, Rejected, OSError, ValueError) as exc:
            raise Unavailable(f"the dataset cannot be read now: {str(exc)[:200]}") from None
        return PreviewOut(
            dataset_id=out.dataset_id,
            format=out.format,
            columns=look.columns,
            rows=look.rows,
            thumbnails=look.thumbnails,
            lines=look.lines,
            class_counts=out.class_counts,
            tokens=out.tokens,
        )

    @get("/{dataset_id:str}", summary="One of my datasets", responses=documented(400, 401, 404))
    async def get_dataset(
        self, request: Request[User, Token, Any], dataset_id: FromPath[str], gw: NamedDependency[Gateway]
    ) -> DatasetOut:
        return _dataset_row_out(await owned_dataset(gw, request.user.user_id, dataset_id))
