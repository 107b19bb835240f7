"""``swarmtrain demo``: the whole product in one command, against a fresh local stack.

Starts ``swarmtrain up`` on free ports, signs up a user, uploads the sample dataset (shipped in the
package), runs a sweep across the local peers (one learning rate each), shows every epoch live from
the session's event stream, then the leaderboard, downloads the best model and stops the stack. It
goes through ``client.Client`` and ``sessionview.Watcher``, the code paths of the user's commands.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import httpx

from swarmtrain.cli.client import ApiError, Client
from swarmtrain.cli.output import ProgressBar
from swarmtrain.cli.sessionview import Watcher, print_result
from swarmtrain.common.events import SWEEP
from swarmtrain.common.servers import free_port

LEARNING_RATES = [0.001, 0.003, 0.01, 0.03, 0.0003, 0.1]


def _wait_healthy(client: httpx.Client, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the stack exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if client.get("/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the stack did not come up in {timeout:.0f}s:\n{log.read_text()[-2000:]}")


def sample_dataset() -> Traversable:
    """The digits CSV shipped inside the package (so the demo works after a plain ``pip install``)."""
    return resources.files("swarmtrain.cli") / "data" / "digits.csv"


def demo(peers: int, csv_path: Path | None, epochs: int) -> int:
    if csv_path is not None and not csv_path.is_file():
        raise RuntimeError(f"dataset not found at {csv_path}")
    port, nats_port = free_port(), free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="swarmtrain-demo-"))
    log = data_dir / "up.log"
    cmd = [
        sys.executable,
        "-m",
        "swarmtrain.cli.main",
        "up",
        "--peers",
        str(peers),
        "--port",
        str(port),
        "--nats-port",
        str(nats_port),
        "--data-dir",
        str(data_dir / "data"),
    ]
    print(f"starting the stack: {' '.join(cmd[2:])}\n  (logs in {data_dir})", flush=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    api = f"http://127.0.0.1:{port}"
    client = Client(api)  # the same client the `swarmtrain login/datasets/sessions` commands use
    try:
        _wait_healthy(client.http, proc, log)
        email, password = f"demo-{uuid.uuid4().hex[:6]}@example.org", "demo-password-123"
        client.signup(email, password)
        client.signin(email, password)
        print(f"gateway {api}  dashboard {api}/ui/  nats nats://127.0.0.1:{nats_port}", flush=True)
        print(f"  sign in to the dashboard as {email} / {password}", flush=True)
        print(f"  watch live events: swarmtrain tap --nats nats://127.0.0.1:{nats_port}", flush=True)

        deadline = time.monotonic() + 120
        while len([p for p in client.peers() if p["status"] == "online"]) < peers:
            if time.monotonic() > deadline:
                raise RuntimeError("peers did not come online in 120s")
            time.sleep(0.5)
        with contextlib.ExitStack() as files:
            path = csv_path or files.enter_context(resources.as_file(sample_dataset()))
            bar = ProgressBar(f"uploading {path.name}")
            ds = client.upload(path, "label", bar)
        bar.finish(f"dataset {ds['dataset_id']}: {ds['rows']} rows, {ds['features']} features, {ds['classes']} classes")
        hps = [
            {"epochs": epochs, "batch_size": 64, "lr": LEARNING_RATES[i % len(LEARNING_RATES)]} for i in range(peers)
        ]
        body = {
            "dataset_id": ds["dataset_id"],
            "num_peers": peers,
            "strategy": SWEEP,
            "model": {"kind": "mlp", "hidden": [128, 64]},
            "hyperparameters": hps,
            "validation_split": 0.2,
            "seed": 0,
        }
        sid = client.start(body)["session_id"]
        print(f"session {sid}: {SWEEP} over {peers} peers, lr = {[h['lr'] for h in hps]}", flush=True)
        print(f"  live in the browser: {api}/ui/sessions/{sid}", flush=True)
        s = Watcher(client, sid).run()  # every epoch, live, from the session's event stream
        print_result(s)
        if s["status"] != "completed":
            return 1
        saved = Path.cwd() / f"swarmtrain-demo-{sid[:8]}.safetensors"
        size = client.download(sid, saved)
        print(f"best model ({size} bytes, safetensors) saved to {saved}")
        return 0
    except ApiError as exc:
        raise RuntimeError(str(exc)) from None
    finally:
        client.close()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("stack stopped")
