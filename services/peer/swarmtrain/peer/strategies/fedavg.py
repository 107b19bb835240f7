"""A peer's part in a fedavg session: local rounds on its shard, averaging what ``RoundClosed`` names.

:func:`run` is the strategy's entry point (see :mod:`swarmtrain.peer.strategies`). Two halves.
:class:`LocalLearner` is blocking torch work, run in a worker thread; nothing in it touches the loop
or the network. :class:`FedavgRun` is the round protocol on the event loop; the averaging itself is
the pure :mod:`swarmtrain.peer.averaging`:

1. Load the dataset, split train/validation as a sweep does, take shard ``shard`` of
   ``num_shards`` of the training rows; fit ``Standardize`` on the *whole* training split and build
   the model from ``torch.manual_seed(seed)``, so every peer starts from identical weights.
2. ``start_round > 1`` (a reassigned shard, a late joiner): rebuild the average of round
   ``start_round - 1`` from its ``RoundClosed`` and the blobs, exactly as every peer computed it
   (walking further back while a round had no acceptable update).
3. Per round ``r``: ``hyperparameters.epochs`` local epochs (a ``Heartbeat`` each, ``epoch``
   counted over the whole session); upload ``<rounds_uri>/<r>/<peer_id>.safetensors``; append
   ``ModelUpdatePublished``; wait for ``RoundClosed{r}``; average exactly the updates it names,
   appending ``UpdateRejected`` for each refused one; with none acceptable keep the round-start
   weights; upload ``<rounds_uri>/<r>/average.safetensors`` (identical bytes on every peer) and
   append ``RoundAveraged`` with the average's figures on the whole validation split.
4. After the last round: the final average as a model file at ``output_uri`` (identical bytes on
   every peer) and ``PeerDone`` with its figures on the whole training and validation splits.

Local training is a pure function of (round-start weights, seed, shard, round): a fresh Adam per
round and a shuffle generator seeded from (seed, shard, round). So a peer that takes over a shard
trains it exactly as its first owner would have, and a round can be recomputed from the log.

The protocol reads ``session.<sid>.events`` from its start through an ordered consumer held for the
whole job. It ends quietly (``TrainingStopped``, nothing more appended) on ``Stop``, on peer
shutdown, when the session ended, or when a ``RoundClosed`` leaves this peer out (it was too late:
the scheduler has marked it failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import nats.errors
import nats.js.errors
import torch
from nats.js import JetStreamContext, api
from torch import nn

from swarmtrain.common import blob, bus, events, subjects
from swarmtrain.common.events import (
    Event,
    ModelUpdatePublished,
    PeerDone,
    RoundAveraged,
    RoundClosed,
    RoundUpdate,
    SessionCancelled,
    SessionCompleted,
    SessionFailed,
    Train,
    UpdateRejected,
)
from swarmtrain.common.logging import get_logger
from swarmtrain.peer.averaging import Tensors, UpdateUnavailable, average_round, sha256_hex, state_bytes
from swarmtrain.peer.data import DataError, shard_indices
from swarmtrain.peer.model import ModelMetadata, Standardize, model_bytes
from swarmtrain.peer.trainer import (
    EpochStats,
    TrainingStopped,
    TrainJob,
    evaluate,
    load_data,
    metadata_for,
    resolve_device,
    run_epoch,
    seeded_model,
)

if TYPE_CHECKING:
    from swarmtrain.peer.strategies import JobContext

log = get_logger("swarmtrain.peer.fedavg")
T = TypeVar("T")

FETCH_ATTEMPTS = 3
HEADER_ALLOWANCE = 1 << 20
"""How much larger than this model's own weights file an update may be before it is refused unread."""


def round_seed(seed: int, shard: int, round_: int) -> int:
    """The shuffle seed of ``shard``'s local epochs in ``round_``: the same for whoever trains it."""
    digest = hashlib.sha256(f"swarmtrain-fedavg/{seed}/{shard}/{round_}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def update_uri(rounds_uri: str, round_: int, peer_id: str) -> str:
    return f"{rounds_uri.rstrip('/')}/{round_}/{peer_id}.safetensors"


def average_uri(rounds_uri: str, round_: int) -> str:
    return f"{rounds_uri.rstrip('/')}/{round_}/average.safetensors"


def check_command(command: Train) -> None:
    """A DataError for a fedavg ``Train`` no peer could follow."""
    if not command.rounds_uri:
        raise DataError("a fedavg Train needs rounds_uri")
    if command.rounds < 1 or not 1 <= command.start_round <= command.rounds:
        raise DataError(f"start_round {command.start_round} is not within rounds 1..{command.rounds}")
    if command.num_shards < 1 or not 0 <= command.shard < command.num_shards:
        raise DataError(f"shard {command.shard} of {command.num_shards} does not exist")


# ------------------------------------------------------------------ torch (worker thread)


@dataclass(frozen=True, kw_only=True)
class RoundStats:
    loss: float
    """Mean local training loss of the round's last epoch (running)."""
    accuracy: float
    """Local training accuracy of the round's last epoch (running)."""


class LocalLearner:
    """One peer's model and data for a fedavg session. Blocking: call it from a worker thread."""

    def __init__(self, csv_path: Path, command: Train, device: str = "cpu", torch_threads: int = 0) -> None:
        check_command(command)
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.command = command
        self.device = resolve_device(device)
        job = TrainJob(
            csv_path=csv_path,
            label_column=command.label_column,
            model=command.model,
            hyperparameters=command.hyperparameters,
            validation_split=command.validation_split,
            seed=command.seed,
        )
        data, train_idx, val_idx = load_data(job)
        shard = shard_indices(train_idx, command.num_shards, command.shard, command.seed)
        self.num_samples = len(shard)
        self.metadata: ModelMetadata = metadata_for(command.model, data)

        self.model: nn.Sequential = seeded_model(command.model, data.features.shape[1], len(data.classes), command.seed)
        standardize = self.model[0]
        assert isinstance(standardize, Standardize)
        standardize.fit(data.features[train_idx])  # the whole training split: the same on every peer
        self.reference: Tensors = self.state()
        """The initial weights: every update must have their names, shapes and dtypes."""

        self.model.to(self.device)
        self.x_shard, self.y_shard = data.features[shard].to(self.device), data.labels[shard].to(self.device)
        self.x_train, self.y_train = data.features[train_idx].to(self.device), data.labels[train_idx].to(self.device)
        self.x_val, self.y_val = data.features[val_idx].to(self.device), data.labels[val_idx].to(self.device)

    def state(self) -> Tensors:
        """The current weights, copied to the CPU."""
        return {name: t.detach().to("cpu").clone() for name, t in self.model.state_dict().items()}

    def load(self, tensors: Tensors) -> None:
        self.model.load_state_dict(tensors, strict=True)

    def train_round(self, round_: int, on_epoch: Callable[[EpochStats], None], stop: threading.Event) -> RoundStats:
        """The round's local epochs on the shard, from the current weights; raises ``TrainingStopped``."""
        hp = self.command.hyperparameters
        optimizer = torch.optim.Adam(self.model.parameters(), lr=hp.lr)
        shuffle = torch.Generator().manual_seed(round_seed(self.command.seed, self.command.shard, round_))
        loss = accuracy = 0.0
        for e in range(1, hp.epochs + 1):
            epoch = (round_ - 1) * hp.epochs + e
            loss, accuracy, seconds = run_epoch(
                self.model, optimizer, self.x_shard, self.y_shard, hp.batch_size, shuffle, stop, epoch
            )
            val_loss, val_accuracy = evaluate(self.model, self.x_val, self.y_val)
            on_epoch(
                EpochStats(
                    epoch=epoch,
                    epochs=self.command.rounds * hp.epochs,
                    loss=loss,
                    accuracy=accuracy,
                    val_loss=val_loss,
                    val_accuracy=val_accuracy,
                    samples_per_s=self.num_samples / max(seconds, 1e-9),
                    seconds=seconds,
                )
            )
        return RoundStats(loss=loss, accuracy=accuracy)

    def evaluate_val(self) -> tuple[float | None, float | None]:
        return evaluate(self.model, self.x_val, self.y_val)

    def evaluate_train(self) -> tuple[float | None, float | None]:
        return evaluate(self.model, self.x_train, self.y_train)

    def model_file(self) -> bytes:
        """The current weights as a model file (``load_model`` reads it); no peer-specific metadata."""
        return model_bytes(self.model, self.metadata)


# ------------------------------------------------------------------ the session's log


class SessionLog:
    """What this job needs from ``session.<sid>.events``, read from its start by an ordered consumer.

    The first ``RoundClosed`` (and ``RoundAveraged``) of a round in log order is the one that counts,
    so every reader agrees.
    """

    def __init__(self) -> None:
        self.closed: dict[int, RoundClosed] = {}
        self.averaged: dict[int, RoundAveraged] = {}
        self.ended: str | None = None
        self._changed = asyncio.Event()
        self._sub: JetStreamContext.PullSubscription | None = None
        self._pump: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    async def open(cls, js: JetStreamContext, session_id: str, peer_id: str) -> SessionLog:
        """Follow the session through this peer's one reader consumer on EVENTS, ``peer-<id>``.

        The name is fixed because a peer's NATS credential allows it that consumer only (filtered
        to a session's events); a peer follows one session at a time, so it recreates it per job.
        """
        reader = cls()
        name = f"peer-{peer_id}"
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(bus.EVENTS_STREAM, name)
        config = api.ConsumerConfig(
            name=name,
            filter_subject=subjects.session_events(session_id),
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=300.0,
        )
        await js.add_consumer(bus.EVENTS_STREAM, config)
        reader._sub = await js.pull_subscribe_bind(consumer=name, stream=bus.EVENTS_STREAM)
        reader._pump = asyncio.create_task(reader._read(reader._sub), name=f"session-log-{session_id}")
        return reader

    async def close(self) -> None:
        if self._pump is not None:
            # let the pending fetch finish rather than cancel it: a pull request cut short leaves
            # a late status message behind, and the connection's drain would wait on it
            self._closing = True
            await self._pump
            self._pump = None
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None

    async def _read(self, sub: JetStreamContext.PullSubscription) -> None:
        while not self._closing:
            try:
                batch = await bus.fetch(sub, events.decode_event, batch=256, timeout=0.5)
            except nats.errors.Error as exc:  # connection trouble: the client reconnects by itself
                log.warning("session log fetch failed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            for _, event in batch:
                self.observe(event)

    def observe(self, event: Event) -> None:
        match event:
            case RoundClosed():
                self.closed.setdefault(event.round, event)
            case RoundAveraged():
                self.averaged.setdefault(event.round, event)
            case SessionCompleted() | SessionFailed() | SessionCancelled():
                self.ended = self.ended or type(event).__name__
            case _:
                return
        self._changed.set()

    async def wait(self, ready: Callable[[], T | None], stopped: asyncio.Event) -> T:
        """Wait until ``ready()`` answers; ``TrainingStopped`` at once on ``stopped`` or the session's end."""
        while True:
            self._changed.clear()
            if stopped.is_set():
                raise TrainingStopped("stopped")
            if self.ended:
                raise TrainingStopped(f"the session ended ({self.ended})")
            value = ready()
            if value is not None:
                return value
            await _first_of(self._changed, stopped)


async def _first_of(*flags: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(flag.wait()) for flag in flags]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


# ------------------------------------------------------------------ the round protocol (event loop)


async def run(command: Train, ctx: JobContext) -> None:
    """The round protocol; returns after ``PeerDone`` or raises ``TrainingStopped``."""
    await FedavgRun(command, ctx).run()


class FedavgRun:
    """One fedavg job on one peer; :meth:`run` returns after ``PeerDone`` or raises ``TrainingStopped``."""

    def __init__(self, command: Train, ctx: JobContext) -> None:
        self.command = command
        self.ctx = ctx
        self.peer_id = ctx.peer_id
        self._append = ctx.append
        self.stop = ctx.stop
        """Seen by the worker thread: set, local training ends at its next batch."""
        self.stopped = ctx.stopped
        """Seen by the loop: set together with ``stop``."""
        self._log = SessionLog()
        self._started = time.perf_counter()

    @property
    def sid(self) -> str:
        return self.command.session_id

    async def run(self) -> None:
        cmd = self.command
        ctx = self.ctx
        learner = await asyncio.to_thread(LocalLearner, ctx.dataset, cmd, str(ctx.device), ctx.settings.torch_threads)
        self._go_on()
        self._log = await SessionLog.open(ctx.js, self.sid, self.peer_id)
        try:
            if cmd.start_round > 1:
                await self._catch_up(learner)
            for r in range(cmd.start_round, cmd.rounds + 1):
                await self._round(learner, r)
            await self._finish(learner)
        finally:
            await self._log.close()

    # ---------------------------------------------------------------- steps

    async def _catch_up(self, learner: LocalLearner) -> None:
        """Start from the average of round ``start_round - 1``, rebuilt as every peer built it."""
        for k in range(self.command.start_round - 1, 0, -1):
            closed = await self._closed(k)
            average, _ = await asyncio.to_thread(self._average, closed, learner.reference)
            if average is None:
                log.info("round had no acceptable update; looking one round further back", round=k)
                continue
            data = await asyncio.to_thread(state_bytes, average)
            stored = self._log.averaged.get(k)
            if stored is not None and stored.sha256 != sha256_hex(data):
                log.error("rebuilt average differs from the stored one", round=k, stored=stored.sha256)
            await asyncio.to_thread(learner.load, average)
            log.info("caught up from a round's average", round=k, sha256=sha256_hex(data))
            return
        log.info("no round had an acceptable update; starting from the initial weights")

    async def _round(self, learner: LocalLearner, r: int) -> None:
        cmd = self.command
        round_start = await asyncio.to_thread(learner.state)
        stats = await self._train_round(learner, r)

        # Too late (the round closed without us) means the scheduler has left us out: stop quietly.
        self._go_on(r)
        data = await asyncio.to_thread(lambda: state_bytes(learner.state()))
        uri = update_uri(cmd.rounds_uri, r, self.peer_id)
        ref = await asyncio.to_thread(self._put, uri, data)
        self._go_on(r)
        await self._append(
            ModelUpdatePublished(
                event_id=f"{self.sid}.r{r}.{self.peer_id}.update",
                session_id=self.sid,
                round=r,
                peer_id=self.peer_id,
                uri=ref.uri,
                sha256=ref.sha256,
                num_samples=learner.num_samples,
                loss=stats.loss,
                accuracy=stats.accuracy,
            )
        )

        closed = await self._closed(r)
        if self.peer_id in closed.left_out:
            raise TrainingStopped(f"left out of round {r}")
        average, rejected = await asyncio.to_thread(self._average, closed, learner.reference)
        self._go_on()
        for author, reason in rejected:
            log.warning("update rejected", round=r, author=author, reason=reason)
            await self._append(
                UpdateRejected(
                    event_id=f"{self.sid}.r{r}.{author}.rejected",
                    session_id=self.sid,
                    round=r,
                    peer_id=author,
                    reason=reason,
                    reported_by=self.peer_id,
                )
            )
        if average is None:
            log.warning("no acceptable update; keeping the round-start weights", round=r)
            average = round_start
        await asyncio.to_thread(learner.load, average)
        val_loss, val_accuracy = await asyncio.to_thread(learner.evaluate_val)
        data = await asyncio.to_thread(state_bytes, average)
        ref = await asyncio.to_thread(self._put, average_uri(cmd.rounds_uri, r), data)
        self._go_on()
        await self._append(
            RoundAveraged(
                event_id=f"{self.sid}.r{r}.averaged",
                session_id=self.sid,
                round=r,
                uri=ref.uri,
                sha256=ref.sha256,
                peer_id=self.peer_id,
                val_loss=val_loss,
                val_accuracy=val_accuracy,
            )
        )
        log.info(
            "round averaged", round=r, updates=len(closed.updates), rejected=len(rejected), val_accuracy=val_accuracy
        )

    async def _train_round(self, learner: LocalLearner, r: int) -> RoundStats:
        """The local epochs in a worker thread; their heartbeats are all appended when it returns."""
        return await self.ctx.train_reporting(
            self.command, lambda on_epoch: learner.train_round(r, on_epoch, self.stop), after_stop=False
        )

    async def _finish(self, learner: LocalLearner) -> None:
        cmd = self.command
        data = await asyncio.to_thread(learner.model_file)
        ref = await asyncio.to_thread(self._put, cmd.output_uri, data)
        loss, accuracy = await asyncio.to_thread(learner.evaluate_train)
        val_loss, val_accuracy = await asyncio.to_thread(learner.evaluate_val)
        self._go_on()
        await self._append(
            PeerDone(
                event_id=f"{self.sid}.{self.peer_id}.done",
                session_id=self.sid,
                peer_id=self.peer_id,
                model_uri=cmd.output_uri,
                model_sha256=ref.sha256,
                epochs=cmd.rounds * cmd.hyperparameters.epochs,
                loss=loss if loss is not None else float("nan"),
                accuracy=accuracy if accuracy is not None else 0.0,
                val_loss=val_loss,
                val_accuracy=val_accuracy,
                train_seconds=time.perf_counter() - self._started,
            )
        )
        log.info("fedavg done", val_accuracy=val_accuracy, model=cmd.output_uri, sha256=ref.sha256)

    async def _closed(self, round_: int) -> RoundClosed:
        """The round's ``RoundClosed``, once it is in the log."""
        return await self._log.wait(lambda: self._log.closed.get(round_), self.stopped)

    def _go_on(self, round_: int | None = None) -> None:
        """Raise ``TrainingStopped`` if this job must publish nothing more."""
        if self.stopped.is_set() or self.stop.is_set():
            raise TrainingStopped("stopped")
        if self._log.ended:
            raise TrainingStopped(f"the session ended ({self._log.ended})")
        if round_ is not None:
            closed = self._log.closed.get(round_)
            if closed is not None and all(u.peer_id != self.peer_id for u in closed.updates):
                raise TrainingStopped(f"round {round_} closed without this peer")

    # ---------------------------------------------------------------- blocking helpers (threads)

    def _average(self, closed: RoundClosed, reference: Tensors) -> tuple[Tensors | None, list[tuple[str, str]]]:
        limit = len(state_bytes(reference)) + HEADER_ALLOWANCE
        return average_round(
            closed, lambda update: self._fetch(update, limit), reference, rounds_uri=self.command.rounds_uri
        )

    def _fetch(self, update: RoundUpdate, limit: int) -> bytes:
        """An update's bytes; ``UpdateUnavailable`` when missing or larger than any update can be."""
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                store, key = self.ctx.blob(update.uri)
                chunks: list[bytes] = []
                size = 0
                for chunk in store.iter_chunks(key):
                    size += len(chunk)
                    if size > limit:
                        raise UpdateUnavailable(f"larger than {limit} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
            except ValueError as exc:  # an URI no store serves
                raise UpdateUnavailable(str(exc)) from None
            except (UpdateUnavailable, blob.BlobNotFound):
                raise
            except Exception as exc:
                if attempt == FETCH_ATTEMPTS:
                    raise
                log.warning("update download failed; retrying", uri=update.uri, error=str(exc))
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def _put(self, uri: str, data: bytes) -> blob.BlobRef:
        store, key = self.ctx.blob(uri)
        return store.put_bytes(key, data)
