"""``swarmtrain demo``: the whole product in one command, against a fresh local stack.

Starts ``swarmtrain up`` on free ports, signs up a user, uploads the sample dataset, runs a sweep
across the local peers (one learning rate each), shows every epoch live from the session's event
stream, then the leaderboard, downloads the best model and stops the stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from swarmtrain.common.servers import free_port
from swarmtrain.common.status import SESSION_TERMINAL

TERMINAL = SESSION_TERMINAL
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


def _check(resp: httpx.Response, what: str) -> dict:  # type: ignore[type-arg]
    if resp.status_code >= 400:
        raise RuntimeError(f"{what} failed: {resp.status_code} {resp.text[:300]}")
    body: dict = resp.json()  # type: ignore[type-arg]
    return body


def demo(peers: int, csv_path: Path, epochs: int) -> int:
    if not csv_path.is_file():
        raise RuntimeError(f"sample dataset not found at {csv_path}; pass --dataset FILE.csv")
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
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        _wait_healthy(client, proc, log)
        email, password = f"demo-{uuid.uuid4().hex[:6]}@example.org", "demo-password-123"
        _check(client.post("/auth/signup", json={"email": email, "password": password}), "sign-up")
        token = _check(client.post("/auth/signin", json={"email": email, "password": password}), "sign-in")
        client.headers["Authorization"] = f"Bearer {token['access_token']}"
        print(f"gateway http://127.0.0.1:{port}  nats nats://127.0.0.1:{nats_port}", flush=True)
        print(f"  watch live events: swarmtrain tap --nats nats://127.0.0.1:{nats_port}", flush=True)

        deadline = time.monotonic() + 120
        while len([p for p in _check(client.get("/peers"), "peers") if p["status"] == "online"]) < peers:  # type: ignore[attr-defined]
            if time.monotonic() > deadline:
                raise RuntimeError("peers did not come online in 120s")
            time.sleep(0.5)
        with csv_path.open("rb") as f:
            ds = _check(client.post("/datasets", files={"file": (csv_path.name, f, "text/csv")}), "upload")
        print(f"dataset {ds['dataset_id']}: {ds['rows']} rows, {ds['features']} features, {ds['classes']} classes")
        hps = [
            {"epochs": epochs, "batch_size": 64, "lr": LEARNING_RATES[i % len(LEARNING_RATES)]} for i in range(peers)
        ]
        body = {
            "dataset_id": ds["dataset_id"],
            "num_peers": peers,
            "strategy": "sweep",
            "model": {"kind": "mlp", "hidden": [128, 64]},
            "hyperparameters": hps,
            "validation_split": 0.2,
            "seed": 0,
        }
        sid = _check(client.post("/sessions", json=body), "session")["session_id"]
        print(f"session {sid}: sweep over {peers} peers, lr = {[h['lr'] for h in hps]}", flush=True)
        # every event of the session, live, from the gateway's Server-Sent Events stream
        with client.stream("GET", f"/sessions/{sid}/stream", timeout=None) as events:
            for line in events.iter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if event["type"] == "Heartbeat":
                    va = event["val_accuracy"]
                    print(
                        f"  {event['peer_id'][:8]}  epoch {event['epoch']:>3}/{event['epochs']}"
                        f"  loss {event['loss']:.4f}  val_acc {va if va is None else f'{va:.3f}'}"
                        f"  {event['samples_per_s']:,.0f} samples/s",
                        flush=True,
                    )
                elif event["type"] in ("PeerDone", "PeerFailed", "SessionStarted"):
                    print(f"  {event['type']} {event.get('peer_id', '')[:8]} {event.get('reason', '')}", flush=True)
        while (s := _check(client.get(f"/sessions/{sid}"), "session status"))["status"] not in TERMINAL:
            time.sleep(0.2)  # the stream ended on the terminal event; the read model follows within moments
        print(f"session {s['status']}")
        if s["status"] != "completed":
            return 1
        print("leaderboard (validation accuracy):")
        for p in sorted(s["peers"], key=lambda p: -(p["val_accuracy"] or 0)):
            star = "*" if p["peer_id"] == s["best_peer_id"] else " "
            print(f" {star} {p['peer_id'][:8]}  lr {p['hyperparameters']['lr']:<7} val_acc {p['val_accuracy']:.3f}")
        model = client.get(f"/sessions/{sid}/model")
        saved = Path.cwd() / f"swarmtrain-demo-{sid[:8]}.safetensors"
        saved.write_bytes(model.content)
        print(f"best model ({len(model.content)} bytes, safetensors) saved to {saved}")
        return 0
    finally:
        client.close()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("stack stopped")
