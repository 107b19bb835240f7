"""Peer fixtures: settings without PostgreSQL (the peer never touches it), a digits CSV, a NATS client,
and the scheduler's part a test plays (signed URLs served by the ``blob_server``)."""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import AsyncIterator
from functools import cache
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from swarmtrain.common.blob import FileStore
from swarmtrain.common.settings import Settings
from swarmtrain.common.signing import UrlSigner
from tests.peer.helpers import SchedulerPart


@cache
def digits_csv() -> bytes:
    """sklearn's digits (1797 rows, 64 pixel features, labels 0-9) as CSV bytes."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    digits = load_digits()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([f"px{i}" for i in range(digits.data.shape[1])] + ["digit"])
    for row, label in zip(digits.data, digits.target, strict=True):
        writer.writerow([int(v) for v in row] + [int(label)])
    return out.getvalue().encode()


def write_digits(path: Path) -> str:
    """Write the digits CSV to ``path``; returns its sha256."""
    data = digits_csv()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def settings(nats_url: str, blob_dir: Path, tmp_path: Path) -> Settings:
    # Overrides the root fixture: the peer needs no database, so no PostgreSQL is started for it.
    return Settings(
        nats_url=nats_url,
        blob_url=blob_dir.as_uri(),
        state_dir=str(tmp_path / "state"),
        presence_interval_s=0.2,
        peer_timeout_s=1.5,
        torch_threads=1,
    )


@pytest.fixture
def digits_path(tmp_path: Path) -> Path:
    path = tmp_path / "digits.csv"
    write_digits(path)
    return path


@pytest.fixture
def digits_sha256(blob_dir: Path) -> str:
    """The digits CSV in the blob folder at ``datasets/digits.csv``; its sha256."""
    return write_digits(blob_dir / "datasets" / "digits.csv")


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    import nats

    from swarmtrain.common import bus

    client = await nats.connect(nats_url)
    await bus.ensure_streams(client.jetstream())
    yield client
    await client.drain()


@pytest.fixture
def signer(blob_dir: Path, blob_server: str, blob_signing_secret: str) -> UrlSigner:
    """Signs URLs of the ``blob_dir`` store that the ``blob_server`` honours."""
    signing = Settings(blob_url=blob_dir.as_uri(), blob_signing_secret=blob_signing_secret, blob_public_url=blob_server)
    return UrlSigner(FileStore(blob_dir), signing)


@pytest.fixture
def scheduler(nc: NATS, signer: UrlSigner, blob_dir: Path) -> SchedulerPart:
    return SchedulerPart(nc.jetstream(), signer, blob_dir)
