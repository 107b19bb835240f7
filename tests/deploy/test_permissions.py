"""Least privilege, against a real nats-server running the configuration `swarmtrain nats-config` wrote.

Every forbidden publish or subscribe is refused by the server (a permissions violation reported to
the client's error callback), and the streams are unchanged afterwards. The allowed paths work: a
peer with its credential registers, beats presence, takes its own commands and appends session events.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import api

from swarmtrain.common import bus, servers
from swarmtrain.common.events import Heartbeat, PeerDone, Stop, decode_event
from swarmtrain.common.settings import from_env
from tests.support import wait_for

from .conftest import SecuredNats


async def refused(nc: NATS, errors: list[str], what: str, subject: str) -> None:
    """The server answers a publish (what="Publish") or subscribe ("Subscription") with a violation."""
    if what == "Publish":
        await nc.publish(subject, b"{}")
    else:
        await nc.subscribe(subject)
    await nc.flush()
    expected = f'permissions violation for {what} to "{subject}"'.lower()
    await wait_for(lambda: any(expected in e.lower() for e in errors), f"the server to report {expected!r}", timeout=5)


async def stream_state(admin: NATS) -> dict[str, Any]:
    js = admin.jetstream()
    out: dict[str, Any] = {}
    for stream in (bus.EVENTS_STREAM, bus.COMMANDS_STREAM):
        info = await js.stream_info(stream)
        consumers = await js.consumers_info(stream)
        out[stream] = (
            info.state.messages,
            info.state.last_seq,
            info.config.subjects,
            sorted((c.name, c.config.filter_subject) for c in consumers),
        )
    return out


def peer_id(secured: SecuredNats, name: str) -> str:
    return secured.env(name)["SWARMTRAIN_PEER_ID"]


async def prepared(secured: SecuredNats) -> tuple[NATS, str, str]:
    """Streams created by a service, a command waiting for peer-2; returns (admin, id of peer-1, of peer-2)."""
    sched = await secured.connect("scheduler")
    js = sched.jetstream()
    await bus.ensure_streams(js)
    a, b = peer_id(secured, "peer-1"), peer_id(secured, "peer-2")
    await bus.send(js, Stop(peer_id=b, session_id="s1"))
    await bus.append(js, Heartbeat(session_id="s1", peer_id=b, epoch=1, epochs=1, loss=1, accuracy=0, samples_per_s=1))
    return await secured.connect("admin"), a, b


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


async def test_a_peer_cannot_touch_other_peers_streams_or_inboxes(secured: SecuredNats) -> None:
    admin, a, b = await prepared(secured)
    before = await stream_state(admin)
    errors: list[str] = []
    nc = await secured.connect("peer-1", errors)
    forbidden_publish = [
        f"peer.{b}.command",  # another peer's commands
        f"peer.{a}.command",  # even its own: only the scheduler commands
        f"peer.{b}.events",
        f"peer.{b}.presence",
        "user.u1.events",
        "dataset.d1.events",
        "$JS.API.STREAM.DELETE.EVENTS",
        "$JS.API.STREAM.PURGE.EVENTS",
        "$JS.API.STREAM.DELETE.COMMANDS",
        "$JS.API.STREAM.PURGE.COMMANDS",
        "$JS.API.STREAM.UPDATE.EVENTS",
        "$JS.API.STREAM.CREATE.EVIL",
        "$JS.API.STREAM.MSG.DELETE.EVENTS",
        # consumers on another peer's command subject, under any name, by any API
        f"$JS.API.CONSUMER.CREATE.COMMANDS.peer-{b}.peer.{b}.command",
        f"$JS.API.CONSUMER.CREATE.COMMANDS.peer-{a}.peer.{b}.command",
        f"$JS.API.CONSUMER.CREATE.COMMANDS.peer-{a}.peer.*.command",
        f"$JS.API.CONSUMER.CREATE.COMMANDS.peer-{a}",  # no filter in the subject: any filter in the body
        f"$JS.API.CONSUMER.DURABLE.CREATE.COMMANDS.peer-{a}",
        "$JS.API.CONSUMER.CREATE.COMMANDS",
        f"$JS.API.CONSUMER.DELETE.COMMANDS.peer-{b}",
        f"$JS.API.CONSUMER.MSG.NEXT.COMMANDS.peer-{b}",
        f"$JS.ACK.COMMANDS.peer-{b}.1.1.1.1.1",
        # the projector's durable, and consumers on EVENTS that are not its own, filtered to sessions
        "$JS.API.CONSUMER.MSG.NEXT.EVENTS.projector",
        f"$JS.API.CONSUMER.CREATE.EVENTS.peer-{a}.user.*.events",
        f"$JS.API.CONSUMER.CREATE.EVENTS.peer-{b}.session.*.events",
    ]
    for subject in forbidden_publish:
        await refused(nc, errors, "Publish", subject)
    for subject in (
        f"peer.{b}.command",
        "peer.*.command",
        "peer.*.presence",
        "user.*.events",
        "_INBOX.>",
        f"_INBOX.{b}.>",
        "_INBOX.scheduler.>",
        "$JS.ACK.>",
        ">",
    ):
        await refused(nc, errors, "Subscription", subject)

    # the client library's own calls fail the same way (no reply: a timeout), and change nothing
    js = nc.jetstream(timeout=0.5)
    with pytest.raises(nats.errors.TimeoutError):
        await js.delete_stream(bus.EVENTS_STREAM)
    with pytest.raises(nats.errors.TimeoutError):
        await js.purge_stream(bus.COMMANDS_STREAM)
    with pytest.raises(nats.errors.TimeoutError):
        await js.pull_subscribe(f"peer.{b}.command", durable=f"peer-{a}", stream=bus.COMMANDS_STREAM)
    with pytest.raises(nats.errors.TimeoutError):
        await js.publish(f"peer.{b}.command", b"{}", stream=bus.COMMANDS_STREAM)
    assert await stream_state(admin) == before


async def test_services_and_the_tap_get_only_their_share(secured: SecuredNats) -> None:
    admin, a, b = await prepared(secured)
    before = await stream_state(admin)
    cases = {
        "tap": (["session.s1.events", "peer.x.presence", "$JS.API.STREAM.INFO.EVENTS"], ["user.*.events", "_INBOX.>"]),
        "projector": (
            ["session.s1.events", "$JS.API.STREAM.DELETE.EVENTS", "$JS.API.STREAM.PURGE.EVENTS"],
            ["peer.*.presence", "_INBOX.gateway.>"],
        ),
        "gateway": (
            [
                "peer.x.command",
                f"peer.{a}.events",
                "$JS.API.STREAM.DELETE.EVENTS",
                "$JS.API.CONSUMER.MSG.NEXT.COMMANDS.peer-x",
            ],
            ["peer.*.command", "_INBOX.scheduler.>"],
        ),
        "scheduler": (
            [
                "user.u.events",
                "dataset.d.events",
                "$JS.API.STREAM.PURGE.COMMANDS",
                f"$JS.API.CONSUMER.DELETE.COMMANDS.peer-{b}",
            ],
            ["peer.*.command", "user.*.events"],
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
    gw = (await secured.connect("gateway")).jetstream()
    await bus.append(gw, Heartbeat(session_id="s2", peer_id=a, epoch=1, epochs=1, loss=1, accuracy=0, samples_per_s=1))
    msg = await seen.next_msg(timeout=2)
    assert decode_event(msg.data).session_id == "s2"  # type: ignore[union-attr]


async def test_a_peer_with_its_credential_registers_beats_and_takes_its_commands(
    secured: SecuredNats, tmp_path: Path
) -> None:
    from swarmtrain.peer.service import run

    admin, a, _ = await prepared(secured)
    settings = from_env(
        {
            **secured.env("peer-1"),
            "SWARMTRAIN_NATS_URL": secured.url,
            "SWARMTRAIN_STATE_DIR": str(tmp_path / "state"),
            "SWARMTRAIN_PRESENCE_INTERVAL_S": "0.1",
        }
    )
    assert settings.peer_id == a
    sched = await secured.connect("scheduler")
    beats = await sched.subscribe(f"peer.{a}.presence")
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop, name="peer-1", device="cpu"))
    try:
        await beats.next_msg(timeout=20)
        registered = await admin.jetstream().get_last_msg(bus.EVENTS_STREAM, f"peer.{a}.events")
        assert decode_event(registered.data or b"").peer_id == a  # type: ignore[union-attr]
        await bus.send(sched.jetstream(), Stop(peer_id=a, session_id="s9"))

        async def acked() -> bool:
            info = await admin.jetstream().consumer_info(bus.COMMANDS_STREAM, f"peer-{a}")
            return bool(info.num_pending == 0 and info.num_ack_pending == 0 and (info.delivered.stream_seq or 0) > 0)

        await wait_for(acked, "the peer to take its command", timeout=10, interval=0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)

    # its own session events, and a consumer on EVENTS filtered to one session (to follow a session)
    errors: list[str] = []
    nc = await secured.connect("peer-1", errors)
    js = nc.jetstream(timeout=2)
    done = PeerDone(
        session_id="s9",
        peer_id=a,
        model_uri="s3://b/m",
        model_sha256="0" * 64,
        epochs=1,
        loss=0.1,
        accuracy=0.9,
        train_seconds=1.0,
    )
    seq = await bus.append(js, done)
    sub = await js.pull_subscribe(
        "session.s9.events",
        durable=f"peer-{a}",
        stream=bus.EVENTS_STREAM,
        config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
    )
    msgs = await sub.fetch(1, timeout=2)
    assert bus.stream_seq(msgs[0]) == seq
    await msgs[0].ack()
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
