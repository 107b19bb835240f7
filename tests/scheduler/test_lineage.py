"""A session's starting model (``init_from``, forks) resolved from its parent's facts: plain calls
on a state folded from events, and the scheduler's decisions that follow."""

from __future__ import annotations

from typing import Any

from swarmtrain.common.events import (
    Event,
    Hyperparameters,
    InitFrom,
    InitModelPrepared,
    PeerDone,
    PeerRegistered,
    PeerWentOnline,
    RoundAveraged,
    RoundClosed,
    RoundUpdate,
    SessionCompleted,
    SessionFailed,
    SessionRequested,
    SessionStarted,
)
from swarmtrain.common.models import MlpSpec
from swarmtrain.scheduler import lineage
from swarmtrain.scheduler.actions import Append, Clocks, Config, Prepare, Start
from swarmtrain.scheduler.decide import decide
from swarmtrain.scheduler.state import State, fold, observe_beats
from tests.factories import session_requested

HP = Hyperparameters(epochs=1, batch_size=8, lr=0.01)
CONFIG = Config(uri=lambda key: f"file:///blobs/{key}")
PEERS = ("a", "b", "c")


def parent_events(rounds_done: int = 3, completed: bool = True, strategy: str = "fedavg") -> list[Event]:
    fed = strategy == "fedavg"
    req = session_requested("p", 3, strategy=strategy, rounds=3 if fed else 1)
    out: list[Event] = [
        req,
        SessionStarted(
            session_id="p", assignments=dict.fromkeys(PEERS, HP), shards={p: i for i, p in enumerate(PEERS)}
        ),
    ]
    for r in range(1, rounds_done + 1 if fed else 1):
        ups = [
            RoundUpdate(peer_id=p, uri=f"file:///blobs/sessions/p/rounds/{r}/{p}.safetensors", sha256=p, num_samples=5)
            for p in PEERS
        ]
        out.append(RoundClosed(session_id="p", round=r, updates=ups))
        out.append(
            RoundAveraged(
                session_id="p",
                round=r,
                uri=f"file:///blobs/sessions/p/rounds/{r}/average.safetensors",
                sha256=f"avg{r}",
                peer_id="a",
            )
        )
    if completed:
        for p in PEERS:
            out.append(
                PeerDone(
                    session_id="p",
                    peer_id=p,
                    model_uri=f"file:///m/{p}",
                    model_sha256="final",
                    epochs=3,
                    loss=0.1,
                    accuracy=0.9,
                    train_seconds=1.0,
                )
            )
        out.append(SessionCompleted(session_id="p", best_peer_id="c", best_val_accuracy=0.9, model_uri="file:///m/c"))
    return out  # fmt: skip


def state_of(*events: Event) -> State:
    return fold(State(), ((i, e, 100.0 + i) for i, e in enumerate(events, start=1)))


def child(init: InitFrom | None, owner: str = "u", **fields: Any) -> SessionRequested:
    return session_requested("k", 2, strategy="fedavg", rounds=2, init_from=init, owner_id=owner, **fields)


def resolve(init: InitFrom | None, *parent: Event, owner: str = "u", **fields: Any) -> lineage.Resolution:
    state = state_of(*(parent or parent_events()), child(init, owner, **fields))
    return lineage.starting_model(state.sessions["k"], state.sessions)


def test_no_init_from_is_seeded_weights() -> None:
    assert resolve(None) is None


def test_a_round_is_its_stored_average_and_no_round_the_final_model() -> None:
    assert resolve(InitFrom(session_id="p", round=2)) == lineage.Model(
        "file:///blobs/sessions/p/rounds/2/average.safetensors", "avg2"
    )
    assert resolve(InitFrom(session_id="p")) == lineage.Model("file:///m/c", "final")


def test_another_owners_session_is_refused_like_one_that_does_not_exist() -> None:
    theirs = resolve(InitFrom(session_id="p", round=2), owner="mallory")
    missing = resolve(InitFrom(session_id="nope", round=2))
    assert isinstance(theirs, lineage.Refused) and isinstance(missing, lineage.Refused)
    assert theirs.reason.replace("p", "nope") == missing.reason


def test_a_different_model_spec_is_refused() -> None:
    got = resolve(InitFrom(session_id="p"), model=MlpSpec(hidden=[7]))
    assert isinstance(got, lineage.Refused) and "model spec" in got.reason


def test_rounds_out_of_range_or_of_a_sweep_are_refused() -> None:
    assert isinstance(resolve(InitFrom(session_id="p", round=4)), lineage.Refused)
    sweep = resolve(InitFrom(session_id="p", round=1), *parent_events(strategy="sweep"))
    assert isinstance(sweep, lineage.Refused) and "no rounds" in sweep.reason


def test_a_running_parent_is_waited_for_and_an_ended_one_without_the_model_refused() -> None:
    running = parent_events(rounds_done=1, completed=False)
    assert isinstance(resolve(InitFrom(session_id="p"), *running), lineage.Pending)
    assert isinstance(resolve(InitFrom(session_id="p", round=2), *running), lineage.Pending)
    failed = [*running, SessionFailed(session_id="p", reason="x")]
    assert isinstance(resolve(InitFrom(session_id="p"), *failed), lineage.Refused)
    assert isinstance(resolve(InitFrom(session_id="p", round=2), *failed), lineage.Refused)


def test_excluding_peers_recomputes_the_round_from_the_previous_rounds_average() -> None:
    got = resolve(InitFrom(session_id="p", round=3, exclude_peers=["b"]))
    assert isinstance(got, lineage.Recompute)
    assert got.session_id == "k" and got.excluded == ("b",) and got.closed.round == 3
    assert got.start == lineage.Model("file:///blobs/sessions/p/rounds/2/average.safetensors", "avg2")
    first = resolve(InitFrom(session_id="p", round=1, exclude_peers=["b"]))
    assert isinstance(first, lineage.Recompute) and first.start is None  # the parent's seeded weights


def test_once_prepared_the_recomputed_model_is_the_start() -> None:
    prepared = InitModelPrepared(
        session_id="k", parent_session_id="p", round=3, excluded=["b"], included=["a", "c"], uri="file:///x", sha256="x"
    )
    state = state_of(*parent_events(), child(InitFrom(session_id="p", round=3, exclude_peers=["b"])), prepared)
    assert lineage.starting_model(state.sessions["k"], state.sessions) == lineage.Model("file:///x", "x")


def online(state: State, *peers: str) -> State:
    events = [e for p in peers for e in (PeerRegistered(peer_id=p, name=p, device="cpu"), PeerWentOnline(peer_id=p))]
    state = fold(state, ((state.position + i, e, 200.0) for i, e in enumerate(events, start=1)))
    return observe_beats(state, dict.fromkeys(peers, 0.0))


def test_decide_starts_a_fork_from_its_model_on_peers_it_does_not_exclude() -> None:
    parent = parent_events()  # no PeerLocked folded: its peers are free
    state = online(state_of(*parent, child(InitFrom(session_id="p", round=2, exclude_peers=[]))), "a", "b", "c")
    starts = [a for a in decide(state, Clocks(now=0.0, wall=300.0), CONFIG) if isinstance(a, Start)]
    assert len(starts) == 1 and starts[0].started.init_sha256 == "avg2"
    assert all(t.init_sha256 == "avg2" and t.init_uri.endswith("/2/average.safetensors") for t in starts[0].trains)

    excluding = child(InitFrom(session_id="p", round=2, exclude_peers=["a"]))
    prepared = InitModelPrepared(
        session_id="k", parent_session_id="p", round=2, excluded=["a"], uri="file:///x", sha256="x"
    )
    state = online(state_of(*parent, excluding), "a", "b", "c")
    actions = decide(state, Clocks(now=0.0, wall=300.0), CONFIG)
    assert [type(a) for a in actions if isinstance(a, Prepare | Start)] == [Prepare]
    state = online(state_of(*parent, excluding, prepared), "a", "b", "c")
    starts = [a for a in decide(state, Clocks(now=0.0, wall=300.0), CONFIG) if isinstance(a, Start)]
    assert starts and starts[0].peer_ids == ("b", "c") and starts[0].started.init_uri == "file:///x"


def test_decide_fails_a_session_whose_parent_is_refused() -> None:
    state = online(state_of(*parent_events(), child(InitFrom(session_id="p"), owner="mallory")), "a", "b")
    failed = [a.event for a in decide(state, Clocks(now=0.0, wall=300.0), CONFIG) if isinstance(a, Append)]
    assert [type(e) for e in failed if e.subject == "session.k.events"] == [SessionFailed]
