"""Gateway fixtures: the real projector as a task, the app in-process, signed-in users, online peers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import pytest
from litestar import Litestar
from nats.js import JetStreamContext

from swarmtrain.common import bus
from swarmtrain.common.events import Event, PeerRegistered, PeerWentOnline
from swarmtrain.common.settings import Settings
from swarmtrain.gateway import create_app
from swarmtrain.gateway.projection import ProjectionWatcher
from swarmtrain.gateway.state import Gateway
from tests.gateway.helpers import Client, Headers, serving, sign_up_and_in, to_csv


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared settings with a cheap argon2id (8 MiB, one pass): every test signs users up and
    in, and the production cost (64 MiB, three passes) would make that most of the suite's time."""
    return msgspec.structs.replace(settings, argon2_memory_kib=8192, argon2_time_cost=1)


@pytest.fixture
def app(settings: Settings) -> Litestar:
    return create_app(settings)


@pytest.fixture
async def client(app: Litestar, projector: None) -> AsyncIterator[Client]:
    """httpx straight into the app, on the test's own event loop (``AsyncTestClient`` would run the
    lifespan on a portal thread's loop, away from the requests)."""
    async with serving(app) as client:
        yield client


@pytest.fixture
def gateway(app: Litestar, client: Client) -> Gateway:
    """The running app's shared state (the lifespan has started once ``client`` exists)."""
    gw: Gateway = app.state.gateway
    return gw


@pytest.fixture
async def alice(client: Client) -> Headers:
    return await sign_up_and_in(client, "alice@example.com")


@pytest.fixture
async def bob(client: Client) -> Headers:
    return await sign_up_and_in(client, "bob@example.com")


Append = Callable[..., Awaitable[int]]
OnlinePeers = Callable[[int], Awaitable[list[str]]]


@pytest.fixture
async def projected(database_url: str, projector: None) -> AsyncIterator[Callable[[int], Awaitable[None]]]:
    """Wait until the read models hold stream sequence ``seq``."""
    watcher = ProjectionWatcher(database_url)
    await watcher.start()

    async def projected(seq: int) -> None:
        assert await watcher.wait_for(seq, max_wait_s=30), "projection did not catch up"  # a hang guard

    yield projected
    await watcher.close()


@pytest.fixture
def append(js: JetStreamContext, projected: Callable[[int], Awaitable[None]]) -> Append:
    """Append events as another service would, then wait until they are projected."""

    async def append(*events: Event) -> int:
        seq = 0
        for event in events:
            seq = await bus.append(js, event)
        await projected(seq)
        return seq

    return append


@pytest.fixture
def online_peers(append: Append) -> OnlinePeers:
    async def online_peers(n: int) -> list[str]:
        ids = [f"peer{i}" for i in range(n)]
        events: list[Event] = []
        for peer_id in ids:
            events += [
                PeerRegistered(peer_id=peer_id, name=f"node-{peer_id}", device="cpu"),
                PeerWentOnline(peer_id=peer_id),
            ]
        await append(*events)
        return ids

    return online_peers


@pytest.fixture(scope="session")
def digits_csv() -> bytes:
    """scikit-learn's digits (1797 rows, 64 pixel features, 10 classes) as a CSV with a ``label``."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    digits = load_digits()
    header = [f"p{i}" for i in range(digits.data.shape[1])] + ["label"]
    rows = [[int(v) for v in x] + [int(y)] for x, y in zip(digits.data, digits.target, strict=True)]
    return to_csv(rows, header)
