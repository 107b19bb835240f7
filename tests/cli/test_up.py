"""`swarmtrain up` refuses a taken port with a clear message instead of talking to someone else's server."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from swarmtrain.common import servers


@pytest.mark.parametrize("flag", ["--nats-port", "--port"])
def test_up_names_the_port_that_is_taken(flag: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {"--port": servers.free_port(), "--nats-port": servers.free_port(), flag: busy}
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "swarmtrain.cli.main",
                "up",
                "--peers",
                "0",
                "--data-dir",
                str(tmp_path),
                *(str(x) for kv in ports.items() for x in kv),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"port {busy} is already in use" in result.stderr and flag in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "postgres").exists()  # nothing was started
