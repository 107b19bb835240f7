"""A peer's transfers ride out a restart of the server they go to: tried again with backoff for
``transfer_retry_s``, never past the URL's expiry. A real HTTP server that comes up late."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from swarmtrain.common import servers, signing
from swarmtrain.peer.strategies import with_retries

BODY = b"weights"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def late_server() -> Iterator[tuple[int, threading.Event]]:
    """A port on which an HTTP server starts 1.5 s from now (a gateway being restarted)."""
    port = servers.free_port()
    up = threading.Event()
    holder: list[ThreadingHTTPServer] = []

    def serve() -> None:
        time.sleep(1.5)
        server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        holder.append(server)
        up.set()
        server.serve_forever(poll_interval=0.05)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port, up
    up.wait(5)
    for server in holder:
        server.shutdown()
        server.server_close()


def test_a_transfer_outlasts_a_server_restart(late_server: tuple[int, threading.Event]) -> None:
    port, up = late_server
    url = f"http://127.0.0.1:{port}/blobs/k?exp={int(time.time()) + 600}&sig=x"
    body = with_retries("download", lambda: signing.fetch_bytes(url, 1 << 20, None), url, budget_s=10)
    assert body == BODY and up.is_set()


def test_a_transfer_gives_up_at_its_urls_expiry(late_server: tuple[int, threading.Event]) -> None:
    port, _ = late_server
    url = f"http://127.0.0.1:{port}/blobs/k?exp={int(time.time())}&sig=x"  # expired already
    tries = []

    def fetch() -> bytes:
        tries.append(1)
        return signing.fetch_bytes(url, 1 << 20, None)

    with pytest.raises(httpx.TransportError):
        with_retries("download", fetch, url, budget_s=10)
    assert tries == [1]  # no second try: the URL would be refused by the time the server is back


def test_a_transfer_refused_by_the_server_is_not_tried_again() -> None:
    calls = []

    def refused() -> None:
        calls.append(1)
        request = httpx.Request("GET", "http://x/blobs/k")
        raise httpx.HTTPStatusError("403", request=request, response=httpx.Response(403, request=request))

    with pytest.raises(httpx.HTTPStatusError):
        with_retries("download", refused, budget_s=10)
    assert calls == [1]
