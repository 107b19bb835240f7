"""Light fake peers: they register, beat presence, take ``Train`` and 'train' instantly (no torch).

Like a real peer they only *report* (``bus.report`` on ``peer.<id>.reports``: registration, the
last ``Heartbeat``, ``PeerDone``) and the scheduler checks each report and appends its fact. The
model a ``PeerDone`` names is a real model file (``model_file``: an untrained MLP for the
dataset, the same bytes for every run), written into the stack's file store at the ``Train``'s
``output_uri``, so the scheduler's evaluation of the winner passes and a sweep session
*completes*. (A real peer PUTs it through its signed URL; the simulator writes the folder directly.)

Two ways to take commands:

- ``durable``: one durable pull consumer per peer on ``peer.<id>.command``, fetched and acked as the
  real peer does (``swarmtrain.peer.service``). For a handful of peers.
- ``core``: one wildcard core subscription on ``peer.*.command`` for the whole swarm (a JetStream
  publish reaches core subscribers too). For a thousand peers in one process: 1,000 pull loops
  would measure the simulator, not the platform. The scheduler cannot tell the difference.

Every ``Train`` receipt is timed (``time.perf_counter``) per (session, peer).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from swarmtrain.common import blob, bus, events
from swarmtrain.common.events import DataSpec, Heartbeat, ModelSpec, PeerDone, PeerRegistered, Presence, Train
from swarmtrain.common.models import MlpSpec


def model_file(dataset: Path, spec: ModelSpec | None = None, label_column: str = "label") -> bytes:
    """The bytes of an untrained model of ``spec`` for the CSV ``dataset``: what a fake peer's
    ``PeerDone`` names (the scheduler loads and evaluates it as a real peer's)."""
    from swarmtrain.training.data import load
    from swarmtrain.training.model import ModelMetadata, build_model, model_bytes

    spec = spec or MlpSpec()
    data = load(dataset, DataSpec(), label_column)
    model = build_model(spec, data.features.shape[1], len(data.classes))
    meta = ModelMetadata.for_spec(
        spec, classes=list(data.classes), feature_names=list(data.feature_names), label_column=label_column
    )
    return model_bytes(model, meta)


class FakeSwarm:
    def __init__(
        self,
        nc: NATS,
        n: int,
        *,
        mode: str = "durable",
        train_s: Callable[[], float] = lambda: 0.0,
        presence_interval_s: float = 1.0,
        prefix: str = "",
        store: blob.FileStore | None = None,
        model: bytes = b"",
        answer: bool = True,
    ) -> None:
        """``store`` and ``model``: where and what the ``PeerDone``'s model file is written (without
        them the model named does not exist: the scheduler's evaluation refuses it and the session
        fails); ``answer=False``: no ``Train`` is answered (the runs train until stopped)."""
        self.nc, self.js = nc, nc.jetstream()
        self.store, self.model = store, model
        self.model_sha256 = hashlib.sha256(model).hexdigest() if model else "0" * 64
        self.answer = answer
        self.mode = mode
        self.train_s = train_s
        self.interval = presence_interval_s
        self.peer_ids = [f"p{prefix}{i:0{16 - len(prefix)}x}" for i in range(n)]
        self.received: dict[str, dict[str, float]] = defaultdict(dict)
        """session_id -> peer_id -> perf_counter() when its Train arrived."""
        self.arrived = asyncio.Condition()
        self.no_reply: set[str] = set()
        """Sessions whose Train is timed but not answered (the floor's own commands)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[JetStreamContext.PullSubscription] = []
        self._core: Subscription | None = None
        self._jobs: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.mode == "durable":
            for peer_id in self.peer_ids:
                subject = f"peer.{peer_id}.command"
                sub = await self.js.pull_subscribe(
                    subject,
                    durable=f"peer-{peer_id}",
                    stream=bus.COMMANDS_STREAM,
                    config=api.ConsumerConfig(
                        deliver_policy=api.DeliverPolicy.NEW, ack_policy=api.AckPolicy.EXPLICIT, filter_subject=subject
                    ),
                )
                self._subs.append(sub)
                self._tasks.append(asyncio.create_task(self._pull(sub)))
        else:
            self._core = await self.nc.subscribe("peer.*.command", cb=self._on_core)
        for i in range(0, len(self.peer_ids), 200):
            await asyncio.gather(
                *(
                    bus.report(self.js, PeerRegistered(peer_id=p, name=f"fake-{p}", device="cpu"))
                    for p in self.peer_ids[i : i + 200]
                )
            )
        self._tasks.append(asyncio.create_task(self._beat()))

    async def close(self) -> None:
        for task in [*self._tasks, *self._jobs]:
            task.cancel()
        for task in [*self._tasks, *self._jobs]:
            with contextlib.suppress(asyncio.CancelledError, nats.errors.Error):
                await task
        for sub in self._subs:  # before the connection drains, or the drain waits on them
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if self._core is not None:
            await self._core.unsubscribe()

    async def _beat(self) -> None:
        """Every peer beats once per interval, spread evenly over it."""
        beats = [events.encode(Presence(peer_id=p, name=f"fake-{p}", device="cpu")) for p in self.peer_ids]
        subjects = [f"peer.{p}.presence" for p in self.peer_ids]
        slices = 20
        while True:
            for s in range(slices):
                for i in range(s, len(beats), slices):
                    await self.nc.publish(subjects[i], beats[i])
                await asyncio.sleep(self.interval / slices)

    async def _pull(self, sub: JetStreamContext.PullSubscription) -> None:
        while True:
            try:
                batch = await bus.fetch(sub, events.decode_command, batch=8, timeout=1.0)
            except nats.errors.Error:
                await asyncio.sleep(0.1)
                continue
            for msg, command in batch:
                await msg.ack()
                await self._on_command(command)

    async def _on_core(self, msg: Msg) -> None:
        await self._on_command(events.decode_command(msg.data))

    async def _on_command(self, command: events.Command) -> None:
        if not isinstance(command, Train):
            return
        now = time.perf_counter()
        async with self.arrived:
            self.received[command.session_id][command.peer_id] = now
            self.arrived.notify_all()
        if self.answer and command.session_id not in self.no_reply:
            job = asyncio.create_task(self._train(command))
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)

    async def _train(self, command: Train) -> None:
        delay = self.train_s()
        if delay > 0:
            await asyncio.sleep(delay)
        sid, peer_id = command.session_id, command.peer_id
        epochs = command.hyperparameters.epochs
        if self.store is not None and self.model:  # off the loop: it times the other peers' arrivals
            await asyncio.to_thread(self.store.put_bytes, self.store.key_of(command.output_uri), self.model)
        await bus.report(
            self.js,
            Heartbeat(
                event_id=f"{sid}.{peer_id}.epoch{epochs}",
                session_id=sid,
                peer_id=peer_id,
                epoch=epochs,
                epochs=epochs,
                loss=0.5,
                accuracy=0.8,
                val_loss=0.6,
                val_accuracy=random.random() * 0.01,
                samples_per_s=1e5,
            ),
        )
        await bus.report(
            self.js,
            PeerDone(
                event_id=f"{sid}.{peer_id}.done",
                session_id=sid,
                peer_id=peer_id,
                model_uri=command.output_uri,
                model_sha256=self.model_sha256,
                epochs=epochs,
                loss=0.5,
                accuracy=0.8,
                val_loss=0.6,
                val_accuracy=0.0,  # claims nothing: the first model the scheduler measures wins
                train_seconds=delay,
            ),
        )

    async def wait_trains(self, session_id: str, n: int, timeout: float = 30.0) -> list[float]:
        """The arrival times of ``n`` peers' ``Train`` for ``session_id``."""
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: len(self.received.get(session_id, {})) >= n)
        return list(self.received[session_id].values())
