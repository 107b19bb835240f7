"""fedavg round closing and peer failure, as plain function calls."""

from __future__ import annotations

import functools
from dataclasses import replace
from datetime import UTC, datetime

from swarmtrain.common.events import (
    Event,
    Hyperparameters,
    ModelUpdatePublished,
    PeerDone,
    PeerFailed,
    PeerLocked,
    PeerRegistered,
    PeerWentOffline,
    PeerWentOnline,
    Presence,
    RoundClosed,
    SessionCompleted,
    SessionFailed,
    SessionStarted,
    ShardReassigned,
)
from swarmtrain.scheduler.actions import Action, Append, Clocks, Config, Forward, Reassign, Send, Timing
from swarmtrain.scheduler.decide import decide
from swarmtrain.scheduler.state import State, observe_presence, regrace
from swarmtrain.scheduler.strategies.fedavg import round_deadline
from tests.factories import session_requested
from tests.scheduler import helpers

HP = Hyperparameters(epochs=1, batch_size=8, lr=0.01)
T0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
TIMING = Timing(peer_timeout=1e9, first_round_timeout=600, round_factor=3, round_min=10)
CONFIG = Config(uri=lambda key: f"file:///blobs/{key}", timing=TIMING)


def seen(t: float, event: Event) -> tuple[Event, float]:
    """``event`` as the scheduler observed it, ``t`` seconds after T0 (whatever its ``occurred_at`` says)."""
    return event, T0 + t


replay = functools.partial(helpers.replay, observed_at=T0)


def decided(state: State, wall: float) -> list[Action]:
    return decide(state, Clocks(now=wall, wall=T0 + wall), CONFIG)  # monotonic 0 = T0


def reassigned(actions: list[Action]) -> list[tuple[str, int, str, str, int]]:
    return [
        (a.session_id, a.moved.shard, a.moved.from_peer_id, a.peer_id, a.moved.round)
        for a in actions
        if isinstance(a, Reassign)
    ]


def fedavg(peers: tuple[str, ...] = ("a", "b", "c"), rounds: int = 2, on_failure: str = "reassign") -> State:
    state = State()
    for p in (*peers, "spare"):
        state = replay(state, PeerRegistered(peer_id=p, name=p, device="cpu"), PeerWentOnline(peer_id=p))
        train = f"s.{p}.train.1" if p in peers else None  # a participant's beats name its Train
        state = observe_presence(state, Presence(peer_id=p, name=p, device="cpu", train_id=train), 0.0)
    request = session_requested(
        "s",
        len(peers),
        dataset_uri="file:///d",
        strategy="fedavg",
        rounds=rounds,
        on_peer_failure=on_failure,
    )
    state = replay(state, request, *(PeerLocked(peer_id=p, session_id="s") for p in peers))
    shards = {p: i for i, p in enumerate(peers)}
    return replay(state, seen(0, SessionStarted(session_id="s", assignments=dict.fromkeys(peers, HP), shards=shards)))


def offline(state: State, peer: str) -> State:
    state = replay(state, PeerWentOffline(peer_id=peer))
    return replace(state, beats={p: t for p, t in state.beats.items() if p != peer})


def update(peer: str, r: int, t: float, n: int = 100) -> tuple[Event, float]:
    """``peer``'s update of round ``r``, observed at ``t``; its own clock says something else entirely."""
    return seen(
        t,
        ModelUpdatePublished(
            session_id="s",
            round=r,
            peer_id=peer,
            uri=f"file:///{r}/{peer}",
            sha256=peer,
            num_samples=n,
            loss=1.0,
            accuracy=0.5,
            occurred_at=datetime(1999, 1, 1, tzinfo=UTC),
        ),
    )


def events(state: State, wall: float) -> list[Event]:
    return [a.event for a in decided(state, wall) if isinstance(a, Append)]


def closed(state: State, wall: float) -> RoundClosed | None:
    return next((e for e in events(state, wall) if isinstance(e, RoundClosed)), None)


def test_round_closes_once_every_participant_published_naming_exactly_those_updates() -> None:
    state = replay(fedavg(), update("b", 1, 2), update("a", 1, 3))
    assert closed(state, 4) is None
    state = replay(state, update("c", 1, 4))
    rc = closed(state, 4)
    assert rc is not None and rc.round == 1 and rc.left_out == []
    assert [(u.peer_id, u.uri) for u in rc.updates] == [
        ("a", "file:///1/a"),
        ("b", "file:///1/b"),
        ("c", "file:///1/c"),
    ]
    assert rc.event_id == "s.r1.closed"  # a retried close is deduplicated by JetStream


def test_late_duplicate_and_forged_updates_are_ignored() -> None:
    state = replay(fedavg(), update("a", 1, 1), update("b", 1, 1), update("c", 1, 1))
    state = replay(state, seen(2, closed(state, 2)))  # type: ignore[arg-type]
    assert state.sessions["s"].round == 2
    state = replay(
        state, update("a", 1, 3), update("spare", 2, 3), update("a", 3, 3)
    )  # late, not a participant, future
    assert state.sessions["s"].updates == {}
    state = replay(state, update("a", 2, 4), update("a", 2, 5, n=999))
    assert state.sessions["s"].updates["a"].num_samples == 100  # first one wins


def test_deadline_adapts_to_the_first_update_and_leaves_the_stragglers_out() -> None:
    state = fedavg()
    assert round_deadline(state.sessions["s"], TIMING) == 600  # nothing known yet
    state = replay(state, update("a", 1, 5), update("b", 1, 6))
    assert round_deadline(state.sessions["s"], TIMING) == 15  # 3 x the first update's 5 s
    assert closed(state, 14) is None
    out = events(state, 16)
    assert [(type(e).__name__, getattr(e, "peer_id", None)) for e in out] == [
        ("PeerFailed", "c"),
        ("RoundClosed", None),
    ]
    assert out[1].left_out == ["c"] and [u.peer_id for u in out[1].updates] == ["a", "b"]  # type: ignore[union-attr]


def test_later_rounds_get_a_deadline_from_the_longest_round_seen() -> None:
    state = replay(fedavg(), update("a", 1, 1), update("b", 1, 1), update("c", 1, 8))
    rc = closed(state, 8)
    state = replay(state, seen(8, RoundClosed(session_id="s", round=1, updates=rc.updates)))  # type: ignore[union-attr]
    assert round_deadline(state.sessions["s"], TIMING) == 24  # 3 x 8 s


def test_failed_participant_shard_goes_to_an_idle_peer_in_the_open_round() -> None:
    state = replay(fedavg(), update("a", 1, 1), PeerFailed(session_id="s", peer_id="b", reason="gone"))
    assert reassigned(decided(state, 2)) == [("s", 1, "b", "spare", 1)]
    state = replay(
        state,
        PeerLocked(peer_id="spare", session_id="s"),
        seen(2, ShardReassigned(session_id="s", shard=1, from_peer_id="b", to_peer_id="spare", round=1)),
    )
    assert state.sessions["s"].orphan_shards() == []
    assert closed(state, 3) is None  # the round now waits for the newcomer too
    state = replay(state, update("c", 1, 3), update("spare", 1, 4))
    assert [u.peer_id for u in closed(state, 5).updates] == ["a", "c", "spare"]  # type: ignore[union-attr]


def test_orphan_shard_waits_for_a_peer_that_joins_later() -> None:
    state = fedavg(peers=("a", "b"))
    state = offline(state, "spare")
    state = replay(state, PeerFailed(session_id="s", peer_id="b", reason="gone"))
    assert not reassigned(decided(state, 1))
    state = replay(state, PeerRegistered(peer_id="late", name="late", device="cpu"), PeerWentOnline(peer_id="late"))
    state = observe_presence(state, Presence(peer_id="late", name="late", device="cpu"), 0.0)
    assert reassigned(decided(state, 2)) == [("s", 1, "b", "late", 1)]


def test_continue_goes_on_without_the_shard_and_fail_fails_the_session() -> None:
    state = replay(fedavg(on_failure="continue"), PeerFailed(session_id="s", peer_id="c", reason="x"))
    assert not reassigned(decided(state, 1))
    state = replay(state, update("a", 1, 1), update("b", 1, 1))
    assert [u.peer_id for u in closed(state, 2).updates] == ["a", "b"]  # type: ignore[union-attr]

    state = replay(fedavg(on_failure="fail"), PeerFailed(session_id="s", peer_id="c", reason="x"))
    assert SessionFailed in [type(e) for e in events(state, 1)]


def test_session_fails_when_no_participant_is_left_and_nobody_can_take_over() -> None:
    state = fedavg(peers=("a",), on_failure="reassign")
    state = offline(state, "spare")
    state = replay(state, PeerFailed(session_id="s", peer_id="a", reason="x"))
    assert [type(e).__name__ for e in events(state, 1)] == ["PeerReleased", "SessionFailed"]  # released first


def test_session_completes_after_the_last_round_once_every_peer_is_done() -> None:
    state = fedavg(peers=("a", "b"), rounds=1)
    state = replay(state, update("a", 1, 1), update("b", 1, 1))
    state = replay(state, seen(2, closed(state, 2)))  # type: ignore[arg-type]
    assert not [e for e in events(state, 3) if isinstance(e, SessionCompleted)]
    for p in ("a", "b"):
        state = replay(
            state,
            PeerDone(
                session_id="s",
                peer_id=p,
                model_uri=f"file:///{p}",
                model_sha256="same",
                epochs=1,
                loss=0.1,
                accuracy=0.9,
                val_accuracy=0.8,
                train_seconds=1,
            ),
        )
    [done] = [e for e in events(state, 3) if isinstance(e, SessionCompleted)]
    assert done.best_val_accuracy == 0.8


def test_fedavg_session_model_is_the_one_most_peers_agree_on_not_a_claim() -> None:
    state = fedavg(peers=("a", "b", "c"), rounds=1)
    for p in ("a", "b", "c"):
        state = replay(state, update(p, 1, 1))
    state = replay(state, seen(2, closed(state, 2)))  # type: ignore[arg-type]
    claims = {"a": ("same", 0.8), "b": ("same", 0.8), "c": ("forged", 1.0)}
    for p, (sha, acc) in claims.items():
        state = replay(
            state,
            PeerDone(
                session_id="s",
                peer_id=p,
                model_uri=f"file:///{p}",
                model_sha256=sha,
                epochs=1,
                loss=0.1,
                accuracy=0.9,
                val_accuracy=acc,
                train_seconds=1,
            ),
        )
    [done] = [e for e in events(state, 3) if isinstance(e, SessionCompleted)]
    assert done.best_peer_id in ("a", "b") and done.best_val_accuracy == 0.8


def test_no_hand_over_into_a_round_that_closes_in_the_same_decision() -> None:
    state = fedavg(rounds=1)
    state = replay(state, update("a", 1, 1), update("b", 1, 1), PeerFailed(session_id="s", peer_id="c", reason="gone"))
    actions = decided(state, 2)
    assert [a for a in actions if isinstance(a, Append) and isinstance(a.event, RoundClosed)]
    assert not [a for a in actions if isinstance(a, Reassign)]  # the last round closed: nothing to hand over


def test_a_round_deadline_never_counts_the_time_the_scheduler_could_not_hear() -> None:
    """A scheduler paused, catching up or cut off from its log past a deadline: the peers' updates
    that arrived meanwhile are unread, so the round gets its whole deadline again from the grace
    (``regrace``) rather than failing the peers that published."""
    state = replay(fedavg(), update("a", 1, 5))  # deadline 15 s after the round opened at 0
    assert [type(e).__name__ for e in events(state, 16)] == ["PeerFailed", "PeerFailed", "RoundClosed"]
    graced = regrace(state, now=0.0, wall=T0 + 16)  # back at 16 s, the reports not read yet
    assert events(graced, 16) == [] and events(graced, 30) == []  # 15 s from the grace, not from 0
    late = replay(graced, update("b", 1, 17), update("c", 1, 17))
    rc = closed(late, 17)
    assert rc is not None and rc.left_out == []  # nobody failed for the scheduler's own stall
    assert [type(e).__name__ for e in events(graced, 32)] == ["PeerFailed", "PeerFailed", "RoundClosed"]


def test_a_peer_that_took_up_its_work_late_has_the_rounds_whole_deadline_from_then() -> None:
    """A peer restarted (its ``Train`` lost, then sent again) whose beats name its ``Train`` only
    from 12 s on: the round's 15 s deadline passes at 15 s, its own 15 s from 12 s; the round waits
    for it until then, not a moment longer."""
    state = replay(fedavg(), update("a", 1, 5), update("b", 1, 5))
    train_c = "s.c.train.1"
    state = observe_presence(state, Presence(peer_id="c", name="c", device="cpu"), 1.0)  # idle: restarted
    assert [
        type(a.event).__name__ for a in decide(state, Clocks(now=16, wall=T0 + 16), CONFIG) if isinstance(a, Append)
    ] == []  # not at work: no round's deadline judges it (presence and re-sends do)
    state = observe_presence(state, Presence(peer_id="c", name="c", device="cpu", train_id=train_c), 12.0)
    state = observe_presence(state, Presence(peer_id="c", name="c", device="cpu", train_id=train_c), 20.0)

    def at(t: float) -> list[str]:
        acts = decide(state, Clocks(now=t, wall=T0 + t), CONFIG)
        return [type(a.event).__name__ for a in acts if isinstance(a, Append)]

    assert at(16) == [] and at(26) == []  # overdue for the round, not for c: it works since 12 s
    assert at(28) == ["PeerFailed", "RoundClosed"]
    assert state.streak["c"] == (train_c, 12.0)  # the streak's start, not its latest beat


def test_a_peer_restarted_after_a_round_gets_its_train_again_from_the_open_round() -> None:
    """A peer restarted in round 2 (its beats name no ``Train``): the re-sent ``Train`` starts at
    round 2, not at its run's first round (which would make it redo round 1 and miss round 2's
    deadline), and every fact of the session goes to it again under new ids, so it rebuilds round
    1's average as a newcomer does; its beats naming that ``Train`` count as at work on its run."""
    state = replay(fedavg(rounds=3), update("a", 1, 2), update("b", 1, 2), update("c", 1, 2))
    rc = closed(state, 3)
    assert rc is not None
    state = replay(state, seen(3, rc))
    assert state.sessions["s"].round == 2
    for p in ("a", "b"):
        state = observe_presence(state, Presence(peer_id=p, name=p, device="cpu", train_id=f"s.{p}.train.1"), 11.0)
    state = observe_presence(state, Presence(peer_id="c", name="c", device="cpu"), 11.0)  # restarted: idle
    acts = decided(state, 11.0)
    sends = [a for a in acts if isinstance(a, Send)]
    assert [(a.command.peer_id, a.command.start_round, a.id) for a in sends] == [("c", 2, "s.c.train.2.resend.1")]
    again = [a for a in acts if isinstance(a, Forward) and a.again]
    assert [(a.peer_id, a.fact.event_id, a.id) for a in again] == [("c", rc.event_id, f"{rc.event_id}.to.c.again.1")]
    at_work = observe_presence(state, Presence(peer_id="c", name="c", device="cpu", train_id="s.c.train.2"), 12.0)
    assert not [a for a in decided(at_work, 21.0) if isinstance(a, Send)]  # at work on its run: no re-send
    assert events(at_work, 21.0) == []  # its round's deadline counts from 12 s, when it took up its work ...
    assert "PeerFailed" in [type(e).__name__ for e in events(at_work, 23.0)]  # ... and runs out 10 s later
