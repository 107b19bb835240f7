"""Authorization: datasets and sessions belong to their owner. Anyone else gets exactly what a
missing one gets (404), on every route; lists show only one's own; request bodies cannot set what
the server owns."""

from __future__ import annotations

from typing import Any

from swarmtrain.common.events import Hyperparameters, SessionCompleted, SessionStarted
from tests.factories import session_body
from tests.gateway.conftest import Append, OnlinePeers
from tests.gateway.helpers import HP, Client, Headers, small_csv, stored_objects, upload

ROUTES = [
    ("GET", "/datasets/{dataset}"),
    ("GET", "/sessions/{session}"),
    ("POST", "/sessions/{session}/cancel"),
    ("GET", "/sessions/{session}/events"),
    ("GET", "/sessions/{session}/stream"),
    ("GET", "/sessions/{session}/metrics"),
    ("GET", "/sessions/{session}/model"),
]


async def test_another_user_gets_404_on_every_route(
    client: Client, alice: Headers, bob: Headers, online_peers: OnlinePeers, append: Append
) -> None:
    dataset = (await upload(client, alice, small_csv())).json()["dataset_id"]
    await online_peers(1)
    body = session_body(dataset, 1, HP)
    session = (await client.post("/sessions", json=body, headers=alice)).json()["session_id"]
    ended = (await client.post("/sessions", json=body, headers=alice)).json()["session_id"]
    await append(
        SessionStarted(session_id=ended, assignments={"peer0": Hyperparameters(**HP)}),
        SessionCompleted(session_id=ended, best_peer_id="peer0", best_val_accuracy=0.9, model_uri="file:///m"),
    )
    unknown = {"dataset": "0" * 32, "session": "0" * 32}
    for ids in ({"dataset": dataset, "session": session}, {"dataset": dataset, "session": ended}):
        for method, template in ROUTES:
            theirs = await client.request(method, template.format(**ids), headers=bob)
            missing = await client.request(method, template.format(**unknown), headers=bob)
            assert theirs.status_code == missing.status_code == 404, (method, template, theirs.text)
            assert theirs.headers["content-type"].startswith("application/problem+json")
            # the same words, but for the id: nothing tells "someone else's" from "none"
            assert theirs.json()["detail"].replace(ids["dataset"], "X").replace(ids["session"], "X") == missing.json()[
                "detail"
            ].replace("0" * 32, "X")
    # asking for a session on someone else's dataset
    r = await client.post("/sessions", json=body, headers=bob)
    assert r.status_code == 404 and r.json()["detail"] == f"no dataset {dataset!r}"
    # lists show one's own only
    assert (await client.get("/datasets", headers=bob)).json() == []
    assert (await client.get("/sessions", headers=bob)).json() == []
    # bob's attempt to cancel changed nothing
    assert (await client.get(f"/sessions/{session}", headers=alice)).json()["status"] == "queued"
    # and alice sees hers everywhere
    for method, template in ROUTES[:-2]:
        if method == "GET" and "stream" not in template:
            r = await client.request(method, template.format(dataset=dataset, session=ended), headers=alice)
            assert r.status_code == 200, template


async def test_malformed_ids_are_404_without_reaching_the_database(client: Client, alice: Headers) -> None:
    for raw in ("%00", "a%00b", "..%2F..%2Fetc%2Fpasswd", "' OR 1=1 --", "%F0%9F%92%A5", "x" * 5000):
        for path in (f"/sessions/{raw}", f"/sessions/{raw}/events", f"/datasets/{raw}", f"/sessions/{raw}/model"):
            r = await client.get(path, headers=alice)
            assert r.status_code == 404, (path, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")


SERVER_OWNED: list[tuple[str, dict[str, Any]]] = [
    ("/auth/signup", {"email": "m@example.com", "password": "long enough", "user_id": "0" * 32}),
    ("/auth/signup", {"email": "m@example.com", "password": "long enough", "role": "admin"}),
    ("/auth/signup", {"email": "m@example.com", "password": "long enough", "password_hash": "$argon2id$..."}),
    ("/auth/signin", {"email": "m@example.com", "password": "long enough", "sub": "someone"}),
]


async def test_bodies_cannot_set_server_owned_fields(client: Client, alice: Headers, blob_dir: Any) -> None:
    for path, body in SERVER_OWNED:
        r = await client.post(path, json=body)
        assert r.status_code == 400 and "unknown field" in r.json()["detail"], (path, body, r.text)
    # forms too: an upload cannot name its owner or id
    for extra in ({"owner_id": "someone"}, {"dataset_id": "0" * 32}):
        r = await upload(client, alice, small_csv(), **extra)
        assert r.status_code == 400, r.text
        assert r.json()["detail"].startswith(f"unknown form field {next(iter(extra))!r}")
        form = {"num_peers": "1", "hyperparameters": '{"epochs": 1, "batch_size": 8, "lr": 0.1}', **extra}
        r = await client.post(
            "/sessions/start", files={"file": ("d.csv", small_csv(), "text/csv")}, data=form, headers=alice
        )
        assert r.status_code == 400 and "unknown form field" in r.json()["detail"], r.text
    assert stored_objects(blob_dir) == []
    assert (await client.get("/datasets", headers=alice)).json() == []
