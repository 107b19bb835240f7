"""A peer's part in a fedavg session: local rounds on its shard, averaging what ``RoundClosed`` names.

:func:`run` is the strategy's entry point (see :mod:`swarmtrain.peer.strategies`). Two halves.
:class:`LocalLearner` is blocking torch work, run in a worker thread; nothing in it touches the loop
or the network. :class:`FedavgRun` is the round protocol on the event loop; the averaging itself is
the pure :mod:`swarmtrain.training.averaging`:

1. Load the dataset, split train/validation as a sweep does, take shard ``shard`` of
   ``num_shards`` of the training rows; fit ``Standardize`` on the *whole* training split and build
   the model from ``torch.manual_seed(seed)``, so every peer starts from identical weights; with
   ``init_url`` (``init_from``, a fork) the session's starting model is loaded over them.
2. ``start_round > 1`` (a reassigned shard, a late joiner): rebuild the model after round
   ``start_round - 1`` from the ``RoundClosed`` facts the scheduler forwards and the blobs, exactly
   as every peer computed it (walking further back while a round had no acceptable update; with a
   norm bound, compression or an outer optimizer, forward from round 1, since each round then
   depends on its start, and the outer optimizer's state on every round before).
3. Per round ``r``: ``hyperparameters.epochs`` local epochs (a ``Heartbeat`` each, ``epoch``
   counted over the whole session); PUT ``<rounds_uri>/<r>/<peer_id>.safetensors`` through
   ``update_urls[r]``; report ``ModelUpdatePublished``; wait for the forwarded ``RoundClosed{r}``;
   average exactly the updates it names, reporting ``UpdateRejected`` for each refused one (wrong
   tensors, NaN/Inf, bad sha256, farther than ``max_update_norm`` from the round's start, or a uri
   the fact's ``urls`` do not sign: never fetched); with none acceptable keep the round-start
   weights. The updates are fetched and checked side by side, this peer's own taken from memory
   (the bytes it PUT, named by their sha256 in the fact). The average is loaded, measured on the
   validation split, and the next round starts at once; beside it, the average is PUT to
   ``<rounds_uri>/<r>/average.safetensors`` (identical bytes on every peer) through
   ``average_urls[r]`` and ``RoundAveraged`` reported with its figures, before the next round's
   update (or ``PeerDone``) is. ``round averaged`` in the log carries the peer's timing of each step
   (``ms``: serialize, upload, report, wait_closed, apply = fetch + verify + average, load, validate).
4. After the last round: the final average as a model file PUT to ``output_url`` (identical bytes
   on every peer) and ``PeerDone`` with its figures on the whole training and validation splits.

Every download goes through a signed URL, capped (this model's weights file plus an allowance, and
never more than ``SWARMTRAIN_BLOB_MAX_DOWNLOAD_MB``) and checked against the sha256 the fact names.

The session's round options travel in the ``Train`` whole (``round_options``): the update is
published as ``compression`` encodes it (the whole weights, or the delta from the round's start),
every named update is decoded from the round's start, aggregated with ``aggregator`` and stepped
with ``outer`` (whose state the peer carries from round to round, and a newcomer rebuilds by
walking the rounds from the first): :func:`rounds.apply_round`. The shard is cut by ``sharding``
(:mod:`swarmtrain.training.sharding`). ``RoundAveraged`` names the rule applied, the updates selected
and the round's bytes.

Local training is a pure function of (round-start weights, seed, shard, round): a fresh Adam per
round (unless ``keep_local_optimizer``) and a shuffle generator seeded from (seed, shard, round).
So a peer that takes over a shard trains it exactly as its first owner would have (with a kept
optimizer, its first round with a fresh one), and a round can be recomputed from the log.

The protocol reads no session events: it follows ``ctx.facts``, which the peer's command consumer
fills from the scheduler's ``SessionFact`` commands. It ends quietly (``TrainingStopped``, nothing
more reported) on ``Stop``, on peer shutdown, when the session ended, or when a ``RoundClosed``
leaves this peer out (it was too late: the scheduler has marked it failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from swarmtrain.common import blob, signing
from swarmtrain.common.blobkeys import average_uri, update_uri
from swarmtrain.common.events import (
    BYTE_VOCAB,
    CLASSIFICATION,
    ModelUpdatePublished,
    PeerDone,
    RoundAveraged,
    RoundClosed,
    RoundUpdate,
    Train,
    UpdateRejected,
)
from swarmtrain.common.logging import get_logger
from swarmtrain.common.models import DataShape
from swarmtrain.peer.strategies.base import STRATEGIES, JobContext
from swarmtrain.peer.trainer import (
    Amp,
    EpochStats,
    ShardJob,
    TrainingStopped,
    TrainJob,
    check_finite,
    epoch_figures,
    load_data,
    metadata_for,
    parse_shard,
    resolve_device,
    run_epoch,
)
from swarmtrain.training import tasks
from swarmtrain.training.averaging import Tensors, UpdateUnavailable, sha256_hex, state_bytes
from swarmtrain.training.compression import encode_update
from swarmtrain.training.data import DataError, scan
from swarmtrain.training.evaluation import EVAL_BATCH
from swarmtrain.training.init import apply_init, fitted_model, initial_model, seeded_model
from swarmtrain.training.model import ModelMetadata, model_bytes
from swarmtrain.training.optim import Steps, steps_per_epoch
from swarmtrain.training.outer import State
from swarmtrain.training.rounds import (
    RoundResult,
    Spent,
    apply_round,
    needs_start,
    replay_rounds,
    update_file,
)
from swarmtrain.training.sharding import make_shards, window_blocks

log = get_logger("swarmtrain.peer.fedavg")

HEADER_ALLOWANCE = 1 << 20
"""How much larger than this model's own weights file an update may be before it is refused unread."""
FETCH_WORKERS = 8
"""How many of a round's updates a peer fetches and checks side by side."""


def round_seed(seed: int, shard: int, round_: int) -> int:
    """The shuffle seed of ``shard``'s local epochs in ``round_``: the same for whoever trains it."""
    digest = hashlib.sha256(f"swarmtrain-fedavg/{seed}/{shard}/{round_}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_command(command: Train) -> None:
    """A DataError for a fedavg ``Train`` no peer could follow."""
    if not command.rounds_uri:
        raise DataError("a fedavg Train needs rounds_uri")
    if command.rounds < 1 or not 1 <= command.start_round <= command.rounds:
        raise DataError(f"start_round {command.start_round} is not within rounds 1..{command.rounds}")
    if command.num_shards < 1 or not 0 <= command.shard < command.num_shards:
        raise DataError(f"shard {command.shard} of {command.num_shards} does not exist")


def check_urls(command: Train) -> None:
    """A DataError for a fedavg ``Train`` without the signed URLs its rounds need to write."""
    missing = [r for r in range(command.start_round, command.rounds + 1) if not command.update_urls.get(r)]
    if missing or not command.output_url:
        raise DataError(f"the Train carries no signed URL for the update of rounds {missing} or the model")


# ------------------------------------------------------------------ torch (worker thread)


@dataclass(frozen=True, kw_only=True)
class RoundStats:
    loss: float
    """Mean local training loss of the round's last epoch (running)."""
    accuracy: float
    """Local training accuracy of the round's last epoch (running)."""


class LocalLearner:
    """One peer's model and data for a fedavg session. Blocking: call it from a worker thread."""

    def __init__(
        self,
        csv_path: Path,
        command: Train,
        device: str = "cpu",
        torch_threads: int = 0,
        init: Mapping[str, torch.Tensor] | None = None,
        validation_path: Path | None = None,
    ) -> None:
        check_command(command)
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.command = command
        self.device = resolve_device(device)
        self.amp = Amp.for_device(command.precision, self.device)  # refuses what the device cannot do
        job = TrainJob(
            csv_path=csv_path,
            label_column=command.label_column,
            data=command.data,
            model=command.model,
            hyperparameters=command.hyperparameters,
            validation_split=command.validation_split,
            seed=command.seed,
            validation_path=validation_path,
            validation_sha256=command.validation_sha256 or None,
        )
        self._job = job
        self._train_rows: tuple[torch.Tensor, torch.Tensor] | None = None
        """``shard``: the training rows and their labels, measured by a streamed pass (not held)."""
        self._train_windows: torch.Tensor | None = None
        """``shard`` of a corpus: the training windows, measured block by block (not held)."""
        self.metadata: ModelMetadata
        x_train: torch.Tensor | None = None
        y_train: torch.Tensor | None = None
        if command.data_read == "shard" and command.data.format == "text":  # a corpus: only its windows
            which = ShardJob(
                shard=command.shard, num_shards=command.num_shards, sharding=command.round_options.sharding
            )
            part = parse_shard(job, which)
            shape = DataShape(features=command.data.context, classes=0, task=command.data.task, vocab=BYTE_VOCAB)
            self.num_samples, self.histograms = len(part.rows), part.histograms
            self.metadata = ModelMetadata.for_spec(
                command.model, classes=[], feature_names=[], label_column="text", shape=shape
            )
            self.model = seeded_model(command.model, command.data.context, 0, command.seed, shape)
            x_shard, y_shard, x_val, y_val = part.x, part.y, part.x_val, part.y_val
            self._train_windows = part.train_idx
            self.task = tasks.task(command.data.task)
        elif command.data_read == "shard":
            which = ShardJob(
                shard=command.shard, num_shards=command.num_shards, sharding=command.round_options.sharding
            )
            part = parse_shard(job, which)
            self.num_samples = len(part.rows)
            self.histograms = part.histograms
            self.metadata = ModelMetadata.for_spec(
                command.model, classes=part.classes, feature_names=part.feature_names, label_column=part.label_column
            )
            n_features, n_classes = len(part.feature_names), len(part.classes)
            self.model = fitted_model(command.model, n_features, n_classes, part.mean, part.std, command.seed)
            x_shard, y_shard, x_val, y_val = part.x, part.y, part.x_val, part.y_val
            self._train_rows = (part.train_idx, part.train_labels)
            self.task = tasks.task(CLASSIFICATION)  # the gateway reads every other task whole
        else:  # a session from before DataRead: the whole dataset, as its peers read it
            data, train_idx, val_idx = load_data(job)
            sharding = make_shards(
                command.round_options.sharding, train_idx, data.labels, command.num_shards, command.seed
            )
            shard = sharding.shards[command.shard]
            self.num_samples = len(shard)
            self.histograms = sharding.histograms
            self.metadata = metadata_for(command.model, data)
            self.model = initial_model(command.model, data, train_idx, command.seed)
            x_shard, y_shard = data.features[shard], data.labels[shard]
            x_val, y_val = data.features[val_idx], data.labels[val_idx]
            x_train, y_train = data.features[train_idx], data.labels[train_idx]
            self.task = tasks.task(data.target)
        # self.histograms: every shard's rows per class index (the scheduler computes the same for label_skew)
        self._steps: Steps | None = None
        """The local optimizer kept from round to round (``keep_local_optimizer``)."""

        if init is not None:  # the session's starting model (init_from, a fork)
            apply_init(self.model, init)
        self.reference: Tensors = self.state()
        """The initial weights: every update must have their names, shapes and dtypes."""

        self.model.to(self.device)
        self.x_shard, self.y_shard = x_shard.to(self.device), y_shard.to(self.device)
        self.x_val, self.y_val = x_val.to(self.device), y_val.to(self.device)
        self.x_train = None if x_train is None else x_train.to(self.device)
        self.y_train = None if y_train is None else y_train.to(self.device)

    def state(self) -> Tensors:
        """The current weights, copied to the CPU."""
        return {name: t.detach().to("cpu").clone() for name, t in self.model.state_dict().items()}

    def load(self, tensors: Tensors) -> None:
        self.model.load_state_dict(tensors, strict=True)

    def train_round(self, round_: int, on_epoch: Callable[[EpochStats], None], stop: threading.Event) -> RoundStats:
        """The round's local epochs on the shard, from the current weights; raises ``TrainingStopped``."""
        hp = self.command.hyperparameters
        per_round = hp.epochs * steps_per_epoch(self.num_samples, hp)
        # The schedule runs over the whole session: round r's first step is step (r - 1) * per_round,
        # for a fresh optimizer as for a kept one.
        steps = self._steps or Steps(
            hp, self.model, total=self.command.rounds * per_round, step=(round_ - 1) * per_round, scaler=self.amp.scaler
        )
        if self.command.round_options.keep_local_optimizer:
            self._steps = steps  # loading an average copies into the same parameters
        shuffle = torch.Generator().manual_seed(round_seed(self.command.seed, self.command.shard, round_))
        loss = accuracy = 0.0
        for e in range(1, hp.epochs + 1):
            epoch = (round_ - 1) * hp.epochs + e
            loss, accuracy, seconds = run_epoch(
                self.model, steps, self.x_shard, self.y_shard, hp.batch_size, shuffle, stop, epoch, self.amp, self.task
            )
            measured = self.task.evaluate(self.model, self.x_val, self.y_val)
            val_loss, val_accuracy = measured.loss, measured.score
            check_finite(epoch, val_loss)
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
                    precision=self.amp.precision,
                    figures=epoch_figures(self.task, measured, self.num_samples / max(seconds, 1e-9), self.x_shard),
                )
            )
        return RoundStats(loss=loss, accuracy=accuracy)

    def evaluate_val(self) -> tuple[float | None, float | None]:
        measured = self.task.evaluate(self.model, self.x_val, self.y_val)
        return measured.loss, measured.score

    def evaluate_train(self) -> tuple[float | None, float | None]:
        """On the whole training split: held (``whole``), or read again block by block (``shard``)."""
        if self.x_train is not None and self.y_train is not None:
            measured = self.task.evaluate(self.model, self.x_train, self.y_train)
            return measured.loss, measured.score
        if self._train_windows is not None:  # a corpus's training windows, a block at a time
            return self._evaluate_windows(self._train_windows)
        assert self._train_rows is not None
        train_idx, train_labels = self._train_rows
        order = torch.argsort(train_idx)
        rows, labels = train_idx[order].numpy(), train_labels[order]
        job = self._job
        loss_sum, correct, done = 0.0, 0, 0
        self.model.eval()
        with torch.inference_mode():
            for got, block in scan(job.csv_path, job.data, job.label_column, rows):
                x = torch.from_numpy(block).to(self.device)
                y = labels[done : done + len(got)].to(self.device)
                done += len(got)
                for start in range(0, len(got), EVAL_BATCH):
                    logits = self.model(x[start : start + EVAL_BATCH])
                    yb = y[start : start + EVAL_BATCH]
                    loss_sum += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum").item())
                    correct += int((logits.argmax(dim=1) == yb).sum().item())
        if not done:
            return None, None
        return loss_sum / done, correct / done

    def _evaluate_windows(self, windows: torch.Tensor) -> tuple[float | None, float | None]:
        job = self._job
        loss_sum, score_sum, tokens = 0.0, 0.0, 0
        for x, y in window_blocks(job.csv_path, job.data, windows):
            measured = self.task.evaluate(self.model, x.to(self.device), y.to(self.device))
            if measured.loss is None or measured.score is None:
                continue
            n = int(y.numel())
            loss_sum, score_sum, tokens = loss_sum + measured.loss * n, score_sum + measured.score * n, tokens + n
        return (loss_sum / tokens, score_sum / tokens) if tokens else (None, None)

    def model_file(self) -> bytes:
        """The current weights as a model file (``load_model`` reads it); no peer-specific metadata."""
        return model_bytes(self.model, self.metadata)


# ------------------------------------------------------------------ the round protocol (event loop)


@STRATEGIES.register("fedavg")
async def run(command: Train, ctx: JobContext) -> None:
    """The round protocol; returns after ``PeerDone`` or raises ``TrainingStopped``."""
    await FedavgRun(command, ctx).run()


class FedavgRun:
    """One fedavg job on one peer; :meth:`run` returns after ``PeerDone`` or raises ``TrainingStopped``."""

    def __init__(self, command: Train, ctx: JobContext) -> None:
        self.command = command
        self.ctx = ctx
        self.peer_id = ctx.peer_id
        self._report = ctx.report
        self.facts = ctx.facts
        self.stop = ctx.stop
        """Seen by the worker thread: set, local training ends at its next batch."""
        self.stopped = ctx.stopped
        """Seen by the loop: set together with ``stop``."""
        self._started = time.perf_counter()
        self.options = command.round_options
        self.outer_state: State = {}
        """The outer optimizer's state after the last round applied (``{}`` before the first)."""
        self._own: tuple[str, str, bytes] | None = None
        """This peer's update of the current round: (uri, sha256, bytes), used instead of fetching it."""
        self._storing: asyncio.Task[None] | None = None
        """The last round's average being stored and reported while the next round trains."""
        self._http = signing.new_client()
        """Kept for the job's transfers: its connections are reused round after round."""

    @property
    def sid(self) -> str:
        return self.command.session_id

    async def run(self) -> None:
        cmd = self.command
        ctx = self.ctx
        check_urls(cmd)
        init = await ctx.fetch_init(cmd)
        learner = await asyncio.to_thread(
            LocalLearner, ctx.dataset, cmd, str(ctx.device), ctx.settings.torch_threads, init, ctx.validation
        )
        self._go_on()
        try:
            if cmd.start_round > 1:
                await self._catch_up(learner)
            for r in range(cmd.start_round, cmd.rounds + 1):
                await self._round(learner, r)
            await self._finish(learner)
        finally:
            await self._abandon_storing()
            await asyncio.to_thread(self._http.close)

    async def _abandon_storing(self) -> None:
        """A job ending early reports nothing more: an average still being stored is cancelled."""
        task, self._storing = self._storing, None
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ---------------------------------------------------------------- steps

    async def _catch_up(self, learner: LocalLearner) -> None:
        """Start from the model after round ``start_round - 1``, rebuilt as every peer built it.

        Where a round's result does not depend on its start (no compression, no norm bound, no
        outer optimizer), the walk goes back from the last round until one had an acceptable
        update. Otherwise it goes forward from round 1 and the initial weights, carrying the outer
        optimizer's state: the state a newcomer rebuilds from the log.
        """
        last = self.command.start_round - 1
        if not needs_start(self.options):
            for k in range(last, 0, -1):
                closed_k = await self._closed(k)
                result = await asyncio.to_thread(self._apply, closed_k, learner.reference, learner.reference)
                if result.aggregate is not None:
                    await self._adopt(learner, k, result.model)
                    return
                log.info("round had no acceptable update; looking one round further back", round=k)
            log.info("no round had an acceptable update; starting from the initial weights")
            return
        closed = {k: await self._closed(k) for k in range(1, last + 1)}
        limit = self._limit(learner.reference)
        weights, self.outer_state = await asyncio.to_thread(
            replay_rounds,
            closed,
            last,
            lambda update: self._fetch(update, limit),
            learner.reference,
            self.options,
            rounds_uri=self.command.rounds_uri,
            workers=FETCH_WORKERS,
        )
        await self._adopt(learner, last, weights)

    async def _adopt(self, learner: LocalLearner, k: int, average: Tensors) -> None:
        data = await asyncio.to_thread(state_bytes, average)
        stored = self.facts.averaged.get(k)
        if stored is not None and stored.sha256 != sha256_hex(data):
            log.error("rebuilt average differs from the stored one", round=k, stored=stored.sha256)
        await asyncio.to_thread(learner.load, average)
        log.info("caught up from a round's average", round=k, sha256=sha256_hex(data))

    async def _round(self, learner: LocalLearner, r: int) -> None:
        cmd = self.command
        round_start = await asyncio.to_thread(learner.state)
        stats = await self._train_round(learner, r)

        # Too late (the round closed without us) means the scheduler has left us out: stop quietly.
        self._go_on(r)
        clock = _Laps()
        data = await asyncio.to_thread(self._encode, learner, round_start)
        clock.lap("serialize")
        ref = await asyncio.to_thread(self._put, cmd.update_urls[r], data)
        clock.lap("upload")
        uri = update_uri(cmd.rounds_uri, r, self.peer_id)
        self._own = (uri, ref.sha256, data)
        await self._average_stored()  # the last round's RoundAveraged goes before this round's update
        self._go_on(r)
        await self._report(
            ModelUpdatePublished(
                event_id=f"{self.sid}.r{r}.{self.peer_id}.update",
                session_id=self.sid,
                round=r,
                peer_id=self.peer_id,
                uri=uri,
                sha256=ref.sha256,
                num_samples=learner.num_samples,
                loss=stats.loss,
                accuracy=stats.accuracy,
                nbytes=len(data),
            )
        )
        clock.lap("report")

        closed = await self._closed(r)
        closed_seen = time.time()
        clock.lap("wait_closed")
        if self.peer_id in closed.left_out:
            raise TrainingStopped(f"left out of round {r}")
        spent: Spent = {}
        result = await asyncio.to_thread(self._apply, closed, learner.reference, round_start, spent)
        clock.lap("apply")
        clock.add(spent)
        self.outer_state = result.state
        self._go_on()
        for author, reason in result.rejected:
            log.warning("update rejected", round=r, author=author, reason=reason)
            await self._report(
                UpdateRejected(
                    event_id=f"{self.sid}.r{r}.{author}.rejected",
                    session_id=self.sid,
                    round=r,
                    peer_id=author,
                    reason=reason,
                    reported_by=self.peer_id,
                )
            )
        if result.aggregate is None:
            log.warning("no acceptable update; keeping the round-start weights", round=r)
        await asyncio.to_thread(learner.load, result.model)
        clock.lap("load")
        val_loss, val_accuracy = await asyncio.to_thread(learner.evaluate_val)
        clock.lap("validate")
        check_finite(r * cmd.hyperparameters.epochs, val_loss)
        # The next round starts now; the average is stored and reported meanwhile.
        self._storing = asyncio.create_task(self._store_average(r, result, val_loss, val_accuracy))
        log.info(
            "round averaged",
            round=r,
            updates=len(closed.updates),
            rejected=len(result.rejected),
            aggregator=result.aggregator,
            update_bytes=result.update_bytes,
            val_accuracy=val_accuracy,
            closed_seen=closed_seen,
            ms=clock.ms(),
        )

    async def _store_average(
        self, r: int, result: RoundResult, val_loss: float | None, val_accuracy: float | None
    ) -> None:
        """PUT round ``r``'s average (identical bytes on every peer) and report ``RoundAveraged``."""
        cmd = self.command
        url = cmd.average_urls.get(r)
        if not url:
            log.warning("no URL to store the round's average; not reporting it", round=r)
            return
        began = time.perf_counter()
        data = await asyncio.to_thread(state_bytes, result.model)
        ref = await asyncio.to_thread(self._put, url, data)
        self._go_on()
        await self._report(
            RoundAveraged(
                event_id=f"{self.sid}.r{r}.averaged",
                session_id=self.sid,
                round=r,
                uri=average_uri(cmd.rounds_uri, r),
                sha256=ref.sha256,
                peer_id=self.peer_id,
                val_loss=val_loss,
                val_accuracy=val_accuracy,
                aggregator=result.aggregator,
                selected=list(result.selected),
                update_bytes=result.update_bytes,
            )
        )
        log.info("round average stored", round=r, ms=round(1000 * (time.perf_counter() - began), 1))

    async def _average_stored(self) -> None:
        """Wait for the last round's average to be stored and reported; its error, if any, is raised."""
        task, self._storing = self._storing, None
        if task is not None:
            await task

    async def _train_round(self, learner: LocalLearner, r: int) -> RoundStats:
        """The local epochs in a worker thread; their heartbeats are all reported when it returns."""
        return await self.ctx.train_reporting(
            self.command, lambda on_epoch: learner.train_round(r, on_epoch, self.stop), after_stop=False
        )

    async def _finish(self, learner: LocalLearner) -> None:
        cmd = self.command
        data = await asyncio.to_thread(learner.model_file)
        ref = await asyncio.to_thread(self._put, cmd.output_url, data)
        loss, accuracy = await asyncio.to_thread(learner.evaluate_train)
        val_loss, val_accuracy = await asyncio.to_thread(learner.evaluate_val)
        epochs = cmd.rounds * cmd.hyperparameters.epochs
        if loss is None or accuracy is None:
            raise DataError("no training rows to measure the final model on")
        check_finite(epochs, loss, val_loss)
        await self._average_stored()
        self._go_on()
        await self._report(
            PeerDone(
                event_id=f"{self.sid}.{self.peer_id}.done",
                session_id=self.sid,
                peer_id=self.peer_id,
                model_uri=cmd.output_uri,
                model_sha256=ref.sha256,
                epochs=epochs,
                loss=loss,
                accuracy=accuracy,
                val_loss=val_loss,
                val_accuracy=val_accuracy,
                train_seconds=time.perf_counter() - self._started,
            )
        )
        log.info("fedavg done", val_accuracy=val_accuracy, model=cmd.output_uri, sha256=ref.sha256)

    async def _closed(self, round_: int) -> RoundClosed:
        """The round's ``RoundClosed``, once the scheduler has forwarded it."""
        return await self.facts.wait(lambda: self.facts.closed.get(round_), self.stopped)

    def _go_on(self, round_: int | None = None) -> None:
        """Raise ``TrainingStopped`` if this job must report nothing more."""
        if self.stopped.is_set() or self.stop.is_set():
            raise TrainingStopped("stopped")
        if self.facts.ended:
            raise TrainingStopped(f"the session ended ({self.facts.ended})")
        if round_ is not None:
            closed = self.facts.closed.get(round_)
            if closed is not None and all(u.peer_id != self.peer_id for u in closed.updates):
                raise TrainingStopped(f"round {round_} closed without this peer")

    # ---------------------------------------------------------------- blocking helpers (threads)

    def _limit(self, reference: Tensors) -> int:
        """The most bytes an update of this model may have: its whole weights file and a header."""
        return len(state_bytes(reference)) + HEADER_ALLOWANCE

    def _encode(self, learner: LocalLearner, round_start: Mapping[str, torch.Tensor]) -> bytes:
        """This peer's update file for the round: its weights, or their delta compressed."""
        method = self.options.compression.name
        return update_file(encode_update(learner.state(), round_start, method).payload, method)

    def _apply(
        self,
        closed: RoundClosed,
        reference: Tensors,
        start: Mapping[str, torch.Tensor],
        spent: Spent | None = None,
    ) -> RoundResult:
        """The round from ``start`` and the outer state carried so far (:func:`rounds.apply_round`),
        its updates fetched and checked side by side; this peer's own update of the round is taken
        from memory (the bytes it PUT, which the fact names by their sha256), the rest fetched."""
        limit = self._limit(reference)
        own = self._own

        def fetch(update: RoundUpdate) -> bytes:
            if own is not None and (update.uri, update.sha256) == own[:2]:
                return own[2]
            return self._fetch(update, limit)

        return apply_round(
            closed,
            fetch,
            reference,
            start,
            self.outer_state,
            self.options,
            rounds_uri=self.command.rounds_uri,
            spent=spent,
            workers=FETCH_WORKERS,
        )

    def _fetch(self, update: RoundUpdate, limit: int) -> bytes:
        """An update's bytes through the signed URL the fact came with; ``UpdateUnavailable`` for a
        uri no URL was handed out for (never fetched), a refusal or a size over ``limit``. A network
        failure that outlasts the retries propagates (the job fails)."""
        url = self.facts.urls.get(update.uri)
        if not url:
            raise UpdateUnavailable("its uri was not handed out with the round's fact")
        try:  # its sha256 is checked where it is taken (``rounds.apply_round``), once
            return self.ctx.download_bytes(url, None, max_bytes=limit, client=self._http)
        except blob.TooLarge:
            raise UpdateUnavailable(f"larger than {limit} bytes") from None
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code >= 500:
                raise
            raise UpdateUnavailable(f"refused with HTTP {exc.response.status_code}") from None

    def _put(self, url: str, data: bytes) -> blob.BlobRef:
        """``data`` PUT to the signed ``url``, from memory, on the job's kept connections."""
        return self.ctx.upload(url, data, client=self._http)


class _Laps:
    """Milliseconds per step of a round on this peer, for its log (``round averaged``'s ``ms``)."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._ms: dict[str, float] = {}

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self._ms[step] = self._ms.get(step, 0.0) + 1000 * (now - self._last)
        self._last = now

    def add(self, spent: Spent) -> None:
        """Steps timed inside a call that just returned (``rounds.apply_round``'s)."""
        for step, seconds in spent.items():
            self._ms[step] = self._ms.get(step, 0.0) + 1000 * seconds
        self._last = time.perf_counter()

    def ms(self) -> dict[str, float]:
        return {step: round(value, 2) for step, value in self._ms.items()}
