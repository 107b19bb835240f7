"""Property-based API fuzzing with schemathesis against the gateway's own OpenAPI document.

The gateway runs under uvicorn on a free port (real HTTP), with real NATS, PostgreSQL and the
projector, signed in as a user who owns a dataset and a session; schemathesis generates requests
for every operation from the schema (valid ones, and invalid ones that the schema rules out) and
checks that none is answered with a 5xx and that every answer conforms to the schema: a status
code it lists, its content type, its body schema, and that invalid input is rejected.

``FUZZ_CASES`` sets the number of generated cases: 300 by default (CI's budget, well under a
minute on two cores); ``make fuzz`` runs 2,000.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from swarmtrain.common.settings import Settings
from tests.factories import session_body
from tests.gateway.conftest import OnlinePeers
from tests.gateway.helpers import HP, live, sign_up_and_in, small_csv, upload

CASES = int(os.environ.get("FUZZ_CASES", "300"))
CHECKS: list[Callable[..., Any]] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]

pytestmark = pytest.mark.timeout(max(120, CASES // 2))


OWNED_READS = [
    ("/datasets/{dataset_id}", "GET"),
    ("/sessions/{session_id}", "GET"),
    ("/sessions/{session_id}/events", "GET"),
    ("/sessions/{session_id}/metrics", "GET"),
    ("/sessions/{session_id}/stream", "GET"),
    ("/sessions/{session_id}/model", "GET"),
    ("/sessions/{session_id}/cancel", "POST"),
]


def fuzz(base: str, headers: dict[str, str], cases: int, ids: dict[str, str]) -> Counter[str]:
    """Run ``cases`` generated requests (blocking: call from a worker thread); returns status counts.

    Every operation, with valid and with invalid input; plus the routes that read one resource,
    with the id of one the user owns (an ended session, so its stream ends too), so that their
    successful answers are checked against the schema as well.
    """
    schema = schemathesis.openapi.from_url(f"{base}/schema/openapi.json")
    anything = schema.as_strategy() | schema.as_strategy(GenerationMode.NEGATIVE)
    owned = st.one_of(
        *(
            schema[path][method].as_strategy(path_parameters={k: v for k, v in ids.items() if "{" + k + "}" in path})
            for path, method in OWNED_READS
        )
    )
    seen: Counter[str] = Counter()

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(anything, anything, anything, owned))
    def one(case: schemathesis.Case[Any]) -> None:
        # The user's token goes with every request, but for one whose headers are the invalid part
        # (a missing or malformed Authorization): that one is sent as generated.
        header = case.meta.components.get(ParameterLocation.HEADER) if case.meta is not None else None
        auth = None if header is not None and header.mode.is_negative else headers
        response = case.call(base_url=base, headers=auth, timeout=10)
        seen[f"{case.method} {case.path} {response.status_code}"] += 1
        case.validate_response(response, checks=CHECKS, headers=auth)

    one()
    return seen


async def test_fuzz_the_api_from_its_openapi(settings: Settings, projector: None, online_peers: OnlinePeers) -> None:
    async with live(settings) as base, httpx.AsyncClient(base_url=base) as http:
        alice = await sign_up_and_in(http, "fuzz@example.com")
        dataset_id = (await upload(http, alice, small_csv(rows=30))).json()["dataset_id"]
        await online_peers(2)
        body = session_body(dataset_id, 1, HP)
        assert (await http.post("/sessions", json=body, headers=alice)).status_code == 201
        ended = (await http.post("/sessions", json=body, headers=alice)).json()["session_id"]
        assert (await http.post(f"/sessions/{ended}/cancel", headers=alice)).status_code == 202
        ids = {"dataset_id": dataset_id, "session_id": ended}
        seen = await asyncio.to_thread(fuzz, base, alice, CASES, ids)
    total = sum(seen.values())
    print(f"\nschemathesis: {total} requests over {len({k.rsplit(' ', 1)[0] for k in seen})} operations")
    for key, count in sorted(seen.items()):
        print(f"  {count:5d}  {key}")
    assert total >= CASES
    assert not any(key.endswith((" 500", " 502", " 503", " 504")) for key in seen)
