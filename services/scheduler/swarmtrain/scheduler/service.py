"""The scheduler's shell: replays the log into state (``state.fold_safely``), then reads events,
presence and the peers' reports, and publishes what ``decide.decide`` and ``reports.check`` return;
it decides nothing itself. Its own mechanics:

- compare-and-set appends (several schedulers may run: peer locks and session starts are
  compare-and-set, so two of them can never take the same peer or start a session twice), and
  releasing what a start that failed had locked;
- reports: one durable pull consumer (``scheduler-reports``) shared by every scheduler; each report
  is checked once the state has read the log to its end, its fact or rejection appended, and only
  then acked;
- no tick to wait for: the loop sleeps until a report comes (a fetch kept in flight), something is
  appended to the log (a core subscription on the event subjects rings a doorbell), or
  ``TICK_S`` has passed (what only time decides: timeouts, deadlines); it reads the log for
  another's append or a tick (its own appends are read back before the next decision, reports
  read it to its end before they are checked), and a batch of heartbeats of sessions that do not
  search is checked and appended without a decision (nothing follows from them at once: the next
  wake decides, a tick at most);
- commands sent once per process (``Send``/``Forward`` ids remembered), ``SessionFact`` signed only
  when sent, evaluations run in worker threads;
- riding out faults: an event whose evolve raises is quarantined (logged, counted, skipped); a
  NATS error ends no loop; after a reconnect, a gap in its reading (paused, catching up) or a log
  it could not reach (its streams probed every ``PROBE_S``, a fact it could not append: a stream
  electing its leader) every peer gets a fresh timeout window and every open round a fresh
  deadline (``state.regrace``);
- judging only on what arrived: no decision is taken when the reports were last read more than a
  gap ago (it reads first), and a decision that fails a peer or takes it offline waits, for a few
  ticks at most, until every stored report has been read and the streams answer;
- a report whose fact the log already holds (a redelivery) is acked, not rejected;
- the peers' transfers: where they go (the gateway's ``/healthz`` for a ``file://`` store, the S3
  endpoint) is asked every ``PROBE_S``; while it does not answer, no round's deadline runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import typing
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import httpx
import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from swarmtrain.common import blob, bus, metrics, signing, subjects
from swarmtrain.common.events import (
    PRESENCE_SUBJECTS,
    Command,
    Event,
    Heartbeat,
    PeerFailed,
    PeerWentOffline,
    Report,
    ReportRejected,
    decode_event,
    decode_presence,
    decode_report,
    encode,
)
from swarmtrain.common.logging import get_logger
from swarmtrain.common.settings import Settings
from swarmtrain.scheduler import recompute as recompute_model
from swarmtrain.scheduler.actions import (
    Action,
    Append,
    AppendIf,
    Clocks,
    Config,
    Evaluate,
    Forward,
    Method,
    Prepare,
    Reassign,
    Send,
    Signer,
    Start,
    Timing,
    evaluated,
    init_prepared,
    release,
    session_fact,
    session_failed,
)
from swarmtrain.scheduler.decide import decide, recover
from swarmtrain.scheduler.reports import check
from swarmtrain.scheduler.state import State, fold_safely, observe_beats, regrace, regrace_rounds, trial_key
from swarmtrain.scheduler.strategies.fedavg import needs_histograms
from swarmtrain.training import evaluation
from swarmtrain.training.data import DataError

log = get_logger("swarmtrain.scheduler")
TICK_S = 0.2
"""The longest the loop sleeps: a decision that only time makes (a timeout, a deadline) waits at
most this long. Anything appended to the log or reported wakes it at once."""
EVENTS_WAIT_S = 0.005
REPORT_TYPES = typing.get_args(Report)
REPORTS_CONSUMER = "scheduler-reports"
SENT_MEMORY = 100_000
"""Ids of commands sent by this process that it remembers, so a level-triggered decision is
published once, not every tick."""
EVALUATION_RETRY_S = 5.0
T = TypeVar("T")
REPORTS_ACK_WAIT_S = 3.0
"""A report fetched by a scheduler that died before it acked comes again after this: well within
a supervised restart, so it is checked while its session still runs."""
PROBE_S = 1.0
"""How often the scheduler asks its streams whether they answer (a stream electing its leader
stores nothing: time a peer could not be heard, which must count against nobody)."""
PROBE_TIMEOUT_S = 2.0
MAX_DEFERRALS = 25
"""Ticks a blaming decision waits for the reports stored before it to be read."""
OWN_MEMORY = 10_000
"""Ids of events this process appended that it remembers, to tell its own doorbells from others'."""
APPLIED_MEMORY = 200_000
"""Ids of the reports' facts read from the log that the scheduler remembers (a redelivered report
whose fact is stored is acked, not rejected)."""


def clocks() -> Clocks:
    return Clocks(now=time.monotonic(), wall=time.time())


def observed_at(msg: Msg) -> float:
    """When the broker stored the message (UTC seconds): the same on every replay and every
    scheduler, and never a peer's own clock."""
    return msg.metadata.timestamp.timestamp()


def sender_of(subject: str) -> str | None:
    """The peer id of a ``peer.<id>.reports`` subject."""
    parts = subject.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "peer" and parts[2] == "reports" else None


def timing_of(settings: Settings) -> Timing:
    return Timing(
        peer_timeout=settings.peer_timeout_s,
        first_round_timeout=settings.round_timeout_s,
        round_factor=settings.round_factor,
        round_min=settings.round_min_s,
        resend_after=2 * settings.peer_timeout_s,
        stale_lock=max(30.0, 5 * settings.peer_timeout_s),
    )


def url_signer(store: blob.BlobStore, settings: Settings) -> Signer | None:
    """The signer of the URLs the commands carry; None (and a warning) where the store cannot be
    signed for: a ``file://`` store without ``SWARMTRAIN_BLOB_SIGNING_SECRET``."""
    try:
        signer = signing.UrlSigner(store, settings)
    except ValueError as exc:
        log.warning("commands carry no signed URLs", error=str(exc))
        return None

    def sign(method: Method, key: str, max_bytes: int | None) -> str:
        return signer.get_url(key) if method == "GET" else signer.put_url(key, max_bytes or 0)

    return sign


def blames(actions: Sequence[Action]) -> bool:
    """Whether ``actions`` fail a peer's run or take a peer offline."""
    return any(isinstance(a, Append) and isinstance(a.event, PeerFailed | PeerWentOffline) for a in actions)


class Scheduler:
    def __init__(self, settings: Settings, js: JetStreamContext) -> None:
        self.settings = settings
        self.js = js
        self.state = State(started_at=time.monotonic(), heard_since=time.time())
        self.gap_s = max(2.0, settings.peer_timeout_s / 2)
        """A reading this much older than a decision is a gap: the decision waits for a new one."""
        self.heard_at = time.monotonic()
        """Monotonic time the latest fetch of the reports began: what a decision stands on."""
        self.deferred = 0
        """Consecutive ticks a blaming decision waited for the reports before it."""
        self.applied: OrderedDict[str, None] = OrderedDict()
        """Event ids of reports' facts read from the log (the latest ``APPLIED_MEMORY``)."""
        self.store = blob.open_store(settings.blob_url, settings)
        self.config = Config(uri=self.store.uri, timing=timing_of(settings), signer=url_signer(self.store, settings))
        self.beats: dict[str, float] = {}
        """Presence beats since the last decision: folded in, all at once, before the next."""
        self.doing: dict[str, str | None] = {}
        """The ``Train`` id each of those beats named."""
        self.barrier = 0
        """Stream sequence of our own latest write: no decision until the state has seen it."""
        self.sent: OrderedDict[str, None] = OrderedDict()
        self.jobs = OncePerKey(EVALUATION_RETRY_S, done=self.nudge)
        """Evaluations, shard counts and a fork's starting model: blocking, once at a time per key."""
        self.histograms: dict[str, list[list[int]]] = {}
        """session_id -> its shards' label histograms (``label_skew``), once computed."""
        self.quarantined = 0
        """Events this process could not apply and skipped (each one logged with its error)."""
        self.reports: JetStreamContext.PullSubscription | None = None
        """The reports' subscription the loop reads (``may_blame`` asks it what is still pending)."""
        self.transfers_down = False
        """The peers' transfers cannot go through now (``watch_transfers``): no round's deadline runs."""
        self.woke = 0.0
        """``perf_counter`` when the loop last woke (a report, the doorbell, a tick): a start's timings."""
        self.deciding = (0.0, 0.0)
        """``perf_counter`` when the latest ``decide`` began and ended."""
        self.own: OrderedDict[str, None] = OrderedDict()
        """Ids of the events this process appended lately (the latest ``OWN_MEMORY``): their
        doorbell asks for no read of the log, ``barrier`` has them read before the next decision."""
        self.foreign = False
        """An event this process did not append rang the doorbell since the log was last read."""
        self.beats_only = False
        """The latest batch of reports checked holds only heartbeats of sessions that do not search
        (or their rejections): facts no decision follows from at once, so the loop may leave its
        decision to the next wake, a tick at most (``Scheduler.due``)."""
        self.decided_at = 0.0
        """Monotonic time ``settle`` last ran."""
        self.settled = False
        """The latest ``settle`` ended because its decisions wrote nothing more (not at its rounds' end)."""
        self.nudged = False
        """A job (an evaluation, a shard count, a starting model) ended since the latest decision."""
        self.doorbell: asyncio.Event | None = None
        """What wakes the loop (``run`` sets it): rung by an append's doorbell, and by ``nudge``."""

    def nudge(self) -> None:
        """A job ended (its facts appended): decide at once. Its appends' doorbell may have rung
        before this, and found nothing due (an own append that ``settle`` decided upon)."""
        self.nudged = True
        if self.doorbell is not None:
            self.doorbell.set()

    def on_appended(self, msg: Msg) -> None:
        """The doorbell rang for ``msg``, an event appended: by another process (the gateway, another
        scheduler) or by this one (its ``Nats-Msg-Id`` one of ``own``)."""
        msg_id = msg.headers.get("Nats-Msg-Id") if msg.headers else None
        if msg_id is None or msg_id not in self.own:
            self.foreign = True

    def on_presence(self, data: bytes) -> None:
        try:
            presence = decode_presence(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("malformed presence beat ignored", error=str(exc))
            return
        self.beats[presence.peer_id] = time.monotonic()
        self.doing[presence.peer_id] = presence.train_id

    def regrace(self, why: str) -> None:
        """Judge no peer on beats this scheduler could not see: every timeout starts again now."""
        self.state = regrace(self.state, time.monotonic(), time.time())
        log.info("fresh timeout window for every peer and round", why=why)

    async def catch_up(self, sub: JetStreamContext.PullSubscription) -> None:
        """Replay the log up to its current end, then redo what a dead scheduler may have left half done."""
        await self.read_to(sub, await bus.last_sequence(self.js))
        log.info("state rebuilt", position=self.state.position, sessions=len(self.state.sessions))
        self.regrace("caught up with the log")  # the time the replay took counts against nobody
        await self.execute(recover(self.state, clocks(), self.config))

    async def read_to(self, sub: JetStreamContext.PullSubscription, target: int) -> None:
        while self.state.position < target:
            if not await self.read(sub, timeout=2.0):
                break  # what is left is malformed: terminated, never evolved

    async def read(self, sub: JetStreamContext.PullSubscription, timeout: float) -> int:
        """Fold in what arrives within ``timeout``; returns how many events came."""
        batch = await bus.fetch(sub, decode_event, batch=512, timeout=timeout)
        if batch:
            items = [(bus.stream_seq(msg), event, observed_at(msg)) for msg, event in batch]
            for _, event, _ in items:
                if isinstance(event, REPORT_TYPES):
                    self.applied[event.event_id] = None
            while len(self.applied) > APPLIED_MEMORY:
                self.applied.popitem(last=False)
            self.state, quarantined = fold_safely(self.state, items)
            for seq, event, error in quarantined:
                self.quarantined += 1
                log.error("event quarantined: it cannot be applied", seq=seq, type=type(event).__name__, error=error)
        return len(batch)

    async def check_reports(self, batch: list[tuple[Msg, Report]], events: JetStreamContext.PullSubscription) -> int:
        """Check fetched reports against a state that has read the log to its end (another
        scheduler may have started the session), append each one's fact or rejection, then ack it.
        A report whose fact is in the log already (redelivered: its ack was lost) is acked as it is.
        One that cannot be recorded (the log unreachable, electing a leader) comes again, and the
        failure is raised: a fault to ride out."""
        self.beats_only = False
        if not batch:  # a fetch that timed out: a tick
            return 0
        await self.read_to(events, max(self.barrier, await bus.last_sequence(self.js)))
        checked: list[tuple[Msg, Report, str, Event]] = []
        for msg, report in batch:
            sender = sender_of(msg.subject)
            if sender is None:
                await msg.term()
                continue
            if report.event_id in self.applied:
                await msg.ack()
                continue
            checked.append((msg, report, sender, check(self.state, sender, report, self.config, clocks().at)))
        self.beats_only = all(self.inconsequential(outcome) for _, _, _, outcome in checked)
        # the batch's facts in flight together, in order on the one connection (so stored in order):
        # one round trip for the batch, not one per report
        results = await asyncio.gather(*(self.append(c[3]) for c in checked), return_exceptions=True)
        failed: BaseException | None = None
        for (msg, report, sender, outcome), result in zip(checked, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("report not recorded; it comes again", report_id=report.event_id, error=repr(result))
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1.0)
                failed = failed or result
                continue
            await msg.ack()
            if isinstance(outcome, ReportRejected):
                log.info("report rejected", peer_id=sender, type=outcome.report_type, reason=outcome.reason)
        if failed is not None:
            raise failed
        return len(batch)

    def inconsequential(self, fact: Event) -> bool:
        """Whether no decision follows at once from ``fact``, a report's outcome: a heartbeat of a
        session that does not search (its progress decides nothing but a search's pruning), a
        heartbeat's rejection."""
        if isinstance(fact, ReportRejected):
            return fact.report_type == "Heartbeat"
        if isinstance(fact, Heartbeat):
            session = self.state.sessions.get(fact.session_id)
            return session is None or not session.searching
        return False

    def due(self, reported: bool, rang: bool, foreign: bool) -> bool:
        """Whether the loop decides on this turn: always, unless its last decision is less than a
        tick old and it woke only for what decides nothing: reports whose facts decide nothing
        (``beats_only``), or the doorbell of its own appends that ``settle`` has decided upon."""
        if foreign or self.nudged or time.monotonic() - self.decided_at >= TICK_S:
            return True
        if reported:
            return not self.beats_only
        return not rang or not self.settled

    async def settle(self, events: JetStreamContext.PullSubscription, rounds: int = 4) -> None:
        """Decide, then read back what that wrote and decide again at once, until nothing new is
        written (at most ``rounds`` times): a fact that follows from another (an update recorded ->
        its round closed -> the close forwarded to the peers) is not held back by a tick."""
        self.decided_at, self.settled, self.nudged = time.monotonic(), False, False
        for _ in range(rounds):
            if self.state.position < self.barrier:  # our own writes (facts of reports, decisions) first
                await self.read_to(events, self.barrier)
            before = self.barrier
            await self.step()
            if self.barrier <= before:
                self.settled = self.state.position >= self.barrier
                return

    async def step(self) -> None:
        beats, self.beats = self.beats, {}
        doing, self.doing = self.doing, {}
        self.state = observe_beats(self.state, beats, doing)
        if self.transfers_down:
            self.state = regrace_rounds(self.state, time.time())
        if self.state.position < self.barrier:
            return
        # checked just before deciding: a process stopped (SIGSTOP, a frozen VM) anywhere in its
        # loop resumes with a reading older than the stop; it reads again before it judges
        if (gap := time.monotonic() - self.heard_at) > self.gap_s:
            self.regrace(f"no reading for {gap:.1f}s")
            return
        began = time.perf_counter()
        with metrics.deciding():
            actions = decide(self.state, clocks(), self.config)
        self.deciding = (began, time.perf_counter())
        if blames(actions) and not await self.may_blame():
            return
        await self.execute(actions)

    async def may_blame(self) -> bool:
        """Whether a decision that fails a peer or takes it offline may stand: the streams answer
        and every report stored has been read (else it waits a tick, ``MAX_DEFERRALS`` at most). A
        stream that does not answer is a fault (raised): once it answers, a fresh grace."""
        await self.probe()
        info = await asyncio.wait_for(self.reports.consumer_info(), PROBE_TIMEOUT_S) if self.reports else None
        pending = int(info.num_pending or 0) if info is not None else 0
        if pending and self.deferred < MAX_DEFERRALS:
            self.deferred += 1
            return False
        self.deferred = 0
        return True

    def transfers(self, up: bool) -> None:
        """What the latest look at the peers' transfer endpoint saw (``watch_transfers``)."""
        if up == (not self.transfers_down):
            return
        self.transfers_down = not up
        if up:
            self.state = regrace_rounds(self.state, time.time())
            log.info("transfers go through again; every open round's deadline counts from now")
        else:
            log.warning("the peers' transfers cannot go through; no round's deadline runs meanwhile")

    async def probe(self) -> None:
        """Ask the streams the peers' reports and the facts go to whether they answer (raises if not)."""
        for stream in (bus.REPORTS_STREAM, bus.EVENTS_STREAM):
            await asyncio.wait_for(self.js.stream_info(stream), PROBE_TIMEOUT_S)

    async def execute(self, actions: Sequence[Action]) -> None:
        starts = [a for a in actions if isinstance(a, Start)]  # disjoint peers: run side by side
        if len(starts) > 1:
            others = [a for a in actions if not isinstance(a, Start)]
            await self.execute(others)
            await asyncio.gather(*(self.execute([a]) for a in starts))
            return
        run: list[Append] = []
        for action in [*actions, None]:
            if isinstance(action, Append):
                run.append(action)
                continue
            if run:  # consecutive appends in flight together: stored in order (one connection), one round trip
                await self.append_all([a.event for a in run])
                run = []
            if action is None:
                break
            try:
                match action:
                    case AppendIf(event=event, expected=expected):
                        with contextlib.suppress(bus.WrongLastSequence):  # moved on: decided again
                            await self.append(event, expected)
                            log.info("appended", type=type(event).__name__, subject=event.subject)
                    case Send(command=command):
                        await self.send_once(action.id, command)
                    case Forward() if action.id not in self.sent:  # signed only when sent
                        await self.send_once(action.id, session_fact(action, clocks(), self.config))
                    case Evaluate():
                        self.evaluate(action)
                    case Prepare():
                        self.prepare(action)
                    case Start():
                        await self.start(action)
                    case Reassign():
                        await self.reassign(action)
            except Exception as exc:
                log.warning("action failed; will retry", action=repr(action)[:200], error=repr(exc))

    async def append_all(self, events: Sequence[Event]) -> None:
        """Append ``events`` in flight together, in this order (one connection: stored in order);
        one that fails is logged and decided again, as any failed action is."""
        results = await asyncio.gather(*(self.append(e) for e in events), return_exceptions=True)
        for event, result in zip(events, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("action failed; will retry", action=repr(event)[:200], error=repr(result))
            else:
                log.info("appended", type=type(event).__name__, subject=event.subject)

    async def send_once(self, msg_id: str, command: Command) -> None:
        """Publish ``command`` under ``msg_id`` unless this process sent that id already."""
        if msg_id in self.sent:
            return
        headers = {"Nats-Msg-Id": msg_id}
        await self.js.publish(command.subject, encode(command), headers=headers, stream=bus.COMMANDS_STREAM)
        self.sent[msg_id] = None
        while len(self.sent) > SENT_MEMORY:
            self.sent.popitem(last=False)

    async def append(self, event: Event, expected: int | None = None) -> int:
        """Append ``event`` (a compare-and-set with ``expected``); the next decision waits until it is read back."""
        self.own[event.event_id] = None  # before it is published: its doorbell comes after
        while len(self.own) > OWN_MEMORY:
            self.own.popitem(last=False)
        seq = await (bus.append(self.js, event) if expected is None else self.cas_append(event, expected))
        self.barrier = max(self.barrier, seq)
        return seq

    async def cas_append(self, event: Event, expected: int) -> int:
        """Append ``event`` if its subject is still at ``expected``.

        A malformed message that landed on the subject since (anyone allowed to publish there can
        put junk on it) does not count as a competing write: the append is retried past it.
        """
        for _ in range(5):
            try:
                return await bus.append(self.js, event, expected_last_subject_seq=expected)
            except bus.WrongLastSequence:
                last = await self.js.get_last_msg(bus.EVENTS_STREAM, event.subject)
                try:
                    decode_event(last.data or b"")
                except (msgspec.DecodeError, msgspec.ValidationError):
                    expected = int(last.seq or 0)
                    continue
                raise
        raise bus.WrongLastSequence(event.subject)

    async def landed(self, event: Event) -> bool | None:
        """Whether ``event`` is the last message on its subject (its append's answer was lost);
        None when that cannot be known now."""
        try:
            last = await self.js.get_last_msg(bus.EVENTS_STREAM, event.subject)
        except nats.js.errors.NotFoundError:
            return False
        except Exception:
            return None
        return bool(last.headers and last.headers.get("Nats-Msg-Id") == event.event_id)

    async def start(self, action: Start) -> None:
        """Lock every peer (all at once), start the session, send the Trains (all at once).

        A start that lost a race, or whose ``SessionStarted`` is known not to have landed (refused,
        timed out), releases the locks it took; where that cannot be known now, ``stale_locks``
        releases them later if the session is still queued, and ``resend`` sends the Trains if it
        started."""
        sid = action.session_id
        started = action.started
        session = self.state.sessions.get(sid)
        if session is not None and needs_histograms(session.request):
            histograms = self.histograms.get(sid)
            if histograms is None:
                self.count_shards(sid)
                return  # a later tick decides the start again, once they are known
            started = msgspec.structs.replace(started, shard_histograms=histograms)
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(self.append(lock.event, lock.expected) for lock in action.locks), return_exceptions=True
        )
        t1 = time.perf_counter()
        locked = [(lock.event.peer_id, r) for lock, r in zip(action.locks, results, strict=True) if isinstance(r, int)]
        failed = [r for r in results if not isinstance(r, int)]
        try:
            if failed:
                raise failed[0]
            await self.append(started, action.expected)
        except Exception as exc:
            lost_race = isinstance(exc, bus.WrongLastSequence)
            landed = False if lost_race or failed else await self.landed(started)
            if landed is None:
                log.warning("start's outcome unknown; stale locks are released later", session_id=sid, error=repr(exc))
                return
            if not landed:
                log.info("start failed; releasing its locks", session_id=sid, error=repr(exc))
                now = clocks()
                await asyncio.gather(
                    *(self.append(release(sid, p, seq, now)) for p, seq in locked), return_exceptions=True
                )
                return
        t2 = time.perf_counter()
        await asyncio.gather(*(bus.send(self.js, train) for train in action.trains))
        t3 = time.perf_counter()
        # where a start's time goes, in this process (P4 reads it): from the loop's waking through
        # reading the log to the decision, the decision, the locks' compare-and-sets, SessionStarted,
        # the Trains (published and acknowledged)
        woke, (decide_began, decided) = self.woke, self.deciding
        ms = {
            "woke_to_decide": decide_began - woke if woke <= decide_began else None,
            "decide": decided - decide_began,
            "decided_to_locks": t0 - decided if decided <= t0 else None,
            "locks": t1 - t0,
            "started": t2 - t1,
            "trains": t3 - t2,
        }
        log.info(
            "session started",
            session_id=sid,
            peers=list(action.peer_ids),
            ms={k: None if v is None else round(v * 1000, 2) for k, v in ms.items()},
        )

    async def reassign(self, action: Reassign) -> None:
        try:
            await self.append(action.lock.event, action.lock.expected)
        except bus.WrongLastSequence:
            return  # the peer moved on; the next decision picks again
        await self.append(action.moved)
        await bus.send(self.js, action.train)
        moved = action.moved
        log.info("shard reassigned", session_id=moved.session_id, shard=moved.shard, peer_id=moved.to_peer_id)

    def count_shards(self, sid: str) -> None:
        """Compute the session's shard histograms in a worker thread (once at a time; again later if
        the dataset could not be read); a dataset that cannot be sharded so fails the session."""
        session = self.state.sessions.get(sid)
        if session is None:
            return
        request = session.request

        async def counted(histograms: list[list[int]]) -> None:
            self.histograms[sid] = histograms

        async def unshardable(exc: Exception) -> None:
            log.warning("the dataset cannot be sharded as asked", session_id=sid, error=str(exc))
            await self.execute([session_failed(sid, f"sharding: {exc}", clocks())])

        self.jobs.run(
            f"{sid}.shards",
            lambda: evaluation.shard_histograms(self.store, request),
            counted,
            final=(DataError, unshardable),
            what="shards could not be counted",
            session_id=sid,
        )

    def evaluate(self, action: Evaluate) -> None:
        """Measure the model in a worker thread (once at a time per model; again later if the
        dataset could not be read), then append its ``ModelEvaluated``."""
        session = self.state.sessions.get(action.session_id)
        if session is None:
            return
        run = session.runs.get(trial_key(action.trial)) if action.trial is not None else None
        request, max_bytes = session.request, session.max_model_bytes(run.model if run is not None else None)

        async def measured(m: evaluation.Measured) -> None:
            await self.append(evaluated(action, m.val_loss, m.val_accuracy, m.reason, clocks()))
            log.info(
                "model evaluated",
                session_id=action.session_id,
                peer_id=action.peer_id,
                val_accuracy=m.val_accuracy,
                reason=m.reason,
            )

        self.jobs.run(
            f"{action.session_id}.{action.peer_id}" + ("" if action.trial is None else f".trial{action.trial}"),
            lambda: evaluation.measure(self.store, request, action.model_uri, action.sha256, max_bytes),
            measured,
            what="evaluation could not run",
            session_id=action.session_id,
        )

    def prepare(self, action: Prepare) -> None:
        """Recompute a fork's starting model in a worker thread (once at a time per session; again
        later if it could not run), then append its ``InitModelPrepared``; a round whose blobs are
        gone fails the session."""
        recompute = action.recompute
        session = self.state.sessions.get(recompute.session_id)
        if session is None:
            return
        max_bytes = session.max_model_bytes()

        async def prepared(result: tuple[blob.BlobRef, list[str]]) -> None:
            ref, included = result
            await self.append(init_prepared(recompute, ref.uri, ref.sha256, included, clocks()))
            log.info("starting model recomputed", session_id=recompute.session_id, included=included)

        async def gone(exc: Exception) -> None:
            await self.append(session_failed(recompute.session_id, f"init_from: {exc!r}", clocks()).event)

        self.jobs.run(
            f"{recompute.session_id}.init",
            lambda: recompute_model.prepare(self.store, recompute, max_bytes),
            prepared,
            final=(blob.BlobNotFound, gone),
            what="starting model not recomputed",
            session_id=recompute.session_id,
        )

    async def close(self) -> None:
        await self.jobs.close()


class OncePerKey:
    """Blocking jobs (torch, blob reads) run in a worker thread, at most one at a time per key; one
    that fails with a ``final`` error hands it to its handler, any other failure is logged and the
    key is tried again no sooner than ``retry_s`` later (the next decision asks again)."""

    def __init__(self, retry_s: float, done: Callable[[], None] | None = None) -> None:
        self.retry_s = retry_s
        self.done = done
        """Called once a job's handler has run (its facts appended, or none to append)."""
        self.running: dict[str, asyncio.Task[None]] = {}
        self.after: dict[str, float] = {}

    def run(
        self,
        key: str,
        blocking: Callable[[], T],
        then: Callable[[T], Awaitable[None]],
        *,
        final: tuple[type[Exception], Callable[[Exception], Awaitable[None]]] | None = None,
        what: str,
        **context: object,
    ) -> None:
        if key in self.running or self.after.get(key, 0.0) > time.monotonic():
            return

        async def go() -> None:
            try:
                result = await asyncio.to_thread(blocking)
            except Exception as exc:
                if final is not None and isinstance(exc, final[0]):
                    await final[1](exc)
                    self._done()
                    return
                self.after[key] = time.monotonic() + self.retry_s
                log.warning(f"{what}; tried again later", key=key, error=repr(exc), **context)
                return
            await then(result)
            self._done()

        task = asyncio.create_task(go(), name=f"job-{key}")
        self.running[key] = task
        task.add_done_callback(lambda _: self.running.pop(key, None))

    def _done(self) -> None:
        if self.done is not None:
            self.done()

    async def close(self) -> None:
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def transfer_endpoint(store: blob.BlobStore, settings: Settings) -> str | None:
    """Where the peers' transfers go, to ask whether it answers: the gateway's ``/healthz`` for a
    ``file://`` store (it serves the signed URLs), the S3 endpoint; None where the scheduler signs
    no URLs."""
    if isinstance(store, blob.S3Store):
        return f"{'https' if settings.s3_secure else 'http'}://{settings.s3_endpoint}/"
    try:
        return signing.UrlSigner(store, settings).base_url() + "/healthz"
    except ValueError:
        return None


async def watch_transfers(scheduler: Scheduler, url: str, stop: asyncio.Event) -> None:
    """Every ``PROBE_S``, whether ``url`` answers (any status below 500) or not, told to ``scheduler``."""
    async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as client:
        while not stop.is_set():
            try:
                up = (await client.get(url)).status_code < 500
            except httpx.HTTPError:
                up = False
            scheduler.transfers(up)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PROBE_S)


async def reports_consumer(js: JetStreamContext) -> JetStreamContext.PullSubscription:
    """The one durable consumer of the peers' reports that every scheduler shares: created if
    missing, never deleted or reset (a restarted scheduler goes on where the acks left off)."""
    config = api.ConsumerConfig(
        durable_name=REPORTS_CONSUMER,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=REPORTS_ACK_WAIT_S,
        max_ack_pending=20_000,
        filter_subject=subjects.PEER_REPORTS,
    )
    with contextlib.suppress(nats.js.errors.BadRequestError):  # created, or brought up to this config
        await js.add_consumer(bus.REPORTS_STREAM, config)
    return await js.pull_subscribe_bind(consumer=REPORTS_CONSUMER, stream=bus.REPORTS_STREAM)


async def renewed(
    js: JetStreamContext,
    events: JetStreamContext.PullSubscription,
    reports: JetStreamContext.PullSubscription,
    start: int,
) -> tuple[JetStreamContext.PullSubscription, JetStreamContext.PullSubscription]:
    """The subscriptions to read after a fault: the same ones where the server still has their
    consumers (a report already on its way to one is not lost), new ones where it lost them (a
    restarted server may forget an ephemeral consumer; in a cluster, the node that held one may be
    gone, and asking for it then times out rather than answering "not found"); the events' new one
    starts at ``start``. A new durable one is the same consumer, bound again."""

    async def lost(sub: JetStreamContext.PullSubscription) -> bool:
        try:
            await sub.consumer_info()
        except (nats.js.errors.NotFoundError, nats.errors.TimeoutError, TimeoutError):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            return True
        return False

    if await lost(events):
        events = await bus.pull_consumer(js, bus.EVENTS_STREAM, ack=api.AckPolicy.NONE, start_seq=start)
    if await lost(reports):
        reports = await reports_consumer(js)
    return events, reports


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run(settings: Settings, stop: asyncio.Event) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nc = await bus.connect(settings, "scheduler")
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        scheduler = Scheduler(settings, js)
        stack.push_async_callback(scheduler.close)

        async def on_presence(msg: Msg) -> None:
            scheduler.on_presence(msg.data)

        presence = await nc.subscribe(PRESENCE_SUBJECTS, cb=on_presence)
        stack.push_async_callback(presence.unsubscribe)
        if (endpoint := transfer_endpoint(scheduler.store, settings)) is not None:
            watcher = asyncio.create_task(watch_transfers(scheduler, endpoint, stop), name="transfers")
            stack.push_async_callback(_cancelled, watcher)
        # the doorbell: a JetStream append reaches core subscribers too, so a session's or a peer's
        # fact appended (a request, our own or another scheduler's writes, an evaluation's fact) wakes
        # the loop at once; the consumer below is still what is read
        doorbell = scheduler.doorbell = asyncio.Event()

        async def on_appended(msg: Msg) -> None:
            scheduler.on_appended(msg)
            doorbell.set()

        for subject in subjects.SCHEDULER_DOORBELL:
            bell = await nc.subscribe(subject, cb=on_appended)
            stack.push_async_callback(bell.unsubscribe)
        events = await bus.pull_consumer(js, bus.EVENTS_STREAM, ack=api.AckPolicy.NONE)
        reports = scheduler.reports = await reports_consumer(js)
        structlog.contextvars.bind_contextvars(service="scheduler")
        await scheduler.catch_up(events)
        faulted, idle_since, probed = False, time.monotonic(), time.monotonic()
        incoming: asyncio.Task[list[tuple[Msg, Report]]] | None = None
        """The reports fetch in flight: kept across turns of the loop (never cancelled while
        running), so waking for the log loses no report on its way."""
        began = time.monotonic()
        """When the fetch in flight began: what a decision stands on once its batch is checked."""
        try:
            while not stop.is_set():
                try:
                    if not nc.is_connected:  # nothing is decided on what could not be seen meanwhile
                        raise nats.errors.ConnectionReconnectingError
                    if faulted:  # back: renew a consumer the server lost, then judge every peer afresh
                        await _dropped(incoming)
                        incoming = None
                        events, reports = await renewed(js, events, reports, scheduler.state.position + 1)
                        scheduler.reports = reports
                        await scheduler.probe()
                        scheduler.regrace("reading again after a fault")
                        faulted = False
                    if time.monotonic() - probed > PROBE_S:  # a stream electing its leader stores nothing
                        probed = time.monotonic()
                        await scheduler.probe()
                    if incoming is None:
                        began = time.monotonic()
                        incoming = asyncio.create_task(bus.fetch(reports, decode_report, batch=256, timeout=TICK_S))
                    # sleep until something is appended, a report comes, or a tick has passed
                    await _first(incoming, doorbell, TICK_S)
                    scheduler.woke = time.perf_counter()
                    rang, foreign = doorbell.is_set(), scheduler.foreign
                    doorbell.clear()
                    scheduler.foreign = False
                    # reports to check read the log to its end first; our own appends are read back
                    # by ``settle`` (to the barrier): only another's append, or a tick, reads here
                    if not incoming.done() and (foreign or not rang):
                        if await scheduler.read(events, timeout=EVENTS_WAIT_S):
                            idle_since = time.monotonic()
                        elif time.monotonic() - idle_since > 5.0:  # is the consumer still there? (raises if not)
                            idle_since = time.monotonic()
                            await events.consumer_info()
                    reported = incoming.done()
                    if reported:
                        batch, incoming = incoming.result(), None
                        scheduler.heard_at = began  # what was reported up to then has been read
                        await scheduler.check_reports(batch, events)
                    if not scheduler.due(reported, rang, foreign):  # nothing to decide upon yet
                        continue
                    await scheduler.settle(events)
                except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                    if not faulted or nc.is_connected:  # once per outage, and on every failure once back
                        log.warning("reading failed; riding it out", error=repr(exc))
                    faulted = True
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.5)  # back off, but stop at once
        finally:
            await _dropped(incoming)
            with contextlib.suppress(Exception):
                await events.unsubscribe()
            with contextlib.suppress(Exception):
                await reports.unsubscribe()


async def _first(task: asyncio.Task[list[tuple[Msg, Report]]], bell: asyncio.Event, timeout: float) -> None:
    """Until ``task`` is done, ``bell`` is set, or ``timeout`` has passed."""
    if task.done() or bell.is_set():
        return
    ring = asyncio.create_task(bell.wait())
    try:
        await asyncio.wait({task, ring}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ring.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ring


async def _dropped(task: asyncio.Task[list[tuple[Msg, Report]]] | None) -> None:
    """Cancel a reports fetch (after a fault, at the end); what it had taken is delivered again
    once its ack wait runs out."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
