"""The model kinds through POST /sessions: a hostile or wrong spec is a 400 with its reason (the
layer's index, the bound, the memory it needs against the peers'), before any peer sees it, and
nothing is appended."""

from __future__ import annotations

import json
from typing import Any

import pytest

from swarmtrain.common.events import PeerRegistered, PeerWentOnline
from swarmtrain.common.models import DataShape
from swarmtrain.common.specs import PeerSpecs
from swarmtrain.gateway.state import Gateway
from tests.gateway.conftest import Append, OnlinePeers
from tests.gateway.helpers import HP, Client, Headers, small_csv, upload
from tests.gateway.test_gateway_sessions import requested, session_body

GiB = 1 << 30
SMALL_CPU = PeerSpecs(cpu_cores=2, memory_bytes=1 * GiB, torch_version="2.5.0", os="Linux")


@pytest.fixture
async def dataset_id(client: Client, alice: Headers) -> str:
    r = await upload(client, alice, small_csv(rows=40, classes=3))  # 2 features, 3 classes
    assert r.status_code == 201, r.text
    return str(r.json()["dataset_id"])


def layers(*stack: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "layers", "layers": list(stack)}


def nested(depth: int) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "relu"}
    for _ in range(depth):
        block = {"type": "residual", "layers": [block]}
    return block


OUT = {"type": "linear", "out": 3}
HOSTILE: list[tuple[dict[str, Any], str]] = [
    (layers({"type": "linear", "out": 1 << 20}, OUT), "model.layers[0].out"),  # over the bound
    (layers({"type": "linear", "out": -4}, OUT), "model.layers[0].out"),
    (layers({"type": "dropout", "p": -0.5}, OUT), "model.layers[0].p"),
    (layers(OUT, {"type": "conv2d", "out": 4, "kernel": 1000}), "model.layers[1].kernel"),
    (layers({"type": "eval", "code": "__import__('os')"}, OUT), "model.layers[0]"),  # unknown layer
    (layers(OUT, nested(6)), "layer 1.0.0.0.0: residual blocks nested deeper than 4"),
    (layers({"type": "linear", "out": 8}), "the layers end in [8], but this dataset needs [3]"),
    (layers({"type": "conv2d", "out": 4}, OUT), "layer 0 (conv2d): conv2d takes (C, H, W), got [2]"),
    (layers({"type": "linear", "out": 8}, {"type": "residual", "layers": [OUT]}, OUT), "layer 1: a residual"),
    (layers(*[{"type": "relu"}] * 300), "model.layers"),
    ({"kind": "layers"}, "a layers needs model.layers"),
    ({"kind": "resnet"}, "a resnet needs image data"),
    ({"kind": "transformer"}, "a transformer takes token ids"),
    ({"kind": "transformer", "d_model": 1 << 20}, "model.d_model"),
    ({"kind": "resnet", "depth": 5000}, "model.depth"),
    ({"kind": "mlp", "layers": 3}, "model.layers applies to a transformer or layers only, not to a mlp"),
]


@pytest.mark.parametrize(("model", "needle"), HOSTILE)
async def test_a_hostile_or_wrong_spec_is_400_with_its_reason(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers, model: dict[str, Any], needle: str
) -> None:
    await online_peers(1)
    r = await client.post("/sessions", json=session_body(dataset_id, 1, model=model), headers=alice)
    assert r.status_code == 400, r.text
    assert needle in r.json()["detail"], r.json()["detail"]
    assert (await client.get("/sessions", headers=alice)).json() == []


async def test_nan_arguments_are_400(client: Client, alice: Headers, dataset_id: str) -> None:
    body = session_body(dataset_id, 1, model=layers({"type": "dropout", "p": 0.5}, OUT))
    raw = json.dumps(body).replace('"p": 0.5', '"p": NaN')  # JSON has no NaN: a hostile client sends it anyway
    assert "NaN" in raw
    r = await client.post("/sessions", content=raw, headers=alice | {"content-type": "application/json"})
    assert r.status_code == 400, r.text


async def test_a_model_too_big_for_every_online_peer_is_400_with_the_numbers(
    client: Client, alice: Headers, dataset_id: str, append: Append
) -> None:
    await append(
        PeerRegistered(peer_id="small", name="small", device="cpu", specs=SMALL_CPU), PeerWentOnline(peer_id="small")
    )
    # 2 -> 65536 -> (reshape 256x256) -> 65536 -> 3: small in parameters, its activations alone are ~GiB at batch 4096
    wide = layers(
        {"type": "linear", "out": 65536},
        {"type": "reshape", "shape": [256, 256]},
        {"type": "layernorm"},
        {"type": "flatten"},
        OUT,
    )
    body = session_body(dataset_id, 1, model=wide, hyperparameters=[HP | {"batch_size": 4096}])
    r = await client.post("/sessions", json=body, headers=alice)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "more than any online peer has: the largest holds 1.00 GiB" in detail, detail
    assert "activation values" in detail and "parameters" in detail
    body = session_body(dataset_id, 1, model=wide, hyperparameters=[HP | {"batch_size": 4}])
    assert (await client.post("/sessions", json=body, headers=alice)).status_code == 201


async def test_a_residual_layers_model_is_requested_as_given(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers, gateway: Gateway
) -> None:
    await online_peers(1)
    model = layers(
        {"type": "linear", "out": 8},
        {"type": "residual", "layers": [{"type": "layernorm"}, {"type": "linear", "out": 8}, {"type": "gelu"}]},
        OUT,
    )
    r = await client.post("/sessions", json=session_body(dataset_id, 1, model=model), headers=alice)
    assert r.status_code == 201, r.text
    event = await requested(gateway, r.json()["session_id"])
    assert event.model.kind == "layers"
    assert event.model.parameter_count(DataShape(2, 3)) == (2 * 8 + 8 + 2 * 8 + 8 * 8 + 8 + 8 * 3 + 3)


async def test_nesting_too_deep_to_decode_is_400(client: Client, alice: Headers, dataset_id: str) -> None:
    body = session_body(dataset_id, 1, model=layers(OUT))
    deep = json.dumps(body).replace(
        '"layers": [{"type": "linear"',
        '"layers": [' + '{"type": "residual", "layers": [' * 1500 + '{"type": "linear"',
        1,
    )
    deep = deep.replace('"out": 3}]', '"out": 3}' + "]}" * 1500 + "]", 1)
    r = await client.post("/sessions", content=deep, headers=alice | {"content-type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    assert (await client.get("/sessions", headers=alice)).json() == []
