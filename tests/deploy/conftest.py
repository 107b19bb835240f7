"""Fixtures for the many-machines tests: generated credentials and a nats-server that enforces them."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from swarmtrain.cli.natsconfig import generate, read_env_file
from swarmtrain.common import servers

ADMIN = ("admin", "test-only-admin-password")
"""A test-only superuser added to a copy of the generated configuration, to look at stream state."""


@pytest.fixture
def creds(tmp_path: Path) -> Path:
    out = tmp_path / "nats"
    generate(out, peers=2)
    return out


@dataclass
class SecuredNats:
    url: str
    creds: Path
    proc: subprocess.Popen[bytes]
    connections: list[NATS] = field(default_factory=list)

    def env(self, identity: str) -> dict[str, str]:
        path = self.creds / ("peers" if identity.startswith("peer-") else "") / f"{identity}.env"
        return read_env_file(path)

    async def connect(self, identity: str, errors: list[str] | None = None) -> NATS:
        """Connect as ``identity`` (gateway, scheduler, projector, tap, peer-1, ..., or admin)."""

        async def on_error(exc: Exception) -> None:
            if errors is not None:
                errors.append(str(exc))

        if identity == "admin":
            nc = await nats.connect(self.url, user=ADMIN[0], password=ADMIN[1], error_cb=on_error)
        else:
            env = self.env(identity)
            nc = await nats.connect(
                self.url,
                nkeys_seed_str=env["SWARMTRAIN_NATS_NKEY_SEED"],
                inbox_prefix=env["SWARMTRAIN_NATS_INBOX_PREFIX"],
                error_cb=on_error,
                allow_reconnect=False,
            )
        self.connections.append(nc)
        return nc


def with_admin(config: Path) -> Path:
    text = config.read_text()
    assert text.count("    users: [\n") == 1
    copy = config.with_name("nats-server.test.conf")
    copy.write_text(
        text.replace("    users: [\n", f"    users: [\n      {{ user: {ADMIN[0]}, password: {ADMIN[1]} }}\n")
    )
    return copy


@pytest.fixture
async def secured(creds: Path, tmp_path: Path) -> AsyncIterator[SecuredNats]:
    port = servers.free_port()
    proc = servers.start_nats(port, tmp_path / "js", config=with_admin(creds / "nats-server.conf"))
    server = SecuredNats(f"nats://127.0.0.1:{port}", creds, proc)
    try:
        yield server
    finally:
        for nc in server.connections:
            if not nc.is_closed:
                await asyncio.wait_for(nc.close(), 5)
        servers.stop(proc, signal.SIGTERM)
