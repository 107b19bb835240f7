"""``swarmtrain health``: the image's one HEALTHCHECK, answering for the role its container runs."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from swarmtrain.cli.health import check, role_of
from swarmtrain.common import servers
from swarmtrain.common.settings import Settings


def test_the_role_is_the_swarmtrain_command_of_the_process() -> None:
    assert role_of(b"/opt/venv/bin/python\0/opt/venv/bin/swarmtrain\0gateway\0") == "gateway"
    assert role_of(b"python\0-m\0swarmtrain.cli.main\0peer\0--device\0cpu\0") == "peer"
    assert role_of(b"/opt/venv/bin/swarmtrain\0--version\0") is None
    assert role_of(b"nats-server\0-js\0") is None


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path in ("/metrics", "/healthz") else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serving() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _process(*argv: str) -> subprocess.Popen[bytes]:
    # a process whose command line reads as `swarmtrain <role>`, as PID 1 of a container does
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "swarmtrain", *argv])


def test_each_role_is_asked_at_the_port_its_settings_name(serving: int) -> None:
    projector, gateway, peer = _process("projector"), _process("gateway"), _process("peer")
    try:
        healthy, what = check(Settings(metrics_port=serving, metrics_host="0.0.0.0"), pid=projector.pid)
        assert healthy and f"127.0.0.1:{serving}/metrics" in what
        assert check(Settings(port=serving), pid=gateway.pid)[0]
        closed = servers.free_port()
        healthy, what = check(Settings(port=closed), pid=gateway.pid)
        assert not healthy and f":{closed}/healthz" in what
        assert check(Settings(), pid=peer.pid) == (True, "peer running (no SWARMTRAIN_METRICS_PORT to ask)")
    finally:
        for proc in (projector, gateway, peer):
            proc.kill()
            proc.wait()
    assert not check(Settings(), pid=projector.pid)[0]  # gone
