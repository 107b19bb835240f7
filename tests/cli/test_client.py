"""The user's commands against a real stack (``swarmtrain up`` as processes): login, upload, start,
watch to the end with non-TTY output, download, plot, and the operator's Prometheus exposition."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from safetensors.numpy import load_file

from swarmtrain.cli.client import Client
from swarmtrain.common import servers
from tests.e2e.conftest import DIGITS, Api, Stack
from tests.factories import session_body
from tests.training.formatdata import archive, corpus, digit_images, table_parquet

pytestmark = pytest.mark.e2e
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, postgres_port: int) -> Iterator[Stack]:
    name = f"cli{uuid.uuid4().hex[:8]}"
    servers.create_database(postgres_port, name)
    st = Stack(tmp_path_factory.mktemp("stack"), servers.postgres_url(postgres_port, name), peers=2)
    try:
        asyncio.run(st.wait_healthy())
        yield st
    finally:
        assert not st.stop(), "swarmtrain up left processes behind"


class Cli:
    """``swarmtrain`` as a user runs it: a process, its own config dir, output to pipes (no TTY)."""

    def __init__(self, stack: Stack, home: Path) -> None:
        self.stack, self.home = stack, home
        self.env = {**os.environ, "XDG_CONFIG_HOME": str(home / "config"), "HOME": str(home)}

    def __call__(self, *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "swarmtrain.cli.main", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.home,
            timeout=timeout,
        )

    def json(self, *args: str) -> object:
        result = self(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture(scope="module")
def cli(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    runner = Cli(stack, tmp_path_factory.mktemp("home"))
    email = f"cli{uuid.uuid4().hex[:8]}@example.org"
    result = runner("login", "--api", stack.url, "--signup", "--email", email, "--password-stdin", stdin=PASSWORD)
    assert result.returncode == 0, result.stderr
    assert f"as {email}" in result.stdout
    return runner


@pytest.fixture(scope="module")
def dataset_id(cli: Cli) -> str:
    result = cli("datasets", "upload", str(DIGITS))
    assert result.returncode == 0, result.stderr
    assert "1797 rows, 64 features, 10 classes" in result.stderr
    listed = cli.json("datasets", "ls")
    assert isinstance(listed, list) and len(listed) == 1
    return str(listed[0]["dataset_id"])


def _wait_idle_peers(cli: Cli, n: int) -> None:
    config = json.loads((cli.home / "config" / "swarmtrain" / "config.json").read_text())

    async def wait() -> None:
        api = Api(config["api_url"])
        try:
            api.client.headers["Authorization"] = f"Bearer {config['token']}"
            await api.wait_idle_peers(n)
        finally:
            await api.client.aclose()

    asyncio.run(wait())


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_login_stores_the_token_for_the_user_only(cli: Cli) -> None:
    path = cli.home / "config" / "swarmtrain" / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert stored["api_url"] == cli.stack.url and stored["token"]
    me = httpx.get(cli.stack.url + "/auth/me", headers={"Authorization": f"Bearer {stored['token']}"})
    assert me.status_code == 200
    again = cli("login", "--api", cli.stack.url, "--token-stdin", stdin=stored["token"] + "\n")
    assert again.returncode == 0, again.stderr


@pytest.mark.timeout(300)  # it also exports the model to ONNX (torch's exporter: tens of seconds)
def test_sweep_from_start_to_plot(cli: Cli, dataset_id: str, tmp_path: Path) -> None:
    _wait_idle_peers(cli, 2)
    started = cli.json(
        "sessions", "start", "--dataset", dataset_id, "--peers", "2", "--epochs", "3", "--lr", "0.003,0.01"
    )
    assert isinstance(started, dict)
    sid = started["session_id"]

    watched = cli("sessions", "watch", sid)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    lines = watched.stdout.splitlines()
    assert sum("epoch   3/3" in line for line in lines) == 2, watched.stdout  # one line per peer's epoch
    assert any(line.startswith("SessionCompleted") for line in lines)
    assert "leaderboard (validation accuracy):" in watched.stdout
    assert "\x1b[" not in watched.stdout  # no terminal control codes off a terminal

    shown = cli.json("sessions", "show", sid)
    assert isinstance(shown, dict) and shown["status"] == "completed" and shown["model_available"]
    events = cli.json("sessions", "events", sid)
    assert isinstance(events, list) and events[-1]["event"]["type"] == "SessionCompleted"
    assert [s["session_id"] for s in cli.json("sessions", "ls")] == [sid]  # type: ignore[union-attr]
    for command, header in (
        ("sessions", ["SESSION", "STATUS", "STRATEGY"]),
        ("datasets", ["DATASET", "NAME", "ROWS"]),
        ("peers", ["NAME", "DEVICE", "STATUS"]),
    ):
        listed = cli(command, "ls")  # a table off --json: a header, its rule, a row per item
        lines = listed.stdout.splitlines()
        assert listed.returncode == 0 and lines[0].split()[:3] == header and set(lines[1]) <= {"-", " "}
        assert len(lines) >= 3 and (command != "sessions" or lines[2].startswith(sid))

    model = tmp_path / "model.safetensors"
    downloaded = cli("sessions", "download", sid, "-o", str(model))
    assert downloaded.returncode == 0, downloaded.stderr
    assert load_file(str(model))  # a readable safetensors file with tensors in it
    _exported_onnx_equals_torch(cli, sid, model, tmp_path)

    png = tmp_path / "curves.png"
    plotted = cli("sessions", "plot", sid, "-o", str(png))
    assert plotted.returncode == 0, plotted.stderr
    assert _png_size(png) == (1200, 400)
    small = tmp_path / "small.png"
    assert cli("sessions", "plot", sid, "-o", str(small), "--size", "600x300").returncode == 0
    assert _png_size(small) == (600, 300)


def test_fedavg_from_a_body_file_watched_to_its_rounds(cli: Cli, dataset_id: str, tmp_path: Path) -> None:
    _wait_idle_peers(cli, 2)
    body = tmp_path / "body.json"
    body.write_text(
        json.dumps(
            session_body(dataset_id, 2, {"epochs": 1, "batch_size": 32, "lr": 0.003}, strategy="fedavg", rounds=2)
        )
    )
    result = cli("sessions", "start", "--file", str(body), "--seed", "7", "--watch")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RoundClosed round 2" in result.stdout
    assert "rounds:" in result.stdout and "val accuracy" in result.stdout


def test_cancelled_session_exits_2(cli: Cli, dataset_id: str) -> None:
    _wait_idle_peers(cli, 1)
    started = cli.json("sessions", "start", "--dataset", dataset_id, "--peers", "1", "--epochs", "500")
    assert isinstance(started, dict)
    sid = started["session_id"]
    cancelled = cli("sessions", "cancel", sid)
    assert cancelled.returncode == 0, cancelled.stderr
    watched = cli("sessions", "watch", sid)
    assert watched.returncode == 2, watched.stdout + watched.stderr
    assert f"session {sid}: cancelled" in watched.stdout


def test_errors_are_the_apis_problem_on_one_line(cli: Cli, dataset_id: str) -> None:
    missing = cli("sessions", "show", uuid.uuid4().hex)
    assert missing.returncode == 1
    assert missing.stderr.startswith("swarmtrain: error: 404 no session") and missing.stderr.count("\n") == 1
    bad = cli("sessions", "start", "--dataset", dataset_id, "--peers", "2", "--epochs", "0")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("swarmtrain: error: 400 ") and "epochs" in bad.stderr
    watch = cli("sessions", "watch", uuid.uuid4().hex)
    assert watch.returncode == 3 and "404" in watch.stderr


def test_prometheus_exposition_counts_what_happened(cli: Cli, dataset_id: str) -> None:
    text = httpx.get(cli.stack.url + "/metrics/prometheus").text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")
    }
    assert samples['swarmtrain_events_appended_total{type="DatasetUploaded"}'] >= 1
    assert samples['swarmtrain_sessions{status="completed"}'] >= 0
    assert "swarmtrain_projection_lag_events" in samples and "swarmtrain_dead_letters" in samples
    assert sum(v for k, v in samples.items() if k.startswith("swarmtrain_peers_online{")) == 2


def test_client_library_speaks_the_same_api(cli: Cli) -> None:
    config = json.loads((cli.home / "config" / "swarmtrain" / "config.json").read_text())
    with Client(config["api_url"], config["token"]) as client:
        assert client.me()["email"].startswith("cli")
        assert len(client.datasets()) == 1


def test_datasets_of_every_format_uploaded_and_shown(cli: Cli, tmp_path: Path) -> None:
    """After the tests above count the datasets: ``datasets upload --format/--image-size/--vocab-size``
    and ``datasets show``, the facts and the preview as text."""
    table = tmp_path / "table.parquet"
    table.write_bytes(table_parquet(rows=40))
    up = cli("datasets", "upload", str(table), "--format", "parquet")
    assert up.returncode == 0 and "40 rows, 6 features, 3 classes" in up.stderr, up.stderr
    shown = cli("datasets", "show", up.stderr.split("dataset ")[-1].split(":")[0])
    assert shown.returncode == 0, shown.stderr
    assert "(parquet," in shown.stdout and "first rows:" in shown.stdout and "colour" in shown.stdout
    histogram = shown.stdout.split("classes:\n", 1)[1].splitlines()
    assert [(line.split()[0], line.split()[-1]) for line in histogram] == [("c0", "14"), ("c1", "13"), ("c2", "13")]

    images = tmp_path / "digits.tar.gz"
    images.write_bytes(archive(digit_images(40), "tar.gz"))
    up = cli("datasets", "upload", str(images), "--image-size", "8x8", "--json")
    assert up.returncode == 0, up.stderr
    ds = json.loads(up.stdout)
    assert (ds["format"], ds["shape"]) == ("images", [1, 8, 8])
    shown = cli("datasets", "show", ds["dataset_id"])
    assert shown.returncode == 0 and "class 7:" in shown.stdout and "@" in shown.stdout, shown.stdout

    corpus_file = tmp_path / "c.txt"
    lines = corpus(20)
    corpus_file.write_text("\n".join(lines) + "\n")
    up = cli("datasets", "upload", str(corpus_file), "--format", "text", "--vocab-size", "280")
    assert up.returncode == 0 and "20 rows" in up.stderr and "(bpe tokenizer)" in up.stderr, up.stderr
    shown = cli.json("datasets", "show", up.stderr.split("dataset ")[-1].split(":")[0])
    assert isinstance(shown, dict) and shown["preview"]["lines"] == lines[:10]

    bad = cli("datasets", "upload", str(corpus_file), "--format", "npz")
    assert bad.returncode == 1 and "not an .npz file" in bad.stderr and "Traceback" not in bad.stderr


def _exported_onnx_equals_torch(cli: Cli, sid: str, model: Path, tmp_path: Path) -> None:
    """``sessions export --onnx``: onnxruntime on the dataset's rows gives what ``load_model`` gives."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from swarmtrain.training.export import load

    onnx_file = tmp_path / "model.onnx"
    exported = cli("sessions", "export", sid, "--onnx", str(onnx_file))
    assert exported.returncode == 0, exported.stderr
    rows = [line.split(",")[:-1] for line in DIGITS.read_text().splitlines()[1:41]]
    x = np.asarray(rows, dtype=np.float32)
    with torch.no_grad():
        want = load(model)(torch.from_numpy(x)).numpy()
    (got,) = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(["output"], {"input": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
