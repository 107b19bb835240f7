"""How a peer trains, one module a strategy, behind one small interface.

A strategy module has a single entry point::

    async def run(command: Train, ctx: JobContext) -> None

It trains what ``command`` asks for and appends what the strategy publishes (``Heartbeat``,
``ModelUpdatePublished``, ``PeerDone``, ...) through ``ctx.append``. It returns once its work is
done, raises ``TrainingStopped`` when ``ctx.stop`` ended it (it then appends nothing more), or
raises any other exception, which the peer turns into ``PeerFailed``. Registration, presence, the
command consumer, ``Stop`` and ``PeerFailed`` belong to the peer (:mod:`swarmtrain.peer.service`),
never to a strategy.

The registry :data:`STRATEGIES` is keyed by the module's name, which is the contract's name of the
strategy (``events.Strategy``): adding a strategy is adding ``<name>.py`` here with its ``run``,
listing it in ``_MODULES``, and its test in ``tests/peer/strategies/``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, get_args

import torch
from nats.js import JetStreamContext

from swarmtrain.common import blob, events
from swarmtrain.common.events import Event, Train
from swarmtrain.common.settings import Settings
from swarmtrain.peer.progress import heartbeat, train_reporting
from swarmtrain.peer.strategies import fedavg, sweep  # they name JobContext for type checking only
from swarmtrain.peer.trainer import EpochStats

T = TypeVar("T")


class Append(Protocol):
    """The peer's append: retried (event ids deduplicate), False, logged, if it never got through."""

    def __call__(self, event: Event, attempts: int = ...) -> Awaitable[bool]: ...


@dataclass(frozen=True, kw_only=True)
class JobContext:
    """What the peer hands a strategy for one ``Train`` command."""

    settings: Settings
    js: JetStreamContext
    """JetStream, for a strategy that reads the session's log (fedavg follows its rounds)."""
    peer_id: str
    device: torch.device
    dataset: Path
    """The command's dataset as a local file, already fetched and checked against its sha256."""
    append: Append
    stop: threading.Event
    """Seen by worker threads: set, training ends at its next batch (``TrainingStopped``)."""
    stopped: asyncio.Event
    """Seen by the loop: set together with ``stop``, so a strategy waiting on the log wakes up."""

    def blob(self, uri: str) -> tuple[blob.BlobStore, str]:
        """The store that holds ``uri`` and its key (blocking I/O on it belongs in a thread)."""
        return blob.resolve(uri, self.settings)

    async def train_reporting(
        self,
        command: Train,
        work: Callable[[Callable[[EpochStats], None]], T],
        *,
        attempts: int = 5,
        after_stop: bool = True,
    ) -> T:
        """The heartbeat bridge: run blocking ``work(on_epoch)`` in a worker thread; each epoch's
        figures are appended as this job's ``Heartbeat``, in order, all before this returns.

        ``after_stop=False``: epochs that end once the job is stopping are not reported.
        """

        async def report(stats: EpochStats) -> None:
            if after_stop or not self.stopped.is_set():
                await self.append(heartbeat(command.session_id, self.peer_id, stats), attempts=attempts)

        return await train_reporting(work, report)


class PeerStrategy(Protocol):
    """A strategy module (modules satisfy this protocol): its name and its ``run``."""

    __name__: str

    async def run(self, command: Train, ctx: JobContext) -> None: ...


RunStrategy = Callable[[Train, JobContext], Awaitable[None]]


def _registry(modules: tuple[PeerStrategy, ...]) -> Mapping[str, RunStrategy]:
    found = {module.__name__.rpartition(".")[2]: module.run for module in modules}
    contract = set(get_args(events.Strategy))
    if set(found) != contract:
        raise ImportError(f"peer strategies {sorted(found)} differ from the contract's {sorted(contract)}")
    return found


_MODULES: tuple[PeerStrategy, ...] = (sweep, fedavg)
STRATEGIES: Mapping[str, RunStrategy] = _registry(_MODULES)
"""The contract's strategy name -> its ``run``."""
