"""The embedded servers start, serve, keep their data and stop without leaving a process or port."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
from pathlib import Path

import asyncpg
import nats
import pytest

from swarmtrain.common import bus, events, servers


def assert_port_closed(port: int) -> None:
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


async def stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    await asyncio.to_thread(servers.stop, proc, sig)


async def test_nats_starts_serves_jetstream_and_stops(tmp_path: Path) -> None:
    port = servers.free_port()
    store = tmp_path / "jetstream"
    proc = await asyncio.to_thread(servers.start_nats, port, store)
    try:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream()
        await bus.ensure_streams(js)
        seq = await bus.append(js, events.PeerWentOnline(peer_id="p1"))
        await nc.close()
    finally:
        await stop(proc, signal.SIGTERM)

    assert proc.returncode is not None
    assert_port_closed(port)

    # Restarted on the same store directory, the stream still holds the event.
    proc = await asyncio.to_thread(servers.start_nats, port, store)
    try:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        assert await bus.last_sequence(nc.jetstream()) == seq
        await nc.close()
    finally:
        await stop(proc, signal.SIGTERM)
    assert_port_closed(port)


async def test_a_second_postgres_starts_keeps_its_data_and_stops(tmp_path: Path) -> None:
    port = servers.free_port()
    data_dir = tmp_path / "pg"
    proc = await asyncio.to_thread(servers.start_postgres, data_dir, port, None, False)
    try:
        conn = await asyncpg.connect(servers.postgres_url(port))  # the database was created
        await conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        await conn.close()
    finally:
        await stop(proc, signal.SIGINT)

    assert proc.returncode == 0  # a clean "fast shutdown"
    assert_port_closed(port)

    proc = await asyncio.to_thread(servers.start_postgres, data_dir, port, None, False)
    try:
        conn = await asyncpg.connect(servers.postgres_url(port))
        assert await conn.fetchval("SELECT v FROM kept") == 42
        await conn.close()
    finally:
        await stop(proc, signal.SIGINT)
    assert proc.returncode == 0
    assert_port_closed(port)
