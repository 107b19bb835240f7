"""Dataset uploads: validate the CSV as it streams, copy it into the blob store, append the event.

Litestar spools the multipart file to disk; the handler validates it in a worker thread (one pass,
bounded memory), then streams it into the store (hashing as it goes). A rejected file never reaches
the store; a failure after the copy deletes the object again.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, cast

import msgspec
from litestar import Controller, Request, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.exceptions import ClientException
from litestar.params import MultipartBody
from litestar.security.jwt import Token

from swarmtrain.common.blob import BlobRef, BlobStore
from swarmtrain.common.events import DatasetUploaded, new_id
from swarmtrain.gateway.auth import User
from swarmtrain.gateway.csvcheck import CsvRejected, CsvSummary, check_csv
from swarmtrain.gateway.state import Gateway

DEFAULT_LABEL = "label"


@dataclass
class DatasetForm:
    file: UploadFile
    label_column: str = DEFAULT_LABEL


class DatasetOut(msgspec.Struct, kw_only=True):
    dataset_id: str
    rows: int
    features: int
    classes: int
    sha256: str
    size_bytes: int
    name: str
    label_column: str


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
    )


def clean_label_column(label_column: str | None) -> str:
    label = (label_column or DEFAULT_LABEL).strip()
    if not label or len(label) > 200:
        raise ClientException("label_column must be 1 to 200 characters")
    return label


def _validate(stream: IO[bytes], label_column: str) -> CsvSummary:
    stream.seek(0)
    return check_csv(cast(BinaryIO, stream), label_column)


def _copy(store: BlobStore, key: str, stream: IO[bytes]) -> BlobRef:
    stream.seek(0, os.SEEK_END)
    length = stream.tell()
    stream.seek(0)
    return store.put_stream(key, cast(BinaryIO, stream), length)


async def store_dataset(upload: UploadFile, label_column: str | None, owner_id: str, gw: Gateway) -> DatasetUploaded:
    """Validate and store an uploaded CSV; returns the (not yet appended) ``DatasetUploaded``.

    Raises ``ClientException`` (400) for a file that is not a usable training CSV, with nothing
    left in the store. The caller appends the event and calls ``discard`` if that fails.
    """
    label = clean_label_column(label_column)
    try:
        summary = await asyncio.to_thread(_validate, upload.file, label)
    except CsvRejected as exc:
        raise ClientException(str(exc)) from None
    dataset_id = new_id()
    key = dataset_key(dataset_id)
    try:
        ref = await asyncio.to_thread(_copy, gw.store, key, upload.file)
    except BaseException:
        await discard(gw, key)
        raise
    name = os.path.basename(upload.filename or "")[:200] or f"{dataset_id}.csv"
    return DatasetUploaded(
        dataset_id=dataset_id,
        owner_id=owner_id,
        name=name,
        uri=ref.uri,
        sha256=ref.sha256,
        size_bytes=ref.size,
        rows=summary.rows,
        features=summary.features,
        classes=summary.classes,
        label_column=label,
    )


def dataset_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}.csv"


async def discard(gw: Gateway, key: str) -> None:
    await asyncio.shield(asyncio.to_thread(gw.store.delete, key))


class DatasetController(Controller):
    path = "/datasets"
    tags = ["datasets"]

    @post("/", status_code=201, summary="Upload a training CSV")
    async def upload(
        self,
        request: Request[User, Token, Any],
        data: MultipartBody[DatasetForm],
        gw: NamedDependency[Gateway],
    ) -> DatasetOut:
        try:
            event = await store_dataset(data.file, data.label_column, request.user.user_id, gw)
            try:
                await gw.append(event)
            except BaseException:
                await discard(gw, dataset_key(event.dataset_id))
                raise
        finally:
            await data.file.close()
        return dataset_out(event)
