"""One fedavg round as a pure function: the updates a ``RoundClosed`` names -> the next model.

Every peer runs :func:`apply_round` over exactly the updates a ``RoundClosed`` names; a newcomer
runs it over every closed round from the first (:func:`replay_rounds`) to rebuild the model and
the outer optimizer's state; so does ``swarmtrain session replay-round``. The steps, each a pure
function of its inputs (see their modules for why each is bit for bit on any machine):

1. per update, in the order named: fetch its bytes, check their sha256, parse them (safetensors,
   never pickle), check them as the session's ``compression`` encodes an update
   (:func:`compression.check_payload`), rebuild the weights from the round's start
   (:func:`compression.decode_update`), and reject one farther than ``max_update_norm`` from the start;
2. the session's aggregator over the accepted ones (:func:`aggregators.aggregate`); Krum with too
   few acceptable updates for its ``f`` falls back to ``median``, and the result names the rule
   applied;
3. the outer step from the round's start (:func:`outer.outer_step`), carrying its state.

A round with no acceptable update keeps the start and the state as they were.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from swarmtrain.common.blob import BlobNotFound
from swarmtrain.common.events import RoundClosed, RoundUpdate
from swarmtrain.common.fedopts import CompressionName, RoundOptions, applied_rule
from swarmtrain.training import tensorfile
from swarmtrain.training.aggregators import aggregate
from swarmtrain.training.averaging import MAX_REASON, Tensors, UpdateUnavailable, l2_distance, state_bytes
from swarmtrain.training.compression import check_payload, decode_update
from swarmtrain.training.outer import State, outer_step


def needs_start(options: RoundOptions) -> bool:
    """Whether a round's result depends on the weights it started from (else a newcomer may take
    the latest round's result alone)."""
    return options.compression.name != "none" or options.max_update_norm is not None or options.outer.name != "none"


@dataclass(frozen=True)
class RoundResult:
    model: Tensors
    """The next round's weights: the outer step's result (the aggregate itself for ``none``), or
    the round's start where no update was acceptable."""
    state: State
    """The outer optimizer's state after the round."""
    aggregate: Tensors | None
    """The aggregate, before the outer step; None where no update was acceptable."""
    rejected: list[tuple[str, str]]
    """``(peer_id, reason)`` in the order the fact names them."""
    aggregator: str
    """The rule applied (the session's, or ``median`` for a Krum that could not run)."""
    selected: tuple[str, ...]
    """The peers whose updates went into the aggregate, sorted."""
    update_bytes: int
    """The bytes of every update whose file matched its sha256."""


Fetch = Callable[[RoundUpdate], bytes]
Spent = dict[str, float]
"""Seconds per step of a round (``fetch``, ``verify``, ``average``), accumulated."""


def _add(spent: Spent, step: str, began: float) -> float:
    """Add the seconds since ``began`` to ``step``; now."""
    now = time.perf_counter()
    spent[step] = spent.get(step, 0.0) + now - began
    return now


def apply_round(
    closed: RoundClosed,
    fetch: Fetch,
    reference: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    state: State,
    options: RoundOptions,
    *,
    rounds_uri: str | None = None,
    spent: Spent | None = None,
    workers: int = 1,
) -> RoundResult:
    """Round ``closed.round`` from the weights ``start`` and the outer ``state`` it began with.

    ``fetch`` raising :class:`UpdateUnavailable`, ``BlobNotFound`` or ``FileNotFoundError`` rejects
    that update; anything else propagates. With ``rounds_uri``, an update whose uri is not under
    ``<rounds_uri>/<round>/`` is rejected unfetched. ``state`` is not modified. ``workers`` > 1
    fetches and checks that many updates side by side (each is a pure function of its bytes, and
    they are taken in the order named: the result is the same). ``spent``, if given, gains the
    seconds spent in ``fetch``, in checking and decoding (``verify``), summed over the updates, and
    in the aggregator and outer step (``average``): a measurement only, it changes nothing computed.
    """
    spent = {} if spent is None else spent
    first: dict[str, int] = {}  # peer id -> the index of its first update: a second is rejected unloaded
    for i, update in enumerate(closed.updates):
        first.setdefault(update.peer_id, i)
    loading = [closed.updates[i] for i in first.values()]

    def load(update: RoundUpdate) -> tuple[tuple[Tensors | str, int], Spent]:
        took: Spent = {}
        return _load(update, closed.round, fetch, reference, start, options, rounds_uri, took), took

    if workers > 1 and len(loading) > 1:
        with ThreadPoolExecutor(min(workers, len(loading)), thread_name_prefix="round") as pool:
            loaded = list(pool.map(load, loading))
    else:
        loaded = [load(update) for update in loading]
    outcomes: dict[int, tuple[Tensors | str, int]] = {}
    for i, (outcome, took) in zip(first.values(), loaded, strict=True):
        outcomes[i] = outcome
        for step, seconds in took.items():
            spent[step] = spent.get(step, 0.0) + seconds

    accepted: list[tuple[str, Mapping[str, torch.Tensor], int]] = []
    rejected: list[tuple[str, str]] = []
    nbytes = 0
    for i, update in enumerate(closed.updates):
        if first[update.peer_id] != i:
            loaded_as: Tensors | str = "a second update from the same peer in one round"
        else:
            loaded_as, size = outcomes[i]
            nbytes += size
        if isinstance(loaded_as, str):
            rejected.append((update.peer_id, loaded_as[:MAX_REASON]))
        else:
            accepted.append((update.peer_id, loaded_as, update.num_samples))
    if not accepted:
        kept = {name: t.detach().to("cpu").clone() for name, t in sorted(start.items())}
        return RoundResult(kept, dict(state), None, rejected, options.aggregator.name, (), nbytes)
    began = time.perf_counter()
    spec = applied_rule(options.aggregator, len(accepted))
    agg = aggregate(spec, accepted)
    model, new_state = outer_step(options.outer, start, agg.tensors, state)
    _add(spent, "average", began)
    return RoundResult(model, new_state, agg.tensors, rejected, spec.name, agg.selected, nbytes)


def replay_rounds(
    closed: Mapping[int, RoundClosed],
    last: int,
    fetch: Fetch,
    initial: Mapping[str, torch.Tensor],
    options: RoundOptions,
    *,
    rounds_uri: str | None = None,
    on_round: Callable[[int, RoundResult], None] | None = None,
    workers: int = 1,
) -> tuple[Tensors, State]:
    """Rounds ``1 .. last`` from the ``initial`` weights and an empty outer state: the model and
    state after round ``last``, as every peer that took part computed them. ``on_round`` sees each
    round's result (a replay compares each with what was stored); ``workers`` as in :func:`apply_round`."""
    weights: Tensors = {name: t.detach().to("cpu").clone() for name, t in sorted(initial.items())}
    state: State = {}
    for k in range(1, last + 1):
        result = apply_round(closed[k], fetch, initial, weights, state, options, rounds_uri=rounds_uri, workers=workers)
        if on_round is not None:
            on_round(k, result)
        weights, state = result.model, result.state
    return weights, state


def _load(
    update: RoundUpdate,
    round_: int,
    fetch: Fetch,
    reference: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    options: RoundOptions,
    rounds_uri: str | None,
    spent: Spent,
) -> tuple[Tensors | str, int]:
    """The update's weights, or why it is rejected; and the bytes fetched that matched their sha256."""
    if reason := _unfetchable(update, round_, rounds_uri):
        return reason, 0
    began = time.perf_counter()
    try:
        data = fetch(update)
    except (UpdateUnavailable, BlobNotFound, FileNotFoundError) as exc:
        return f"update not available: {exc}", 0
    finally:
        began = _add(spent, "fetch", began)
    try:
        return _check(update, data, reference, start, options)
    finally:
        _add(spent, "verify", began)


def _unfetchable(update: RoundUpdate, round_: int, rounds_uri: str | None) -> str | None:
    """Why ``update`` is rejected before anything is fetched; None if it may be fetched."""
    if update.num_samples < 1:
        return f"num_samples must be at least 1, got {update.num_samples}"
    if rounds_uri is not None and not update.uri.startswith(f"{rounds_uri.rstrip('/')}/{round_}/"):
        return "uri is outside the session's folder for this round"
    return None


def _check(
    update: RoundUpdate,
    data: bytes,
    reference: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    options: RoundOptions,
) -> tuple[Tensors | str, int]:
    """``data`` as the update's weights, or why it is rejected; and its size once its sha256 matched."""
    if hashlib.sha256(data).hexdigest() != update.sha256.lower():
        return "sha256 mismatch", 0
    try:
        payload = tensorfile.loads(data)
    except Exception as exc:  # untrusted bytes: whatever the parser says, the update is unusable
        return f"not a safetensors file: {type(exc).__name__}: {exc}", len(data)
    if reason := check_payload(payload, reference, options.compression.name):
        return reason, len(data)
    weights = decode_update(payload, start, options.compression.name)
    bound = options.max_update_norm
    if bound is not None:
        distance = l2_distance(weights, start)
        if not distance <= bound:
            return (
                f"update norm {distance:.6g} from the round's start exceeds the bound {bound:.6g}",
                len(data),
            )
    return weights, len(data)


def update_file(payload: Mapping[str, torch.Tensor], compression: CompressionName) -> bytes:
    """The bytes a peer publishes for an encoded update: fixed metadata, so the same on any machine;
    ``none`` is the weights file of today (:func:`averaging.state_bytes`)."""
    if compression == "none":
        return state_bytes(payload)
    return tensorfile.dumps(payload, {"format": f"swarmtrain-update/{compression}"})
