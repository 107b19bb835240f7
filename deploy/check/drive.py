"""The REST half of `make compose-check`: what a user does against the compose stack's gateway.

  python drive.py train  --api URL --dataset CSV --strategy sweep|fedavg [--download FILE]
  python drive.py ha     --api URL --dataset CSV --strategy fedavg|sweep --kill "CMD {service}" --monitor PORT...

``train`` signs up, uploads the CSV, runs one session on 2 peers to its end and, with --download,
saves the session's model (safetensors) and checks it. ``ha`` does the same, and while the session
runs, asks each NATS node's monitoring port which node leads the EVENTS stream, runs --kill with
that node's compose service, and waits for the session to end. Prints what it does; exits 1 unless the session
completed. Only httpx (a swarmtrain dependency) is needed.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"completed", "failed", "cancelled"}
MONITORS = {"nats-1": 8222, "nats-2": 8223, "nats-3": 8224}
"""compose.yaml's monitoring port of each node (x-ports)."""


def say(text: str) -> None:
    print(f"    {text}", flush=True)


def client(api: str) -> httpx.Client:
    c = httpx.Client(base_url=api, timeout=30)
    email, password = f"check-{uuid.uuid4().hex[:8]}@example.org", "compose-check-password"
    for path in ("/auth/signup", "/auth/signin"):
        resp = c.post(path, json={"email": email, "password": password})
        resp.raise_for_status()
    c.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"
    say(f"signed up and in as {email}")
    return c


def wait_peers(c: httpx.Client, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        online = [p for p in c.get("/peers").json() if p["status"] == "online"]
        if len(online) >= n:
            say(f"{len(online)} peers online: {', '.join(p['name'] for p in online)}")
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(online)} of {n} peers online after {timeout:.0f}s")
        time.sleep(1)


def upload(c: httpx.Client, csv: Path) -> str:
    resp = c.post("/datasets", files={"file": (csv.name, csv.read_bytes(), "text/csv")})
    resp.raise_for_status()
    ds = resp.json()
    say(f"dataset {ds['dataset_id']}: {ds['rows']} rows")
    return str(ds["dataset_id"])


def body(dataset_id: str, strategy: str, rounds: int) -> dict[str, Any]:
    common = {"dataset_id": dataset_id, "num_peers": 2, "validation_split": 0.2, "seed": 1}
    common["model"] = {"kind": "mlp", "hidden": [64, 32]}
    if strategy == "sweep":
        hps = [{"epochs": 4, "batch_size": 64, "lr": lr} for lr in (0.003, 0.01)]
        return {**common, "strategy": "sweep", "hyperparameters": hps}
    local = {"epochs": 1, "batch_size": 32, "lr": 0.003}
    return {**common, "strategy": "fedavg", "rounds": rounds, "hyperparameters": local}


def start(c: httpx.Client, request: dict[str, Any]) -> str:
    resp = c.post("/sessions", json=request)
    if resp.status_code != 201:
        raise SystemExit(f"POST /sessions: {resp.status_code} {resp.text}")
    sid = str(resp.json()["session_id"])
    say(f"session {sid}: {request['strategy']} on {request['num_peers']} peers")
    return sid


def wait_end(c: httpx.Client, sid: str, timeout: float = 600) -> dict[str, Any]:
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        s: dict[str, Any] = c.get(f"/sessions/{sid}").json()
        line = f"status {s['status']}" + (f", round {s.get('round')}" if s.get("round") else "")
        if line != last:
            say(line)
            last = line
        if s["status"] in TERMINAL:
            return s
        time.sleep(1)
    raise SystemExit(f"session {sid} did not end in {timeout:.0f}s")


def download(c: httpx.Client, sid: str, out: Path) -> None:
    with c.stream("GET", f"/sessions/{sid}/model") as resp:
        resp.raise_for_status()
        with out.open("wb") as f:
            for chunk in resp.iter_bytes():
                f.write(chunk)
    data = out.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])  # safetensors: a little-endian header length, then JSON
    tensors = [k for k in json.loads(data[8 : 8 + n]) if k != "__metadata__"]
    say(f"model saved to {out}: {len(data)} bytes, safetensors with {len(tensors)} tensors")


def stream_leader(monitors: list[int]) -> str | None:
    """The server name that leads the EVENTS stream, as any reachable node's /jsz tells."""
    for port in monitors:
        try:
            jsz = httpx.get(f"http://127.0.0.1:{port}/jsz", params={"accounts": "true", "streams": "true"}, timeout=2)
        except httpx.HTTPError:
            continue
        for account in jsz.json().get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                if stream.get("name") == "EVENTS" and (stream.get("cluster") or {}).get("leader"):
                    return str(stream["cluster"]["leader"])
    return None


def finish(s: dict[str, Any]) -> int:
    if s["status"] != "completed":
        say(f"FAILED: {json.dumps({k: s.get(k) for k in ('status', 'reason', 'peers')})[:1500]}")
        return 1
    figures = [f"{p.get('peer_id')}: {p.get('status')}" for p in s.get("peers") or []]
    say(f"completed ({'; '.join(figures)})")
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "ha"])
    p.add_argument("--api", default="http://127.0.0.1:8000")
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--strategy", choices=["sweep", "fedavg"], required=True)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--download", type=Path)
    p.add_argument("--sid-file", type=Path, help="append the session id here")
    p.add_argument("--kill", help="ha: a shell command; {node}, {service}: the stream leader's name, compose service")
    p.add_argument("--monitor", type=int, nargs="*", default=list(MONITORS.values()))
    args = p.parse_args()
    c = client(args.api)
    wait_peers(c, 2)
    sid = start(c, body(upload(c, args.dataset), args.strategy, args.rounds))
    if args.sid_file:
        with args.sid_file.open("a") as f:
            f.write(sid + "\n")
    if args.mode == "ha":
        deadline = time.monotonic() + 120
        while c.get(f"/sessions/{sid}").json()["status"] != "running":  # mid-session: training has begun
            if time.monotonic() > deadline:
                raise SystemExit("the session did not start running in 120s")
            time.sleep(0.5)
        time.sleep(3)
        leader = stream_leader(args.monitor)
        if leader is None:
            raise SystemExit("no node names an EVENTS stream leader")
        service = "nats" if leader == "nats-1" else leader  # compose.yaml's service of that node
        command = args.kill.format(node=leader, service=service)
        say(f"EVENTS stream leader: {leader}; killing its container mid-session: {command}")
        subprocess.run(command, shell=True, check=True, stdout=subprocess.DEVNULL)
        killed_at, elected = time.monotonic(), None
        while time.monotonic() - killed_at < 60 and elected in (None, leader):
            time.sleep(0.5)
            elected = stream_leader([p for p in args.monitor if p != MONITORS.get(leader)])
        say(f"EVENTS stream leader after {time.monotonic() - killed_at:.1f} s: {elected}")
    s = wait_end(c, sid)
    code = finish(s)
    if code == 0 and args.download:
        download(c, sid, args.download)
    return code


if __name__ == "__main__":
    sys.exit(main())
