"""A sweep that searches, end to end on a real stack (NATS, PostgreSQL, gateway, projector,
scheduler, three peers as processes): more trials than peers, run as the peers free up, to
completion; the session shows its trials, importances and the best configuration, and a new
session starts from that configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.factories import session_body
from tests.support import wait_for

from .conftest import Api, Stack, cli

SEARCH_TIMEOUT_S = 480
"""A search is several sessions' worth of trials: its waits (up to 120 s for a trial to start, 300 s
to end) need more than the suite's 120 s per test on a busy 2-core machine."""

SEARCH = {
    "space": {"lr": {"log_uniform": [1e-4, 3e-2]}, "batch_size": {"choice": [32, 64]}, "epochs": {"int": [2, 4]}},
    "trials": 7,
    "sampler": "tpe",
    "pruner": {"name": "asha", "min_epochs": 1, "reduction_factor": 2},
    "seed": 3,
}


async def ended(api: Api, sid: str, stack: Stack, timeout: float = 300) -> dict[str, Any]:
    """``api.wait_ended``; on a timeout, the session's events, its state, the peers' and the stack's
    logs in the failure (a search that never ends says why)."""
    try:
        return await api.wait_ended(sid, timeout=timeout)
    except AssertionError as exc:
        resp = await api.client.get(f"/sessions/{sid}/events", params={"limit": 1000})
        shown = ("peer_id", "trial", "attempt", "reason", "epoch")
        records = resp.json().get("events", []) if resp.status_code == 200 else []
        lines = [
            f"{r['seq']} {r['event'].get('type', '?')} {json.dumps({k: r['event'].get(k) for k in shown})}"
            for r in records
            if r["event"].get("type") != "Heartbeat"
        ]
        session, peers = await api.session(sid), await api.peers()
        print(stack.logs())
        raise AssertionError(
            "\n".join([str(exc), "events:", *lines, f"session: {json.dumps(session)[:4000]}", f"peers: {peers}"])
        ) from exc


@pytest.mark.timeout(SEARCH_TIMEOUT_S)
async def test_a_search_of_more_trials_than_peers_runs_to_completion(stack: Stack, api: Api, tmp_path: Path) -> None:
    await api.wait_idle_peers(3)
    ds = await api.upload()
    body = session_body(
        ds["dataset_id"], 3, {"epochs": 3, "batch_size": 32, "lr": 0.003}, model={"kind": "mlp", "hidden": [32]}
    )
    resp = await api.client.post("/sessions", json=body | {"search": SEARCH})
    assert resp.status_code == 201, resp.text
    sid = resp.json()["session_id"]
    done = await ended(api, sid, stack)
    assert done["status"] == "completed", done
    search = done["search"]
    trials = search["trials"]
    assert sorted(t["trial"] for t in trials) == list(range(7))
    assert len({t["peer_id"] for t in trials}) == 3  # seven trials on three peers
    assert search["done"] + search["pruned"] == 7 and search["running"] == 0 and search["left"] == 0
    for t in trials:
        assert t["status"] in ("done", "pruned"), t
        assert t["curve"], t  # its heartbeats reached the read model
        if t["status"] == "pruned":
            # stopped at its rung (an epoch its peer was past already may have been reported meanwhile)
            assert t["rung"] is not None and 1 <= t["rung"] <= t["epoch"] <= t["epochs"] and "asha" in t["reason"]
    assert set(search["importances"]) == {"lr", "batch_size", "epochs"}
    best = search["best"]
    assert best is not None
    assert done["best_peer_id"] == next(t for t in trials if t["trial"] == best["trial"])["peer_id"]
    assert best["hyperparameters"]["lr"] == next(t for t in trials if t["trial"] == best["trial"])["params"]["lr"]
    assert best["value"] is not None  # re-checked by the scheduler

    # the CLI prints the importances, and starts a session from the best configuration
    login = {"api_url": str(api.client.base_url), "token": api.client.headers["Authorization"].split()[1]}
    (tmp_path / "swarmtrain").mkdir()
    (tmp_path / "swarmtrain" / "config.json").write_text(json.dumps(login))
    env = {**stack.env, "XDG_CONFIG_HOME": str(tmp_path)}
    rc, out, err = await cli("sessions", "show", sid, env=env)
    assert rc == 0, err
    assert "importance" in out and "lr" in out
    rc, out, err = await cli("sessions", "start", "--from-best", sid, "--json", env=env)
    assert rc == 0, err
    started = json.loads(out)
    again = await ended(api, started["session_id"], stack)
    assert again["status"] == "completed" and again["search"] is None
    assert again["peers"][0]["hyperparameters"]["lr"] == best["hyperparameters"]["lr"]


@pytest.mark.timeout(SEARCH_TIMEOUT_S)
async def test_a_peer_killed_mid_trial_has_its_trial_run_again_once(stack: Stack, api: Api) -> None:
    """SIGKILL of a peer while it trains a trial: the presence timeout fails that run, the trial runs
    again (same point) on a peer that is left, never lost and counted once; the search completes."""
    extra = stack.start_peer("doomed")
    try:
        await api.wait_idle_peers(4)
        doomed = next(p["peer_id"] for p in await api.peers() if p["name"] == "doomed")
        ds = await api.upload()
        search = {"space": {"lr": {"log_uniform": [1e-3, 3e-2]}}, "trials": 6, "sampler": "random", "seed": 1}
        body = session_body(ds["dataset_id"], 4, {"epochs": 25, "batch_size": 16, "lr": 0.003}, model={"hidden": [64]})
        resp = await api.client.post("/sessions", json=body | {"search": search})
        assert resp.status_code == 201, resp.text
        sid = resp.json()["session_id"]

        async def doomed_at_work() -> dict[str, Any] | None:
            s = await api.session(sid)
            trials = (s.get("search") or {}).get("trials", [])
            return next((t for t in trials if t["peer_id"] == doomed and t["epoch"] >= 1), None)

        victim = await wait_for(doomed_at_work, "the doomed peer training a trial", timeout=120, interval=0.2)
        extra.kill()
        extra.wait()
        done = await ended(api, sid, stack)
    finally:
        if extra.poll() is None:
            extra.kill()
            extra.wait()
    assert done["status"] == "completed", done
    search = done["search"]
    trials = {t["trial"]: t for t in search["trials"]}
    assert sorted(trials) == list(range(6)) and search["done"] == 6 and search["failed"] == 0
    again = trials[victim["trial"]]
    assert again["attempt"] >= 1 and again["peer_id"] != doomed and again["status"] == "done"
    assert again["params"] == victim["params"]  # the same point, run again
