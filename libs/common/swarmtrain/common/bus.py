"""NATS JetStream plumbing shared by every service: streams, appends, commands, pull loops."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from swarmtrain.common import metrics, subjects
from swarmtrain.common.events import Command, Event, Report, UpdateRejected, encode
from swarmtrain.common.logging import get_logger
from swarmtrain.common.settings import Settings, get_settings

EVENTS_STREAM = "EVENTS"
COMMANDS_STREAM = "COMMANDS"
REPORTS_STREAM = "REPORTS"
EVENT_SUBJECTS = subjects.EVENT_SUBJECTS
COMMAND_SUBJECTS = subjects.COMMAND_SUBJECTS
REPORT_SUBJECTS = subjects.REPORT_SUBJECTS
WRONG_LAST_SEQUENCE = 10071

log = get_logger("swarmtrain.bus")
T = TypeVar("T")


class WrongLastSequence(Exception):
    """The subject moved on since the sequence the writer expected: someone else wrote first."""


class Stopped(Exception):
    """The process was asked to stop (SIGTERM, SIGINT) while it was still waiting for NATS."""


STOP: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar("swarmtrain_stop", default=None)
"""The process's stop event, set by ``swarmtrain.cli.main.serve`` before it starts a service: the
waits here that can last forever (a NATS server away or refusing this credential, a JetStream
still electing its leader) give up with ``Stopped`` as soon as it is set."""


async def _unless_stopped(work: asyncio.Future[T] | asyncio.Task[T], what: str) -> T:
    """``await work``, or cancel it and raise ``Stopped`` once the process's stop event is set."""
    stop = STOP.get()
    if stop is None:
        return await work
    stopping: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
    racing: set[asyncio.Future[Any]] = {work, stopping}
    try:
        await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        stopping.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        raise Stopped(f"stopped while {what}")
    return work.result()


async def connect(settings: Settings, name: str, attempts: int = -1) -> NATS:
    """Connect to NATS; a service waits for it forever (``attempts=-1``), a one-shot command does not.

    A process stopped while it waits (NATS away, or refusing its credential and asked again every
    half second) ends at once: ``Stopped``, which ``serve`` takes as a clean stop.
    """

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", error=str(exc))

    connecting = asyncio.ensure_future(
        nats.connect(
            servers=settings.nats_url.split(","),
            name=name,
            user=settings.nats_user,
            password=settings.nats_password,
            nkeys_seed_str=settings.nats_nkey_seed,
            inbox_prefix=settings.nats_inbox_prefix,
            max_reconnect_attempts=attempts,
            reconnect_time_wait=0.5,
            error_cb=on_error,
        )
    )
    return await _unless_stopped(connecting, f"connecting to NATS at {settings.nats_url}")


JETSTREAM_NOT_READY = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError)
"""What JetStream answers (or fails to) while it is starting: a cluster electing its meta leader,
a server recovering its store."""


async def ensure_streams(js: JetStreamContext, replicas: int | None = None, ready_timeout: float = 60.0) -> None:
    """Create the three streams, or bring their subjects up to date; safe to call from every service.

    A stream that exists with its subjects and replicas is left alone, so a client allowed only to
    read stream info (a peer, see ``swarmtrain nats-config``) passes here once a service has created
    them. ``replicas`` defaults to the ``stream_replicas`` setting (3 on a three-node cluster).
    While JetStream is not ready yet (a cluster still electing its leader) it is asked again, with
    backoff, for up to ``ready_timeout`` seconds, so services started beside it need no ordering.
    """
    deadline = time.monotonic() + ready_timeout
    delay = 0.1
    while True:
        try:
            return await _ensure_streams(js, replicas or get_settings().stream_replicas)
        except JETSTREAM_NOT_READY as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.info("JetStream not ready yet; asking again", error=repr(exc), in_s=delay)
            await _unless_stopped(asyncio.ensure_future(asyncio.sleep(delay)), "waiting for JetStream")
            delay = min(delay * 2, 2.0)


async def _ensure_streams(js: JetStreamContext, replicas: int) -> None:
    for config in (
        api.StreamConfig(
            name=EVENTS_STREAM,
            subjects=EVENT_SUBJECTS,
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            duplicate_window=120.0,
            allow_direct=True,
            num_replicas=replicas,
        ),
        api.StreamConfig(
            name=COMMANDS_STREAM,
            subjects=COMMAND_SUBJECTS,
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=7 * 24 * 3600.0,
            duplicate_window=120.0,
            num_replicas=replicas,
        ),
        api.StreamConfig(
            name=REPORTS_STREAM,
            subjects=REPORT_SUBJECTS,
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=7 * 24 * 3600.0,
            duplicate_window=120.0,
            num_replicas=replicas,
        ),
    ):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            info = await js.stream_info(config.name or "")
            same = sorted(info.config.subjects or []) == sorted(config.subjects or [])
            if same and (info.config.num_replicas or 1) == replicas:
                continue
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config)


async def append(js: JetStreamContext, event: Event, expected_last_subject_seq: int | None = None) -> int:
    """Append an event to its subject; returns its stream sequence.

    ``event_id`` travels as ``Nats-Msg-Id`` so a retried publish is deduplicated by JetStream.
    With ``expected_last_subject_seq`` the append is a compare-and-set on the event's subject.
    """
    headers = {"Nats-Msg-Id": event.event_id}
    if expected_last_subject_seq is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_last_subject_seq)
    try:
        ack = await js.publish(event.subject, encode(event), headers=headers, stream=EVENTS_STREAM)
    except nats.js.errors.APIError as exc:
        if exc.err_code == WRONG_LAST_SEQUENCE:
            # The server checks the expected sequence before the duplicate window, so a retry of
            # an append that did land (its ack was lost) is refused: answer it as the duplicate.
            seq = await _own_last_sequence(js, event)
            if seq is not None:
                return seq
            raise WrongLastSequence(event.subject) from exc
        raise
    metrics.appended(event)
    return int(ack.seq)


async def _own_last_sequence(js: JetStreamContext, event: Event) -> int | None:
    """The sequence of the last message on the event's subject if it is this very event."""
    try:
        last = await js.get_last_msg(EVENTS_STREAM, event.subject)
    except nats.js.errors.NotFoundError:
        return None
    if last.headers and last.headers.get("Nats-Msg-Id") == event.event_id and last.seq is not None:
        return int(last.seq)
    return None


async def send(js: JetStreamContext, command: Command) -> int:
    headers = {"Nats-Msg-Id": command.event_id}
    ack = await js.publish(command.subject, encode(command), headers=headers, stream=COMMANDS_STREAM)
    return int(ack.seq)


async def report(js: JetStreamContext, report: Report) -> int:
    """A peer's report on its own ``peer.<id>.reports`` subject (deduplicated by ``event_id``).

    The reporting peer is ``peer_id``, except for ``UpdateRejected``, whose ``peer_id`` names the
    update's author and ``reported_by`` the peer that says so."""
    headers = {"Nats-Msg-Id": report.event_id}
    speaker = report.reported_by if isinstance(report, UpdateRejected) else report.peer_id
    subject = subjects.peer_reports(speaker)
    ack = await js.publish(subject, encode(report), headers=headers, stream=REPORTS_STREAM)
    return int(ack.seq)


async def last_sequence(js: JetStreamContext, stream: str = EVENTS_STREAM) -> int:
    info = await js.stream_info(stream)
    return int(info.state.last_seq)


async def fetch(
    sub: JetStreamContext.PullSubscription,
    decode: Callable[[bytes], T],
    batch: int = 256,
    timeout: float = 1.0,
) -> list[tuple[Msg, T]]:
    """Fetch up to ``batch`` messages and decode them.

    A malformed message is logged and terminated (never redelivered), so it can neither crash the
    caller nor hold back the messages behind it. Returns [] when nothing arrived in ``timeout``.
    """
    try:
        msgs = await fetch_msgs(sub, batch, timeout)
    except (TimeoutError, nats.errors.TimeoutError):
        return []
    out: list[tuple[Msg, T]] = []
    for msg in msgs:
        try:
            out.append((msg, decode(msg.data)))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("malformed message terminated", subject=msg.subject, error=str(exc), data=msg.data[:200])
            await msg.term()
    return out


_END_OF_PULL = frozenset({"404", "408", "409"})
"""Statuses that end a pull request without an error: no messages, expired, a conflict (nats-py's
temporary ones)."""


async def fetch_msgs(sub: JetStreamContext.PullSubscription, batch: int, timeout: float) -> list[Msg]:
    """What ``sub.fetch(batch, timeout=timeout)`` answers (``nats.errors.TimeoutError`` when nothing
    came), the same pull request, without its cost per message: nats-py takes each message of a
    batch off its queue with ``next_msg``, a task, a uuid and a timer apiece (on a consumer that
    does little else, a good part of its time); here what has arrived is taken at once, and only a
    queue found empty before the batch is complete is waited on. Falls back to ``sub.fetch`` where
    the subscription does not look as expected (another nats-py)."""
    inner = getattr(sub, "_sub", None)
    queue: asyncio.Queue[Msg] | None = getattr(inner, "_pending_queue", None)
    nms, deliver, nc = getattr(sub, "_nms", None), getattr(sub, "_deliver", None), getattr(inner, "_conn", None)
    if batch < 2 or inner is None or queue is None or not nms or not deliver or nc is None:
        return await sub.fetch(batch, timeout=timeout)

    def took(msg: Msg) -> str | None:
        inner._pending_size -= len(msg.data)
        queue.task_done()
        status = msg.headers.get(api.Header.STATUS) if msg.headers else None
        if status and status not in _END_OF_PULL and not status.startswith("1"):
            raise nats.js.errors.APIError.from_msg(msg)
        return status

    msgs: list[Msg] = []
    while not queue.empty() and len(msgs) < batch:  # delivered after an earlier request ended
        msg = queue.get_nowait()
        if not took(msg):  # a status left over from an earlier request: not this one's
            msgs.append(msg)
    if len(msgs) >= batch:
        return msgs
    request: dict[str, Any] = {"batch": batch - len(msgs), "no_wait": True}
    if not msgs:  # wait up to the timeout for the first; then what is there, and the request ends
        request["expires"] = max(1, int(timeout * 1_000_000_000) - 100_000)
    await nc.publish(nms, msgspec.json.encode(request), reply=deliver)
    deadline = time.monotonic() + timeout
    while len(msgs) < batch:
        if queue.empty():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                msg = await asyncio.wait_for(queue.get(), left)
            except TimeoutError:
                break
        else:
            msg = queue.get_nowait()
        status = took(msg)
        if status is None:
            msgs.append(msg)
        elif not status.startswith("1"):  # a request ended (a heartbeat is not an end)
            left = deadline - time.monotonic()
            if msgs or left < 0.002:
                break
            # nothing yet: the end of an earlier request (it expired as its fetch gave up), or of
            # this one; ask again for what is left of the timeout, as nats-py does
            again = {"batch": batch, "no_wait": True, "expires": int(left * 1_000_000_000) - 100_000}
            await nc.publish(nms, msgspec.json.encode(again), reply=deliver)
    if not msgs:
        raise nats.errors.TimeoutError
    return msgs


def stream_seq(msg: Msg) -> int:
    """The message's stream sequence, read straight from its reply subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.…``): ``msg.metadata`` parses every
    token and a timestamp, which is a good part of a consumer's time per message. Other reply
    forms (with a domain) go through ``msg.metadata``."""
    tokens = msg.reply.split(".") if msg.reply else []
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5])
    return int(msg.metadata.sequence.stream)


async def pull_consumer(
    js: JetStreamContext,
    stream: str,
    *,
    durable: str | None = None,
    start_seq: int = 1,
    ack: api.AckPolicy = api.AckPolicy.EXPLICIT,
    filter_subject: str | None = None,
) -> JetStreamContext.PullSubscription:
    """A pull consumer on ``stream`` that starts at ``start_seq``.

    A durable is recreated from ``start_seq`` (its owner keeps the authoritative position);
    without ``durable`` the consumer is ephemeral and vanishes once its subscriber is gone.
    """
    config = api.ConsumerConfig(
        durable_name=durable,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, start_seq),
        ack_policy=ack,
        ack_wait=30.0,
        max_ack_pending=20_000,
        filter_subject=filter_subject,
        inactive_threshold=None if durable else 30.0,
    )
    if durable:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(stream, durable)
    info = await js.add_consumer(stream, config)
    return await js.pull_subscribe_bind(consumer=info.name, stream=stream)
