"""fedavg peers against a real nats-server, with the test playing the scheduler's part.

The test sends each peer its ``Train`` (with URLs signed for the ``blob_server``), waits for the
round's ``ModelUpdatePublished`` reports and forwards the ``RoundClosed`` that names them as a
``SessionFact`` with signed GETs of the updates, exactly as the scheduler would; every wait is for
a report, with a deadline. The peers write nothing to EVENTS and read nothing from it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import torch
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from swarmtrain.common import blob, bus
from swarmtrain.common.events import (
    Heartbeat,
    Hyperparameters,
    ModelSpec,
    ModelUpdatePublished,
    PeerDone,
    PeerFailed,
    RoundAveraged,
    RoundClosed,
    RoundUpdate,
    SessionCancelled,
    Stop,
    Train,
    UpdateRejected,
)
from swarmtrain.common.fedopts import RoundOptions
from swarmtrain.common.models import CnnSpec, MlpSpec
from swarmtrain.common.settings import Settings
from swarmtrain.training.averaging import average_round, state_bytes
from swarmtrain.training.model import load_model
from swarmtrain.training.tensorfile import loads
from tests.peer.helpers import (
    ReportReader,
    SchedulerPart,
    events_stored,
    presence,
    registered,
    reports,
    running_peer,
    stored_reports,
)

LOCAL_EPOCHS = 2


def fedavg_command(
    peer_id: str,
    blob_dir: Path,
    sid: str,
    *,
    sha256: str,
    shard: int,
    num_shards: int,
    rounds: int,
    start_round: int = 1,
    model: ModelSpec | None = None,
    max_update_norm: float | None = None,
) -> Train:
    return Train(
        peer_id=peer_id,
        session_id=sid,
        dataset_uri=(blob_dir / "datasets" / "digits.csv").as_uri(),
        dataset_sha256=sha256,
        label_column="digit",
        model=model or MlpSpec(hidden=[64, 32]),
        hyperparameters=Hyperparameters(epochs=LOCAL_EPOCHS, batch_size=32, lr=2e-3),
        validation_split=0.2,
        seed=7,
        output_uri=(blob_dir / "sessions" / sid / "models" / f"{peer_id}.safetensors").as_uri(),
        strategy="fedavg",
        shard=shard,
        num_shards=num_shards,
        rounds=rounds,
        start_round=start_round,
        rounds_uri=(blob_dir / "sessions" / sid / "rounds").as_uri(),
        round_options=RoundOptions(max_update_norm=max_update_norm),
    )


@contextlib.asynccontextmanager
async def peers(settings: Settings, js: JetStreamContext, *names: str) -> AsyncIterator[list[str]]:
    """Run a peer per name; yields their ids in the same order."""
    async with contextlib.AsyncExitStack() as stack:
        for name in names:
            await stack.enter_async_context(running_peer(settings, name))
        yield [(await registered(js, name)).peer_id for name in names]


async def updates_of(session: ReportReader, r: int, peer_ids: list[str]) -> dict[str, ModelUpdatePublished]:
    found = await session.collect(
        ModelUpdatePublished, lambda e: e.round == r and e.peer_id in peer_ids, count=len(peer_ids)
    )
    return {e.peer_id: e for e in found}


def named(*updates: ModelUpdatePublished) -> list[RoundUpdate]:
    return [RoundUpdate(peer_id=u.peer_id, uri=u.uri, sha256=u.sha256, num_samples=u.num_samples) for u in updates]


async def close_round(
    scheduler: SchedulerPart,
    to: list[str],
    sid: str,
    r: int,
    updates: list[RoundUpdate],
    left_out: list[str] | None = None,
) -> RoundClosed:
    """The scheduler's ``RoundClosed``, forwarded to the peers ``to`` with signed GETs of its updates."""
    closed = RoundClosed(session_id=sid, round=r, updates=updates, left_out=left_out or [])
    await scheduler.forward(to, closed)
    return closed


def rounds_uri(blob_dir: Path, sid: str) -> str:
    return (blob_dir / "sessions" / sid / "rounds").as_uri()


def read_uri(uri: str) -> bytes:
    """An object of the test's ``file://`` store, read as anyone holding the folder could."""
    return Path(url2pathname(urlsplit(uri).path)).read_bytes()


def fetch(update: RoundUpdate) -> bytes:
    return read_uri(update.uri)


def reference_of(update_uri: str) -> dict[str, torch.Tensor]:
    return loads(read_uri(update_uri))


# ------------------------------------------------------------------ tests


async def test_three_peers_average_every_round_and_end_identical(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    sid, rounds = "fa", 3
    async with peers(settings, js, "alpha", "beta", "gamma") as ids, reports(js, sid) as session:
        for shard, peer_id in enumerate(ids):
            cmd = fedavg_command(peer_id, blob_dir, sid, sha256=digits_sha256, shard=shard, num_shards=3, rounds=rounds)
            await scheduler.train(cmd)
        for r in range(1, rounds + 1):
            ups = await updates_of(session, r, ids)
            closed = await close_round(scheduler, ids, sid, r, named(*ups.values()))
            [averaged] = await session.collect(RoundAveraged, lambda e, r=r: e.round == r)  # type: ignore[misc]
            # Anyone can recompute the round from the facts and the blobs, bit for bit.
            expected, rejected = average_round(closed, fetch, reference_of(next(iter(ups.values())).uri))
            assert rejected == [] and expected is not None
            data = read_uri(averaged.uri)
            assert data == state_bytes(expected)
            assert hashlib.sha256(data).hexdigest() == averaged.sha256
            assert averaged.event_id == f"{sid}.r{r}.averaged" and averaged.val_accuracy is not None
        done = await session.collect(PeerDone, count=3, timeout=30)

    assert {d.peer_id for d in done} == set(ids)
    assert len({d.model_sha256 for d in done}) == 1, "every peer must end with the same model file"
    assert all(d.epochs == rounds * LOCAL_EPOCHS and d.val_accuracy == done[0].val_accuracy for d in done)
    assert done[0].val_accuracy is not None and done[0].val_accuracy > 0.85
    final = read_uri(done[0].model_uri)
    assert hashlib.sha256(final).hexdigest() == done[0].model_sha256
    model, meta = load_model(final)
    assert meta.label_column == "digit" and len(meta.classes) == 10
    last_average = loads(read_uri(averaged.uri))
    assert all(torch.equal(t, last_average[name]) for name, t in model.state_dict().items())

    stored = await stored_reports(js, sid)
    for peer_id in ids:
        mine = [e for e in stored if isinstance(e, ModelUpdatePublished) and e.peer_id == peer_id]
        assert [u.round for u in mine] == [1, 2, 3]
        assert all(u.event_id == f"{sid}.r{u.round}.{peer_id}.update" for u in mine)
        assert all(u.uri == f"{rounds_uri(blob_dir, sid)}/{u.round}/{peer_id}.safetensors" for u in mine)
        heartbeats = [e for e in stored if isinstance(e, Heartbeat) and e.peer_id == peer_id]
        assert [(b.epoch, b.epochs) for b in heartbeats] == [(e, rounds * LOCAL_EPOCHS) for e in range(1, 7)]
    assert sum(u.num_samples for u in stored if isinstance(u, ModelUpdatePublished) and u.round == 1) == 1438
    assert [e.round for e in stored if isinstance(e, RoundAveraged)] == [1, 2, 3]  # one per round (deduplicated)
    assert not any(isinstance(e, UpdateRejected | PeerFailed) for e in stored)
    assert await events_stored(js) == 0


async def test_poisoned_updates_are_rejected_and_the_session_still_ends_identical(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    sid = "poison"
    rounds_dir = blob_dir / "sessions" / sid / "rounds"
    async with peers(settings, js, "alpha", "beta") as ids, reports(js, sid) as session:
        for shard, peer_id in enumerate(ids):
            cmd = fedavg_command(
                peer_id, blob_dir, sid, sha256=digits_sha256, shard=shard, num_shards=2, rounds=2, max_update_norm=1e4
            )
            await scheduler.train(cmd)

        ups = await updates_of(session, 1, ids)
        genuine = loads(read_uri(ups[ids[0]].uri))
        nan = {name: t.clone() for name, t in genuine.items()}
        next(t for name, t in nan.items() if name.endswith("weight"))[0, 0] = float("nan")
        bent = {**genuine, "1.bias": torch.zeros(3)}
        huge = {name: t * 1e6 if t.is_floating_point() else t for name, t in genuine.items()}  # finite, far away
        poison = []
        for name, tensors in (("evil", nan), ("bent", bent), ("huge", huge), ("stranger", genuine)):
            ref = blob.FileStore(rounds_dir).put_bytes(f"1/{name}.safetensors", state_bytes(tensors))
            poison.append(RoundUpdate(peer_id=name, uri=ref.uri, sha256=ref.sha256, num_samples=10_000))
        closed = RoundClosed(session_id=sid, round=1, updates=[*named(*ups.values()), *poison])
        urls = scheduler.urls_of(closed)
        del urls[poison[-1].uri]  # an object the fact's URLs do not cover is never fetched
        await scheduler.forward(ids, closed, urls)
        rejected = await session.collect(UpdateRejected, count=4)
        assert {(e.peer_id, e.round) for e in rejected} == {("evil", 1), ("bent", 1), ("huge", 1), ("stranger", 1)}
        reasons = {e.peer_id: e.reason for e in rejected}
        assert "NaN or Inf" in reasons["evil"] and "shape" in reasons["bent"]
        assert "norm" in reasons["huge"] and "not handed out" in reasons["stranger"]
        assert all(e.reported_by in ids and e.event_id == f"{sid}.r1.{e.peer_id}.rejected" for e in rejected)
        [first] = await session.collect(RoundAveraged, lambda e: e.round == 1)
        honest = RoundClosed(session_id=sid, round=1, updates=named(*ups.values()))
        expected, _ = average_round(honest, fetch, genuine)
        assert expected is not None and read_uri(first.uri) == state_bytes(expected)

        # Round 2 names nothing acceptable: every peer keeps the round-start weights (round 1's average).
        await updates_of(session, 2, ids)
        await close_round(scheduler, ids, sid, 2, poison[:1])
        [second] = await session.collect(RoundAveraged, lambda e: e.round == 2)
        assert second.sha256 == first.sha256
        done = await session.collect(PeerDone, count=2)
    assert len({d.model_sha256 for d in done}) == 1
    model, _ = load_model(read_uri(done[0].model_uri))
    assert all(torch.equal(t, expected[name]) for name, t in model.state_dict().items())


async def test_late_joiner_rebuilds_the_last_average_and_trains_the_shard_as_its_owner_would(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    sid = "late"
    async with peers(settings, js, "alpha", "beta", "gamma") as ids, reports(js, sid) as session:
        alpha, beta, gamma = ids
        for shard, peer_id in enumerate((alpha, beta)):
            cmd = fedavg_command(peer_id, blob_dir, sid, sha256=digits_sha256, shard=shard, num_shards=2, rounds=2)
            await scheduler.train(cmd)
        ups = await updates_of(session, 1, [alpha, beta])
        closed = await close_round(scheduler, [alpha, beta], sid, 1, named(*ups.values()))
        await session.collect(RoundAveraged, lambda e: e.round == 1)

        # gamma joins for round 2 on beta's shard, as a reassignment would hand it, with the facts it
        # needs to rebuild round 1's average (forwarded here before its Train: the peer keeps them).
        await scheduler.forward([gamma], closed)
        late = fedavg_command(
            gamma, blob_dir, sid, sha256=digits_sha256, shard=1, num_shards=2, rounds=2, start_round=2
        )
        await scheduler.train(late)
        round2 = await updates_of(session, 2, ids)
        # Same round-start weights (round 1's average, rebuilt from the facts), same shard, same
        # round: the same bytes as the shard's first owner.
        assert round2[gamma].sha256 == round2[beta].sha256
        assert round2[gamma].num_samples == round2[beta].num_samples

        # The round closes without beta (as if it had stalled): beta stops, the others finish.
        await close_round(scheduler, ids, sid, 2, named(round2[alpha], round2[gamma]), left_out=[beta])
        done = await session.collect(PeerDone, count=2)
        assert {d.peer_id for d in done} == {alpha, gamma}
        assert done[0].model_sha256 == done[1].model_sha256
        async with presence(nc, beta) as beats:
            await beats.wait_for(lambda b: b.session_id is None)

    stored = await stored_reports(js, sid)
    assert not any(isinstance(e, PeerDone | PeerFailed) and e.peer_id == beta for e in stored)
    heartbeats = [e for e in stored if isinstance(e, Heartbeat) and e.peer_id == gamma]
    assert [b.epoch for b in heartbeats] == [3, 4]  # round 2's epochs only
    assert not any(isinstance(e, ModelUpdatePublished) and e.peer_id == gamma and e.round == 1 for e in stored)


async def test_stop_while_waiting_for_a_round_ends_the_job_at_once_and_quietly(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    sid = "halt"
    async with peers(settings, js, "alpha") as [alpha], reports(js, sid) as session:
        cnn = CnnSpec(input_shape=[1, 8, 8], channels=[8], hidden=[16])
        cmd = fedavg_command(alpha, blob_dir, sid, sha256=digits_sha256, shard=0, num_shards=1, rounds=3, model=cnn)
        async with presence(nc, alpha) as beats:
            await scheduler.train(cmd)
            await updates_of(session, 1, [alpha])
            await beats.wait_for(lambda b: b.session_id == sid)
            await bus.send(js, Stop(peer_id=alpha, session_id=sid))
            # the job waits for a RoundClosed that never comes: only the Stop can make the peer idle
            await beats.wait_for(lambda b: b.session_id is None)
        # Closing the round now changes nothing: the job is gone.
        await close_round(scheduler, [alpha], sid, 1, [])
    stored = await stored_reports(js, sid)
    assert not any(isinstance(e, RoundAveraged | PeerDone | PeerFailed) for e in stored)
    assert [e.round for e in stored if isinstance(e, ModelUpdatePublished)] == [1]


async def test_the_forwarded_end_of_the_session_ends_the_job_quietly(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    sid = "ended"
    async with peers(settings, js, "alpha") as [alpha], reports(js, sid) as session:
        cmd = fedavg_command(alpha, blob_dir, sid, sha256=digits_sha256, shard=0, num_shards=1, rounds=3)
        async with presence(nc, alpha) as beats:
            await scheduler.train(cmd)
            await updates_of(session, 1, [alpha])
            await scheduler.forward([alpha], SessionCancelled(session_id=sid))
            await beats.wait_for(lambda b: b.session_id is None)
    stored = await stored_reports(js, sid)
    assert not any(isinstance(e, RoundAveraged | PeerDone | PeerFailed) for e in stored)


async def test_a_peer_takes_its_own_update_from_memory_and_stores_the_average_beside_the_next_round(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    """Each peer is handed a signed GET of the *other* peer's update only: had it fetched its own,
    it would have rejected it unfetched ("not handed out"). Both average both updates, end with one
    model, and every round's average is stored and reported before the next round's update."""
    js = nc.jetstream()
    sid, rounds = "own", 2
    async with peers(settings, js, "alpha", "beta") as ids, reports(js, sid) as session:
        for shard, peer_id in enumerate(ids):
            cmd = fedavg_command(peer_id, blob_dir, sid, sha256=digits_sha256, shard=shard, num_shards=2, rounds=rounds)
            await scheduler.train(cmd)
        for r in range(1, rounds + 1):
            ups = await updates_of(session, r, ids)
            closed = RoundClosed(session_id=sid, round=r, updates=named(*ups.values()))
            for me, other in (ids, ids[::-1]):
                await scheduler.forward([me], closed, urls={ups[other].uri: scheduler.get(ups[other].uri)})
            [averaged] = await session.collect(RoundAveraged, lambda e, r=r: e.round == r)  # type: ignore[misc]
            expected, rejected = average_round(closed, fetch, reference_of(ups[ids[0]].uri))
            assert rejected == [] and expected is not None
            assert read_uri(averaged.uri) == state_bytes(expected)
        done = await session.collect(PeerDone, count=2, timeout=30)

    assert len({d.model_sha256 for d in done}) == 1
    stored = await stored_reports(js, sid)
    assert not any(isinstance(e, UpdateRejected | PeerFailed) for e in stored)
    # in the reports stream's order: whoever reported round r's average did so before its update of
    # round r + 1 (and before its PeerDone after the last round)
    averaged = [e for e in stored if isinstance(e, RoundAveraged)]
    assert [e.round for e in averaged] == [1, 2]
    for avg in averaged:
        after = PeerDone if avg.round == rounds else ModelUpdatePublished
        nxt = next(
            i
            for i, e in enumerate(stored)
            if isinstance(e, after) and e.peer_id == avg.peer_id and getattr(e, "round", avg.round + 1) == avg.round + 1
        )
        assert stored.index(avg) < nxt
