"""A session's round options: how updates are aggregated, stepped, compressed, sharded and bounded.

:class:`RoundOptions` is the one value that holds them, declared once here: it travels whole from the
REST input (``SessionIn`` derives its flat fields from it) to ``SessionRequested.round_options``,
``Train.round_options`` and the training library's rounds (``swarmtrain.training.rounds``). Adding a
round option is one field of :class:`RoundOptions` (with a default that is today's behaviour) plus
its rule in the training library. Events stored before the options were one value held them flat;
``events.upcast`` reads those.

Plain msgspec Structs with their constraints in ``msgspec.Meta``, whose defaults are today's
behaviour. No torch here: the gateway validates a request with :func:`check_options` (a reason for
a 400, or None) without importing the peer's numerics. The rules themselves live in
``swarmtrain.training.{aggregators,outer,compression,sharding,rounds}``.

Every default that could matter to a replay is a concrete value, not "whatever the code says
today": the gateway stores :func:`resolve_outer`'s result, so a later change of default never
changes what an old session's log means.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

AggregatorName = Literal["mean", "trimmed_mean", "median", "krum", "multi_krum"]
OuterName = Literal["none", "momentum", "nesterov", "adam"]
CompressionName = Literal["none", "fp16", "bf16", "int8"]
ShardingName = Literal["iid", "label_skew"]

Fraction = Annotated[float, msgspec.Meta(ge=0.0, lt=0.5, description="Fraction trimmed from each end.")]
Faulty = Annotated[int, msgspec.Meta(ge=0, le=1_000, description="Peers assumed faulty.")]
Positive = Annotated[int, msgspec.Meta(ge=1, le=1_000)]
Rate = Annotated[float, msgspec.Meta(gt=0.0, le=100.0, description="Outer learning rate.")]
Beta = Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)]
Epsilon = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Concentration = Annotated[float, msgspec.Meta(gt=0.0, le=1e6, description="Dirichlet concentration.")]
MAX_UPDATE_NORM: Final = 1e12
UpdateNorm = Annotated[
    float,
    msgspec.Meta(
        gt=0,
        le=MAX_UPDATE_NORM,
        description="fedavg: reject an update whose L2 norm (minus the round's starting model) exceeds this.",
    ),
]
"""A bound on an update's L2 norm: positive, and finite by its upper bound (JSON's ``1e999`` decodes
to infinity, which ``gt=0`` alone lets by)."""


class AggregatorSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a round's accepted updates become one model.

    ``mean``: weighted by ``num_samples`` (today's). ``trimmed_mean``: per coordinate, drop the
    ``floor(beta * n)`` largest and smallest values, average the rest. ``median``: per coordinate.
    ``krum``: the one update closest to its ``n - f - 2`` nearest others. ``multi_krum``: the
    unweighted mean of the ``m`` best-scored updates (``m`` None: ``n - f``). Krum needs
    ``n >= 2f + 3`` participants.
    """

    name: AggregatorName = "mean"
    beta: Fraction = 0.25
    """trimmed_mean: the fraction of updates trimmed from each end, per coordinate."""
    f: Faulty = 1
    """krum, multi_krum: how many participants are assumed faulty."""
    m: Positive | None = None
    """multi_krum: how many updates are averaged; None is ``n - f``."""


class OuterSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The server-side step on the round's pseudo-gradient ``g = start - aggregate``.

    ``none``: the aggregate is the next model (today's). ``momentum`` (FedAvgM):
    ``v = beta1 v + g; w = start - lr v``. ``nesterov`` (DiLoCo's outer step, torch SGD's
    nesterov form): ``v = beta1 v + g; w = start - lr (g + beta1 v)``. ``adam`` (FedAdam, with
    Adam's bias correction): ``w = start - lr m_hat / (sqrt(v_hat) + eps)``. ``lr`` None means
    the rule's default (:data:`OUTER_DEFAULT_LR`); store :func:`resolve_outer`'s result.
    """

    name: OuterName = "none"
    lr: Rate | None = None
    beta1: Beta = 0.9
    """momentum and nesterov: the momentum; adam: the first moment's decay."""
    beta2: Beta = 0.99
    """adam: the second moment's decay."""
    eps: Epsilon = 1e-3
    """adam: added to the root of the second moment (FedAdam's tau; larger than Adam's usual 1e-8
    because pseudo-gradients are small and sparse)."""


OUTER_DEFAULT_LR: dict[str, float] = {"none": 1.0, "momentum": 1.0, "nesterov": 0.7, "adam": 0.03}


class CompressionSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a peer's update travels: ``none`` (full weights, today's) or its delta from the round's
    start in ``fp16``, ``bf16`` or ``int8`` with one float32 scale per tensor."""

    name: CompressionName = "none"


class ShardingSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the training rows are cut into shards: ``iid`` (today's seeded equal split) or
    ``label_skew``: per class, Dirichlet(``alpha``) proportions over the shards (small alpha,
    few classes per shard), deterministic from the session's seed."""

    name: ShardingName = "iid"
    alpha: Concentration = 1.0
    """label_skew: the Dirichlet concentration."""


def check_krum(n: int, f: int) -> str | None:
    """Why Krum cannot run with ``n`` participants assuming ``f`` faulty (it needs ``n >= 2f + 3``);
    None when it can."""
    if f < 0:
        return f"f must be at least 0, got {f}"
    if n < 2 * f + 3:
        return f"krum with f={f} needs at least {2 * f + 3} participants (n >= 2f + 3), got {n}"
    return None


def check_aggregator(spec: AggregatorSpec, n: int) -> str | None:
    """Why ``spec`` cannot aggregate ``n`` participants' updates; None when it can.

    For a request, ``n`` is ``num_peers``. A trimmed mean that would trim nothing is refused too:
    it would silently be the unweighted mean.
    """
    if n < 1:
        return f"at least one participant is needed, got {n}"
    if spec.name == "trimmed_mean" and int(spec.beta * n) < 1:
        return f"trimmed_mean with beta={spec.beta} trims no update of {n}; beta must be at least {1 / n:.3g}"
    if spec.name in ("krum", "multi_krum") and (reason := check_krum(n, spec.f)):
        return reason
    if spec.name == "multi_krum" and spec.m is not None and spec.m > n - spec.f:
        return f"multi_krum averages at most n - f = {n - spec.f} updates, m={spec.m} asked"
    return None


KRUM_FALLBACK = AggregatorSpec(name="median")
"""What a round aggregates with where Krum cannot run on the updates left acceptable (``n < 2f + 3``,
or fewer than ``m + f`` for multi_krum): a robust rule that needs no ``f``. The round's fact names it."""


def applied_rule(spec: AggregatorSpec, accepted: int) -> AggregatorSpec:
    """The rule a round with ``accepted`` acceptable updates applies: ``spec``, or
    :data:`KRUM_FALLBACK` where ``spec`` is a Krum that cannot run on that many."""
    if spec.name in ("krum", "multi_krum") and check_aggregator(spec, accepted) is not None:
        return KRUM_FALLBACK
    return spec


def possible_rules(spec: AggregatorSpec) -> set[str]:
    """The names a round of a session with ``spec`` may say it applied."""
    return {spec.name, KRUM_FALLBACK.name} if spec.name in ("krum", "multi_krum") else {spec.name}


def resolve_outer(spec: OuterSpec) -> OuterSpec:
    """``spec`` with its learning rate filled in: what a session's log should hold."""
    if spec.lr is not None:
        return spec
    return msgspec.structs.replace(spec, lr=OUTER_DEFAULT_LR[spec.name])


def check_options(
    num_peers: int,
    aggregator: AggregatorSpec | None = None,
    sharding: ShardingSpec | None = None,
) -> str | None:
    """Why a fedavg request with these options cannot run (a 400's reason); None when it can."""
    if aggregator is not None and (reason := check_aggregator(aggregator, num_peers)):
        return reason
    if sharding is not None and sharding.name == "label_skew" and num_peers < 2:
        return "label_skew needs at least 2 peers"
    return None


class RoundOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How a session that trains in rounds turns its peers' updates into the next model: the one
    value ``SessionRequested``, ``Train``, the read model (``GET /sessions/{id}``'s
    ``round_options``) and the training library's rounds hold. Every default is today's behaviour;
    a strategy without rounds takes the defaults (the gateway refuses any other value for it)."""

    aggregator: AggregatorSpec = msgspec.field(default_factory=AggregatorSpec)
    """How a round's accepted updates become one model (``mean``: weighted by sample count)."""
    outer: OuterSpec = msgspec.field(default_factory=OuterSpec)
    """The outer step on the round's pseudo-gradient, its ``lr`` resolved by the gateway
    (:func:`resolve_outer`) so a later change of default never changes what a log means."""
    compression: CompressionSpec = msgspec.field(default_factory=CompressionSpec)
    """How an update travels (``none``: whole weights; else the delta in fp16/bf16/int8)."""
    sharding: ShardingSpec = msgspec.field(default_factory=ShardingSpec)
    """How the training rows are cut into shards (``iid`` or ``label_skew``)."""
    keep_local_optimizer: bool = False
    """Each peer keeps its local optimizer's state across rounds (a fresh one per round otherwise;
    a peer that takes a shard over starts with a fresh one either way)."""
    max_update_norm: UpdateNorm | None = None
    """The largest L2 norm of an update (its weights minus the round's starting model) that is
    averaged; a larger one is rejected, by every peer alike. None: only non-finite or misshapen
    updates are."""


ROUND_OPTIONS: Final = tuple(RoundOptions.__struct_fields__)
"""The round options' names, in order: also the flat fields events stored before they were one value."""


def describe(options: RoundOptions) -> str:
    """One line for a person: ``krum(f=1) · nesterov(lr=0.7, beta1=0.9) · int8 · label_skew(alpha=0.5)``."""
    a = options.aggregator
    parts: list[str] = [a.name]
    if a.name == "trimmed_mean":
        parts[-1] += f"(beta={a.beta:g})"
    elif a.name in ("krum", "multi_krum"):
        parts[-1] += f"(f={a.f}" + (f", m={a.m}" if a.m is not None else "") + ")"
    o = resolve_outer(options.outer)
    if o.name != "none":
        extra = f", beta2={o.beta2:g}, eps={o.eps:g}" if o.name == "adam" else ""
        parts.append(f"{o.name}(lr={o.lr:g}, beta1={o.beta1:g}{extra})")
    if options.compression.name != "none":
        parts.append(options.compression.name)
    if options.sharding.name != "iid":
        parts.append(f"{options.sharding.name}(alpha={options.sharding.alpha:g})")
    if options.keep_local_optimizer:
        parts.append("keep_local_optimizer")
    if options.max_update_norm is not None:
        parts.append(f"max_update_norm={options.max_update_norm:g}")
    return " · ".join(parts)
