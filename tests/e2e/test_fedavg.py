"""fedavg end to end: real peers as processes that die, stall, or cheat, on a real stack.

Peers report on their own subjects and the scheduler writes the facts, so what these tests read
from ``session.<id>.events`` is what the scheduler accepted."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
import torch
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy
from safetensors.torch import load, save

from swarmtrain.common import bus, servers, shapes, signing, subjects
from swarmtrain.common.events import (
    Event,
    Heartbeat,
    ModelUpdatePublished,
    PeerDone,
    PeerFailed,
    PeerRegistered,
    Presence,
    RoundAveraged,
    RoundClosed,
    SessionFact,
    SessionRequested,
    SessionStarted,
    ShardReassigned,
    Train,
    UpdateRejected,
    decode_command,
    decode_event,
    encode,
)
from swarmtrain.common.settings import Settings
from tests.factories import session_body
from tests.support import wait_for

from .conftest import DIGITS, Api, Stack, cli

LOCAL = {"epochs": 2, "batch_size": 32, "lr": 0.003}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, postgres_port: int) -> AsyncIterator[Stack]:
    """A stack with no peers of its own: every test starts exactly the peers it needs."""
    name = f"fedavg{uuid.uuid4().hex[:8]}"
    servers.create_database(postgres_port, name)
    st = Stack(tmp_path_factory.mktemp("stack"), servers.postgres_url(postgres_port, name), peers=0)
    try:
        await st.wait_healthy()
        yield st
    finally:
        assert not st.stop()


class Swarm:
    def __init__(self, stack: Stack, api: Api) -> None:
        self.stack, self.api = stack, api
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ids: dict[str, str] = {}

    async def start(self, *names: str) -> None:
        for name in names:
            self.procs[name] = self.stack.start_peer(name)

        async def all_online() -> dict[str, str] | None:
            online = {p["name"]: p["peer_id"] for p in await self.api.online()}
            return online if all(n in online for n in names) else None

        known = await wait_for(all_online, f"peers {names} online", timeout=60, interval=0.2)
        self.ids.update({n: known[n] for n in names})

    def name_of(self, peer_id: str) -> str:
        return next(n for n, p in self.ids.items() if p == peer_id)

    async def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                await asyncio.to_thread(proc.wait)
        mine = set(self.ids.values())

        async def all_offline() -> bool:
            return all(p["status"] == "offline" for p in await self.api.peers() if p["peer_id"] in mine)

        await wait_for(all_offline, "this test's peers to be offline", timeout=30, interval=0.2)


@pytest.fixture
async def swarm(stack: Stack, api: Api) -> AsyncIterator[Swarm]:
    s = Swarm(stack, api)
    yield s
    await s.stop_all()


def fedavg(dataset_id: str, num_peers: int, rounds: int, local: dict[str, Any] = LOCAL, **extra: Any) -> dict[str, Any]:
    model = {"kind": "mlp", "hidden": [64, 32]}
    fields = {"strategy": "fedavg", "rounds": rounds, "model": model, "validation_split": 0.2, "seed": 3}
    return session_body(dataset_id, num_peers, local, **{**fields, **extra})


async def start(api: Api, body: dict[str, Any]) -> str:
    resp = await api.client.post("/sessions", json=body)
    assert resp.status_code == 201, resp.text
    sid: str = resp.json()["session_id"]
    return sid


async def history(stack: Stack, sid: str) -> list[Event]:
    """The session's events as stored, read with a short-lived consumer."""
    nc = await nats.connect(stack.nats_url)
    js = nc.jetstream()
    sub = await bus.pull_consumer(
        js, bus.EVENTS_STREAM, ack=AckPolicy.NONE, filter_subject=subjects.session_events(sid)
    )
    out: list[Event] = []
    while batch := await bus.fetch(sub, decode_event, batch=1024, timeout=0.5):
        out += [event for _, event in batch]
        if batch[-1][0].metadata.num_pending == 0:
            break  # everything stored when we asked: a live session never goes quiet
    await sub.unsubscribe()
    await nc.drain()
    return out


def of(events: list[Event], kind: type[Any]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


async def test_fedavg_on_three_peers_gives_every_peer_the_same_model_and_replays_bit_for_bit(
    stack: Stack, api: Api, swarm: Swarm
) -> None:
    await swarm.start("fa", "fb", "fc")
    ds = await api.upload()
    sid = await start(api, fedavg(ds["dataset_id"], 3, rounds=3))
    done = await api.wait_ended(sid)
    assert done["status"] == "completed", done
    events = await history(stack, sid)
    closed = of(events, RoundClosed)
    assert [c.round for c in closed] == [1, 2, 3]
    assert all(len(c.updates) == 3 and not c.left_out for c in closed)
    finals = {e.peer_id: e.model_sha256 for e in of(events, PeerDone)}
    assert len(finals) == 3 and len(set(finals.values())) == 1, finals  # identical weights everywhere
    assert [r["round"] for r in done["round_figures"]] == [1, 2, 3]
    assert done["val_accuracy"] > 0.85, done["val_accuracy"]
    model = await api.client.get(f"/sessions/{sid}/model")
    assert model.status_code == 200 and {tuple(t.shape) for t in load(model.content).values()} >= {(64, 64), (10, 32)}

    rc, out, err = await cli("session", "replay-round", sid, "2", env=stack.env)
    assert rc == 0, out + err
    assert "MATCH: bit for bit" in out


async def first_heartbeat(stack: Stack, sid: str, peer_id: str) -> None:
    """Wait until ``peer_id`` is mid-way through round 1. The round it dies in stays open until the
    scheduler notices the death (participants wait for each other), so no test needs slow training."""

    async def trained_an_epoch() -> bool:
        return any(isinstance(e, Heartbeat) and e.peer_id == peer_id for e in await history(stack, sid))

    await wait_for(trained_an_epoch, f"{peer_id}'s first epoch", timeout=60)


async def test_peer_killed_mid_round_hands_its_shard_to_the_idle_spare(stack: Stack, api: Api, swarm: Swarm) -> None:
    await swarm.start("ka", "kb", "kc", "kd")
    ds = await api.upload()
    sid = await start(api, fedavg(ds["dataset_id"], 3, rounds=4))
    session = await api.wait_started(sid)
    participants = {p["peer_id"] for p in session["peers"]}
    [spare] = set(swarm.ids.values()) - participants
    victim = sorted(participants)[0]
    await first_heartbeat(stack, sid, victim)
    swarm.procs[swarm.name_of(victim)].kill()

    done = await api.wait_ended(sid)
    assert done["status"] == "completed", done
    events = await history(stack, sid)
    moved = of(events, ShardReassigned)
    assert [(m.from_peer_id, m.to_peer_id) for m in moved] == [(victim, spare)], [type(e).__name__ for e in events]
    assert victim in {e.peer_id for e in of(events, PeerFailed)}
    finals = {e.peer_id: e.model_sha256 for e in of(events, PeerDone)}
    assert spare in finals and victim not in finals and len(set(finals.values())) == 1
    last = of(events, RoundClosed)[-1]
    assert spare in {u.peer_id for u in last.updates}


async def test_stalled_peer_is_left_out_and_its_late_update_is_ignored(stack: Stack, api: Api, swarm: Swarm) -> None:
    await swarm.start("sa", "sb", "sc")
    ds = await api.upload()
    sid = await start(api, fedavg(ds["dataset_id"], 3, rounds=4, on_peer_failure="continue"))
    stalled = sorted(swarm.ids.values())[0]
    await first_heartbeat(stack, sid, stalled)
    proc = swarm.procs[swarm.name_of(stalled)]
    proc.send_signal(signal.SIGSTOP)

    async def stall_noticed() -> bool:
        return stalled in {e.peer_id for e in of(await history(stack, sid), PeerFailed)}

    await wait_for(stall_noticed, "the stall noticed", timeout=60)
    proc.send_signal(signal.SIGCONT)

    done = await api.wait_ended(sid)
    assert done["status"] == "completed", done
    events = await history(stack, sid)
    failed_at = next(i for i, e in enumerate(events) if isinstance(e, PeerFailed) and e.peer_id == stalled)
    before = {e.round for e in of(events[:failed_at], ModelUpdatePublished) if e.peer_id == stalled}
    for closed in of(events[failed_at:], RoundClosed):
        if closed.round not in before:  # nothing it published after it was failed counts
            assert stalled not in {u.peer_id for u in closed.updates}, closed
    finals = {e.peer_id: e.model_sha256 for e in of(events, PeerDone)}
    assert stalled not in finals and len(finals) == 2 and len(set(finals.values())) == 1


class Poisoner(threading.Thread):
    """A peer that follows the protocol as a real one must (reports on its own subject, the round's
    facts from forwarded ``SessionFact`` commands, blobs only through its ``Train``'s signed URLs,
    an honest sample count) but sends poison: NaN in odd rounds, a wrong shape in even ones."""

    def __init__(self, settings: Settings, delay_s: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.delay_s = delay_s
        """How long it sits on each round before publishing: a slow participant keeps rounds open."""
        self.peer_id = "p" + uuid.uuid4().hex[:16]
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.train: Train | None = None
        self.closed: set[int] = set()

    def run(self) -> None:
        try:
            asyncio.run(self.main())
        except BaseException as exc:
            self.error = exc

    async def online(self, api: Api) -> None:
        async def seen() -> bool:
            return self.peer_id in {p["peer_id"] for p in await api.online()}

        await wait_for(seen, f"{self.peer_id} online", timeout=30, interval=0.2)

    async def main(self) -> None:
        nc = await nats.connect(self.settings.nats_url)
        done = asyncio.Event()
        beats = asyncio.create_task(self.beat(nc, done))
        try:
            await self.follow(nc)
        finally:
            done.set()
            await beats
            await nc.drain()

    async def beat(self, nc: NATS, done: asyncio.Event) -> None:
        """Presence as a peer beats it: naming the session and the Train it works on."""
        while not done.is_set():
            train = self.train
            beat = Presence(
                peer_id=self.peer_id,
                name=self.peer_id,
                device="cpu",
                session_id=train.session_id if train else None,
                train_id=train.event_id if train else None,
            )
            await nc.publish(beat.subject, encode(beat))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.2)  # the beat's period; returns at once when done

    async def take(self, sub: Any) -> None:
        for msg, cmd in await bus.fetch(sub, decode_command, timeout=0.3):
            await msg.ack()
            match cmd:
                case Train() if self.train is None:
                    self.train = cmd
                case SessionFact(fact=RoundClosed() as closed) if self.train is not None:
                    if closed.session_id == self.train.session_id:
                        self.closed.add(closed.round)

    async def follow(self, nc: NATS) -> None:
        js = nc.jetstream()
        subject = subjects.peer_command(self.peer_id)
        sub = await bus.pull_consumer(js, bus.COMMANDS_STREAM, durable=f"peer-{self.peer_id}", filter_subject=subject)
        await bus.report(js, PeerRegistered(peer_id=self.peer_id, name=self.peer_id, device="cpu"))
        while self.train is None and not self.stop.is_set():
            await self.take(sub)
        train = self.train
        if train is not None:
            for r in range(train.start_round, train.rounds + 1):
                if self.delay_s:
                    # not a synchronisation: this fake peer is slow on purpose, so its rounds stay open
                    await asyncio.sleep(self.delay_s)
                await self.publish_poison(js, train, r)
                while r not in self.closed and not self.stop.is_set():
                    await self.take(sub)
            sid = train.session_id
            me = self.peer_id
            done = PeerFailed(event_id=f"{sid}.{me}.failed", session_id=sid, peer_id=me, reason="poisoner done")
            await bus.report(js, done)
        await sub.unsubscribe()

    async def publish_poison(self, js: Any, train: Train, r: int) -> None:
        from swarmtrain.training.model import build_model

        model = build_model(train.model, 64, 10)
        tensors = {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
        if r % 2 == 0:
            tensors = {k: torch.zeros(3, 3) for k in tensors}
        path = Path(tempfile.mkdtemp()) / "update.safetensors"
        path.write_bytes(save(tensors))
        ref = await asyncio.to_thread(signing.put_url, train.update_urls[r], path)
        await bus.report(
            js,
            ModelUpdatePublished(
                event_id=f"{train.session_id}.r{r}.{self.peer_id}.update",  # a report's id names its session
                session_id=train.session_id,
                round=r,
                peer_id=self.peer_id,
                uri=f"{train.rounds_uri.rstrip('/')}/{r}/{self.peer_id}.safetensors",
                sha256=ref.sha256,
                num_samples=honest_samples(train),
                loss=0.0,
                accuracy=1.0,
            ),
        )


def honest_samples(train: Train) -> int:
    """The size of ``train``'s shard of the digits' training rows: what the scheduler expects."""
    rows = sum(1 for line in DIGITS.read_text().splitlines()[1:] if line.strip())
    start, stop = shapes.shard_bounds(shapes.training_rows(rows, train.validation_split), train.num_shards, train.shard)
    return stop - start


async def test_poisoned_updates_are_rejected_and_the_session_completes(stack: Stack, api: Api, swarm: Swarm) -> None:
    await swarm.start("pa", "pb")
    poisoner = Poisoner(Settings(nats_url=stack.nats_url))
    poisoner.start()
    try:
        await poisoner.online(api)
        ds = await api.upload()
        sid = await start(api, fedavg(ds["dataset_id"], 3, rounds=2))
        done = await api.wait_ended(sid)
    finally:
        poisoner.stop.set()
        await asyncio.to_thread(poisoner.join, 30)
    assert poisoner.error is None, poisoner.error
    assert done["status"] == "completed", done
    events = await history(stack, sid)
    rejected = {(e.round, e.peer_id) for e in of(events, UpdateRejected)}
    assert rejected == {(1, poisoner.peer_id), (2, poisoner.peer_id)}
    reasons = " ".join(e.reason for e in of(events, UpdateRejected))
    assert "NaN" in reasons or "nan" in reasons.lower()
    finals = {e.peer_id: e.model_sha256 for e in of(events, PeerDone)}
    assert len(finals) == 2 and len(set(finals.values())) == 1
    assert done["val_accuracy"] > 0.8  # the poison never reached the model
    assert all(poisoner.peer_id in [r["peer_id"] for r in f["rejected"]] for f in done["round_figures"])


async def test_late_joiner_takes_an_orphan_shard_and_catches_up(stack: Stack, api: Api, swarm: Swarm) -> None:
    await swarm.start("la", "lb")
    pacer = Poisoner(Settings(nats_url=stack.nats_url), delay_s=4.0)  # rounds stay open while "late" boots
    pacer.start()
    try:
        await pacer.online(api)
        ds = await api.upload()
        sid = await start(api, fedavg(ds["dataset_id"], 3, rounds=3))
        victim = swarm.ids["lb"]

        async def round_closed() -> list[RoundClosed]:
            return of(await history(stack, sid), RoundClosed)

        await wait_for(round_closed, "round 1 to close", timeout=60)
        swarm.procs["lb"].kill()  # in round 2, which the pacer holds open: the newcomer starts from round 1's average
        await swarm.start("late")  # joins the swarm while the session runs
        done = await api.wait_ended(sid)
    finally:
        pacer.stop.set()
        await asyncio.to_thread(pacer.join, 30)
    assert done["status"] == "completed", done
    events = await history(stack, sid)
    [moved] = of(events, ShardReassigned)
    assert (moved.from_peer_id, moved.to_peer_id) == (victim, swarm.ids["late"]) and moved.round >= 2
    finals = {e.peer_id: e.model_sha256 for e in of(events, PeerDone)}
    assert set(finals) == {swarm.ids["la"], swarm.ids["late"]} and len(set(finals.values())) == 1


# ------------------------------------------------------------------ round options (issue 13)


class SignFlipper(Poisoner):
    """A participant that trains its shard honestly, then publishes the sign-flipped update scaled
    x100 (``start - 100 * (local - start)``): finite, the right tensors, an honest sample count,
    and within the session's norm bound, so only the aggregator can keep it out of the model."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.averages: dict[int, str] = {}
        """round -> the signed GET of its stored model, from the forwarded ``RoundAveraged``."""
        self.learner: Any = None

    async def take(self, sub: Any) -> None:
        for msg, cmd in await bus.fetch(sub, decode_command, timeout=0.3):
            await msg.ack()
            match cmd:
                case Train() if self.train is None:
                    self.train = cmd
                case SessionFact(fact=RoundClosed() as closed) if self.train is not None:
                    self.closed.add(closed.round)
                case SessionFact(fact=RoundAveraged() as averaged, urls=urls) if averaged.uri in urls:
                    self.averages.setdefault(averaged.round, urls[averaged.uri])

    async def publish_poison(self, js: Any, train: Train, r: int) -> None:
        from swarmtrain.peer.strategies.fedavg import LocalLearner
        from swarmtrain.training.averaging import state_bytes

        tmp = Path(tempfile.mkdtemp())
        if self.learner is None:
            csv = tmp / "data.csv"
            await asyncio.to_thread(signing.fetch_url, train.dataset_url, csv, 1 << 26, train.dataset_sha256)
            # one torch thread: spinning intra-op threads would starve this fake peer's presence beats
            self.learner = await asyncio.to_thread(LocalLearner, csv, train, "cpu", 1)
        start = self.learner.reference
        if r > 1:
            while r - 1 not in self.averages and not self.stop.is_set():
                await self.take(self.sub)
            await asyncio.to_thread(signing.fetch_url, self.averages[r - 1], tmp / "start.safetensors", 1 << 26, None)
            start = load((tmp / "start.safetensors").read_bytes())
        self.learner.load(start)
        await asyncio.to_thread(self.learner.train_round, r, lambda _: None, threading.Event())
        local = self.learner.state()
        flipped = {k: start[k] - 100.0 * (v - start[k]) if v.is_floating_point() else v for k, v in local.items()}
        path = tmp / "update.safetensors"
        path.write_bytes(state_bytes(flipped))
        ref = await asyncio.to_thread(signing.put_url, train.update_urls[r], path)
        await bus.report(
            js,
            ModelUpdatePublished(
                event_id=f"{train.session_id}.r{r}.{self.peer_id}.update",
                session_id=train.session_id,
                round=r,
                peer_id=self.peer_id,
                uri=f"{train.rounds_uri.rstrip('/')}/{r}/{self.peer_id}.safetensors",
                sha256=ref.sha256,
                num_samples=self.learner.num_samples,
                loss=0.5,
                accuracy=0.5,
                nbytes=path.stat().st_size,
            ),
        )

    async def follow(self, nc: NATS) -> None:
        js = nc.jetstream()
        subject = subjects.peer_command(self.peer_id)
        self.sub = await bus.pull_consumer(
            js, bus.COMMANDS_STREAM, durable=f"peer-{self.peer_id}", filter_subject=subject
        )
        await bus.report(js, PeerRegistered(peer_id=self.peer_id, name=self.peer_id, device="cpu"))
        while self.train is None and not self.stop.is_set():
            await self.take(self.sub)
        train = self.train
        if train is not None:
            for r in range(train.start_round, train.rounds + 1):
                await self.publish_poison(js, train, r)
                while r not in self.closed and not self.stop.is_set():
                    await self.take(self.sub)
            sid, me = train.session_id, self.peer_id
            await bus.report(js, PeerFailed(event_id=f"{sid}.{me}.failed", session_id=sid, peer_id=me, reason="done"))
        await self.sub.unsubscribe()


SMALL = {"epochs": 1, "batch_size": 32, "lr": 0.003}


def replayed(stack: Stack, sid: str, round_: int) -> Any:
    """``replay-round`` in this process (the CLI's own function; the CLI itself is run once below)."""
    from swarmtrain.cli.replay import replay_round

    settings = Settings(nats_url=stack.nats_url, blob_url=stack.env["SWARMTRAIN_BLOB_URL"])
    return replay_round(settings, sid, round_)


async def test_median_keeps_a_sign_flipping_peer_out_of_the_model_and_replays_bit_for_bit(
    stack: Stack, api: Api, swarm: Swarm
) -> None:
    await swarm.start("ma", "mb", "mc")
    flipper = SignFlipper(Settings(nats_url=stack.nats_url))
    flipper.start()
    try:
        await flipper.online(api)
        ds = await api.upload()
        body = fedavg(ds["dataset_id"], 4, rounds=3, aggregator={"name": "median"}, max_update_norm=1e4)
        sid = await start(api, body)
        done = await api.wait_ended(sid)
    finally:
        flipper.stop.set()
        await asyncio.to_thread(flipper.join, 30)
    assert flipper.error is None, flipper.error
    assert done["status"] == "completed", done
    events = await history(stack, sid)
    assert not of(events, UpdateRejected)  # the flipped updates pass every check: only the rule stops them
    closed = of(events, RoundClosed)
    assert all(flipper.peer_id in {u.peer_id for u in c.updates} for c in closed)
    averaged = of(events, RoundAveraged)
    assert [a.aggregator for a in averaged] == ["median"] * 3 and all(len(a.selected) == 4 for a in averaged)
    assert done["val_accuracy"] > 0.8, done["val_accuracy"]  # the poison never took the model over

    rc, out, err = await cli("session", "replay-round", sid, "3", env=stack.env)
    assert rc == 0, out + err
    assert "MATCH: bit for bit" in out and "rule median" in out


# one short session each (3 peers, 2 rounds): every aggregator, lossy compression and outer step, label_skew
OPTION_SESSIONS: list[dict[str, Any]] = [
    {
        "aggregator": {"name": "trimmed_mean", "beta": 0.34},
        "compression": {"name": "int8"},
        "outer": {"name": "momentum"},
    },
    {"aggregator": {"name": "krum", "f": 0}, "compression": {"name": "fp16"}},
    {"aggregator": {"name": "multi_krum", "f": 0, "m": 2}, "compression": {"name": "bf16"}, "outer": {"name": "adam"}},
    {"aggregator": {"name": "mean"}, "sharding": {"name": "label_skew", "alpha": 0.5}, "outer": {"name": "nesterov"}},
]


async def test_replay_round_matches_under_every_aggregator_compression_and_outer_step(
    stack: Stack, api: Api, swarm: Swarm
) -> None:
    await swarm.start("oa", "ob", "oc")
    ds = await api.upload()
    for options in OPTION_SESSIONS:
        sid = await start(api, fedavg(ds["dataset_id"], 3, rounds=2, local=SMALL, **options))
        done = await api.wait_ended(sid)
        assert done["status"] == "completed", (options, done)
        events = await history(stack, sid)
        [requested] = of(events, SessionRequested)
        assert requested.round_options.outer.lr is not None  # the default resolved into the log
        updates = of(events, ModelUpdatePublished)
        averaged = of(events, RoundAveraged)
        rule = options["aggregator"]["name"]
        assert [a.aggregator for a in averaged] == [rule, rule]
        assert averaged[1].update_bytes == sum(u.nbytes for u in updates if u.round == 2) > 0
        if rule == "krum":
            assert all(len(a.selected) == 1 for a in averaged)
        if "sharding" in options:  # the scheduler counted the skewed shards; each count matched its shard
            [started] = of(events, SessionStarted)
            sizes = sorted(sum(h) for h in started.shard_histograms)
            assert len(sizes) == 3 and sorted(u.num_samples for u in updates if u.round == 1) == sizes
        for r in (1, 2):
            result = await asyncio.to_thread(replayed, stack, sid, r)
            assert result.matches, (options, r, result)
