"""``swarmtrain.common.bus`` against a real ``nats-server -js`` (one per test, see tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from swarmtrain.common import bus, events
from swarmtrain.common.settings import Settings


@pytest.fixture
async def bare_js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    """A JetStream context on a server where no stream exists yet."""
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.drain()


def failed(session_id: str, reason: str) -> events.SessionFailed:
    return events.SessionFailed(session_id=session_id, reason=reason)


def user(user_id: str, email: str) -> events.UserRegistered:
    return events.UserRegistered(user_id=user_id, email=email, username="u", password_hash="h")


async def stream_config(js: JetStreamContext, stream: str) -> dict[str, Any]:
    info = await js.stream_info(stream)
    config = info.config.as_dict()
    assert isinstance(config, dict)
    return config


async def message_count(js: JetStreamContext, stream: str) -> int:
    info = await js.stream_info(stream)
    return int(info.state.messages)


# ------------------------------------------------------------------ streams


async def test_ensure_streams_creates_three_streams_with_their_subjects(bare_js: JetStreamContext) -> None:
    await bus.ensure_streams(bare_js)

    streams = {info.config.name: sorted(info.config.subjects or []) for info in await bare_js.streams_info()}
    assert streams == {
        "EVENTS": sorted(["session.*.events", "peer.*.events", "user.*.events", "dataset.*.events"]),
        "COMMANDS": ["peer.*.command"],
        "REPORTS": ["peer.*.reports"],
    }


async def test_ensure_streams_is_idempotent(bare_js: JetStreamContext) -> None:
    await bus.ensure_streams(bare_js)
    await bus.append(bare_js, failed("s1", "kept"))
    before = {s: await stream_config(bare_js, s) for s in (bus.EVENTS_STREAM, bus.COMMANDS_STREAM, bus.REPORTS_STREAM)}

    await bus.ensure_streams(bare_js)

    after = {s: await stream_config(bare_js, s) for s in (bus.EVENTS_STREAM, bus.COMMANDS_STREAM, bus.REPORTS_STREAM)}
    assert after == before
    assert await message_count(bare_js, bus.EVENTS_STREAM) == 1


async def test_services_starting_together_all_ensure_the_streams(bare_js: JetStreamContext) -> None:
    await asyncio.gather(*(bus.ensure_streams(bare_js) for _ in range(4)))

    assert {info.config.name for info in await bare_js.streams_info()} == {"COMMANDS", "EVENTS", "REPORTS"}


async def test_ensure_streams_brings_old_subjects_up_to_date(bare_js: JetStreamContext) -> None:
    await bare_js.add_stream(name=bus.EVENTS_STREAM, subjects=["session.*.events"])

    await bus.ensure_streams(bare_js)

    config = await stream_config(bare_js, bus.EVENTS_STREAM)
    assert sorted(config["subjects"]) == sorted(bus.EVENT_SUBJECTS)


# ------------------------------------------------------------------ appends and commands


async def test_append_sets_the_message_id(js: JetStreamContext) -> None:
    event = failed("s1", "boom")

    seq = await bus.append(js, event)

    stored = await js.get_msg(bus.EVENTS_STREAM, seq)
    assert stored.subject == "session.s1.events"
    assert stored.headers is not None and stored.headers["Nats-Msg-Id"] == event.event_id
    assert stored.data is not None and events.decode_event(stored.data) == event
    assert await bus.last_sequence(js) == seq


async def test_appending_the_same_event_twice_stores_it_once(js: JetStreamContext) -> None:
    event = failed("s1", "boom")

    first = await bus.append(js, event)
    again = await bus.append(js, event)
    other = await bus.append(js, failed("s1", "boom"))  # equal fields, new event_id

    assert again == first
    assert other == first + 1
    assert await message_count(js, bus.EVENTS_STREAM) == 2


async def test_append_with_an_expected_sequence_is_a_compare_and_set(js: JetStreamContext) -> None:
    first = await bus.append(js, user("u1", "a@example.org"), expected_last_subject_seq=0)

    with pytest.raises(bus.WrongLastSequence, match=r"user\.u1\.events"):
        await bus.append(js, user("u1", "a@example.org"), expected_last_subject_seq=0)

    await bus.append(js, user("u2", "b@example.org"))  # another subject moves the stream, not u1
    second = await bus.append(js, user("u1", "c@example.org"), expected_last_subject_seq=first)
    assert second > first
    assert await message_count(js, bus.EVENTS_STREAM) == 3


async def test_a_retried_compare_and_set_append_is_deduplicated_not_refused(js: JetStreamContext) -> None:
    event = user("u1", "a@example.org")
    first = await bus.append(js, event, expected_last_subject_seq=0)

    assert await bus.append(js, event, expected_last_subject_seq=0) == first


async def test_send_puts_commands_on_the_commands_stream(js: JetStreamContext) -> None:
    command = events.Stop(peer_id="p1", session_id="s1")

    seq = await bus.send(js, command)
    assert await bus.send(js, command) == seq  # deduplicated as well

    stored = await js.get_msg(bus.COMMANDS_STREAM, seq)
    assert stored.subject == "peer.p1.command"
    assert stored.headers is not None and stored.headers["Nats-Msg-Id"] == command.event_id
    assert stored.data is not None and events.decode_command(stored.data) == command
    assert await message_count(js, bus.COMMANDS_STREAM) == 1
    assert await message_count(js, bus.EVENTS_STREAM) == 0


async def test_connect_uses_the_settings(nats_url: str) -> None:
    nc = await bus.connect(Settings(nats_url=nats_url), "test-client")
    try:
        assert nc.is_connected
        assert nc.connected_url is not None and nc.connected_url.port == int(nats_url.rsplit(":", 1)[1])
    finally:
        await nc.close()


# ------------------------------------------------------------------ fetch


@asynccontextmanager
async def pull(
    js: JetStreamContext, durable: str, config: api.ConsumerConfig | None = None
) -> AsyncIterator[JetStreamContext.PullSubscription]:
    """A pull subscription on session events, unsubscribed at the end.

    nats-py's drain() waits its whole drain_timeout (30 s) on a pull subscription that has seen a
    fetch time out: the late status message left in its queue is never marked done.
    """
    sub = await js.pull_subscribe("session.*.events", durable=durable, stream=bus.EVENTS_STREAM, config=config)
    try:
        yield sub
    finally:
        await sub.unsubscribe()


async def fetch_until(
    sub: JetStreamContext.PullSubscription, count: int, timeout: float = 0.5
) -> list[tuple[Msg, events.Event]]:
    """Call ``bus.fetch`` until ``count`` decoded messages arrived (the test timeout bounds it)."""
    got: list[tuple[Msg, events.Event]] = []
    while len(got) < count:
        got += await bus.fetch(sub, events.decode_event, batch=10, timeout=timeout)
    return got


async def test_fetch_on_nothing_returns_nothing(js: JetStreamContext) -> None:
    async with pull(js, "empty") as sub:
        assert await bus.fetch(sub, events.decode_event, timeout=0.2) == []


async def test_fetch_terminates_malformed_messages_and_returns_the_good_ones(js: JetStreamContext) -> None:
    ack_wait = 0.5
    good = [failed("s1", "first"), failed("s1", "second")]
    await bus.append(js, good[0])
    await js.publish("session.s1.events", b"not json", stream=bus.EVENTS_STREAM)
    unknown = {"type": "NoSuchEvent", "session_id": "s1", "event_id": "x"}
    await js.publish("session.s1.events", json.dumps(unknown).encode(), stream=bus.EVENTS_STREAM)
    await js.publish("session.s1.events", b'{"type": "SessionFailed"}', stream=bus.EVENTS_STREAM)
    await bus.append(js, good[1])

    async with pull(js, "reader", api.ConsumerConfig(ack_wait=ack_wait)) as sub:
        got = await fetch_until(sub, 2)

        assert [event for _, event in got] == good
        for msg, _ in got:
            await msg.ack_sync()  # answered after the terms sent before it on this connection
        info = await sub.consumer_info()
        assert (info.num_ack_pending, info.num_redelivered, info.num_pending) == (0, 0, 0)
        assert info.ack_floor is not None and info.ack_floor.stream_seq == 5

        # Past ack_wait nothing comes back: the malformed ones were terminated, not just skipped.
        assert await bus.fetch(sub, events.decode_event, batch=10, timeout=3 * ack_wait) == []
        info = await sub.consumer_info()
        assert info.delivered is not None and info.delivered.consumer_seq == 5
        assert info.num_redelivered == 0

        # The control: a message left unacknowledged does come back within that time.
        third = failed("s1", "third")
        await bus.append(js, third)
        [(first_delivery, _)] = await fetch_until(sub, 1)
        [(redelivery, event)] = await fetch_until(sub, 1, timeout=3 * ack_wait)
        assert event == third
        assert (first_delivery.metadata.num_delivered, redelivery.metadata.num_delivered) == (1, 2)
        await redelivery.ack_sync()


async def test_stream_seq_reads_the_reply_subject_as_the_metadata_does(js: JetStreamContext) -> None:
    seqs = [await bus.append(js, failed(f"s{i}", "x")) for i in range(3)]
    sub = await bus.pull_consumer(js, bus.EVENTS_STREAM, ack=api.AckPolicy.NONE, start_seq=seqs[1])
    msgs = await sub.fetch(2, timeout=2)
    assert [bus.stream_seq(m) for m in msgs] == [m.metadata.sequence.stream for m in msgs] == seqs[1:]
    await sub.unsubscribe()


async def test_appends_in_flight_together_are_stored_in_the_order_they_were_made(js: JetStreamContext) -> None:
    """What the scheduler relies on when it appends a batch of reports' facts at once."""
    seqs = await asyncio.gather(*(bus.append(js, failed(f"s{i}", "x")) for i in range(200)))
    assert list(seqs) == sorted(seqs) and len(set(seqs)) == 200


async def test_fetch_msgs_answers_as_nats_py_fetch_does(js: JetStreamContext) -> None:
    """``bus.fetch_msgs`` (the same pull request as ``sub.fetch``, without its per-message task):
    what is stored, up to the batch, in order, at once; nothing: a timeout after ``timeout``; one
    that arrives while it waits: as soon as it is stored; after a fetch gave up (its request's end
    arriving late), the next one still gets what comes."""
    seqs = [await bus.append(js, failed(f"f{i}", "x")) for i in range(700)]
    sub = await bus.pull_consumer(js, bus.EVENTS_STREAM, ack=api.AckPolicy.NONE, start_seq=seqs[0])
    first = await bus.fetch_msgs(sub, 512, 2.0)
    rest = await bus.fetch_msgs(sub, 512, 2.0)
    assert [bus.stream_seq(m) for m in first + rest] == seqs
    assert len(first) == 512
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(nats.errors.TimeoutError):
        await bus.fetch_msgs(sub, 512, 0.3)
    assert loop.time() - began >= 0.25
    for _ in range(3):  # each time a request of the fetch before may end late, within this one
        late = asyncio.create_task(asyncio.sleep(0.1))
        late.add_done_callback(lambda _: asyncio.ensure_future(bus.append(js, failed("late", str(loop.time())))))
        began = loop.time()
        [msg] = await bus.fetch_msgs(sub, 512, 3.0)
        assert loop.time() - began < 2.0  # as soon as it was stored, not at the timeout
        assert events.decode_event(msg.data).session_id == "late"
        with pytest.raises(nats.errors.TimeoutError):
            await bus.fetch_msgs(sub, 512, 0.2)
    await sub.unsubscribe()
