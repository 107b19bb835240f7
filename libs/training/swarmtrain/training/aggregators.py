"""Aggregation rules for a fedavg round: pure functions, the same bytes on every machine.

Each rule takes ``(peer_id, tensors, num_samples)`` updates, as :func:`averaging.weighted_average`
does, and returns an :class:`Aggregate`: the tensors and which updates went into them (so a round
fact can name Krum's choice). The rules keep averaging's conventions, so that a round stays
recomputable bit for bit wherever it runs:

- updates are sorted by peer id first, so the input order never matters;
- float tensors are computed in float64 on the CPU and cast back once to each tensor's dtype;
- only elementwise IEEE operations, a stable sort, and sums in a fixed order: no library
  reduction whose order could vary with the CPU's vector width (see :func:`_fixed_sum`);
- ties are broken by peer id;
- a non-float tensor (a step counter) is taken from the first update by peer id (Krum: from the
  chosen update).

The robust rules (trimmed mean, median, Krum) weight every update equally: ``num_samples`` is
what a peer claims, and a rule meant to resist a faulty peer must not let it buy weight. They work
on whatever they are given, whole weights or deltas from the round's start; for Krum the two are
the same (distances between weights are distances between deltas).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from swarmtrain.common.fedopts import AggregatorSpec, check_aggregator, check_krum
from swarmtrain.training.averaging import Tensors, weighted_average

Update = tuple[str, Mapping[str, torch.Tensor], int]
"""``(peer_id, tensors, num_samples)``."""

__all__ = [
    "AGGREGATORS",
    "Aggregate",
    "AggregatorSpec",
    "aggregate",
    "check_aggregator",
    "check_krum",
    "krum",
    "krum_scores",
    "mean",
    "median",
    "multi_krum",
    "trimmed_mean",
]


@dataclass(frozen=True)
class Aggregate:
    tensors: Tensors
    selected: tuple[str, ...]
    """Peer ids whose updates went into ``tensors``, sorted; for the coordinate-wise rules, all."""
    scores: dict[str, float] = field(default_factory=dict)
    """Krum: each peer's score (sum of squared distances to its nearest others); lower is better."""


def mean(updates: Sequence[Update]) -> Aggregate:
    """Today's rule: the ``num_samples``-weighted mean (:func:`averaging.weighted_average`)."""
    ordered = _ordered(updates)
    return Aggregate(weighted_average(list(ordered)), tuple(u[0] for u in ordered))


def trimmed_mean(updates: Sequence[Update], beta: float) -> Aggregate:
    """Per coordinate: sort the n values, drop the ``floor(beta * n)`` smallest and largest, and
    take the unweighted mean of the rest. ``0 <= beta < 0.5``; ``beta * n < 1`` trims nothing."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    ordered = _ordered(updates)
    k = int(beta * len(ordered))

    def rule(stacked: torch.Tensor) -> torch.Tensor:
        kept = torch.sort(stacked, dim=0, stable=True).values[k : stacked.shape[0] - k]
        return _fixed_sum(kept) / float(kept.shape[0])

    return _coordinatewise(ordered, rule)


def median(updates: Sequence[Update]) -> Aggregate:
    """Per coordinate: the middle value, or the mean of the two middle ones for an even count."""
    ordered = _ordered(updates)

    def rule(stacked: torch.Tensor) -> torch.Tensor:
        s = torch.sort(stacked, dim=0, stable=True).values
        n = s.shape[0]
        if n % 2:
            return s[n // 2].clone()
        return (s[n // 2 - 1] + s[n // 2]) / 2.0

    return _coordinatewise(ordered, rule)


def krum_scores(updates: Sequence[Update], f: int) -> dict[str, float]:
    """Each update's Krum score: the sum of its squared distances to its ``n - f - 2`` nearest
    other updates, over every float tensor. Raises ValueError unless ``n >= 2f + 3``."""
    ordered = _ordered(updates)
    if reason := check_krum(len(ordered), f):
        raise ValueError(reason)
    flats = [_flat64(tensors) for _, tensors, _ in ordered]
    n = len(ordered)
    dist = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            d = flats[i] - flats[j]
            dist[i][j] = dist[j][i] = float(_fixed_sum(d * d))
    nearest = n - f - 2
    scores = {}
    for i, (peer_id, _, _) in enumerate(ordered):
        others = sorted(dist[i][j] for j in range(n) if j != i)
        total = 0.0
        for value in others[:nearest]:  # ascending, a fixed order
            total += value
        scores[peer_id] = total
    return scores


def krum(updates: Sequence[Update], f: int) -> Aggregate:
    """The single update with the lowest Krum score (ties: the lowest peer id), unchanged."""
    return multi_krum(updates, f, 1)


def multi_krum(updates: Sequence[Update], f: int, m: int | None = None) -> Aggregate:
    """The unweighted mean of the ``m`` updates with the lowest Krum scores (ties by peer id);
    ``m`` None is ``n - f``. With ``m == 1`` this is Krum: that update, bit for bit."""
    ordered = _ordered(updates)
    scores = krum_scores(ordered, f)
    n = len(ordered)
    m = n - f if m is None else m
    if not 1 <= m <= n - f:
        raise ValueError(f"multi_krum averages 1 to n - f = {n - f} updates, m={m} asked")
    best = sorted(scores, key=lambda peer_id: (scores[peer_id], peer_id))[:m]
    chosen = [u for u in ordered if u[0] in set(best)]
    if m == 1:
        _, tensors, _ = chosen[0]
        out = {name: t.detach().to("cpu").clone() for name, t in sorted(tensors.items())}
    else:
        out = weighted_average([(peer_id, tensors, 1) for peer_id, tensors, _ in chosen])
    return Aggregate(out, tuple(sorted(best)), scores)


Aggregator = Callable[[Sequence[Update], AggregatorSpec], Aggregate]

AGGREGATORS: dict[str, Aggregator] = {
    "mean": lambda updates, spec: mean(updates),
    "trimmed_mean": lambda updates, spec: trimmed_mean(updates, spec.beta),
    "median": lambda updates, spec: median(updates),
    "krum": lambda updates, spec: krum(updates, spec.f),
    "multi_krum": lambda updates, spec: multi_krum(updates, spec.f, spec.m),
}
"""Every rule by the name an :class:`AggregatorSpec` gives."""


def aggregate(spec: AggregatorSpec, updates: Sequence[Update]) -> Aggregate:
    """Apply the rule ``spec`` names. Raises ValueError for no updates, duplicate peer ids, or a
    Krum that ``n`` participants cannot support (the caller decides: fail the round, or fall back)."""
    return AGGREGATORS[spec.name](updates, spec)


# ------------------------------------------------------------------ helpers


def _ordered(updates: Sequence[Update]) -> list[Update]:
    if not updates:
        raise ValueError("nothing to aggregate")
    ordered = sorted(updates, key=lambda u: u[0])
    ids = [peer_id for peer_id, _, _ in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError(f"more than one update from a peer: {ids}")
    return ordered


def _coordinatewise(ordered: list[Update], rule: Callable[[torch.Tensor], torch.Tensor]) -> Aggregate:
    """``rule`` over each float tensor stacked (dim 0: updates by peer id) in float64."""
    first = ordered[0][1]
    out: Tensors = {}
    for name in sorted(first):
        ref = first[name]
        if not ref.is_floating_point():
            out[name] = ref.detach().to("cpu").clone()
            continue
        stacked = torch.stack([tensors[name].detach().to("cpu", torch.float64) for _, tensors, _ in ordered])
        out[name] = rule(stacked).to(ref.dtype)
    return Aggregate(out, tuple(u[0] for u in ordered))


def _flat64(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every float tensor, by name, flattened into one float64 vector on the CPU."""
    floats = [name for name in sorted(tensors) if tensors[name].is_floating_point()]
    parts = [tensors[name].detach().to("cpu", torch.float64).reshape(-1) for name in floats]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _fixed_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over dim 0 in a fixed pairwise order, by elementwise adds only.

    Pads dim 0 with zeros to a power of two and adds its halves until one row is left: the same
    operations, hence the same bits, on every CPU (``torch.sum`` may group differently with the
    machine's vector width). For a 1-D tensor, the sum of its elements as a 0-d tensor.
    """
    rows = x.shape[0]
    if rows == 0:
        return torch.zeros(x.shape[1:], dtype=x.dtype)
    size = 1 << (rows - 1).bit_length()
    if size != rows:
        x = torch.cat([x, torch.zeros((size - rows, *x.shape[1:]), dtype=x.dtype)])
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        x = x[:half] + x[half:]
    return x[0]
