"""How a peer trains, one module a strategy, behind one small interface: :class:`JobContext`.

A strategy module has a single entry point::

    async def run(command: Train, ctx: JobContext) -> None

It trains what ``command`` asks for and reports what the strategy has to say (``Heartbeat``,
``ModelUpdatePublished``, ``PeerDone``, ...) through ``ctx.report``, on the peer's own reports
subject (never on a session's events: the scheduler checks each report and writes the fact). It
reads and writes blobs only through the signed URLs of its ``Train`` and of the forwarded facts
(``ctx.facts.urls``), with ``ctx.download`` / ``ctx.upload``: the peer holds no storage credential.
It returns once its work is done, raises ``TrainingStopped`` when ``ctx.stop`` ended it (it then
reports nothing more), or raises any other exception, which the peer turns into ``PeerFailed``.
Registration, presence, the command consumer, ``Stop`` and ``PeerFailed`` belong to the peer
(:mod:`swarmtrain.peer.service`), never to a strategy.

The registry :data:`STRATEGIES` is keyed by the contract's name of the strategy
(``events.Strategy``): adding a strategy is adding ``<name>.py`` beside this file with its ``run``
registered (``@STRATEGIES.register("<name>")``), importing it in the package's ``__init__``, and
its test in ``tests/peer/strategies/``.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import torch

from swarmtrain.common import blobkeys, signing
from swarmtrain.common.blob import BlobRef, MiB
from swarmtrain.common.events import CheckpointSaved, Report, Train
from swarmtrain.common.logging import get_logger
from swarmtrain.common.registry import Registry
from swarmtrain.common.settings import Settings, get_settings
from swarmtrain.peer.facts import SessionFacts
from swarmtrain.peer.progress import heartbeat, train_reporting
from swarmtrain.peer.trainer import Checkpointed, EpochStats
from swarmtrain.training import tensorfile
from swarmtrain.training.averaging import Tensors
from swarmtrain.training.data import DataError

T = TypeVar("T")


log = get_logger("swarmtrain.peer")
TRANSFER_BACKOFF_S = 0.25
"""The first pause between two tries of a transfer; doubled each time, up to ``TRANSFER_BACKOFF_MAX_S``."""
TRANSFER_BACKOFF_MAX_S = 4.0


ReportFn = Callable[[Report], Awaitable[None]]
"""The peer's report: retried with backoff (event ids deduplicate) for as long as the peer runs."""


def _transient(exc: BaseException) -> bool:
    """A transfer error worth another try: the network, or the server's fault (5xx)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)


def with_retries(what: str, work: Callable[[], T], url: str | None = None, budget_s: float | None = None) -> T:
    """``work()``, tried again (blocking, with a jittered exponential backoff) after a transient
    transfer error, for ``budget_s`` (default ``SWARMTRAIN_TRANSFER_RETRY_S``: longer than a
    supervised restart of the gateway or the object store) but never past ``url``'s expiry."""
    budget = get_settings().transfer_retry_s if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    expires = None if url is None else signing.url_expiry(url)
    delay = TRANSFER_BACKOFF_S
    attempt = 0
    while True:
        attempt += 1
        try:
            return work()
        except Exception as exc:
            if not _transient(exc):
                raise
            pause = delay * random.uniform(0.8, 1.2)
            left = deadline - time.monotonic()
            if expires is not None:
                left = min(left, expires - time.time())
            if left < pause:
                log.warning("transfer failed; no more tries", what=what, attempts=attempt, error=str(exc))
                raise
            log.warning("transfer failed; retrying", what=what, attempt=attempt, in_s=round(pause, 2), error=str(exc))
            time.sleep(pause)
            delay = min(delay * 2, TRANSFER_BACKOFF_MAX_S)


@dataclass(frozen=True, kw_only=True)
class JobContext:
    """What the peer hands a strategy for one ``Train`` command."""

    settings: Settings
    peer_id: str
    device: torch.device
    dataset: Path
    """The command's dataset as a local file, already fetched and checked against its sha256."""
    report: ReportFn
    facts: SessionFacts
    """The session's facts as the scheduler forwards them (fedavg follows its rounds there)."""
    stop: threading.Event
    """Seen by worker threads: set, training ends at its next batch (``TrainingStopped``)."""
    stopped: asyncio.Event
    """Seen by the loop: set together with ``stop``, so a strategy waiting on a fact wakes up."""
    validation: Path | None = None
    """The session's own validation set as a local file (checked like the dataset); None: the split."""

    @property
    def max_download_bytes(self) -> int:
        """The cap of every download (``SWARMTRAIN_BLOB_MAX_DOWNLOAD_MB``)."""
        return self.settings.blob_max_download_mb * MiB

    @property
    def tmp_dir(self) -> Path:
        path = Path(self.settings.state_dir) / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def download(self, url: str, dest: Path, sha256: str | None, max_bytes: int | None = None) -> BlobRef:
        """Blocking: ``url`` to ``dest``, capped (default ``max_download_bytes``) and checked against
        ``sha256``; transient failures are tried again."""
        cap = self._cap(max_bytes)
        return with_retries("download", lambda: signing.fetch_url(url, dest, cap, sha256), url)

    def download_bytes(
        self, url: str, sha256: str | None, max_bytes: int | None = None, client: httpx.Client | None = None
    ) -> bytes:
        """Blocking: ``url``'s body in memory, capped and checked as :meth:`download` does;
        ``client`` (``signing.new_client``) reuses its connections across calls."""
        cap = self._cap(max_bytes)
        return with_retries("download", lambda: signing.fetch_bytes(url, cap, sha256, client), url)

    def upload(self, url: str, source: Path | bytes, client: httpx.Client | None = None) -> BlobRef:
        """Blocking: ``source`` (a file or bytes) PUT to the signed ``url``; transient failures are
        tried again."""
        if not url:
            raise ValueError("the Train carries no URL to write this object to")
        return with_retries("upload", lambda: signing.put_url(url, source, client), url)

    async def fetch_init(self, command: Train) -> Tensors | None:
        """The command's starting model's tensors (``Train.init_url``, its sha256 checked), or None
        when it trains from seeded weights."""
        if not command.init_uri:
            return None
        if not command.init_url or not command.init_sha256:
            raise DataError("the Train names a starting model but carries no signed URL or sha256 for it")

        def fetch() -> Tensors:
            fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".safetensors")
            os.close(fd)
            tmp = Path(name)
            try:
                self.download(command.init_url, tmp, command.init_sha256)
                try:
                    return tensorfile.loads(tmp.read_bytes())
                except Exception as exc:  # untrusted bytes
                    raise DataError(f"the starting model is not a safetensors file: {type(exc).__name__}") from None
            finally:
                tmp.unlink(missing_ok=True)

        return await asyncio.to_thread(fetch)

    async def fetch_checkpoint(self, command: Train) -> bytes | None:
        """The checkpoint the command resumes from (``Train.resume_url``, its sha256 checked), or
        None when it starts at epoch 1."""
        if not command.resume_uri:
            return None
        if not command.resume_url or not command.resume_sha256:
            raise DataError("the Train names a checkpoint but carries no signed URL or sha256 for it")
        return await asyncio.to_thread(self.download_bytes, command.resume_url, command.resume_sha256)

    def checkpointing(self, command: Train, loop: asyncio.AbstractEventLoop) -> Checkpointed | None:
        """The trainer's ``on_checkpoint`` for ``command`` (None when it saves none): in the worker
        thread, PUT the epoch's bytes to its signed URL, then report ``CheckpointSaved`` and wait
        until it went out. A checkpoint that cannot be stored is skipped (logged): the run goes on."""
        if not command.checkpoint_urls or not command.checkpoints_uri:
            return None

        def save(epoch: int, data: bytes) -> None:
            url = command.checkpoint_urls.get(epoch)
            if not url:
                return
            try:
                ref = self.upload(url, data)
            except Exception as exc:
                log.warning("checkpoint not stored", epoch=epoch, error=type(exc).__name__)
                return
            saved = CheckpointSaved(
                event_id=f"{command.event_id}.checkpoint{epoch}",
                session_id=command.session_id,
                peer_id=self.peer_id,
                trial=command.trial,
                epoch=epoch,
                uri=blobkeys.checkpoint_uri(command.checkpoints_uri, epoch),
                sha256=ref.sha256,
                nbytes=len(data),
            )

            async def send() -> None:
                await self.report(saved)

            asyncio.run_coroutine_threadsafe(send(), loop).result()

        return save

    def _cap(self, max_bytes: int | None) -> int:
        return self.max_download_bytes if max_bytes is None else min(max_bytes, self.max_download_bytes)

    async def train_reporting(
        self,
        command: Train,
        work: Callable[[Callable[[EpochStats], None]], T],
        *,
        after_stop: bool = True,
    ) -> T:
        """The heartbeat bridge: run blocking ``work(on_epoch)`` in a worker thread; each epoch's
        figures are reported as this job's ``Heartbeat``, in order, all before this returns.

        ``after_stop=False``: epochs that end once the job is stopping are not reported.
        """

        async def report(stats: EpochStats) -> None:
            if after_stop or not self.stopped.is_set():
                trial = None if command.trial is None else (command.trial, command.event_id)
                await self.report(heartbeat(command.session_id, self.peer_id, stats, trial))

        return await train_reporting(work, report)


RunStrategy = Callable[[Train, JobContext], Awaitable[None]]
"""A strategy's entry point: ``async def run(command, ctx)``."""

STRATEGIES: Registry[RunStrategy] = Registry("peer strategy")
"""The contract's strategy name -> its ``run``; each module registers its own."""
