"""Placement and the queue, as pure rules: which idle peers take a session, and who waits (issue 14).

No I/O and no clock of its own: the caller passes the peers it knows (``PeerView``), the sessions
waiting for peers (``Request``) and the wall time; :func:`plan` returns one :data:`Decision` per
request. The scheduler's decide step turns a ``Placement`` into its peer locks and a
``SessionStarted`` (whose reason goes into the session's facts), an ``Expired`` or ``Refused`` into
a ``SessionFailed`` with the reason, and a ``Queued`` into the position shown for the session.

The rules
---------
* **Requirements** (:func:`matches`): device (``cpu`` | ``cuda`` | ``any``), minimum memory of the
  GPU a peer trains on, minimum host memory, labels (every asked label, same value).
* **Capacity** (:func:`memory_needed`, :func:`can_hold`): a peer holds one session at a time, and
  never one whose estimated memory exceeds what it has: the GPU's memory for a GPU peer, the host's
  for a CPU peer. The estimate is ``param_count x bytes_per_param x factor + data_bytes +
  overhead_bytes`` (``data_bytes`` with the model's activations for its largest batch, from the
  contract's costs); see :class:`MemoryModel` for why each term.
* **Preference**: a model with at least ``Rules.large_model_params`` parameters goes to GPU peers
  first, a smaller one to CPU peers first, when both kinds are idle and match; within a kind, the
  tightest fit first (the smallest memory that holds it, so a big card stays free for a big model),
  then by peer id, so two schedulers decide alike.
* **Queue**: requests are served by priority (higher first), then in request order (the stream
  sequence of their ``SessionRequested``): first come, first served per priority. A request that
  cannot be placed keeps (reserves) the idle peers that match it, so a later request cannot take
  them and starve it; it reserves nothing while even every online matching peer together would be
  too few (it waits for peers to join, and does not hold up others meanwhile). A request that does
  not queue and cannot be placed now is refused; a queued one whose ``queue_timeout_s`` has passed
  expires (checked before it is placed).

Peers that registered before specs existed (``specs is None``) are taken as CPU peers of unknown
size: they match only requests that ask nothing and are trusted to hold any model, as before.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from swarmtrain.common.specs import PeerSpecs, QueuePolicy, Requirements, gib, labels_text, meets

Kind = Literal["cpu", "cuda"]


# ------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class MemoryModel:
    """How much memory training a model takes on one peer, estimated from its parameter count.

    ``factor`` 4: during training a peer holds the weights, their gradients and the optimiser's
    state (momentum for SGD, two moments for Adam): about four copies of the parameters.
    ``bytes_per_param`` 4: fp32 parameters (mixed precision keeps fp32 master weights, so the
    estimate holds for bf16/fp16 too). ``overhead_bytes``: the torch runtime, a CUDA context,
    batches and activations of the modest models this platform trains. ``data_bytes`` of a request
    (the parsed dataset) comes on top, as a peer holds its whole dataset in memory.
    """

    bytes_per_param: int = 4
    factor: float = 4.0
    overhead_bytes: int = 512 << 20


@dataclass(frozen=True)
class Rules:
    large_model_params: int = 1_000_000
    """At or above this many parameters a model prefers GPU peers; below, CPU peers."""
    memory: MemoryModel = field(default_factory=MemoryModel)


@dataclass(frozen=True)
class PeerView:
    """A peer as placement sees it: online (the caller leaves offline peers out), idle or busy."""

    peer_id: str
    specs: PeerSpecs | None
    idle: bool = True

    @property
    def kind(self) -> Kind:
        return "cuda" if self.specs is not None and self.specs.device_index is not None else "cpu"


@dataclass(frozen=True)
class Request:
    """A session waiting for peers."""

    session_id: str
    num_peers: int
    param_count: int
    requested_at: float
    """Wall seconds (the ``SessionRequested``'s ``occurred_at``), for the queue timeout."""
    order: int
    """Request order, e.g. the stream sequence of the ``SessionRequested``."""
    requirements: Requirements = field(default_factory=Requirements)
    policy: QueuePolicy = field(default_factory=QueuePolicy)
    data_bytes: int = 0
    """The parsed dataset's size (rows x features x 4, roughly), held by every peer."""
    activation_bytes: int = 0
    """The model's activations and their gradients for its largest batch (``common.models.Costs``)."""


# ------------------------------------------------------------------ decisions


@dataclass(frozen=True)
class Placement:
    session_id: str
    peer_ids: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Queued:
    session_id: str
    position: int
    """1-based, among the requests still waiting after this plan."""
    reason: str


@dataclass(frozen=True)
class Refused:
    """Too few peers now, and the request does not queue: today's 400."""

    session_id: str
    reason: str


@dataclass(frozen=True)
class Expired:
    session_id: str
    reason: str


Decision = Placement | Queued | Refused | Expired


# ------------------------------------------------------------------ single rules


def matches(specs: PeerSpecs | None, requirements: Requirements) -> bool:
    """Whether a peer with ``specs`` meets ``requirements`` (capacity aside: see :func:`can_hold`)."""
    return meets(specs, requirements)


def memory_needed(param_count: int, data_bytes: int = 0, model: MemoryModel | None = None) -> int:
    """Estimated bytes to train a model of ``param_count`` parameters on ``data_bytes`` of data."""
    model = model or MemoryModel()
    return math.ceil(param_count * model.bytes_per_param * model.factor) + data_bytes + model.overhead_bytes


def capacity(specs: PeerSpecs | None) -> int | None:
    """Memory a peer trains in: its GPU's for a GPU peer, the host's for a CPU peer; ``None``: unknown."""
    if specs is None:
        return None
    gpu = specs.training_gpu
    return gpu.memory_bytes if gpu is not None else specs.memory_bytes


def can_hold(specs: PeerSpecs | None, need: int) -> bool:
    have = capacity(specs)
    return have is None or have >= need


def is_large(param_count: int, rules: Rules | None = None) -> bool:
    return param_count >= (rules or Rules()).large_model_params


def queue_order(requests: Iterable[Request]) -> list[Request]:
    """Higher priority first, then request order: first come, first served per priority."""
    return sorted(requests, key=lambda r: (-r.policy.priority, r.order, r.session_id))


def positions(requests: Iterable[Request]) -> dict[str, int]:
    """Session id -> 1-based place in the queue."""
    return {r.session_id: i for i, r in enumerate(queue_order(requests), start=1)}


def cancel(requests: Iterable[Request], session_id: str) -> list[Request]:
    """The queue without ``session_id`` (cancelled while queued); the others keep their order."""
    return [r for r in queue_order(requests) if r.session_id != session_id]


def deadline(request: Request) -> float | None:
    timeout = request.policy.queue_timeout_s
    return None if timeout is None else request.requested_at + timeout


def expired(requests: Iterable[Request], now: float) -> list[Expired]:
    """The queued requests whose ``queue_timeout_s`` has passed at wall time ``now``."""
    out = []
    for r in queue_order(requests):
        end = deadline(r)
        if end is not None and now >= end:
            out.append(
                Expired(r.session_id, f"no {r.num_peers} matching idle peers within {r.policy.queue_timeout_s:g} s")
            )
    return out


# ------------------------------------------------------------------ the plan


@dataclass
class _Shape:
    """Peers alike for placement (same GPU memory, host memory, labels): matched once, not per peer."""

    key: tuple[int, int, tuple[tuple[str, str], ...]]
    specs: PeerSpecs | None
    idle: set[str] = field(default_factory=set)
    online: int = 0

    @property
    def kind(self) -> Kind:
        return "cuda" if self.specs is not None and self.specs.device_index is not None else "cpu"


def _shape_key(specs: PeerSpecs | None) -> tuple[int, int, tuple[tuple[str, str], ...]]:
    if specs is None:
        return (-2, -2, ())
    gpu = specs.training_gpu
    return (gpu.memory_bytes if gpu is not None else -1, specs.memory_bytes, tuple(sorted(specs.labels.items())))


def plan(
    requests: Sequence[Request], peers: Sequence[PeerView], now: float, rules: Rules | None = None
) -> list[Decision]:
    """One decision per request: placed, still queued (with its position), refused, or expired.

    ``peers`` are the online peers, idle or not; each idle peer goes to at most one request.
    """
    rules = rules or Rules()
    shapes: dict[object, _Shape] = {}
    for p in peers:
        key = _shape_key(p.specs)
        shape = shapes.get(key)
        if shape is None:
            shape = shapes[key] = _Shape(key, p.specs)
        shape.online += 1
        if p.idle:
            shape.idle.add(p.peer_id)
    pool = sorted(shapes.values(), key=lambda s: s.key)
    decisions: list[Decision] = []
    waiting: list[tuple[Request, str]] = []
    for request in queue_order(requests):
        end = deadline(request)
        if end is not None and now >= end:
            decisions.extend(expired([request], now))
            continue
        decision = _place(request, pool, rules)
        if isinstance(decision, Placement):
            decisions.append(decision)
        elif request.policy.queues:
            waiting.append((request, decision))
        else:
            decisions.append(Refused(request.session_id, decision))
    decisions.extend(Queued(r.session_id, i, why) for i, (r, why) in enumerate(waiting, start=1))
    return decisions


def _place(request: Request, pool: list[_Shape], rules: Rules) -> Placement | str:
    """The peers for ``request`` (taken out of ``pool``), or why there are too few.

    A queued request that could be served by the online peers that match it and can hold it keeps
    the idle ones out of ``pool`` even when they are too few, so no later request takes them.
    """
    need = memory_needed(request.param_count, request.data_bytes + request.activation_bytes, rules.memory)
    large = is_large(request.param_count, rules)
    prefer: Kind = "cuda" if large else "cpu"
    fitting: list[_Shape] = []
    free = holdable_online = too_small = 0
    for shape in pool:
        if not matches(shape.specs, request.requirements):
            continue
        if not can_hold(shape.specs, need):
            too_small += len(shape.idle)
            continue
        holdable_online += shape.online
        free += len(shape.idle)
        if shape.idle:
            fitting.append(shape)
    if free >= request.num_peers:
        # the preferred kind first; within it the tightest fit (pool is sorted by capacity), then peer id
        fitting.sort(key=lambda s: s.kind != prefer)
        chosen: list[str] = []
        gpus = 0
        for shape in fitting:
            take = sorted(shape.idle)[: request.num_peers - len(chosen)]
            shape.idle.difference_update(take)
            chosen += take
            gpus += len(take) if shape.kind == "cuda" else 0
            if len(chosen) == request.num_peers:
                break
        size = f"{request.param_count:,} parameters"
        why = (
            f"{size} >= {rules.large_model_params:,}: GPU peers first"
            if large
            else f"{size} < {rules.large_model_params:,}: CPU peers first"
        )
        return Placement(
            request.session_id,
            tuple(chosen),
            f"{gpus} GPU and {len(chosen) - gpus} CPU peer(s) matching {_describe(request.requirements)}; "
            f"{why}; each needs about {gib(need)}",
        )
    reserved = request.policy.queues and holdable_online >= request.num_peers
    if reserved:  # first come, first served: later requests may not take these
        for shape in fitting:
            shape.idle.clear()
    small = f", {too_small} more too small to hold about {gib(need)}" if too_small else ""
    held = "; the idle ones are held for it" if reserved and free else ""
    return (
        f"needs {request.num_peers} idle peer(s) matching {_describe(request.requirements)}: "
        f"{free} idle{small}, {holdable_online} online able to hold it{held}"
    )


def _describe(requirements: Requirements) -> str:
    parts = [f"device={requirements.device}"]
    if requirements.min_gpu_memory_bytes:
        parts.append(f"GPU memory >= {gib(requirements.min_gpu_memory_bytes)}")
    if requirements.min_memory_bytes:
        parts.append(f"memory >= {gib(requirements.min_memory_bytes)}")
    if requirements.labels:
        parts.append(labels_text(requirements.labels))
    return "(" + ", ".join(parts) + ")"
