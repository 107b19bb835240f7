"""Least privilege, against a real nats-server running the configuration `swarmtrain nats-config` wrote.

Facts are written by services only: every forbidden publish or subscribe is refused by the server
itself (a permissions violation reported to the client's error callback), for a peer that is
assigned to a running session as much as for any other, and the streams are unchanged afterwards.
The allowed paths work: a peer with its credential beats presence, reports on its own subject,
and takes its own commands; the scheduler reads the reports through its durable.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from swarmtrain.cli.natsconfig import SCHEDULER_REPORTS
from swarmtrain.common import bus, servers, subjects
from swarmtrain.common.events import (
    Event,
    Heartbeat,
    Hyperparameters,
    PeerDone,
    PeerLocked,
    PeerRegistered,
    RoundClosed,
    RoundUpdate,
    SessionCancelled,
    SessionCompleted,
    SessionFailed,
    SessionStarted,
    Stop,
    UserRegistered,
    decode_command,
    decode_event,
    decode_report,
)
from swarmtrain.common.settings import from_env
from tests.factories import session_requested
from tests.support import wait_for

from .conftest import SecuredNats

SID = "s1"
HP = Hyperparameters(epochs=1, batch_size=8, lr=0.01)


async def refused(nc: NATS, errors: list[str], what: str, subject: str, data: bytes = b"{}") -> None:
    """The server answers a publish (what="Publish") or subscribe ("Subscription") with a violation."""
    if what == "Publish":
        await nc.publish(subject, data)
    else:
        await nc.subscribe(subject)
    await nc.flush()
    expected = f'permissions violation for {what} to "{subject}"'.lower()
    await wait_for(lambda: any(expected in e.lower() for e in errors), f"the server to report {expected!r}", timeout=5)


async def stream_state(admin: NATS) -> dict[str, Any]:
    js = admin.jetstream()
    out: dict[str, Any] = {}
    for stream in (bus.EVENTS_STREAM, bus.COMMANDS_STREAM, bus.REPORTS_STREAM):
        info = await js.stream_info(stream)
        consumers = await js.consumers_info(stream)
        out[stream] = (
            info.state.messages,
            info.state.last_seq,
            info.config.subjects,
            sorted((c.name, c.config.filter_subject, c.config.deliver_subject) for c in consumers),
        )
    return out


def violated(errors: list[str], subject: str) -> bool:
    return any(f'permissions violation for publish to "{subject}"' in e.lower() for e in errors)


def peer_id(secured: SecuredNats, name: str) -> str:
    return secured.env(name)["SWARMTRAIN_PEER_ID"]


async def prepared(secured: SecuredNats) -> tuple[NATS, str, str]:
    """Streams created by a service; a user registered (a password hash in the log); session s1
    requested by the gateway and started by the scheduler with peer-1 assigned (so what peer-1
    tries below, it tries as an assigned peer); a command waiting for peer-2.
    Returns (admin, id of peer-1, id of peer-2)."""
    sched = (await secured.connect("scheduler")).jetstream()
    gateway = (await secured.connect("gateway")).jetstream()
    await bus.ensure_streams(sched)
    a, b = peer_id(secured, "peer-1"), peer_id(secured, "peer-2")
    await bus.append(gateway, UserRegistered(user_id="u1", email="v@x", username="v", password_hash="$argon2id$x"))
    await bus.append(gateway, session_requested(SID, 1, HP))
    for peer in (a, b):
        await bus.append(sched, PeerRegistered(peer_id=peer, name=peer, device="cpu"))
    await bus.append(sched, PeerLocked(peer_id=a, session_id=SID))
    await bus.append(sched, SessionStarted(session_id=SID, assignments={a: HP}))
    await bus.send(sched, Stop(peer_id=b, session_id="s0"))
    return await secured.connect("admin"), a, b


def forged_facts(a: str, b: str) -> list[Event]:
    """Every fact a hostile peer would like to write, in its own name or another's."""
    return [
        SessionCancelled(session_id=SID, reason="forged"),
        SessionCompleted(session_id=SID, best_peer_id=a, best_val_accuracy=1.0, model_uri="file:///proc/self/environ"),
        SessionFailed(session_id=SID, reason="forged"),
        SessionStarted(session_id="s2", assignments={a: HP}),
        PeerLocked(peer_id=b, session_id="nowhere"),
        UserRegistered(user_id="u2", email="victim@example.com", username="victim", password_hash="$argon2id$x"),
        RoundClosed(
            session_id=SID, round=1, updates=[RoundUpdate(peer_id=a, uri="file:///evil", sha256="e", num_samples=1)]
        ),
        session_requested("s3", 1, HP, owner_id="someone-else"),
        # what a peer reports is not a fact until the scheduler has checked it
        Heartbeat(session_id=SID, peer_id=a, epoch=1, epochs=1, loss=0.0, accuracy=1.0, samples_per_s=1.0),
        PeerDone(
            session_id=SID,
            peer_id=a,
            model_uri="file:///proc/self/environ",
            model_sha256="0" * 64,
            epochs=1,
            loss=0.0,
            accuracy=1.0,
            train_seconds=1.0,
        ),
        PeerRegistered(peer_id=a, name="evil", device="cpu"),
    ]


async def test_nobody_without_credentials(secured: SecuredNats) -> None:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = NATS()
    try:
        with pytest.raises((nats.errors.Error, OSError)):
            await nc.connect(secured.url, allow_reconnect=False, max_reconnect_attempts=0, error_cb=on_error)
    finally:
        await nc.close()
        if nc._transport is not None:  # nats-py leaves a refused connection's socket open
            nc._transport.close()  # type: ignore[no-untyped-call]
            await asyncio.sleep(0)  # one turn of the loop, where the transport's close callback runs
    assert any("authorization violation" in e.lower() for e in errors), errors


async def test_an_assigned_peer_cannot_write_a_single_fact(secured: SecuredNats) -> None:
    """Forged cancel, complete, fail, start, lock, register, round close and session request (and
    a report dressed as a fact) from the credential of a peer assigned to the session: each is
    refused by NATS, and the log is unchanged."""
    admin, a, b = await prepared(secured)
    before = await stream_state(admin)
    errors: list[str] = []
    nc = await secured.connect("peer-1", errors)
    js = nc.jetstream(timeout=0.5)
    for event in forged_facts(a, b):
        with pytest.raises(nats.errors.TimeoutError):  # the server drops it: no ack ever comes
            await bus.append(js, event)
        await wait_for(partial(violated, errors, event.subject), f"a violation on {event.subject}", timeout=5)
    # nor on any events subject by hand, nor on another peer's reports or presence
    for subject in (
        "session.s1.events",
        "session.*.events",
        f"peer.{a}.events",
        f"peer.{b}.events",
        "user.u1.events",
        "dataset.d1.events",
        f"peer.{b}.reports",
        f"peer.{b}.presence",
        f"peer.{a}.command",
    ):
        await refused(nc, errors, "Publish", subject)
    assert await stream_state(admin) == before


async def test_a_peer_reads_nothing_but_its_own_commands(secured: SecuredNats) -> None:
    """No consumer on session events (its own session's included), no password hash, no other
    peer's commands, no reports, no direct or by-sequence reads of a stream, no core subscription."""
    admin, a, b = await prepared(secured)
    before = await stream_state(admin)
    errors: list[str] = []
    nc = await secured.connect("peer-1", errors)
    body = json.dumps({"stream_name": bus.EVENTS_STREAM, "config": {"ack_policy": "none"}}).encode()
    for subject in (
        # consumers on EVENTS under any name, with any filter, by any API
        f"$JS.API.CONSUMER.CREATE.EVENTS.peer-{a}.session.{SID}.events",
        f"$JS.API.CONSUMER.CREATE.EVENTS.peer-{a}.session.*.events",
        f"$JS.API.CONSUMER.CREATE.EVENTS.peer-{a}.user.*.events",
        f"$JS.API.CONSUMER.CREATE.EVENTS.peer-{a}",
        "$JS.API.CONSUMER.CREATE.EVENTS",
        f"$JS.API.CONSUMER.DURABLE.CREATE.EVENTS.peer-{a}",
        "$JS.API.CONSUMER.MSG.NEXT.EVENTS.projector",
        # reads of single messages: a password hash by subject, anything by sequence
        "$JS.API.DIRECT.GET.EVENTS",
        "$JS.API.DIRECT.GET.EVENTS.user.u1.events",
        "$JS.API.STREAM.MSG.GET.EVENTS",
        "$JS.API.STREAM.MSG.GET.COMMANDS",
        "$JS.API.STREAM.MSG.GET.REPORTS",
        # another peer's commands, under any name, by any API
        f"$JS.API.CONSUMER.CREATE.COMMANDS.peer-{b}.peer.{b}.command",
        f"$JS.API.CONSUMER.CREATE.COMMANDS.peer-{a}.peer.{b}.command",
        f"$JS.API.CONSUMER.CREATE.COMMANDS.peer-{a}.peer.*.command",
        f"$JS.API.CONSUMER.CREATE.COMMANDS.peer-{a}",  # no filter in the subject: any filter in the body
        f"$JS.API.CONSUMER.DURABLE.CREATE.COMMANDS.peer-{a}",
        "$JS.API.CONSUMER.CREATE.COMMANDS",
        f"$JS.API.CONSUMER.INFO.COMMANDS.peer-{b}",
        f"$JS.API.CONSUMER.MSG.NEXT.COMMANDS.peer-{b}",
        f"$JS.ACK.COMMANDS.peer-{b}.1.1.1.1.1",
        # the reports: the scheduler's durable, or one of its own
        f"$JS.API.CONSUMER.CREATE.REPORTS.peer-{a}.peer.*.reports",
        f"$JS.API.CONSUMER.CREATE.REPORTS.{SCHEDULER_REPORTS}",
        f"$JS.API.CONSUMER.MSG.NEXT.REPORTS.{SCHEDULER_REPORTS}",
    ):
        await refused(nc, errors, "Publish", subject, body)
    for subject in (
        "session.*.events",
        f"session.{SID}.events",
        "user.*.events",
        "peer.*.events",
        f"peer.{b}.command",
        f"peer.{a}.command",  # its commands come through its consumer, not a core subscription
        "peer.*.reports",
        "peer.*.presence",
        "_INBOX.>",
        f"_INBOX.{b}.>",
        "_INBOX.scheduler.>",
        "_INBOX.gateway.>",
        "$JS.ACK.>",
        ">",
    ):
        await refused(nc, errors, "Subscription", subject)

    # the client library's own calls fail the same way (no reply: a timeout)
    js = nc.jetstream(timeout=0.5)
    with pytest.raises(nats.errors.TimeoutError):
        await js.pull_subscribe(f"session.{SID}.events", durable=f"peer-{a}", stream=bus.EVENTS_STREAM)
    with pytest.raises(nats.errors.TimeoutError):
        await js.pull_subscribe(f"peer.{b}.command", durable=f"peer-{a}", stream=bus.COMMANDS_STREAM)
    with pytest.raises(nats.errors.TimeoutError):
        await js.get_last_msg(bus.EVENTS_STREAM, "user.u1.events")
    assert await stream_state(admin) == before


async def test_its_own_consumer_takes_no_other_filter_and_delivers_into_no_stream(secured: SecuredNats) -> None:
    """The one consumer a peer may create carries its filter in the API subject: the server itself
    refuses a body naming another filter (or several). Pointed at a fact or report subject as a
    push consumer, it delivers the peer's own commands there, but no stream stores a delivery."""
    admin, a, b = await prepared(secured)
    before = await stream_state(admin)
    nc = await secured.connect("peer-1")
    create = f"$JS.API.CONSUMER.CREATE.COMMANDS.peer-{a}.peer.{a}.command"

    async def ask(config: dict[str, Any]) -> dict[str, Any]:
        request = {"stream_name": bus.COMMANDS_STREAM, "config": {"durable_name": f"peer-{a}", **config}}
        reply = await nc.request(create, json.dumps(request).encode(), timeout=2)
        answer: dict[str, Any] = json.loads(reply.data)
        return answer

    for config in ({"filter_subject": f"peer.{b}.command"}, {"filter_subjects": [f"peer.{b}.command"]}):
        answer = await ask({**config, "ack_policy": "explicit"})
        assert answer["error"]["code"] == 400, answer
    assert await stream_state(admin) == before

    sched = (await secured.connect("scheduler")).jetstream()
    for target in (f"session.{SID}.events", f"peer.{b}.reports"):
        watch = await admin.subscribe(target)
        answer = await ask({"filter_subject": f"peer.{a}.command", "ack_policy": "none", "deliver_subject": target})
        assert "error" not in answer, answer
        await bus.send(sched, Stop(peer_id=a, session_id=f"via-{target.replace('.', '-')}"))
        delivered = await watch.next_msg(timeout=5)
        assert decode_command(delivered.data).peer_id == a  # its own commands, nothing else
        await watch.unsubscribe()
        await admin.jetstream().delete_consumer(bus.COMMANDS_STREAM, f"peer-{a}")
    after = await stream_state(admin)
    assert after[bus.EVENTS_STREAM] == before[bus.EVENTS_STREAM]
    assert after[bus.REPORTS_STREAM] == before[bus.REPORTS_STREAM]


async def test_a_peer_cannot_touch_the_streams(secured: SecuredNats) -> None:
    admin, _, _ = await prepared(secured)
    before = await stream_state(admin)
    errors: list[str] = []
    nc = await secured.connect("peer-1", errors)
    for stream in (bus.EVENTS_STREAM, bus.COMMANDS_STREAM, bus.REPORTS_STREAM):
        for op in ("DELETE", "PURGE", "UPDATE", "CREATE", "MSG.DELETE"):
            await refused(nc, errors, "Publish", f"$JS.API.STREAM.{op}.{stream}")
    await refused(nc, errors, "Publish", "$JS.API.STREAM.CREATE.EVIL")
    js = nc.jetstream(timeout=0.5)
    with pytest.raises(nats.errors.TimeoutError):
        await js.delete_stream(bus.EVENTS_STREAM)
    with pytest.raises(nats.errors.TimeoutError):
        await js.purge_stream(bus.REPORTS_STREAM)
    with pytest.raises(nats.errors.TimeoutError):
        await js.publish("peer.x.command", b"{}", stream=bus.COMMANDS_STREAM)
    assert await stream_state(admin) == before


async def test_services_and_the_tap_get_only_their_share(secured: SecuredNats) -> None:
    admin, a, b = await prepared(secured)
    before = await stream_state(admin)
    cases = {
        # the tap: session events only (no password hash, no peers' or datasets' events), publishes nothing
        "tap": (
            ["session.s1.events", "peer.x.presence", f"peer.{a}.reports", "$JS.API.STREAM.INFO.EVENTS"],
            ["user.*.events", "peer.*.events", "peer.*.presence", "peer.*.reports", "dataset.*.events", "_INBOX.>"],
        ),
        "projector": (
            [
                "session.s1.events",
                "user.u.events",
                f"peer.{a}.reports",
                "$JS.API.STREAM.DELETE.EVENTS",
                "$JS.API.STREAM.PURGE.EVENTS",
                f"$JS.API.CONSUMER.CREATE.REPORTS.{SCHEDULER_REPORTS}",
            ],
            ["peer.*.presence", "peer.*.reports", "_INBOX.gateway.>"],
        ),
        "gateway": (
            [
                "peer.x.command",
                f"peer.{a}.events",
                f"peer.{a}.reports",
                "$JS.API.STREAM.DELETE.EVENTS",
                "$JS.API.CONSUMER.MSG.NEXT.COMMANDS.peer-x",
                f"$JS.API.CONSUMER.CREATE.REPORTS.{SCHEDULER_REPORTS}",
                "$JS.API.STREAM.MSG.GET.REPORTS",
            ],
            ["peer.*.command", "peer.*.reports", "_INBOX.scheduler.>"],
        ),
        "scheduler": (
            [
                "user.u.events",
                "dataset.d.events",
                f"peer.{a}.reports",
                "$JS.API.STREAM.PURGE.COMMANDS",
                "$JS.API.STREAM.PURGE.REPORTS",
                f"$JS.API.CONSUMER.DELETE.COMMANDS.peer-{b}",
                f"$JS.API.CONSUMER.CREATE.COMMANDS.peer-{b}.peer.{b}.command",
                "$JS.API.CONSUMER.CREATE.REPORTS.other",  # its one durable on REPORTS, no other
            ],
            ["peer.*.command", "peer.*.reports", "user.*.events"],
        ),
    }
    for identity, (publish, subscribe) in cases.items():
        errors: list[str] = []
        nc = await secured.connect(identity, errors)
        for subject in publish:
            await refused(nc, errors, "Publish", subject)
        for subject in subscribe:
            await refused(nc, errors, "Subscription", subject)
    assert await stream_state(admin) == before

    # and what they are for works: the tap follows session events live
    tap = await secured.connect("tap")
    seen = await tap.subscribe("session.*.events")
    sched = (await secured.connect("scheduler")).jetstream()
    await bus.append(sched, SessionFailed(session_id="s2", reason="for the tap"))
    msg = await seen.next_msg(timeout=2)
    assert decode_event(msg.data).session_id == "s2"  # type: ignore[union-attr]
    # and the scheduler's doorbell: a session's fact appended reaches its core subscription
    sched_nc = await secured.connect("scheduler")
    bells = [await sched_nc.subscribe(subject) for subject in subjects.SCHEDULER_DOORBELL]
    await bus.append(sched_nc.jetstream(), SessionFailed(session_id="s3", reason="for the doorbell"))
    rung = await bells[0].next_msg(timeout=2)
    assert decode_event(rung.data).session_id == "s3"  # type: ignore[union-attr]


async def test_a_peer_with_its_credential_beats_reports_and_takes_its_commands(
    secured: SecuredNats, tmp_path: Path
) -> None:
    from swarmtrain.peer.service import run

    admin, a, _ = await prepared(secured)
    facts = (await stream_state(admin))[bus.EVENTS_STREAM]
    settings = from_env(
        {
            **secured.env("peer-1"),
            "SWARMTRAIN_NATS_URL": secured.url,
            "SWARMTRAIN_STATE_DIR": str(tmp_path / "state"),
            "SWARMTRAIN_PRESENCE_INTERVAL_S": "0.1",
        }
    )
    assert settings.peer_id == a
    sched_nc = await secured.connect("scheduler")
    sched = sched_nc.jetstream()
    beats = await sched_nc.subscribe(subjects.peer_presence(a))
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop, name="peer-1", device="cpu"))
    try:
        await beats.next_msg(timeout=20)

        async def registered() -> bool:  # reported on its own subject, not written as a fact
            try:
                msg = await admin.jetstream().get_last_msg(bus.REPORTS_STREAM, subjects.peer_reports(a))
            except nats.js.errors.NotFoundError:
                return False
            return isinstance(decode_report(msg.data or b""), PeerRegistered)

        await wait_for(registered, "the peer to report that it registered", timeout=10, interval=0.1)
        await bus.send(sched, Stop(peer_id=a, session_id="s9"))

        async def acked() -> bool:
            info = await admin.jetstream().consumer_info(bus.COMMANDS_STREAM, f"peer-{a}")
            return bool(info.num_pending == 0 and info.num_ack_pending == 0 and (info.delivered.stream_seq or 0) > 0)

        await wait_for(acked, "the peer to take its command", timeout=10, interval=0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    assert (await stream_state(admin))[bus.EVENTS_STREAM] == facts  # the peer wrote no fact

    # a report by hand on its own subject, read and acked by the scheduler's durable
    errors: list[str] = []
    nc = await secured.connect("peer-1", errors)
    done = PeerDone(
        session_id=SID,
        peer_id=a,
        model_uri="s3://b/m",
        model_sha256="0" * 64,
        epochs=1,
        loss=0.1,
        accuracy=0.9,
        train_seconds=1.0,
    )
    seq = await bus.report(nc.jetstream(timeout=2), done)
    assert await bus.report(nc.jetstream(timeout=2), done) == seq  # a retried report is deduplicated
    sub = await bus.pull_consumer(sched, bus.REPORTS_STREAM, durable=SCHEDULER_REPORTS, start_seq=seq)
    [(msg, report)] = await bus.fetch(sub, decode_report, batch=1, timeout=2)
    assert msg.subject == subjects.peer_reports(a) and report == done
    await msg.ack()
    await sub.unsubscribe()
    assert not errors, errors


def test_the_generated_configuration_fsyncs_every_write(creds: Path, tmp_path: Path) -> None:
    """sync_interval: always reaches the server: /varz says sync_always. (The secured fixture shows
    that servers.start_nats applies the file: without it, nothing would be refused.)"""
    port, monitor = servers.free_port(), servers.free_port()
    cmd = [
        servers.nats_server_binary(),
        "-js",
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        "-m",
        str(monitor),
        "-sd",
        str(tmp_path / "js"),
        "-c",
        str(creds / "nats-server.conf"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        servers.wait_port(monitor, proc, "nats-server monitoring")
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=5) as resp:
            varz = json.load(resp)
        assert varz["jetstream"]["config"]["sync_always"] is True
        assert varz["port"] == port  # the command line's -p wins over the file's port
    finally:
        servers.stop(proc, signal.SIGTERM)
