"""Checking a session request, as pure functions.

msgspec has checked each value against the contract's rules when it decoded the body (see
``swarmtrain.common.events``); what is left here are the rules that join values, or that depend on
the configured caps, the strategy (``strategies``) or the dataset's shape (``common.shapes``; a
model kind's facts are in ``common.models``).
``plan_session`` checks what the request alone decides; ``check_against_dataset`` what needs the
dataset's shape too. Both raise ``ClientException`` (400) naming the first bad value.
"""

from __future__ import annotations

import msgspec
from litestar.exceptions import ClientException

from swarmtrain.common import models, shapes
from swarmtrain.common import search as searching
from swarmtrain.common.events import (
    DataRead,
    Hyperparameters,
    InitFrom,
    ModelSpec,
    OnPeerFailure,
    Precision,
    Strategy,
    ValidationData,
)
from swarmtrain.common.fedopts import ROUND_OPTIONS, OuterSpec, RoundOptions, check_options, resolve_outer
from swarmtrain.common.search import SearchSpec
from swarmtrain.common.settings import Settings
from swarmtrain.common.specs import Requirements
from swarmtrain.common.strategies import rules, with_rounds
from swarmtrain.gateway.errors import describe
from swarmtrain.gateway.sessions.schemas import HyperparametersIn, SessionIn


class SessionPlan(msgspec.Struct, frozen=True, kw_only=True):
    """A checked session request: each field is ``SessionRequested``'s of the same name, which
    ``commands.request_session`` builds from them whole (``msgspec.structs.asdict``)."""

    strategy: Strategy
    num_peers: int
    model: ModelSpec
    hyperparameters: list[Hyperparameters]
    validation_split: float
    seed: int
    rounds: int
    on_peer_failure: OnPeerFailure
    round_options: RoundOptions = msgspec.field(default_factory=lambda: RoundOptions(outer=resolve_outer(OuterSpec())))
    """The outer step resolved (``fedopts.resolve_outer``): the log holds the learning rate, not "the default"."""
    init_from: InitFrom | None = None
    requirements: Requirements | None = None
    queue: bool = False
    queue_timeout_s: float | None = None
    priority: int = 0
    precision: Precision = "fp32"
    data_read: DataRead = "whole"
    """``shard`` for a strategy with rounds: its peers read only their shards (``events.DataRead``)."""
    search: SearchSpec | None = None
    validation: ValidationData | None = None
    """The session's own validation set (``validation_dataset_id``), once the gateway checked it."""

    @property
    def queues(self) -> bool:
        """Whether the session may wait for peers (no 400 when too few are idle now)."""
        return self.queue or self.queue_timeout_s is not None


def _given(options: object) -> dict[str, object]:
    """The round options a request sets (flat in ``SessionIn``, or its ``round_options``)."""
    return {name: value for name in ROUND_OPTIONS if (value := getattr(options, name, None)) is not None}


def _round_options(data: SessionIn) -> RoundOptions:
    """The request's round options: 400 for one given twice, one asked of a strategy without
    rounds, or one its peers cannot follow. The outer step's learning rate is resolved."""
    flat, nested = _given(data), _given(data.round_options)
    if twice := [name for name in ROUND_OPTIONS if name in flat and name in nested]:
        raise ClientException(f"{twice[0]} is given twice: as a field and in round_options")
    given = nested | flat
    first = next(iter(name for name in ROUND_OPTIONS if name in given), None)
    if first is not None and not rules(data.strategy).rounds:
        raise ClientException(
            f"{first} applies to {', '.join(with_rounds())} only: a {data.strategy} averages no updates"
        )
    options = msgspec.convert(given, RoundOptions, from_attributes=True)
    options = msgspec.structs.replace(options, outer=resolve_outer(options.outer))
    if rules(data.strategy).rounds and (reason := check_options(data.num_peers, options.aggregator, options.sharding)):
        raise ClientException(reason)
    return options


def _requirements(data: SessionIn) -> Requirements | None:
    given = data.requirements
    if given is None:
        return None
    try:
        requirements = Requirements(
            device=given.device,
            min_gpu_memory_bytes=given.min_gpu_memory_bytes,
            min_memory_bytes=given.min_memory_bytes,
            labels=dict(given.labels),
        )
    except ValueError as exc:
        raise ClientException(f"requirements: {exc}") from None
    return None if requirements.asks_nothing else requirements


def _at_most(name: str, value: int, cap: int) -> None:
    if value > cap:
        raise ClientException(f"{name} must be between 1 and {cap}, not {value}")


def _model(model: object) -> ModelSpec:
    """The kind's spec of the request's ``model`` (``ModelIn``): 400 for a field of another kind,
    or one the kind needs and lacks."""
    kind = str(getattr(model, "kind", "mlp"))
    given = {name: value for name in models.INPUT_FIELDS if (value := getattr(model, name, None)) is not None}
    try:
        return models.from_fields(kind, given)
    except shapes.ShapeError as exc:
        raise ClientException(str(exc)) from None


def _hyperparameters(data: SessionIn, settings: Settings) -> list[Hyperparameters]:
    hps, strategy = data.hyperparameters, rules(data.strategy)
    if isinstance(hps, list):
        if strategy.shared_model:
            raise ClientException(
                f"{data.strategy} takes one hyperparameters object (the peers train one model together), not a list"
            )
        if len(hps) != data.num_peers:
            raise ClientException(
                f"hyperparameters has {len(hps)} entries for {data.num_peers} peers: "
                "give one per peer, or a single object for all"
            )
        sets = hps
    else:
        sets = [hps] * data.num_peers
    max_epochs = settings.max_epochs // data.rounds
    for i, hp in enumerate(sets):
        if hp.epochs > max_epochs:
            where = f"hyperparameters[{i}]" if isinstance(hps, list) else "hyperparameters"
            per = f" per round ({data.rounds} rounds)" if strategy.rounds else ""
            raise ClientException(
                f"{where}.epochs must be at most {max_epochs}{per}: a peer trains at most {settings.max_epochs} epochs"
            )
    return [Hyperparameters(**msgspec.structs.asdict(h)) for h in sets]


def _search(data: SessionIn, spec: SearchSpec, base: Hyperparameters, model: ModelSpec, settings: Settings) -> None:
    """A search's space, checked against the session's own values (``common.search.check``)."""
    if rules(data.strategy).rounds:
        raise ClientException(f"search applies to a sweep only, not to {data.strategy}")
    if isinstance(data.hyperparameters, list):
        raise ClientException("a search takes one hyperparameters object (each trial's starting values), not a list")
    if reason := searching.check(spec, base, model):
        raise ClientException(f"search: {reason}")
    epochs = spec.space.get("epochs")
    if epochs is not None and max(int(v) for v in epochs.ends() if not isinstance(v, str)) > settings.max_epochs:
        raise ClientException(f"search: epochs must be at most {settings.max_epochs}")


def plan_session(data: SessionIn, settings: Settings) -> SessionPlan:
    """Check a decoded session request; raises ``ClientException`` (400) naming the first bad value."""
    _at_most("num_peers", data.num_peers, settings.max_num_peers)
    if rules(data.strategy).rounds:
        _at_most("rounds", data.rounds, settings.max_rounds)
    elif data.rounds != 1:
        raise ClientException(
            f"rounds applies to {', '.join(with_rounds())} only: a {data.strategy} has 1 round, not {data.rounds}"
        )
    model = _model(data.model)
    hyperparameters = _hyperparameters(data, settings)
    if data.search is not None:
        hyperparameters = hyperparameters[:1]
        _search(data, data.search, hyperparameters[0], model, settings)
    return SessionPlan(
        search=data.search,
        strategy=data.strategy,
        num_peers=data.num_peers,
        model=model,
        hyperparameters=hyperparameters,
        validation_split=data.validation_split,
        seed=data.seed,
        rounds=data.rounds,
        on_peer_failure=data.on_peer_failure,
        round_options=_round_options(data),
        init_from=None
        if data.init_from is None
        else InitFrom(session_id=data.init_from.session_id, round=data.init_from.round),
        requirements=_requirements(data),
        queue=data.queue,
        queue_timeout_s=data.queue_timeout_s,
        priority=data.priority,
        precision=data.precision,
        data_read="shard" if rules(data.strategy).rounds else "whole",
    )


def parse_session(fields: dict[str, object]) -> SessionIn:
    """A ``SessionIn`` from values that did not come as a JSON body (a form), checked as a body is."""
    try:
        return msgspec.convert(fields, SessionIn)
    except msgspec.ValidationError as exc:
        raise ClientException(describe(exc)) from None


def parse_hyperparameters(raw: str) -> list[HyperparametersIn] | HyperparametersIn:
    """The form's ``hyperparameters`` field: JSON of one set or a list of them."""
    try:
        return msgspec.json.decode(raw, type=list[HyperparametersIn] | HyperparametersIn)
    except msgspec.ValidationError as exc:  # a DecodeError too: first
        raise ClientException(describe(exc, "hyperparameters")) from None
    except msgspec.DecodeError as exc:
        raise ClientException(
            f"hyperparameters is not valid JSON of [{{epochs, batch_size, lr}}, ...]: {exc}"
        ) from None


def check_against_dataset(
    plan: SessionPlan,
    *,
    rows: int,
    features: int,
    classes: int,
    settings: Settings,
    shape: models.DataShape | None = None,
) -> None:
    """What needs the dataset: the model's shapes (a layers model's layer by layer, an image's
    size), its size, the shards. ``shape``: the dataset's, where it says more (an image)."""
    try:
        params = models.parameter_count(plan.model, features, classes, shape)
    except shapes.ShapeError as exc:
        raise ClientException(f"model: {exc}") from None
    if params > settings.max_model_params:
        raise ClientException(
            f"the model would have {params:,} parameters on this dataset: at most {settings.max_model_params:,}"
        )
    if rules(plan.strategy).sharded:
        train = rows if plan.validation is not None else shapes.training_rows(rows, plan.validation_split)
        try:
            shapes.shard_sizes(train, plan.num_peers)
        except shapes.ShapeError as exc:
            raise ClientException(f"{plan.strategy}: {exc}: ask for at most {train} peers") from None


def training_bytes(plan: SessionPlan, shape: models.DataShape) -> tuple[models.Costs, int]:
    """The model's costs on ``shape`` and the memory its largest batch trains in (``Costs.training_bytes``)."""
    costs = plan.model.costs(shape)
    batch = max((hp.batch_size for hp in plan.hyperparameters), default=1)
    return costs, costs.training_bytes(batch)


def check_fits_a_peer(plan: SessionPlan, shape: models.DataShape, capacities: list[int]) -> None:
    """400 when the model needs more memory than every online peer trains in (``capacities``:
    each one's GPU memory, or its host's for a CPU peer; empty: none is known, nothing to check)."""
    if not capacities:
        return
    try:
        costs, need = training_bytes(plan, shape)
    except shapes.ShapeError as exc:
        raise ClientException(f"model: {exc}") from None
    if need > (most := max(capacities)):
        raise ClientException(
            f"the model needs about {need / 2**30:,.2f} GiB to train ({costs.parameters:,} parameters, "
            f"{costs.activations:,} activation values and {costs.flops:,} FLOPs per sample), more than any "
            f"online peer has: the largest holds {most / 2**30:,.2f} GiB"
        )
