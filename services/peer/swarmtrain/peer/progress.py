"""Training runs in a worker thread; its per-epoch figures become ``Heartbeat`` events on the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from swarmtrain.common.events import Heartbeat
from swarmtrain.peer.trainer import EpochStats

T = TypeVar("T")


def heartbeat(session_id: str, peer_id: str, stats: EpochStats, trial: tuple[int, str] | None = None) -> Heartbeat:
    """The epoch's event; its id is fixed by (session, peer, epoch), so a retried append is stored
    once; ``trial``: a search's (trial, the id of its ``Train``), which the id extends."""
    return Heartbeat(
        event_id=f"{session_id}.{peer_id}.epoch{stats.epoch}" if trial is None else f"{trial[1]}.epoch{stats.epoch}",
        session_id=session_id,
        peer_id=peer_id,
        trial=None if trial is None else trial[0],
        epoch=stats.epoch,
        epochs=stats.epochs,
        loss=stats.loss,
        accuracy=stats.accuracy,
        val_loss=stats.val_loss,
        val_accuracy=stats.val_accuracy,
        samples_per_s=stats.samples_per_s,
        precision=stats.precision,
        figures=dict(stats.figures),
    )


async def train_reporting(
    work: Callable[[Callable[[EpochStats], None]], T], report: Callable[[EpochStats], Awaitable[object]]
) -> T:
    """Run blocking ``work(on_epoch)`` in a worker thread, never on the loop; each epoch's figures
    reach ``report`` on the loop, in order, and all of them before this returns."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[EpochStats | None] = asyncio.Queue()

    def on_epoch(stats: EpochStats) -> None:  # runs in the worker thread
        loop.call_soon_threadsafe(queue.put_nowait, stats)

    async def publish() -> None:
        while (stats := await queue.get()) is not None:
            await report(stats)

    publisher = asyncio.create_task(publish(), name="heartbeats")
    try:
        return await asyncio.to_thread(work, on_epoch)
    finally:
        # every on_epoch callback was scheduled before the thread's result was, so the sentinel
        # goes in after the last epoch's figures: heartbeats all precede what the caller does next
        queue.put_nowait(None)
        await publisher
