"""The scheduler's shell against a real nats-server: malformed input, fake peers (beating, reading
their commands, publishing reports), two schedulers."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import pytest
from nats.js.api import AckPolicy

from swarmtrain.common import blob, bus, servers, subjects
from swarmtrain.common.events import (
    Command,
    DatasetUploaded,
    Event,
    Heartbeat,
    Hyperparameters,
    ModelEvaluated,
    PeerDone,
    PeerFailed,
    PeerLocked,
    PeerRegistered,
    PeerReleased,
    PeerWentOffline,
    Presence,
    ReportRejected,
    SessionCompleted,
    SessionRequested,
    SessionStarted,
    Train,
    decode_command,
    decode_event,
    encode,
)
from swarmtrain.common.settings import Settings
from swarmtrain.scheduler import service
from tests import support
from tests.factories import session_requested

E = TypeVar("E", bound=Event)

HP = Hyperparameters(epochs=1, batch_size=8, lr=0.01)


def request(sid: str, n: int) -> SessionRequested:
    return session_requested(sid, n)


@contextlib.asynccontextmanager
async def beating(nats_url: str, peer_ids: list[str]) -> AsyncIterator[None]:
    """Fake peers: registered, and beating presence until the block ends."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    for p in peer_ids:
        await bus.append(js, PeerRegistered(peer_id=p, name=p, device="cpu"))

    async def beat() -> None:
        while True:
            for p in peer_ids:
                await nc.publish(f"peer.{p}.presence", encode(Presence(peer_id=p, name=p, device="cpu")))
            await asyncio.sleep(0.1)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await nc.drain()


@contextlib.asynccontextmanager
async def schedulers(settings: Settings, n: int) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(service.run(settings, stop)) for _ in range(n)]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def log(js: Any) -> list[Event]:
    sub = await bus.pull_consumer(js, bus.EVENTS_STREAM, ack=AckPolicy.NONE)
    out: list[Event] = []
    while batch := await bus.fetch(sub, decode_event, batch=1024, timeout=0.3):
        out += [e for _, e in batch]
    await sub.unsubscribe()
    return out


async def wait_started(js: Any, count: int, timeout: float = 20) -> list[Event]:
    async with asyncio.timeout(timeout):
        while True:
            events = await log(js)
            if len([e for e in events if isinstance(e, SessionStarted)]) >= count:
                return events
            await asyncio.sleep(0.1)


@pytest.fixture
def settings(nats_url: str, tmp_path: Any) -> Settings:  # no PostgreSQL needed here
    return Settings(
        nats_url=nats_url,
        blob_url=(tmp_path / "blobs").as_uri(),
        peer_timeout_s=5.0,
        blob_signing_secret="s" * 32,
        blob_public_url="http://gateway.test",
    )


async def test_malformed_messages_at_the_end_of_the_log_do_not_stop_the_start(js: Any, settings: Settings) -> None:
    await js.publish("session.junk.events", b"\x00not json")
    await js.publish("peer.junk.events", b'{"type": "Nope"}')
    async with beating(settings.nats_url, ["pa", "pb"]), schedulers(settings, 1):
        await bus.append(js, request("s1", 2))
        await js.publish("session.s1.events", b"[]")  # more junk, live this time
        events = await wait_started(js, 1)
    [started] = [e for e in events if isinstance(e, SessionStarted)]
    assert sorted(started.assignments) == ["pa", "pb"]
    commands = await js.pull_subscribe("peer.pa.command", durable="t", stream=bus.COMMANDS_STREAM)
    [msg] = await commands.fetch(1, timeout=5)
    assert b'"type":"Train"' in msg.data and b'"session_id":"s1"' in msg.data
    await commands.unsubscribe()


async def test_two_schedulers_never_take_the_same_peer(js: Any, settings: Settings) -> None:
    peers = [f"p{i}" for i in range(6)]
    async with beating(settings.nats_url, peers), schedulers(settings, 2):
        for i in range(6):  # more demand than peers: sessions must queue, not share
            await bus.append(js, request(f"s{i}", 2))
        events = await wait_started(js, 3)
        await asyncio.sleep(1.0)  # give a wrongly eager second scheduler the chance to misbehave
        events = await log(js)
    holder: dict[str, str | None] = dict.fromkeys(peers)
    for e in events:
        if isinstance(e, PeerLocked):
            assert holder[e.peer_id] is None, f"{e.peer_id} locked for {e.session_id} while held by {holder[e.peer_id]}"
            holder[e.peer_id] = e.session_id
        elif isinstance(e, PeerReleased) and holder[e.peer_id] == e.session_id:
            holder[e.peer_id] = None
    started = [e for e in events if isinstance(e, SessionStarted)]
    assert len(started) == 3 and len({s.session_id for s in started}) == 3  # each started once
    assigned = [p for s in started for p in s.assignments]
    assert sorted(assigned) == peers  # six peers, each in exactly one session


# ------------------------------------------------------------------ reports, checked figures, re-sends


@contextlib.asynccontextmanager
async def presence(
    nats_url: str, doing: dict[str, str | None], paused: asyncio.Event | None = None
) -> AsyncIterator[None]:
    """Fake peers (registered by report) beating presence that names the Train each one works on
    (``doing``, changed by the test as it goes) until the block ends; silent while ``paused`` is set."""
    nc = await nats.connect(nats_url, reconnect_time_wait=0.2, max_reconnect_attempts=-1)
    js = nc.jetstream()
    for p in doing:
        await bus.report(js, PeerRegistered(peer_id=p, name=p, device="cpu"))
    stop = asyncio.Event()

    async def beat() -> None:
        while not stop.is_set():
            for p, train in doing.items() if paused is None or not paused.is_set() else ():
                beat = Presence(peer_id=p, name=p, device="cpu", session_id=None, train_id=train)
                with contextlib.suppress(nats.errors.Error):  # an outage: beats resume with the connection
                    await nc.publish(subjects.peer_presence(p), encode(beat))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)  # the beat's period; returns at once on stop

    task = asyncio.create_task(beat(), name="fake-presence")
    try:
        yield
    finally:
        stop.set()
        await task
        await nc.drain()


async def next_command(js: Any, peer_id: str, durable: str) -> tuple[Command, str]:
    """The peer's next command and the ``Nats-Msg-Id`` it was stored under."""
    sub = await js.pull_subscribe(subjects.peer_command(peer_id), durable=durable, stream=bus.COMMANDS_STREAM)
    [msg] = await sub.fetch(1, timeout=20)
    await msg.ack()
    return decode_command(msg.data), (msg.headers or {}).get("Nats-Msg-Id", "")


async def wait_for_event(js: Any, what: type[E], timeout: float = 60) -> E:
    async def found() -> E | None:
        return next((e for e in await log(js) if isinstance(e, what)), None)

    return await support.wait_for(found, what.__name__, timeout=timeout, interval=0.2)


def dataset_csv(rows: int = 80) -> bytes:
    """Two features; the class is mostly the sign of the first (every 7th label flipped, so no model
    is perfect): a model that learned it is mostly right, a random one is not."""
    lines = ["x0,x1,label"]
    for i in range(rows):
        x0 = (i % 17 - 8) / 4 + (0.5 if i % 2 else -0.5)
        positive = (x0 > 0) != (i % 7 == 0)
        lines.append(f"{x0:.3f},{(i * 7) % 5 - 2},{'pos' if positive else 'neg'}")
    return ("\n".join(lines) + "\n").encode()


def trained_model(csv: Path, train: Train, learn: bool) -> tuple[bytes, float | None]:
    """The model file a peer would upload, and its true validation accuracy; ``learn=False``: its
    untrained initial weights."""
    from swarmtrain.peer import trainer
    from swarmtrain.training.init import seeded_model
    from swarmtrain.training.model import model_bytes

    job = trainer.TrainJob(
        csv_path=csv, label_column=train.label_column, model=train.model, hyperparameters=train.hyperparameters,
        validation_split=train.validation_split, seed=train.seed, device="cpu",
    )  # fmt: skip
    if learn:
        result = trainer.train(job, lambda _: None, threading.Event())
        return model_bytes(result.model, result.metadata), result.final.val_accuracy
    data, _, _ = trainer.load_data(job)
    model = seeded_model(train.model, len(data.feature_names), len(data.classes), train.seed)
    return model_bytes(model, trainer.metadata_for(train.model, data)), None


async def test_reports_become_facts_and_a_sweep_is_won_by_the_checked_figure_not_the_claim(
    js: Any, settings: Settings, tmp_path: Path
) -> None:
    store = blob.open_store(settings.blob_url, settings)
    csv = tmp_path / "d.csv"
    csv.write_bytes(dataset_csv())
    ref = store.put_bytes("datasets/d.csv", csv.read_bytes())
    await bus.append(
        js,
        DatasetUploaded(
            dataset_id="d", owner_id="u", name="d", uri=ref.uri, sha256=ref.sha256, size_bytes=ref.size, rows=80,
            features=2, classes=2, label_column="label",
        ),
    )  # fmt: skip
    hps = [Hyperparameters(epochs=30, batch_size=16, lr=0.05), Hyperparameters(epochs=1, batch_size=16, lr=0.05)]
    request = session_requested("s1", 2, dataset_uri=ref.uri, dataset_sha256=ref.sha256, hyperparameters=hps[0])
    doing: dict[str, str | None] = {"pa": None, "pb": None}
    async with presence(settings.nats_url, doing), schedulers(settings, 1):
        await bus.append(js, msgspec.structs.replace(request, hyperparameters=hps))
        trains: dict[str, Train] = {}
        honest: float | None = None
        for p in doing:
            command, _ = await next_command(js, p, f"{p}-commands")
            assert isinstance(command, Train)
            trains[p] = command
            doing[p] = command.event_id  # at work on it
        assert trains["pa"].dataset_url.startswith("http://gateway.test/blobs/datasets/d.csv?")
        assert "max=" in trains["pa"].output_url
        # a forged report (pc speaks for pa) and one from a peer not in the session
        forged = Heartbeat(
            event_id="s1.pa.epoch1", session_id="s1", peer_id="pa", epoch=1, epochs=30, loss=0.1, accuracy=1.0,
            samples_per_s=1.0,
        )  # fmt: skip
        await js.publish(subjects.peer_reports("pc"), encode(forged), stream=bus.REPORTS_STREAM)
        await bus.report(js, msgspec.structs.replace(forged, event_id="s1.pc.epoch1", peer_id="pc"))
        for p, learn, claim in (("pa", True, None), ("pb", False, 0.99)):  # pb claims more than it has
            data, true_accuracy = await asyncio.to_thread(trained_model, csv, trains[p], learn)
            model = store.put_bytes(store.key_of(trains[p].output_uri), data)
            claimed = true_accuracy if claim is None else claim
            await bus.report(
                js,
                PeerDone(
                    event_id=f"s1.{p}.done", session_id="s1", peer_id=p, model_uri=trains[p].output_uri,
                    model_sha256=model.sha256, epochs=trains[p].hyperparameters.epochs, loss=0.5, accuracy=0.5,
                    val_accuracy=claimed, train_seconds=1.0,
                ),
            )  # fmt: skip
            if p == "pa":
                honest = true_accuracy
        completed = await wait_for_event(js, SessionCompleted)
        events = await log(js)
    assert honest is not None and honest < 0.99
    assert completed.best_peer_id == "pa" and completed.checked_val_accuracy == pytest.approx(honest)
    assert completed.best_val_accuracy == pytest.approx(honest)
    checked = {e.peer_id: e for e in events if isinstance(e, ModelEvaluated)}
    assert sorted(checked) == ["pa", "pb"]  # the higher claim was checked first, and found wanting
    assert checked["pb"].val_accuracy is not None and checked["pb"].val_accuracy < 0.99
    done_ids = [e.event_id for e in events if isinstance(e, PeerDone)]
    assert sorted(done_ids) == ["s1.pa.done", "s1.pb.done"]  # the reports' own ids: the same messages
    rejected = [e for e in events if isinstance(e, ReportRejected)]
    assert sorted((e.peer_id, e.report_id) for e in rejected) == [("pc", "s1.pa.epoch1"), ("pc", "s1.pc.epoch1")]
    assert {e.subject for e in rejected} == {"peer.pc.events"}
    reasons = sorted(e.reason for e in rejected)
    assert "in the name of 'pa'" in reasons[1] and "holds no training run" in reasons[0]


async def test_a_train_no_beat_shows_at_work_is_re_sent_under_a_fresh_id(js: Any, nats_url: str, tmp_path: Any) -> None:
    settings = Settings(nats_url=nats_url, blob_url=(tmp_path / "blobs").as_uri(), peer_timeout_s=1.0)
    doing: dict[str, str | None] = {"pa": None}  # beating, but never naming the Train
    async with presence(nats_url, doing), schedulers(settings, 1):
        await bus.append(js, request("s1", 1))
        first, first_id = await next_command(js, "pa", "pa-commands")
        again, again_id = await next_command(js, "pa", "pa-commands")
    assert isinstance(first, Train) and isinstance(again, Train)
    assert again.event_id == first.event_id == first_id == "s1.pa.train.1"  # the same job to the peer
    assert again_id == "s1.pa.train.1.resend.1"


async def sweep_of_two(js: Any, settings: Settings, csv: Path) -> SessionRequested:
    store = blob.open_store(settings.blob_url, settings)
    data = dataset_csv()
    csv.write_bytes(data)  # noqa: ASYNC240  # a few bytes, in a test
    ref = store.put_bytes("datasets/d.csv", data)
    await bus.append(
        js,
        DatasetUploaded(
            dataset_id="d", owner_id="u", name="d", uri=ref.uri, sha256=ref.sha256, size_bytes=ref.size, rows=80,
            features=2, classes=2, label_column="label",
        ),
    )  # fmt: skip
    return session_requested("s1", 2, dataset_uri=ref.uri, dataset_sha256=ref.sha256)


async def model_done(settings: Settings, csv: Path, train: Train) -> PeerDone:
    """Train ``train``'s model, upload it where the peer would, and return the report of it."""
    store = blob.open_store(settings.blob_url, settings)
    data, accuracy = await asyncio.to_thread(trained_model, csv, train, True)
    model = store.put_bytes(store.key_of(train.output_uri), data)
    return PeerDone(
        event_id=f"{train.session_id}.{train.peer_id}.done", session_id=train.session_id, peer_id=train.peer_id,
        model_uri=train.output_uri, model_sha256=model.sha256, epochs=train.hyperparameters.epochs, loss=0.5,
        accuracy=0.5, val_accuracy=accuracy, train_seconds=1.0,
    )  # fmt: skip


@pytest.fixture
def restart_nats(nats_server: tuple[str, Any], tmp_path: Path) -> Iterator[Callable[[], None]]:
    """Kill the test's nats-server now; calling what this yields starts it again on its port and
    store (stopped after every fixture that talks to it is torn down)."""
    nats_url = nats_server[0]
    restarted: list[subprocess.Popen[bytes]] = []

    def restart() -> None:
        restarted.append(servers.start_nats(int(nats_url.rsplit(":", 1)[1]), tmp_path / "jetstream"))

    yield restart
    for p in restarted:
        servers.stop(p, signal.SIGTERM)


async def test_a_nats_outage_longer_than_the_presence_timeout_fails_no_peer(
    restart_nats: Callable[[], None], nats_server: tuple[str, Any], js: Any, tmp_path: Path
) -> None:
    nats_url, proc = nats_server
    settings = Settings(nats_url=nats_url, blob_url=(tmp_path / "blobs").as_uri(), peer_timeout_s=4.0)
    request = await sweep_of_two(js, settings, tmp_path / "d.csv")
    doing: dict[str, str | None] = {"pa": None, "pb": None}
    silent = asyncio.Event()
    async with presence(nats_url, doing, silent), schedulers(settings, 1):
        await bus.append(js, request)
        done: dict[str, PeerDone] = {}
        for p in doing:
            command, _ = await next_command(js, p, f"{p}-commands")
            assert isinstance(command, Train)
            doing[p] = command.event_id
            done[p] = await model_done(settings, tmp_path / "d.csv", command)
        silent.set()  # the peers' beats stop with the outage ...
        servers.stop(proc, signal.SIGKILL)
        await asyncio.sleep(5.0)  # the fault itself: an outage longer than the presence timeout
        restart_nats()
        nc = await nats.connect(nats_url)  # the test's own connection may still be reconnecting
        after = nc.jetstream()
        await bus.report(after, done["pa"])
        await wait_for_event(after, PeerDone, timeout=30)  # the scheduler reads and decides again ...
        silent.clear()  # ... and only then do the peers beat again: long after their last beat
        await bus.report(after, done["pb"])
        completed = await wait_for_event(after, SessionCompleted)
        events = await log(after)
        await nc.drain()
    assert completed.session_id == "s1"
    assert not [e for e in events if isinstance(e, (PeerWentOffline, PeerFailed))]


async def test_no_peer_is_judged_on_a_stale_reading_nor_before_the_stored_reports_are_read(
    js: Any, settings: Settings
) -> None:
    """A scheduler that resumes (SIGSTOP, a frozen VM) decides nothing on its reading from before
    the stop: it takes a fresh grace and reads first. And a decision that takes a peer offline
    waits until the reports already stored have been read."""
    import time
    from dataclasses import replace

    from swarmtrain.common.events import PeerWentOnline
    from swarmtrain.scheduler.state import State, fold

    scheduler = service.Scheduler(settings, js)
    scheduler.reports = await service.reports_consumer(js)
    events = await bus.pull_consumer(js, bus.EVENTS_STREAM, ack=AckPolicy.NONE)
    long_ago = time.monotonic() - 60
    known = fold(
        State(),
        [(1, PeerRegistered(peer_id="pa", name="pa", device="cpu"), 0.0), (2, PeerWentOnline(peer_id="pa"), 0.0)],
    )
    silent = replace(known, started_at=long_ago, beats={"pa": long_ago})  # a decision would take pa offline

    scheduler.state, scheduler.heard_at = silent, long_ago  # its last reading began before a long stop
    await scheduler.settle(events)
    assert scheduler.barrier == 0  # nothing decided on it
    assert scheduler.state.grace_from > long_ago + 30  # a fresh grace for every peer instead

    await bus.report(js, PeerRegistered(peer_id="pb", name="pb", device="cpu"))  # stored, not read yet
    scheduler.state, scheduler.heard_at = silent, time.monotonic()
    await scheduler.settle(events)
    assert scheduler.barrier == 0 and scheduler.deferred == 1  # the blame waits for the stored report

    batch = await bus.fetch(scheduler.reports, service.decode_report, batch=256, timeout=2)
    assert await scheduler.check_reports(batch, events) == 1
    await scheduler.settle(events)
    stored = await log(js)
    assert [type(e).__name__ for e in stored] == ["PeerRegistered", "PeerWentOffline"], stored
    await events.unsubscribe()
    await scheduler.reports.unsubscribe()


async def test_only_what_can_change_a_decision_asks_for_one_before_the_next_tick(js: Any, settings: Settings) -> None:
    """The loop's shortcuts (issue 20): the doorbell of the scheduler's own append asks for no read
    of the log, another's does; a batch of heartbeats of a session that does not search (or their
    rejections) asks for no decision before the next tick, a search's heartbeat or any other fact
    does; nor does a wake by its own appends once ``settle`` has decided upon them; a job that
    ended (an evaluation's fact) does."""
    import time
    from types import SimpleNamespace

    from swarmtrain.scheduler.state import State, fold
    from tests.scheduler.test_trials import search

    scheduler = service.Scheduler(settings, js)
    own = PeerRegistered(event_id="pa.registered.1", peer_id="pa", name="pa", device="cpu")
    await scheduler.append(own)
    scheduler.on_appended(SimpleNamespace(headers={"Nats-Msg-Id": own.event_id}))  # type: ignore[arg-type]
    assert not scheduler.foreign
    scheduler.on_appended(SimpleNamespace(headers={"Nats-Msg-Id": "s9.requested"}))  # type: ignore[arg-type]
    assert scheduler.foreign

    scheduler.state = fold(
        State(), [(1, session_requested("sweep"), 0.0), (2, session_requested("tuned", search=search()), 0.0)]
    )

    def beat(sid: str) -> Heartbeat:
        return Heartbeat(
            event_id=f"{sid}.pa.beat.1",
            session_id=sid,
            peer_id="pa",
            epoch=1,
            epochs=1,
            loss=1.0,
            accuracy=0.5,
            samples_per_s=1.0,
        )

    def rejected(report_type: str) -> ReportRejected:
        return ReportRejected(
            event_id="pa.report.0.rejected", peer_id="pa", report_type=report_type, report_id="x", reason="no"
        )

    assert scheduler.inconsequential(beat("sweep")) and scheduler.inconsequential(rejected("Heartbeat"))
    assert not scheduler.inconsequential(beat("tuned"))  # a search prunes on heartbeats
    assert not scheduler.inconsequential(rejected("PeerDone"))
    done = PeerDone(
        event_id="sweep.pa.done", session_id="sweep", peer_id="pa", model_uri="file:///m", model_sha256="0" * 64,
        epochs=1, loss=1.0, accuracy=0.5, train_seconds=1.0,
    )  # fmt: skip
    assert not scheduler.inconsequential(done)

    scheduler.decided_at, scheduler.settled, scheduler.beats_only = time.monotonic(), True, True
    assert not scheduler.due(reported=True, rang=False, foreign=False)  # heartbeats alone
    assert not scheduler.due(reported=False, rang=True, foreign=False)  # its own appends, decided upon
    assert scheduler.due(reported=True, rang=False, foreign=True)  # another's append
    assert scheduler.due(reported=False, rang=False, foreign=False)  # a tick
    scheduler.beats_only = False
    assert scheduler.due(reported=True, rang=False, foreign=False)  # a report that decides something
    scheduler.settled = False
    assert scheduler.due(reported=False, rang=True, foreign=False)  # settle stopped at its rounds' end
    scheduler.settled, scheduler.beats_only = True, True
    scheduler.doorbell = asyncio.Event()
    scheduler.nudge()  # a job's fact appended: its own doorbell may have found nothing due already
    assert scheduler.doorbell.is_set(), "a job's end must wake the loop, not wait for a tick"
    assert scheduler.due(reported=True, rang=False, foreign=False)
    assert scheduler.due(reported=False, rang=True, foreign=False)
    scheduler.nudged, scheduler.decided_at = False, time.monotonic() - service.TICK_S
    assert scheduler.due(reported=True, rang=False, foreign=False)  # a tick old: what time decides
