"""The peer process: registers, beats presence, takes commands, trains off the loop, reports.

``swarmtrain peer --nats URL [--name NAME] [--device auto|cpu|cuda]`` calls :func:`run`.

- Identity: ``<state_dir>/peers/<name>.id`` holds a stable id (``p`` + 16 hex digits), kept across
  restarts and ``flock``-ed while the peer runs, so two peers cannot share a name on one machine.
- Reports, not facts: everything the peer has to say (``PeerRegistered``, ``Heartbeat``,
  ``ModelUpdatePublished``, ``UpdateRejected``, ``RoundAveraged``, ``PeerDone``, ``PeerFailed``) goes
  with ``bus.report`` to ``peer.<peer_id>.reports``; the scheduler checks it and writes the fact.
  The peer never publishes on, nor reads, a ``*.events`` subject. A report is retried with backoff
  for as long as the peer runs (a NATS outage of minutes loses nothing); its deterministic
  ``event_id`` (``<session>.<peer>.done``, ``.failed``, ``.epoch<N>``, ...) deduplicates a retry.
- Commands come from a durable pull consumer ``peer-<peer_id>`` on ``peer.<peer_id>.command``
  (stream ``COMMANDS``), created with ``DeliverPolicy.NEW``; a restarted peer resumes it and still
  gets what was sent while it was away. A ``Train`` is acked only once its job has started: one
  that arrives while another job runs or winds down is nak-ed with a delay and so comes again (a
  ``Stop`` of its session sent after it drops it); a ``Train`` this peer already runs or ran (its
  ``event_id``) is acked and ignored. ``SessionFact`` goes to the running job of its session
  (fedavg follows its rounds there); facts of another session are acked and kept, a few sessions'
  worth, for a ``Train`` that may come next (a newcomer's catch-up facts can arrive before its
  nak-ed ``Train`` comes back).
- Specs: what the peer has (``peer.specs.collect``: cores, memory, GPUs, versions, OS, its owner's
  ``--label`` labels) travels in its ``PeerRegistered``; looked at again every ``SPECS_CHECK_S``
  and registered again when it changed. The scheduler places sessions by them.
- Precision: a ``Train`` whose ``precision`` this peer cannot compute in (fp16 on a CPU, bf16 where
  autocast to it does not work) fails at once, before any download, with the reason.
- Presence beats name the session and the ``Train`` (``train_id``) in progress, so the scheduler can
  re-send a ``Train`` no beat shows being worked on.
- Blobs only through signed URLs: the dataset through ``Train.dataset_url`` (cached by sha256,
  size-capped by ``SWARMTRAIN_BLOB_MAX_DOWNLOAD_MB``, checked against ``dataset_sha256``), the
  rest by the strategy (:class:`~swarmtrain.peer.strategies.JobContext`). No storage credential.
- Training runs in a worker thread; per-epoch stats cross into the loop with
  ``call_soon_threadsafe`` and are reported as ``Heartbeat`` by a task, so NATS is only ever used
  from the event loop and presence beats never stall.
- ``Stop`` for the session being trained (or the forwarded end of that session) ends it at the
  next batch and **reports nothing**: the scheduler has already decided the session's fate. A peer
  *shut down* mid-training (its ``stop`` event set) reports ``PeerFailed{reason: "peer shut
  down"}`` instead, so its session need not wait for missed beats. A non-finite loss ends the job
  with ``PeerFailed{reason: "diverged: non-finite loss at epoch N"}``: no report carries NaN.
- What a ``Train`` runs is its strategy's, ``STRATEGIES.get(command.strategy)``
  (:mod:`swarmtrain.peer.strategies`); an exception becomes ``PeerFailed``; ``Stop`` and shutdown
  end every strategy the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats.errors
import nats.js.errors
import structlog
import torch
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from swarmtrain.common import blob, bus, events, formats, signing, subjects
from swarmtrain.common.blob import MiB
from swarmtrain.common.events import (
    PeerFailed,
    PeerRegistered,
    Presence,
    Report,
    SessionFact,
    Stop,
    Train,
)
from swarmtrain.common.logging import get_logger
from swarmtrain.common.settings import Settings
from swarmtrain.common.specs import PeerSpecs
from swarmtrain.peer import specs as peer_specs
from swarmtrain.peer import trainer
from swarmtrain.peer.checkpoint import CheckpointError
from swarmtrain.peer.facts import SessionFacts
from swarmtrain.peer.strategies import STRATEGIES, JobContext, with_retries
from swarmtrain.peer.trainer import Diverged, PrecisionUnsupported, TrainingStopped
from swarmtrain.training.data import DataError

log = get_logger("swarmtrain.peer")

ID_RE = re.compile(r"^p[0-9a-f]{16}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
COMMAND_ACK_WAIT_S = 30.0
"""The most a command delivered and not acked waits before it comes again (``command_ack_wait``)."""
BUSY_RETRY_S = 1.0
"""How long a ``Train`` that arrived while another job runs waits before it is delivered again."""
REPORT_BACKOFF_MAX_S = 5.0
SHUTDOWN_REPORT_S = 10.0
"""Once the peer is shutting down, how much longer an undelivered report is tried."""
KEPT_SESSIONS = 8
"""Sessions not running whose forwarded facts are kept, for a ``Train`` that may still come."""
KEPT_FACTS = 4096
SPECS_CHECK_S = 60.0
"""How often the peer looks at its specs again, and registers again when they changed."""


def command_ack_wait(settings: Settings) -> float:
    """How long a command delivered and not acked waits before it is delivered again: half the
    presence timeout (at least 1 s, at most ``COMMAND_ACK_WAIT_S``). A peer acks a command as soon
    as it is dealt with (a ``Train`` once its job started), so the wait matters only for a command
    delivered to a process that died with a fetch pending: it comes to the restarted one well
    within the presence timeout, before anyone is judged on it."""
    return min(COMMAND_ACK_WAIT_S, max(1.0, settings.peer_timeout_s / 2))


# ------------------------------------------------------------------ identity


def identity_path(state_dir: Path, name: str) -> Path:
    return state_dir / "peers" / f"{name}.id"


@contextlib.contextmanager
def hold_identity(state_dir: Path, name: str, assigned: str | None = None) -> Iterator[str]:
    """Yield the stable peer id for ``name``, holding an exclusive ``flock`` on its file meanwhile.

    ``assigned``: the id fixed by the peer's NATS credential (``SWARMTRAIN_PEER_ID``), kept in the file.
    """
    if assigned is not None and not ID_RE.match(assigned):
        raise SystemExit(f"invalid peer id {assigned!r} (SWARMTRAIN_PEER_ID): expected p + 16 hex digits")
    if not NAME_RE.match(name):
        raise SystemExit(f"invalid peer name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    path = identity_path(state_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"a peer named {name!r} is already running here; pass --name") from None
        peer_id = os.pread(fd, 64, 0).decode("ascii", errors="replace").strip()
        if not ID_RE.match(peer_id) or (assigned is not None and peer_id != assigned):
            peer_id = assigned or "p" + secrets.token_hex(8)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{peer_id}\n".encode(), 0)
            os.fsync(fd)
        yield peer_id
    finally:
        os.close(fd)  # releases the lock


# ------------------------------------------------------------------ the peer


@dataclass(eq=False)
class _Job:
    command: Train
    facts: SessionFacts
    stop: threading.Event = field(default_factory=threading.Event)
    """Seen by the worker thread: training ends at its next batch."""
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    """Seen by the loop (a fedavg job waiting for its round to close): set together with ``stop``."""
    stop_reason: str | None = None
    """None while running; "stop" (a Stop command or the session's end) or "shutdown"."""

    @property
    def session_id(self) -> str:
        return self.command.session_id

    def halt(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop.set()
        self.stopped.set()


def failure_reason(exc: BaseException) -> str:
    """A short reason for ``PeerFailed``: no traceback (that goes to the log)."""
    match exc:
        case Diverged() | PrecisionUnsupported():
            reason = str(exc)
        case blob.IntegrityError():
            reason = f"dataset sha256 mismatch ({exc})"
        case blob.TooLarge():
            reason = f"download too large: {exc}"
        case blob.BlobNotFound():
            reason = f"object not found: {exc.args[0] if exc.args else exc}"
        case httpx.HTTPStatusError():
            where = str(exc.request.url).split("?", 1)[0]  # the query is the credential: never reported
            reason = f"blob URL refused: HTTP {exc.response.status_code} for {where}"
        case CheckpointError():
            reason = f"checkpoint refused: {exc}"
        case DataError():
            reason = f"bad data: {exc}"
        case _:
            reason = f"{type(exc).__name__}: {exc}"
    return events.bounded_text(reason, events.MAX_REPORTED_REASON)


class Peer:
    """One peer's loops over an open connection; :func:`run` owns the connection and identity."""

    def __init__(
        self,
        settings: Settings,
        nc: NATS,
        js: JetStreamContext,
        peer_id: str,
        name: str,
        device: torch.device,
        specs: PeerSpecs | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.peer_id = peer_id
        self.name = name
        self.device = device
        self.device_label = trainer.describe_device(device)
        self.specs = specs
        """What this peer has, as last registered (None: not collected, as in tests of old peers)."""
        self.labels = dict(labels or {})
        self.state_dir = Path(settings.state_dir)
        self._job: _Job | None = None
        self._finished: set[str] = set()
        """Event ids of the Train commands this peer has run."""
        self._stops: dict[str, int] = {}
        """session id -> stream sequence of the last Stop for it: an earlier Train of it is dropped."""
        self._kept: OrderedDict[str, SessionFacts] = OrderedDict()
        """Forwarded facts of sessions this peer is not running (the most recent few)."""
        self._tasks: asyncio.TaskGroup | None = None
        self._stopping = asyncio.Event()
        self._stopping_since: float | None = None

    @property
    def command_subject(self) -> str:
        return subjects.peer_command(self.peer_id)

    @property
    def current_session(self) -> str | None:
        return self._job.session_id if self._job else None

    async def serve(self, stop: asyncio.Event) -> None:
        # The consumer exists before the peer announces itself, so no command sent after the
        # announcement can be missed (DeliverPolicy.NEW applies only when it is first created).
        durable = f"peer-{self.peer_id}"
        config = api.ConsumerConfig(
            name=durable,  # created with its filter in the API subject: all a peer's credential allows
            durable_name=durable,
            deliver_policy=api.DeliverPolicy.NEW,
            ack_policy=api.AckPolicy.EXPLICIT,
            filter_subject=self.command_subject,
            ack_wait=command_ack_wait(self.settings),
        )
        # created, or (a consumer of an earlier run) brought up to this ack wait
        with contextlib.suppress(nats.js.errors.BadRequestError):
            await self.js.add_consumer(bus.COMMANDS_STREAM, config)
        sub = await self.js.pull_subscribe(self.command_subject, durable=durable, stream=bus.COMMANDS_STREAM)
        log.info("peer started", name=self.name, device=self.device_label)
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                tasks.create_task(self._beat(stop), name="presence")
                tasks.create_task(self._report(self._registration()), name="register")
                if self.specs is not None:
                    tasks.create_task(self._watch_specs(stop), name="specs")
                tasks.create_task(self._take_commands(sub), name="commands")
                await stop.wait()
                self._stopping_since = time.monotonic()
                self._stopping.set()  # the commands loop ends after its current fetch (at most 1 s)
                if self._job is not None:
                    self._job.halt("shutdown")
            # The TaskGroup has waited for a running job to wind down and report.
        finally:
            # Unsubscribe now rather than in the connection's drain: a pull request cut short can
            # leave a late status message in the inbox, and drain would wait for it until its
            # timeout. Anything delivered and not acked is redelivered to the next run.
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        log.info("peer stopped")

    # ---------------------------------------------------------------- registration and specs

    def _registration(self) -> PeerRegistered:
        return PeerRegistered(peer_id=self.peer_id, name=self.name, device=self.device_label, specs=self.specs)

    async def _watch_specs(self, stop: asyncio.Event) -> None:
        """Register again whenever what this peer has changes (a cgroup's memory limit, a label
        file, a driver upgrade): looked at every ``SPECS_CHECK_S``."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SPECS_CHECK_S)
            if stop.is_set():
                return
            try:
                now = await asyncio.to_thread(collect_specs, self.device, self.labels)
            except ValueError as exc:
                log.warning("specs not collected", error=str(exc))
                continue
            if now != self.specs:
                log.info("specs changed; registering again")
                self.specs = now
                await self._report(self._registration())

    # ---------------------------------------------------------------- presence

    async def _beat(self, stop: asyncio.Event) -> None:
        interval = self.settings.presence_interval_s
        while not stop.is_set():
            job = self._job
            presence = Presence(
                peer_id=self.peer_id,
                name=self.name,
                device=self.device_label,
                session_id=job.session_id if job else None,
                train_id=job.command.event_id if job else None,
            )
            try:
                await self.nc.publish(presence.subject, events.encode(presence))
            except nats.errors.Error as exc:
                log.warning("presence beat not sent", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval * random.uniform(0.9, 1.1))

    # ---------------------------------------------------------------- reports

    async def _report(self, report: Report) -> bool:
        """Send ``report`` on this peer's reports subject, retried with backoff for as long as the
        peer runs (its event id deduplicates a retry); once it is shutting down, for at most
        ``SHUTDOWN_REPORT_S`` more. False, logged, if it never got through."""
        delay = 0.25
        while True:
            try:
                await bus.report(self.js, report)
                return True
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                since = self._stopping_since
                if since is not None and time.monotonic() - since > SHUTDOWN_REPORT_S:
                    log.error("report not sent", report_type=type(report).__name__, error=str(exc))
                    return False
                log.warning("report failed; retrying", report_type=type(report).__name__, error=str(exc))
            with contextlib.suppress(TimeoutError):
                # a backoff, cut short by shutdown (which bounds the remaining tries)
                await asyncio.wait_for(self._stopping.wait(), delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, REPORT_BACKOFF_MAX_S)

    async def _send(self, report: Report) -> None:
        """The strategies' report (:data:`~swarmtrain.peer.strategies.ReportFn`)."""
        await self._report(report)

    # ---------------------------------------------------------------- commands

    async def _take_commands(self, sub: JetStreamContext.PullSubscription) -> None:
        """Take commands until the peer stops. The loop is never cancelled: a cancelled pull fetch
        can lose its cancellation inside the client and then wait for a message forever, so
        shutdown would hang; it ends instead after the fetch in progress times out."""
        while not self._stopping.is_set():
            try:
                batch = await bus.fetch(sub, events.decode_command, batch=8, timeout=1.0)
            except nats.errors.Error as exc:  # connection trouble: the client reconnects by itself
                log.warning("command fetch failed", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 0.5)
                continue
            for msg, command in batch:
                if self._stopping.is_set():  # comes again to the next run
                    await self._settle(msg, done=False)
                    continue
                match command:
                    case Train():
                        started = self._on_train(command, bus.stream_seq(msg))
                    case Stop():
                        self._on_stop(command, bus.stream_seq(msg))
                        started = True
                    case SessionFact():
                        self._on_fact(command)
                        started = True
                await self._settle(msg, done=started)

    async def _settle(self, msg: Msg, done: bool) -> None:
        """Ack a command that is dealt with; nak (delayed) one to be delivered again later."""
        try:
            if done:
                await msg.ack()
            else:
                await msg.nak(delay=BUSY_RETRY_S)
        except nats.errors.Error as exc:  # a redelivery is harmless: duplicates are ignored
            log.warning("command ack failed", error=str(exc))

    def _on_train(self, command: Train, seq: int) -> bool:
        """Start ``command``'s job if this peer is free; True when it is dealt with (started or
        ignored for good), False when it must come again later (busy)."""
        sid = command.session_id
        job = self._job
        if command.event_id in self._finished or (job is not None and job.command.event_id == command.event_id):
            log.info("Train already run or running; ignored", session_id=sid, train_id=command.event_id)
            return True
        if self._stops.get(sid, -1) > seq:
            log.info("Train dropped: its session was stopped after it was sent", session_id=sid)
            return True
        if job is not None:
            log.info("busy; the Train will come again", session_id=sid, busy_with=job.session_id)
            return False
        assert self._tasks is not None
        facts = self._kept.pop(sid, None) or SessionFacts(sid)
        job = _Job(command, facts)
        self._job = job
        self._tasks.create_task(self._run_job(job), name=f"train-{sid}")
        return True

    def _on_stop(self, command: Stop, seq: int) -> None:
        job = self._job
        if command.trial is not None:  # a search's pruned trial: that job only, the next Train goes on
            mine = job is not None and job.session_id == command.session_id and job.command.trial == command.trial
            if job is not None and mine and job.stop_reason is None:
                log.info("stopping a pruned trial", session_id=command.session_id, trial=command.trial)
                job.halt("stop")
            return
        self._stops[command.session_id] = seq
        if job is None or job.session_id != command.session_id:
            log.debug("Stop ignored: not training that session", session_id=command.session_id)
            return
        if job.stop_reason is None:
            log.info("stopping training", session_id=command.session_id)
            job.halt("stop")

    def _on_fact(self, command: SessionFact) -> None:
        sid = command.session_id
        if command.fact.session_id != sid:
            log.warning("SessionFact dropped: its fact is of another session", session_id=sid)
            return
        job = self._job
        if job is not None and job.session_id == sid:
            job.facts.observe(command.fact, command.urls)
            if isinstance(command.fact, events.TERMINAL_SESSION_EVENTS) and job.stop_reason is None:
                log.info("the session ended; stopping", session_id=sid, fact=type(command.fact).__name__)
                job.halt("stop")
            return
        facts = self._kept.pop(sid, None) or SessionFacts(sid)
        if len(facts.closed) + len(facts.averaged) < KEPT_FACTS:
            facts.observe(command.fact, command.urls)
        self._kept[sid] = facts
        while len(self._kept) > KEPT_SESSIONS:
            self._kept.popitem(last=False)

    # ---------------------------------------------------------------- a training job

    async def _run_job(self, job: _Job) -> None:
        command = job.command
        with structlog.contextvars.bound_contextvars(session_id=command.session_id):
            try:
                await self._train_and_report(job)
            except TrainingStopped as exc:
                if job.stop_reason == "shutdown":
                    await self._fail(command, "peer shut down")
                else:
                    log.info("training stopped", reason=job.stop_reason or str(exc))
            except asyncio.CancelledError:
                job.stop.set()  # the worker thread ends at its next batch
                raise
            except Exception as exc:
                if isinstance(exc, Diverged):
                    log.warning("training diverged", epoch=exc.epoch)
                else:
                    log.exception("training failed")
                await self._fail(command, failure_reason(exc))
            finally:
                self._finished.add(command.event_id)
                if self._job is job:
                    self._job = None

    async def _train_and_report(self, job: _Job) -> None:
        command = job.command
        hp = command.hyperparameters
        log.info("training", dataset=command.dataset_uri, epochs=hp.epochs, batch_size=hp.batch_size, lr=hp.lr)
        # refused before any download: a precision this peer cannot compute in fails the run at once
        trainer.Amp.for_device(command.precision, self.device)
        csv_path = await asyncio.to_thread(self._fetch_dataset, command)
        validation = None
        if command.validation_url:
            validation = await asyncio.to_thread(
                self._fetch, command, command.validation_url, command.validation_sha256, "validation"
            )
        if job.stop.is_set():
            raise TrainingStopped("stopped before training began")
        context = JobContext(
            settings=self.settings,
            peer_id=self.peer_id,
            device=self.device,
            dataset=csv_path,
            report=self._send,
            facts=job.facts,
            stop=job.stop,
            stopped=job.stopped,
            validation=validation,
        )
        await STRATEGIES.get(command.strategy)(command, context)

    async def _fail(self, command: Train, reason: str) -> None:
        log.warning("training failed", reason=reason)
        await self._report(
            PeerFailed(
                event_id=f"{command.session_id}.{self.peer_id}.failed"
                if command.trial is None
                else f"{command.event_id}.failed",
                session_id=command.session_id,
                peer_id=self.peer_id,
                reason=reason,
                trial=command.trial,
            )
        )

    # ---------------------------------------------------------------- blocking helpers (threads)

    def _fetch_dataset(self, command: Train) -> Path:
        """The dataset as a local file, cached by sha256: fetched through the Train's signed URL,
        size-capped, checked against its sha256."""
        return self._fetch(command, command.dataset_url, command.dataset_sha256, "dataset")

    def _fetch(self, command: Train, url: str, digest: str, name: str) -> Path:
        """A dataset (``name``: ``dataset``, or ``validation``: the session's own validation set) as a
        local file, cached by sha256, fetched through ``Train.<name>_url``."""
        sha256 = digest.lower()
        if not SHA256_RE.match(sha256):
            raise DataError(f"{name}_sha256 is not a sha256 hex digest: {digest[:80]!r}")
        path = self.state_dir / "cache" / "datasets" / f"{sha256}.{formats.rules(command.data.format).extension}"
        if not path.is_file():
            if not url:
                what = "dataset" if name == "dataset" else f"{name} dataset"
                raise DataError(f"the Train carries no {name}_url to fetch the {what} from")
            cap = self.settings.blob_max_download_mb * MiB
            with_retries("dataset", lambda: signing.fetch_url(url, path, cap, sha256), url)
        return path


# ------------------------------------------------------------------ entry point


async def _drain(nc: NATS) -> None:
    if not nc.is_closed:
        await nc.drain()


def collect_specs(device: torch.device, labels: dict[str, str]) -> PeerSpecs:
    """This process's specs, training on ``device`` (its index among the visible GPUs)."""
    where = "cpu" if device.type != "cuda" else f"cuda:{device.index or 0}"
    return peer_specs.collect(device=where, labels=labels)


async def run(
    settings: Settings,
    stop: asyncio.Event,
    name: str | None = None,
    device: str = "auto",
    labels: dict[str, str] | None = None,
) -> None:
    """Run a peer until ``stop`` is set. ``labels``: its owner's (``--label region=eu``), in its specs.

    Raises ``SystemExit`` with a message for a person when it cannot start: a peer of that name
    already running here, a bad name, a device that is not available, or bad labels.
    """
    name = name or socket.gethostname()
    try:
        torch_device = trainer.resolve_device(device)
    except ValueError as exc:
        raise SystemExit(f"--device {device}: {exc}") from None
    try:
        specs = await asyncio.to_thread(collect_specs, torch_device, dict(labels or {}))
    except ValueError as exc:
        raise SystemExit(f"peer specs: {exc}") from None
    async with contextlib.AsyncExitStack() as stack:
        peer_id = stack.enter_context(hold_identity(Path(settings.state_dir), name, settings.peer_id))
        stack.enter_context(structlog.contextvars.bound_contextvars(peer_id=peer_id))
        nc = await bus.connect(settings, f"swarmtrain-peer {name}")
        stack.push_async_callback(_drain, nc)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        await Peer(settings, nc, js, peer_id, name, torch_device, specs, labels).serve(stop)
