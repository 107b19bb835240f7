"""Requirements, the queue, priority and precision through the gateway; peers' specs in GET /peers."""

from __future__ import annotations

import pytest

from swarmtrain.common.events import PeerRegistered, PeerWentOnline, SessionStarted
from swarmtrain.common.specs import GpuSpec, PeerSpecs
from swarmtrain.gateway.state import Gateway
from tests.gateway.conftest import Append
from tests.gateway.helpers import HP, Client, Headers, small_csv, upload
from tests.gateway.test_gateway_sessions import requested, session_body

GiB = 1 << 30
CPU = PeerSpecs(cpu_cores=4, memory_bytes=8 * GiB, torch_version="2.5.0", os="Linux", labels={"region": "eu"})
GPU = PeerSpecs(
    cpu_cores=16,
    memory_bytes=64 * GiB,
    gpus=[GpuSpec(name="NVIDIA H100", memory_bytes=80 * GiB, compute_capability="9.0")],
    torch_version="2.5.0",
    cuda_version="12.4",
    os="Linux",
    device_index=0,
)


@pytest.fixture
async def dataset_id(client: Client, alice: Headers) -> str:
    r = await upload(client, alice, small_csv(rows=40, classes=3))
    assert r.status_code == 201, r.text
    return str(r.json()["dataset_id"])


async def test_peers_show_their_specs(client: Client, alice: Headers, append: Append) -> None:
    await append(
        PeerRegistered(peer_id="c", name="laptop", device="cpu", specs=CPU),
        PeerRegistered(peer_id="old", name="old", device="cpu"),
    )
    peers = {p["peer_id"]: p for p in (await client.get("/peers", headers=alice)).json()}
    assert peers["c"]["specs"]["labels"] == {"region": "eu"}
    assert peers["c"]["specs"]["memory_bytes"] == 8 * GiB
    assert peers["old"]["specs"] is None


async def test_requirements_count_only_matching_idle_peers(
    client: Client, alice: Headers, dataset_id: str, append: Append
) -> None:
    await append(PeerRegistered(peer_id="c", name="c", device="cpu", specs=CPU), PeerWentOnline(peer_id="c"))
    cuda = session_body(dataset_id, 1, hyperparameters=HP, requirements={"device": "cuda"})
    r = await client.post("/sessions", json=cuda, headers=alice)
    assert r.status_code == 400
    assert r.json()["detail"].startswith("not enough matching peers: 1 requested, 0 of 1 idle online peers match")
    eu = session_body(dataset_id, 1, hyperparameters=HP, requirements={"labels": {"region": "eu"}})
    assert (await client.post("/sessions", json=eu, headers=alice)).status_code == 201


async def test_contradicting_or_unknown_requirements_are_a_400(client: Client, alice: Headers, dataset_id: str) -> None:
    for requirements, words in (
        ({"device": "cpu", "min_gpu_memory_bytes": 1}, "can match no peer"),
        ({"gpu": 1}, "unknown field"),
        ({"labels": {"bad key!": "x"}}, "requirements.labels"),
    ):
        body = session_body(dataset_id, 1, hyperparameters=HP, requirements=requirements, queue=True)
        r = await client.post("/sessions", json=body, headers=alice)
        assert r.status_code == 400, requirements
        assert words in r.json()["detail"].lower() or words in r.json()["detail"], r.json()["detail"]


async def test_a_queued_session_is_accepted_without_peers_and_shows_its_position(
    client: Client, alice: Headers, dataset_id: str, gateway: Gateway, append: Append
) -> None:
    first = session_body(dataset_id, 1, hyperparameters=HP, queue=True, requirements={"device": "cuda"})
    second = session_body(dataset_id, 1, hyperparameters=HP, queue_timeout_s=60, precision="bf16")
    urgent = session_body(dataset_id, 1, hyperparameters=HP, queue=True, priority=10)
    ids = []
    for body in (first, second, urgent):
        r = await client.post("/sessions", json=body, headers=alice)
        assert r.status_code == 201, r.text
        ids.append(r.json()["session_id"])
    event = await requested(gateway, ids[1])
    assert (event.queue, event.queue_timeout_s, event.precision, event.requirements) == (False, 60, "bf16", None)
    sessions = [(await client.get(f"/sessions/{sid}", headers=alice)).json() for sid in ids]
    assert [s["queue_position"] for s in sessions] == [2, 3, 1]
    assert sessions[0]["requirements"]["device"] == "cuda" and sessions[1]["precision"] == "bf16"

    await append(SessionStarted(session_id=ids[2], assignments={"g": event.hyperparameters[0]}, placement="why"))
    after = [(await client.get(f"/sessions/{sid}", headers=alice)).json() for sid in ids]
    assert [s["queue_position"] for s in after] == [1, 2, None]
    assert after[2]["placement"] == "why"
