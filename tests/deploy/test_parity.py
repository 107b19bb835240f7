"""compose.yaml, run without Docker: the very commands and environment of its services, as local
processes, against the NATS configuration and credentials `swarmtrain nats-config` generated, an
S3-compatible server standing in for MinIO (moto) and PostgreSQL; then a sweep through REST.

What differs from compose, and only this: host names and ports (nats, minio, postgres, the
gateway's public URL and its port are rewritten to where the local servers listen), the peers' state folder, and
faster presence beats. Everything else comes from compose.yaml, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from safetensors.torch import load

from swarmtrain.cli.natsconfig import generate, read_env_file
from swarmtrain.common import servers
from swarmtrain.common.blob import S3Store
from swarmtrain.common.settings import from_env
from tests.factories import session_body
from tests.support import wait_for

from ..e2e.conftest import Api
from .composefile import Service, service

SECRETS = {
    "MINIO_ROOT_USER": "parity-user",
    "MINIO_ROOT_PASSWORD": "parity-password-0123456789",
    "POSTGRES_PASSWORD": "parity-pg-password",
    "SWARMTRAIN_JWT_SECRET": "parity-jwt-secret-0123456789abcdef0123456789",
    "SWARMTRAIN_BLOB_SIGNING_SECRET": "parity-blob-signing-secret-0123456789abcdef",
}


class Local:
    """Where the compose services' host names point in this test."""

    def __init__(self, tmp: Path, postgres_port: int) -> None:
        self.tmp = tmp
        self.vars = {**SECRETS, "SWARMTRAIN_NATS_DIR": str(tmp / "nats")}
        self.nats_port, self.s3_port, self.pg_port = servers.free_port(), servers.free_port(), postgres_port
        self.gateway_port = servers.free_port()
        self.database = f"parity{os.getpid()}{servers.free_port()}"
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def rewrite(self, value: str) -> str:
        return (
            value.replace("nats://nats:4222", f"nats://127.0.0.1:{self.nats_port}")
            .replace("minio:9000", f"127.0.0.1:{self.s3_port}")
            .replace("@postgres:5432/swarmtrain", f"@127.0.0.1:{self.pg_port}/{self.database}")
            .replace("http://gateway:8000", f"http://127.0.0.1:{self.gateway_port}")
        )

    def environment(self, svc: Service) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("SWARMTRAIN_")}
        return {**base, **{k: self.rewrite(v) for k, v in svc.environment().items()}}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = (self.tmp / f"{name}.log").open("wb")
        self.procs.append((name, subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)))
        log.close()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(self.tmp.glob("*.log"))
        )


@pytest.fixture
def local(tmp_path: Path, postgres_port: int) -> Iterator[Local]:
    from moto.server import ThreadedMotoServer

    here = Local(tmp_path, postgres_port)
    generate(tmp_path / "nats", peers=2)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=here.s3_port, verbose=False)
    moto.start()
    try:
        yield here
    finally:
        for _, proc in reversed(here.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in here.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        moto.stop()


async def create_database(port: int, name: str, password: str) -> None:
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = 'swarmtrain'"):
            await conn.execute(f"CREATE ROLE swarmtrain LOGIN PASSWORD '{password}'")
        await conn.execute(f"CREATE DATABASE {name} OWNER swarmtrain")
    finally:
        await conn.close()


async def test_the_compose_services_run_a_sweep_as_local_processes(local: Local) -> None:
    me = [sys.executable, "-m", "swarmtrain.cli.main"]

    # nats: the compose command's configuration file, found through its bind mount
    nats = service("nats", local.vars)
    config = nats.mounts()[nats.command[nats.command.index("-c") + 1]]
    assert config == (local.tmp / "nats" / "nats-server.conf").resolve() and "-js" in nats.command
    nats_proc = servers.start_nats(local.nats_port, local.tmp / "jetstream", config=config)
    local.procs.append(("nats-server", nats_proc))

    # minio-init's bucket, postgres' database and user
    gateway = service("gateway", local.vars)
    bucket_settings = from_env(local.environment(gateway))
    bucket = S3Store(bucket_settings.blob_url.removeprefix("s3://"), "", bucket_settings)
    await asyncio.to_thread(bucket.ensure_bucket)
    await create_database(local.pg_port, local.database, SECRETS["POSTGRES_PASSWORD"])

    for name in ("projector", "scheduler", "gateway"):
        svc = service(name, local.vars)
        env = local.environment(svc)
        env["SWARMTRAIN_PRESENCE_INTERVAL_S"] = "0.3"
        if name == "gateway":
            env["SWARMTRAIN_PORT"] = str(local.gateway_port)  # compose publishes 8000; any free port here
        local.start(name, [*me, *svc.command], env)

    peer = service("peer", local.vars)
    credentials = peer.mounts()[peer.command[peer.command.index("--credentials") + 1]]
    assert credentials == (local.tmp / "nats" / "peers").resolve()
    peer_argv = [*me, *[str(credentials) if a == "/run/swarmtrain/peers" else a for a in peer.command]]
    peer_env = {
        **local.environment(peer),
        "SWARMTRAIN_STATE_DIR": str(local.tmp / "peer-state"),
        "SWARMTRAIN_PRESENCE_INTERVAL_S": "0.3",
    }
    assert "SWARMTRAIN_DATABASE_URL" not in peer_env
    assert not [k for k in peer_env if k.startswith(("SWARMTRAIN_S3_", "SWARMTRAIN_BLOB_"))]  # no storage keys
    for i in (1, 2):  # the same command twice: each claims its own credential
        local.start(f"peer{i}", peer_argv, peer_env)

    api = Api(f"http://127.0.0.1:{local.gateway_port}")
    try:

        async def healthy() -> bool:
            for name, proc in local.procs:
                assert proc.poll() is None, f"{name} exited with {proc.returncode}\n{local.logs()}"
            try:
                return (await api.client.get("/healthz")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_for(healthy, "the gateway", timeout=60, interval=0.2)
        await api.signup()
        ids = {read_env_file(p)["SWARMTRAIN_PEER_ID"] for p in credentials.glob("peer-*.env")}
        try:
            online = await api.wait_idle_peers(2)
        except AssertionError:
            raise AssertionError(local.logs()) from None
        assert {p["peer_id"] for p in online} == ids  # the peers took the ids of their credentials

        ds = await api.upload()
        hps = [{"epochs": 2, "batch_size": 64, "lr": 0.01}, {"epochs": 2, "batch_size": 32, "lr": 0.003}]
        resp = await api.client.post(
            "/sessions",
            json=session_body(
                ds["dataset_id"],
                2,
                hps,
                strategy="sweep",
                model={"kind": "mlp", "hidden": [32]},
                validation_split=0.2,
                seed=1,
            ),
        )
        assert resp.status_code == 201, resp.text
        done = await api.wait_ended(resp.json()["session_id"], timeout=60)
        assert done["status"] == "completed", f"{done}\n{local.logs()}"
        assert {p["peer_id"] for p in done["peers"]} == ids
        model = await api.client.get(f"/sessions/{done['session_id']}/model")
        assert model.status_code == 200
        assert any(tuple(t.shape) == (32, 64) for t in load(model.content).values())
        # the dataset and both models went through the S3 API
        listed = await asyncio.to_thread(lambda: list(bucket.client.list_objects(bucket.bucket, recursive=True)))
        keys = [o.object_name or "" for o in listed]
        assert sum(k.endswith(".safetensors") for k in keys) == 2 and any(k.endswith(".csv") for k in keys), keys
    finally:
        await api.client.aclose()
