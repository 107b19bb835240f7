"""fedavg vs one peer on all the data: the validation-accuracy gap (issue 3's quality benchmark).

Starts a real `swarmtrain up --peers 4`, uploads scikit-learn's digits (examples/digits.csv), and for
each seed runs, interleaved, (a) a `sweep` on 1 peer over all the training data for R x E epochs and
(b) `fedavg` on 4 peers for R rounds of E local epochs (the same sample-epochs in total), with the
same model, validation split and seed. Prints both validation accuracies per seed and the median gap.

    .venv/bin/python bench/fedavg_gap.py [--rounds 20] [--local-epochs 2] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench._common import ROOT  # also: no SWARMTRAIN_* setting of the shell reaches the stack it starts
from swarmtrain.common.servers import free_port

MODEL = {"kind": "mlp", "hidden": [128, 64]}


def wait(client: httpx.Client, path: str, ok: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            resp = client.get(path)
            if resp.status_code == 200 and (value := ok(resp.json())):
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting on {path}")


def run_session(client: httpx.Client, body: dict[str, Any]) -> float:
    wait(client, "/peers", lambda ps: len([p for p in ps if p["status"] == "online"]) >= body["num_peers"], 120)
    resp = client.post("/sessions", json=body)
    resp.raise_for_status()
    sid = resp.json()["session_id"]
    done = wait(client, f"/sessions/{sid}", lambda s: s["status"] in ("completed", "failed") and s, 900)
    if done["status"] != "completed":
        raise SystemExit(f"session {sid} {done['status']}: {done.get('reason')}")
    if body["strategy"] == "fedavg":
        return float(done["val_accuracy"])
    return float(done["peers"][0]["val_accuracy"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()

    port, nats_port = free_port(), free_port()
    data = Path(tempfile.mkdtemp(prefix="swarmtrain-bench-"))
    env = {**os.environ, "SWARMTRAIN_TORCH_THREADS": "1"}
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swarmtrain.cli.main",
            "up",
            "--peers",
            "4",
            "--port",
            str(port),
            "--nats-port",
            str(nats_port),
            "--data-dir",
            str(data / "data"),
        ],
        stdout=(data / "up.log").open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        wait(client, "/healthz", lambda body: True, 180)
        email, password = f"bench-{uuid.uuid4().hex[:6]}@example.org", "benchmark-password"
        client.post("/auth/signup", json={"email": email, "password": password}).raise_for_status()
        token = client.post("/auth/signin", json={"email": email, "password": password}).json()["access_token"]
        client.headers["Authorization"] = f"Bearer {token}"
        with (ROOT / "examples" / "digits.csv").open("rb") as f:
            ds = client.post("/datasets", files={"file": ("digits.csv", f, "text/csv")}).json()
        hp = {"batch_size": args.batch_size, "lr": args.lr}
        gaps = []
        print(
            f"digits, MLP {MODEL['hidden']}, {args.rounds} rounds x {args.local_epochs} local epochs, "
            f"batch {args.batch_size}, lr {args.lr}, validation split 0.2"
        )
        print(f"{'seed':>4}  {'1 peer, all data':>16}  {'fedavg, 4 peers':>15}  {'gap (points)':>12}")
        for seed in args.seeds:
            common = {"dataset_id": ds["dataset_id"], "model": MODEL, "validation_split": 0.2, "seed": seed}
            single = run_session(
                client,
                {
                    **common,
                    "strategy": "sweep",
                    "num_peers": 1,
                    "hyperparameters": [{**hp, "epochs": args.rounds * args.local_epochs}],
                },
            )
            federated = run_session(
                client,
                {
                    **common,
                    "strategy": "fedavg",
                    "num_peers": 4,
                    "rounds": args.rounds,
                    "hyperparameters": {**hp, "epochs": args.local_epochs},
                },
            )
            gaps.append(100 * (single - federated))
            print(f"{seed:>4}  {single:>16.4f}  {federated:>15.4f}  {gaps[-1]:>12.2f}")
        print(f"median gap: {statistics.median(gaps):.2f} points (target: at most 1)")
    finally:
        client.close()
        os.killpg(up.pid, signal.SIGINT)
        up.wait(60)


if __name__ == "__main__":
    main()
