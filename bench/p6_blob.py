"""P6 averaging goodput: model weights through the blob store path fedavg uses vs a raw copy.

A (platform), as ``swarmtrain.peer.fedavg`` does it: publish = ``blob.resolve(uri)`` then
``put_bytes`` (streamed to a temp file while hashed with sha256, then renamed into place); fetch =
``resolve`` then ``iter_chunks`` joined, then the sha256 checked against the promised one.
B (raw): a loopback TCP copy of the same bytes (sent to a socket on 127.0.0.1 and read back, no
extra copies), the issue's reference; and, stricter, ``open(..., "wb").write(data)`` then
``open(..., "rb").read()`` in the same folder: no hashing, no temp file, no rename.

Goodput = bytes / (publish + fetch seconds), for weights of 1, 10 and 100 MB; A, B, B' rotate.

Also, clearly labelled, the S3 store against a moto server (moto is a Python mock of S3, far
slower than MinIO, so this is a floor for the S3 path, not MinIO's figure) vs a raw loopback TCP
copy of the same bytes (sent to a local socket and read back).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench._common import Report, cli_output, median, quick, rss_mib, settings
from swarmtrain.common import blob, servers
from swarmtrain.common.settings import Settings

MB = 1_000_000
SIZES = {1 * MB: 3, 10 * MB: 2} if quick() else {1 * MB: 15, 10 * MB: 7, 100 * MB: 5}
S3_SIZES = {1 * MB: 2} if quick() else {1 * MB: 5, 10 * MB: 3}


def platform_roundtrip(uri: str, data: bytes, settings: Settings) -> float:
    t = time.perf_counter()
    store, key = blob.resolve(uri, settings)
    ref = store.put_bytes(key, data)
    store, key = blob.resolve(uri, settings)
    got = b"".join(store.iter_chunks(key))
    if hashlib.sha256(got).hexdigest() != ref.sha256:
        raise RuntimeError("sha256 mismatch")
    elapsed = time.perf_counter() - t
    store.delete(key)
    return elapsed


def raw_file_roundtrip(path: Path, data: bytes) -> float:
    t = time.perf_counter()
    with path.open("wb") as f:
        f.write(data)
    with path.open("rb") as f:
        got = f.read()
    elapsed = time.perf_counter() - t
    assert len(got) == len(data)
    path.unlink()
    return elapsed


class Echo:
    """A loopback TCP server that reads ``n`` bytes then sends them back; buffers are reused, so a
    round trip is two socket copies and nothing else."""

    def __init__(self, size: int) -> None:
        self.server_buf = bytearray(size)
        self.client_buf = bytearray(size)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            with conn:
                header = bytearray(8)
                _read_into(conn, memoryview(header))
                view = memoryview(self.server_buf)[: int.from_bytes(header, "big")]
                _read_into(conn, view)
                conn.sendall(view)

    def roundtrip(self, data: bytes) -> float:
        view = memoryview(self.client_buf)[: len(data)]
        t = time.perf_counter()
        with socket.create_connection(("127.0.0.1", self.port)) as conn:
            conn.sendall(len(data).to_bytes(8, "big"))
            conn.sendall(data)
            _read_into(conn, view)
        return time.perf_counter() - t


def _read_into(conn: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        k = conn.recv_into(view[got:], min(len(view) - got, 1 << 20))
        if not k:
            raise ConnectionError("short read")
        got += k


def file_store(report: Report, root: Path, payload: bytes) -> None:
    store = blob.FileStore(root / "store")
    config = settings(root, blob_url=(root / "store").as_uri())
    echo = Echo(max(SIZES))
    for size, reps in SIZES.items():
        data = payload[:size]
        a, b_file, b_tcp = [], [], []
        for i in range(reps + 1):  # the first round warms up
            uri = store.uri(f"sessions/s/rounds/1/p{i}.safetensors")
            ta = platform_roundtrip(uri, data, config)
            tb = raw_file_roundtrip(root / f"raw-{i}.bin", data)
            tc = echo.roundtrip(data)
            if i:
                a.append(size / ta)
                b_file.append(size / tb)
                b_tcp.append(size / tc)
        row = report.add(
            f"file:// {size // MB} MB publish+fetch",
            median(a),
            "B/s",
            reference=median(b_tcp),
            reference_name="raw loopback TCP copy",
            target=">= 0.5",
        )
        row.met = (row.ratio or 0) >= 0.5
        report.add(
            f"file:// {size // MB} MB publish+fetch",
            median(a),
            "B/s",
            reference=median(b_file),
            reference_name="raw file write+read",
            note="stricter floor: no socket at all",
        )


def s3_store(report: Report, root: Path, payload: bytes) -> None:
    port = servers.free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        servers.wait_port(port, moto, "moto server")
        config = settings(
            root,
            blob_url="s3://bench",
            s3_endpoint=f"127.0.0.1:{port}",
            s3_access_key="bench",
            s3_secret_key="bench-secret",
            s3_region="us-east-1",
        )
        store = blob.S3Store("bench", settings=config)
        store.ensure_bucket()
        echo = Echo(max(S3_SIZES))
        for size, reps in S3_SIZES.items():
            data = payload[:size]
            a, b = [], []
            for i in range(reps + 1):
                ta = platform_roundtrip(store.uri(f"rounds/1/p{i}.safetensors"), data, config)
                tb = echo.roundtrip(data)
                if i:
                    a.append(size / ta)
                    b.append(size / tb)
            report.add(
                f"s3:// (moto mock) {size // MB} MB publish+fetch",
                median(a),
                "B/s",
                reference=median(b),
                reference_name="raw loopback TCP copy",
                note="moto is a Python mock of S3, not MinIO",
            )
        report.extra["moto_rss_mib"] = rss_mib(moto.pid)
    finally:
        servers.stop(moto, signal.SIGTERM)


def main() -> Report:
    import tempfile

    report = Report("P6 blob")
    payload = os.urandom(max(SIZES))
    with tempfile.TemporaryDirectory(prefix="swarmtrain-bench-p6-") as tmp:
        file_store(report, Path(tmp), payload)
        if os.environ.get("BENCH_S3", "1") != "0":
            s3_store(report, Path(tmp), payload)
    return report


if __name__ == "__main__":
    main().write(cli_output())
