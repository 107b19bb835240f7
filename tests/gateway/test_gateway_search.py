"""A sweep that searches, at the gateway: ``search`` travels whole into ``SessionRequested``; a space
that cannot be searched is a 400 that names why, and nothing is stored."""

from __future__ import annotations

from typing import Any

import pytest
from nats.js import JetStreamContext

from swarmtrain.common import bus
from swarmtrain.common.events import SessionRequested, decode_event
from swarmtrain.gateway.state import Gateway
from tests.factories import session_body
from tests.gateway.conftest import OnlinePeers
from tests.gateway.helpers import Client, Headers, small_csv, upload

HP = {"epochs": 4, "batch_size": 32, "lr": 0.01}
SPACE = {"lr": {"log_uniform": [1e-4, 1e-1]}, "batch_size": {"choice": [16, 32, 64]}}


@pytest.fixture
async def dataset_id(client: Client, alice: Headers) -> str:
    r = await upload(client, alice, small_csv(rows=40, classes=3))
    assert r.status_code == 201, r.text
    return str(r.json()["dataset_id"])


def body(dataset_id: str, search: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return session_body(dataset_id, 2, HP, model={"kind": "mlp", "hidden": [32, 16]}, search=search, **fields)


async def test_a_search_is_requested_whole(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers, gateway: Gateway
) -> None:
    await online_peers(2)
    search = {"space": SPACE | {"model.hidden.0": {"choice": [16, 64]}}, "trials": 6, "pruner": {"name": "asha"}}
    r = await client.post("/sessions", json=body(dataset_id, search), headers=alice)
    assert r.status_code == 201, r.text
    js: JetStreamContext = gateway.js
    msg = await js.get_last_msg(bus.EVENTS_STREAM, f"session.{r.json()['session_id']}.events")
    event = decode_event(msg.data or b"")
    assert isinstance(event, SessionRequested) and event.search is not None
    assert event.search.trials == 6 and event.search.pruner.name == "asha"
    assert set(event.search.space) == {"lr", "batch_size", "model.hidden.0"}
    assert len(event.hyperparameters) == 1  # each trial's starting values


BAD_SPACES: list[tuple[dict[str, Any], str]] = [
    ({"space": {"lr": {"uniform": [0.1, 0.01]}}, "trials": 4}, "empty range"),
    ({"space": {"lr": {"log_uniform": [0, 0.1]}}, "trials": 4}, "log_uniform needs a positive low"),
    ({"space": {"learning_rate": {"uniform": [0.01, 0.1]}}, "trials": 4}, "unknown key 'learning_rate'"),
    ({"space": {"model.depth": {"int": [1, 3]}}, "trials": 4}, "unknown key 'model.depth'"),
    ({"space": {"batch_size": {"choice": [16, 32, 64]}}, "trials": 2, "sampler": "grid"}, "more than trials"),
    ({"space": {"lr": {"uniform": [0.01, 0.1], "choice": [0.1]}}, "trials": 4}, "exactly one of"),
    ({"space": {"batch_size": {"int": [0, 8]}}, "trials": 4}, "out of bounds"),
    ({"space": {}, "trials": 4}, "search.space"),
    ({"space": SPACE, "trials": 0}, "search.trials"),
    ({"space": SPACE, "trials": 4, "colour": "blue"}, "unknown field `colour`"),
]


async def test_bad_spaces_are_400_naming_the_reason_and_store_nothing(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers
) -> None:
    await online_peers(2)
    wrong = []
    for search, needle in BAD_SPACES:
        r = await client.post("/sessions", json=body(dataset_id, search), headers=alice)
        if r.status_code != 400 or needle not in r.json()["detail"]:
            wrong.append((search, r.status_code, r.text))
    fedavg = body(dataset_id, {"space": SPACE, "trials": 4}, strategy="fedavg")
    fedavg["hyperparameters"] = HP
    r = await client.post("/sessions", json=fedavg, headers=alice)
    if r.status_code != 400 or "search applies to a sweep only" not in r.json()["detail"]:
        wrong.append(("fedavg", r.status_code, r.text))
    listed = body(dataset_id, {"space": SPACE, "trials": 4})
    listed["hyperparameters"] = [HP, HP]
    r = await client.post("/sessions", json=listed, headers=alice)
    if r.status_code != 400 or "one hyperparameters object" not in r.json()["detail"]:
        wrong.append(("list", r.status_code, r.text))
    assert wrong == []
    assert (await client.get("/sessions", headers=alice)).json() == []
