"""The peer process: registers, beats presence, takes ``Train``/``Stop`` commands, trains off the loop.

``swarmtrain peer --nats URL [--name NAME] [--device auto|cpu|cuda]`` calls :func:`run`.

- Identity: ``<state_dir>/peers/<name>.id`` holds a stable id (``p`` + 16 hex digits), kept across
  restarts and ``flock``-ed while the peer runs, so two peers cannot share a name on one machine.
- Commands come from a durable pull consumer ``peer-<peer_id>`` on ``peer.<peer_id>.command``
  (stream ``COMMANDS``), created with ``DeliverPolicy.NEW``; a restarted peer resumes it and still
  gets what was sent while it was away. A command is acked as soon as it is taken.
- Training runs in a worker thread; per-epoch stats cross into the loop with
  ``call_soon_threadsafe`` and are appended as ``Heartbeat`` by a task, so NATS is only ever used
  from the event loop and presence beats never stall.
- ``Stop`` for the session being trained ends it at the next batch and **appends nothing**: the
  scheduler that sent it has already decided the session's fate, and the peer's presence beats go
  back to ``session_id=None``. A peer *shut down* mid-training (its ``stop`` event set) appends
  ``PeerFailed{reason: "peer shut down"}`` instead, so its session need not wait for missed beats.
- ``PeerDone`` / ``PeerFailed`` / ``Heartbeat`` carry deterministic event ids
  (``<session>.<peer>.done``, ``.failed``, ``.epoch<N>``): a retried append is deduplicated.
- What a ``Train`` runs is its strategy's, ``STRATEGIES[command.strategy]``
  (:mod:`swarmtrain.peer.strategies`): the peer fetches the dataset, hands the strategy a
  :class:`~swarmtrain.peer.strategies.JobContext`, and turns an exception into ``PeerFailed``;
  ``Stop`` and shutdown end every strategy the same way.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
import structlog
import torch
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api

from swarmtrain.common import blob, bus, events
from swarmtrain.common.events import (
    Event,
    PeerFailed,
    PeerRegistered,
    Presence,
    Stop,
    Train,
)
from swarmtrain.common.logging import get_logger
from swarmtrain.common.settings import Settings
from swarmtrain.peer import trainer
from swarmtrain.peer.data import DataError
from swarmtrain.peer.strategies import STRATEGIES, JobContext
from swarmtrain.peer.trainer import TrainingStopped

log = get_logger("swarmtrain.peer")

ID_RE = re.compile(r"^p[0-9a-f]{16}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
COMMAND_ACK_WAIT_S = 30.0
MAX_REASON = 500


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
    stop: threading.Event = field(default_factory=threading.Event)
    """Seen by the worker thread: training ends at its next batch."""
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    """Seen by the loop (a fedavg job waiting for its round to close): set together with ``stop``."""
    stop_reason: str | None = None
    """None while running; "stop" (a Stop command) or "shutdown" (the peer is going away)."""

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
        case blob.IntegrityError():
            reason = f"dataset sha256 mismatch ({exc})"
        case blob.BlobNotFound():
            reason = f"object not found: {exc.args[0] if exc.args else exc}"
        case DataError():
            reason = f"bad data: {exc}"
        case _:
            reason = f"{type(exc).__name__}: {exc}"
    return reason[:MAX_REASON]


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
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.peer_id = peer_id
        self.name = name
        self.device = device
        self.device_label = trainer.describe_device(device)
        self.state_dir = Path(settings.state_dir)
        self._job: _Job | None = None
        self._finished: set[str] = set()
        """Event ids of the Train commands this peer has run."""
        self._tasks: asyncio.TaskGroup | None = None

    @property
    def command_subject(self) -> str:
        return f"peer.{self.peer_id}.command"

    @property
    def current_session(self) -> str | None:
        return self._job.session_id if self._job else None

    async def serve(self, stop: asyncio.Event) -> None:
        # The consumer exists before the peer announces itself, so no command sent after the
        # announcement can be missed (DeliverPolicy.NEW applies only when it is first created).
        sub = await self.js.pull_subscribe(
            self.command_subject,
            durable=f"peer-{self.peer_id}",
            stream=bus.COMMANDS_STREAM,
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.NEW,
                ack_policy=api.AckPolicy.EXPLICIT,
                filter_subject=self.command_subject,
                ack_wait=COMMAND_ACK_WAIT_S,
            ),
        )
        await self._append(PeerRegistered(peer_id=self.peer_id, name=self.name, device=self.device_label))
        log.info("peer started", name=self.name, device=self.device_label)
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                tasks.create_task(self._beat(stop), name="presence")
                commands = tasks.create_task(self._take_commands(sub), name="commands")
                await stop.wait()
                commands.cancel()
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

    # ---------------------------------------------------------------- presence

    async def _beat(self, stop: asyncio.Event) -> None:
        interval = self.settings.presence_interval_s
        while not stop.is_set():
            presence = Presence(
                peer_id=self.peer_id,
                name=self.name,
                device=self.device_label,
                session_id=self.current_session,
            )
            try:
                await self.nc.publish(presence.subject, events.encode(presence))
            except nats.errors.Error as exc:
                log.warning("presence beat not sent", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval * random.uniform(0.9, 1.1))

    # ---------------------------------------------------------------- commands

    async def _take_commands(self, sub: JetStreamContext.PullSubscription) -> None:
        while True:
            try:
                batch = await bus.fetch(sub, events.decode_command, batch=8, timeout=1.0)
            except nats.errors.Error as exc:  # connection trouble: the client reconnects by itself
                log.warning("command fetch failed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            for msg, command in batch:
                try:
                    await msg.ack()
                except nats.errors.Error as exc:  # a redelivery is harmless: duplicates are ignored
                    log.warning("command ack failed", error=str(exc))
                match command:
                    case Train():
                        self._on_train(command)
                    case Stop():
                        self._on_stop(command)

    def _on_train(self, command: Train) -> None:
        sid = command.session_id
        # one job per Train command: a redelivered command is ignored, a new one for the same
        # session (its shard handed back to this peer) is not
        if self.current_session == sid or command.event_id in self._finished:
            log.info("duplicate Train ignored", session_id=sid)
            return
        if self._job is not None:
            log.warning("Train ignored: busy with another session", session_id=sid, busy_with=self.current_session)
            return
        assert self._tasks is not None
        job = _Job(command)
        self._job = job
        self._tasks.create_task(self._run_job(job), name=f"train-{sid}")

    def _on_stop(self, command: Stop) -> None:
        job = self._job
        if job is None or job.session_id != command.session_id:
            log.debug("Stop ignored: not training that session", session_id=command.session_id)
            return
        if job.stop_reason is None:
            log.info("stopping training", session_id=command.session_id)
            job.halt("stop")

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
        csv_path = await asyncio.to_thread(self._fetch_dataset, command)
        if job.stop.is_set():
            raise TrainingStopped("stopped before training began")
        context = JobContext(
            settings=self.settings,
            js=self.js,
            peer_id=self.peer_id,
            device=self.device,
            dataset=csv_path,
            append=self._append,
            stop=job.stop,
            stopped=job.stopped,
        )
        await STRATEGIES[command.strategy](command, context)

    async def _fail(self, command: Train, reason: str) -> None:
        log.warning("training failed", reason=reason)
        await self._append(
            PeerFailed(
                event_id=f"{command.session_id}.{self.peer_id}.failed",
                session_id=command.session_id,
                peer_id=self.peer_id,
                reason=reason,
            )
        )

    async def _append(self, event: Event, attempts: int = 5) -> bool:
        """Append with retries (safe: event ids deduplicate); False, logged, if it never got through."""
        for attempt in range(1, attempts + 1):
            try:
                await bus.append(self.js, event)
                return True
            except nats.errors.Error as exc:
                if attempt == attempts:
                    log.error("event not appended", event_type=type(event).__name__, error=str(exc))
                    return False
                log.warning("append failed; retrying", event_type=type(event).__name__, error=str(exc))
                await asyncio.sleep(min(0.25 * 2**attempt, 5.0))
        return False

    # ---------------------------------------------------------------- blocking helpers (threads)

    def _fetch_dataset(self, command: Train) -> Path:
        """The dataset as a local file, cached by sha256 (checked on download)."""
        sha256 = command.dataset_sha256.lower()
        if not SHA256_RE.match(sha256):
            raise DataError(f"dataset_sha256 is not a sha256 hex digest: {command.dataset_sha256[:80]!r}")
        path = self.state_dir / "cache" / "datasets" / f"{sha256}.csv"
        if not path.is_file():
            store, key = blob.resolve(command.dataset_uri, self.settings)
            store.download(key, path, sha256=sha256)
        return path


# ------------------------------------------------------------------ entry point


async def _drain(nc: NATS) -> None:
    if not nc.is_closed:
        await nc.drain()


async def run(settings: Settings, stop: asyncio.Event, name: str | None = None, device: str = "auto") -> None:
    """Run a peer until ``stop`` is set.

    Raises ``SystemExit`` with a message for a person when it cannot start: a peer of that name
    already running here, a bad name, or a device that is not available.
    """
    name = name or socket.gethostname()
    try:
        torch_device = trainer.resolve_device(device)
    except ValueError as exc:
        raise SystemExit(f"--device {device}: {exc}") from None
    async with contextlib.AsyncExitStack() as stack:
        peer_id = stack.enter_context(hold_identity(Path(settings.state_dir), name, settings.peer_id))
        stack.enter_context(structlog.contextvars.bound_contextvars(peer_id=peer_id))
        nc = await bus.connect(settings, f"swarmtrain-peer {name}")
        stack.push_async_callback(_drain, nc)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        await Peer(settings, nc, js, peer_id, name, torch_device).serve(stop)
