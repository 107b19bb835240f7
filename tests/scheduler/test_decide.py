"""``decide`` and ``evolve`` are pure: equal inputs give equal outputs, ids and times included; the
input state is never changed; every action carries what the shell publishes, in full."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import msgspec

from swarmtrain.common.events import (
    Event,
    Heartbeat,
    Hyperparameters,
    ModelUpdatePublished,
    PeerDone,
    PeerFailed,
    PeerLocked,
    PeerRegistered,
    PeerReleased,
    PeerWentOnline,
    Presence,
    SessionCancelled,
    SessionStarted,
    ShardReassigned,
    Stop,
)
from swarmtrain.scheduler.actions import Action, Append, Clocks, Config, Send, Start, Timing
from swarmtrain.scheduler.decide import decide, recover
from swarmtrain.scheduler.state import State, evolve, observe_presence
from tests.factories import session_requested
from tests.scheduler.helpers import replay

HPS = [Hyperparameters(epochs=e, batch_size=8, lr=0.01) for e in (1, 2)]
CONFIG = Config(uri=lambda key: f"file:///blobs/{key}", timing=Timing(peer_timeout=5.0))
CLOCKS = Clocks(now=1.0, wall=1_700_000_000.0)


def idle_peers(*peer_ids: str) -> State:
    state = State()
    for p in peer_ids:
        state = replay(state, PeerRegistered(peer_id=p, name=p, device="cpu"), PeerWentOnline(peer_id=p))
        state = observe_presence(state, Presence(peer_id=p, name=p, device="cpu"), 0.0)
    return state


def request(strategy: str = "sweep") -> Event:
    return msgspec.structs.replace(session_requested("s", 2, strategy=strategy, rounds=3), hyperparameters=HPS)


def started(state: State, *peers: str, observed_at: float = 0.0) -> State:
    return replay(
        state,
        *(PeerLocked(peer_id=p, session_id="s") for p in peers),
        SessionStarted(session_id="s", assignments={p: HPS[i] for i, p in enumerate(peers)}),
        observed_at=observed_at,
    )


def test_deciding_twice_on_equal_inputs_gives_equal_actions_ids_and_times_included() -> None:
    state = replay(idle_peers("a", "b", "c"), request())
    first, second = decide(state, CLOCKS, CONFIG), decide(copy.deepcopy(state), CLOCKS, CONFIG)
    assert first and first == second
    assert msgspec.json.encode([a.trains for a in first if isinstance(a, Start)]) == msgspec.json.encode(
        [a.trains for a in second if isinstance(a, Start)]
    )


def test_evolve_and_decide_leave_their_input_as_it_was() -> None:
    state = replay(idle_peers("a", "b", "c"), request("fedavg"))
    state = started(state, "a", "b")
    before = copy.deepcopy(state)
    events: list[Event] = [
        Heartbeat(session_id="s", peer_id="a", epoch=1, epochs=3, loss=1, accuracy=0, samples_per_s=1),
        ModelUpdatePublished(
            session_id="s", round=1, peer_id="a", uri="u", sha256="x", num_samples=1, loss=1, accuracy=0
        ),
        PeerFailed(session_id="s", peer_id="b", reason="x"),
        PeerLocked(peer_id="c", session_id="s"),
        ShardReassigned(session_id="s", shard=1, from_peer_id="b", to_peer_id="c", round=1),
        SessionCancelled(session_id="s"),
        PeerReleased(peer_id="a", session_id="s"),
    ]
    after = state
    for event in events:
        after = evolve(after, after.position + 1, event, 5.0)
    decide(after, CLOCKS, CONFIG)
    observe_presence(state, Presence(peer_id="z", name="z", device="cpu"), 2.0)
    assert state == before
    assert after.sessions["s"].status == "cancelled" and after.peers["a"].session_id is None


def test_a_start_carries_the_assignment_the_locks_and_the_trains() -> None:
    state = replay(idle_peers("b", "a", "c"), request("fedavg"))
    [start] = [a for a in decide(state, CLOCKS, CONFIG) if isinstance(a, Start)]
    assert start.peer_ids == ("a", "b")
    assert [(lock.event.peer_id, lock.expected) for lock in start.locks] == [("a", 4), ("b", 2)]
    assert start.expected == state.sessions["s"].seq
    assert start.started.assignments == {"a": HPS[0], "b": HPS[1]} and start.started.shards == {"a": 0, "b": 1}
    assert [(t.peer_id, t.shard, t.hyperparameters, t.start_round, t.event_id) for t in start.trains] == [
        ("a", 0, HPS[0], 1, "s.a.train.1"),
        ("b", 1, HPS[1], 1, "s.b.train.1"),
    ]
    assert start.trains[0].output_uri == "file:///blobs/sessions/s/models/a.safetensors"
    assert all(t.occurred_at == datetime.fromtimestamp(CLOCKS.wall, UTC) for t in start.trains)
    ids = [lock.event.event_id for lock in start.locks] + [start.started.event_id]
    assert len(set(ids)) == 3
    # another choice of peers is another decision: no id in common, so no append passes for the other's
    elsewhere = replay(idle_peers("0", "a", "b"), request("fedavg"))
    [other] = [a for a in decide(elsewhere, CLOCKS, CONFIG) if isinstance(a, Start)]
    assert other.peer_ids == ("0", "a")
    assert not {lock.event.event_id for lock in other.locks} & set(ids)
    assert other.started.event_id != start.started.event_id


def test_releases_and_stops_of_a_peer_locked_twice_by_one_session_have_their_own_ids() -> None:
    state = replay(idle_peers("a", "b"), request())
    state = started(state, "a", "b")
    state = replay(state, PeerFailed(session_id="s", peer_id="a", reason="x"))
    first = decide(state, CLOCKS, CONFIG)
    state = replay(state, PeerReleased(peer_id="a", session_id="s"), PeerLocked(peer_id="a", session_id="s"))
    second = decide(state, CLOCKS, CONFIG)

    def ids(actions: list[Action]) -> set[str]:
        out = set()
        for a in actions:
            message = a.event if isinstance(a, Append) else a.command if isinstance(a, Send) else None
            if isinstance(message, (PeerReleased, Stop)):
                out.add(message.event_id)
        return out

    assert len(ids(first)) == 2 and len(ids(second)) == 2
    assert not ids(first) & ids(second)


def test_after_a_restart_a_run_not_seen_at_work_gets_its_train_again_with_its_first_id() -> None:
    state = replay(idle_peers("a", "b", "c"), request())
    [start] = [a for a in decide(state, CLOCKS, CONFIG) if isinstance(a, Start)]
    state = started(state, "a", "b")
    state = replay(
        state, Heartbeat(session_id="s", peer_id="b", epoch=1, epochs=1, loss=1, accuracy=0, samples_per_s=1)
    )
    resent = [a.command for a in recover(state, CLOCKS, CONFIG) if isinstance(a, Send)]
    assert resent == [start.trains[0]]  # a only: b is at work; the same id, so JetStream drops a repeat


def test_round_times_come_from_when_events_were_observed_not_from_the_peers_clocks() -> None:
    def story(peer_clock: datetime) -> State:
        state = replay(idle_peers("a", "b"), request("fedavg"))
        state = started(state, "a", "b", observed_at=100.0)
        for p in ("a", "b"):  # at work on their Trains from 0 s (monotonic) to 60 s
            for t in (0.0, 60.0):
                state = observe_presence(state, Presence(peer_id=p, name=p, device="cpu", train_id=f"s.{p}.train.1"), t)
        update = ModelUpdatePublished(
            session_id="s",
            round=1,
            peer_id="a",
            uri="u",
            sha256="x",
            num_samples=1,
            loss=1,
            accuracy=0,
            occurred_at=peer_clock,
        )
        return replay(state, update, observed_at=120.0)

    honest, skewed = story(datetime(2030, 1, 1, tzinfo=UTC)), story(datetime(1990, 1, 1, tzinfo=UTC))
    assert honest.sessions["s"].first_update == skewed.sessions["s"].first_update == 120.0
    clocks = Clocks(now=61.0, wall=100.0 + 3 * 20.0 + 1)  # past the deadline: 3 x the first update's 20 s
    assert decide(honest, clocks, CONFIG) == decide(skewed, clocks, CONFIG)
    assert PeerFailed in [type(a.event) for a in decide(honest, clocks, CONFIG) if isinstance(a, Append)]


def test_a_session_that_ends_stops_its_training_runs() -> None:
    state = started(replay(idle_peers("a", "b"), request()), "a", "b")
    state = replay(state, PeerDone(
        session_id="s", peer_id="a", model_uri="m", model_sha256="x", epochs=1, loss=0, accuracy=1, train_seconds=1
    ), SessionCancelled(session_id="s"))  # fmt: skip
    assert {p: r.status for p, r in state.sessions["s"].runs.items()} == {"a": "done", "b": "stopped"}
    stops = [a.command.peer_id for a in decide(state, CLOCKS, CONFIG) if isinstance(a, Send)]
    assert stops == ["b"]
