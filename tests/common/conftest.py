"""Fixtures of the blob tests: a real S3-compatible HTTP server (moto's server mode)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from swarmtrain.common import servers
from swarmtrain.common.settings import Settings


@pytest.fixture(scope="session")
def s3_settings() -> Iterator[Settings]:
    """A real S3-compatible HTTP server for the whole run; each test makes its own bucket."""
    from moto.server import ThreadedMotoServer

    port = servers.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield Settings(
            s3_endpoint=f"127.0.0.1:{port}",
            s3_access_key="test",
            s3_secret_key="test",
            s3_region="us-east-1",
        )
    finally:
        server.stop()
