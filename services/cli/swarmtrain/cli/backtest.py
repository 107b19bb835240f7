"""``swarmtrain sessions backtest SESSION_ID --aggregator krum --f 1``: another aggregation rule
tried on a fedavg session's recorded rounds.

For each closed round it takes the updates that round's ``RoundClosed`` named, fetches them from
the blob store (each checked against its sha256, its tensors against the model's, and the
session's norm bound from the round's recorded start, as the peers did), aggregates them with the
other rule (``training.aggregators``), and evaluates both that aggregate and the average the peers
recorded (``RoundAveraged``) on the session's validation split.

What this is, honestly: a per-round counterfactual on the same updates, not a retraining. Round
r's updates were trained from the RECORDED round r-1 model; had the other rule run from the start,
the peers would have trained from other models and sent other updates. So the table says how the
other rule would have combined exactly these updates, round by round (a poisoned update that the
recorded rule let through shows as a gap in that round), not what accuracy a session run with it
would have reached.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping

import msgspec

from swarmtrain.cli import replay
from swarmtrain.common import blob, strategies
from swarmtrain.common.events import RoundAveraged, RoundClosed, SessionEvent, SessionRequested
from swarmtrain.common.fedopts import AggregatorSpec
from swarmtrain.common.settings import Settings
from swarmtrain.training import tensorfile
from swarmtrain.training.aggregators import aggregate
from swarmtrain.training.averaging import check_update, l2_distance
from swarmtrain.training.data import split_indices
from swarmtrain.training.evaluation import evaluate, load_dataset
from swarmtrain.training.model import build_model


class RoundRow(msgspec.Struct, frozen=True, kw_only=True):
    round: int
    updates: int
    """Updates named by the round's ``RoundClosed`` that pass the peers' checks."""
    recorded_accuracy: float | None
    other_accuracy: float | None
    selected: list[str]
    """The peers whose updates the other rule used (Krum: its choice)."""
    note: str = ""
    """Why the other rule gave no model for this round."""


class Backtest(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    recorded_rule: str
    other_rule: str
    rows: list[RoundRow]


async def read_session(settings: Settings, session_id: str) -> list[SessionEvent]:
    """The session's events, in log order."""
    return await replay.read_session(settings, session_id, "backtest")


def describe(spec: AggregatorSpec) -> str:
    match spec.name:
        case "trimmed_mean":
            return f"trimmed_mean(beta={spec.beta})"
        case "krum":
            return f"krum(f={spec.f})"
        case "multi_krum":
            return f"multi_krum(f={spec.f}, m={spec.m if spec.m is not None else 'n-f'})"
    return spec.name


def backtest(settings: Settings, session_id: str, other: AggregatorSpec) -> Backtest:
    """Every closed round of the session: the recorded model and ``other``'s, on the validation split."""
    events = asyncio.run(read_session(settings, session_id))
    request = next((e for e in events if isinstance(e, SessionRequested)), None)
    if request is None:
        raise ValueError(f"no session {session_id} in the log")
    if not strategies.rules(request.strategy).rounds:
        raise ValueError(f"session {session_id} is a {request.strategy}: it has no rounds to backtest")
    closed = {e.round: e for e in events if isinstance(e, RoundClosed)}
    averaged: dict[int, RoundAveraged] = {}
    for e in events:
        if isinstance(e, RoundAveraged):
            averaged.setdefault(e.round, e)
    if not closed:
        raise ValueError(f"session {session_id} has no closed round")

    def get(uri: str, sha256: str | None = None) -> bytes:
        store, key = blob.resolve(uri, settings)
        return store.get_bytes(key, sha256=sha256)

    store, _ = blob.resolve(request.dataset_uri, settings)
    dataset = load_dataset(store, request)
    _, val_idx = split_indices(len(dataset), request.validation_split, request.seed)
    x_val, y_val = dataset.features[val_idx], dataset.labels[val_idx]
    n_features, n_classes = dataset.features.shape[1], len(dataset.classes)

    def accuracy(tensors: Mapping[str, object]) -> float | None:
        model = build_model(request.model, n_features, n_classes)
        model.load_state_dict(tensors, strict=True)
        return evaluate(model, x_val, y_val)[1]

    rows: list[RoundRow] = []
    for r in sorted(closed):
        stored = averaged.get(r)
        if stored is None:
            rows.append(RoundRow(round=r, updates=0, recorded_accuracy=None, other_accuracy=None, selected=[],
                                 note="no stored average"))  # fmt: skip
            continue
        recorded = tensorfile.loads(get(stored.uri, stored.sha256))
        previous = averaged.get(r - 1)
        start = tensorfile.loads(get(previous.uri, previous.sha256)) if previous is not None else None
        updates = []
        for update in closed[r].updates:
            try:
                data = get(update.uri)
            except (blob.BlobNotFound, ValueError):
                continue
            if hashlib.sha256(data).hexdigest() != update.sha256.lower():
                continue
            try:
                tensors = tensorfile.loads(data)
            except Exception:  # untrusted bytes: refused, as the peers refuse them
                continue
            if check_update(tensors, recorded) is not None:
                continue
            bound = request.max_update_norm
            if bound is not None and start is not None and not l2_distance(tensors, start) <= bound:
                continue
            updates.append((update.peer_id, tensors, update.num_samples))
        try:
            result = aggregate(other, updates)
        except ValueError as exc:
            rows.append(RoundRow(round=r, updates=len(updates), recorded_accuracy=accuracy(recorded),
                                 other_accuracy=None, selected=[], note=str(exc)))  # fmt: skip
            continue
        rows.append(
            RoundRow(
                round=r,
                updates=len(updates),
                recorded_accuracy=accuracy(recorded),
                other_accuracy=accuracy(result.tensors),
                selected=list(result.selected),
            )
        )
    recorded_rule = getattr(request, "aggregator", None)
    return Backtest(
        session_id=session_id,
        recorded_rule=describe(recorded_rule) if isinstance(recorded_rule, AggregatorSpec) else "mean",
        other_rule=describe(other),
        rows=rows,
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def render(result: Backtest) -> str:
    """The per-round table, and what it is."""
    head = ("round", "updates", f"recorded {result.recorded_rule}", result.other_rule, "delta", "selected / note")
    body = []
    for row in result.rows:
        delta = (
            f"{100 * (row.other_accuracy - row.recorded_accuracy):+.2f}"
            if row.other_accuracy is not None and row.recorded_accuracy is not None
            else "-"
        )
        body.append(
            (
                str(row.round),
                str(row.updates),
                _pct(row.recorded_accuracy),
                _pct(row.other_accuracy),
                delta,
                row.note or ", ".join(row.selected),
            )
        )
    widths = [max(len(cells[i]) for cells in [head, *body]) for i in range(len(head))]
    lines = [f"session {result.session_id}: validation accuracy (%) per round, recorded rule vs {result.other_rule}"]
    for cells in [head, *body]:
        lines.append("  ".join(c.rjust(w) if i < 5 else c for i, (c, w) in enumerate(zip(cells, widths, strict=True))))
    lines.append(
        "a per-round counterfactual on the same recorded updates, not a retraining: each round's updates "
        "were trained from the recorded model of the round before"
    )
    return "\n".join(lines)
