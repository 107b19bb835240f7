"""A process whose NATS credential is refused ends at once on SIGTERM or SIGINT.

docs/many-machines.md promises it: a service or peer started with a credential NATS does not
know (a revoked peer, a configuration not reloaded yet) retries every half second, and a signal
must still end it, cleanly (exit 0), not after a SIGKILL. Real processes, against a nats-server
running the configuration ``swarmtrain nats-config`` wrote.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from swarmtrain.cli.natsconfig import new_seed
from swarmtrain.common import servers
from tests.support import wait_for

from .conftest import SecuredNats

EXIT_BOUND_S = 30.0
"""A bound, not a timing: before the fix the process never exited at all."""


def _env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARMTRAIN_")}
    # a well-formed nkey seed that NATS has never heard of: every attempt is an Authorization Violation
    return {**env, "SWARMTRAIN_NATS_URL": url, "SWARMTRAIN_NATS_NKEY_SEED": new_seed(), **extra}


def _start(service: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "swarmtrain.cli.main", service], env=env, stdout=out, stderr=subprocess.STDOUT
        )


@pytest.mark.parametrize(
    ("service", "sig"),
    [("scheduler", signal.SIGTERM), ("gateway", signal.SIGINT), ("projector", signal.SIGTERM)],
)
async def test_a_signal_ends_a_process_whose_credential_nats_refuses(
    secured: SecuredNats, database_url: str, tmp_path: Path, service: str, sig: signal.Signals
) -> None:
    extra = {
        "SWARMTRAIN_DATABASE_URL": database_url,
        "SWARMTRAIN_PORT": str(servers.free_port()),
        "SWARMTRAIN_JWT_SECRET": "test-only-jwt-secret-0123456789abcdef",
        "SWARMTRAIN_BLOB_URL": (tmp_path / "blobs").as_uri(),
    }
    log = tmp_path / f"{service}.log"
    proc = _start(service, _env(secured.url, **extra), log)
    try:
        # it has been refused twice: it is in the retry loop the signal used to be lost in
        await wait_for(
            lambda: log.read_text(errors="replace").count("Authorization Violation") >= 2,
            f"{service} refused by NATS",
            timeout=60,
            interval=0.2,
        )
        proc.send_signal(sig)
        try:
            code = await asyncio.to_thread(proc.wait, EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{service} ignored {sig.name} while NATS refused its credential:\n{log.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "stopped while connecting to NATS" in text
    if service != "gateway":  # uvicorn logs the startup it did not finish, with its traceback
        assert "Traceback" not in text
