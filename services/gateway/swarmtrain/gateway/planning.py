"""Checking a session request, as pure functions: the request bodies, the caps, the model's size.

``plan_session`` checks what the request alone decides; ``check_against_dataset`` what needs the
dataset's shape too. Both raise ``ClientException`` (400) naming the first bad value.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec
from litestar.exceptions import ClientException

from swarmtrain.common.events import Hyperparameters, ModelSpec, OnPeerFailure, Strategy
from swarmtrain.common.settings import Settings

MAX_LAYERS = 32
MAX_WIDTH = 1 << 16
MAX_BATCH_SIZE = 1 << 16
MAX_SEED = 2**63 - 1
DEFAULT_HIDDEN = (128, 64)
DEFAULT_CHANNELS = (16, 32)

# ------------------------------------------------------------------ bodies


class HyperparametersIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    epochs: int
    """Epochs per peer (sweep), or local epochs per round (fedavg)."""
    batch_size: int
    lr: float


class ModelIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    kind: Literal["mlp", "cnn"] = "mlp"
    hidden: list[int] = msgspec.field(default_factory=lambda: list(DEFAULT_HIDDEN))
    """Fully connected layer widths (after the convolutions, for a cnn)."""
    input_shape: list[int] | None = None
    """cnn only, required: [C, H, W] of the image each row's feature columns hold (C*H*W = features)."""
    channels: list[int] | None = None
    """cnn only: convolution widths (default [16, 32])."""


class SessionIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    dataset_id: str
    num_peers: int
    hyperparameters: list[HyperparametersIn] | HyperparametersIn
    """sweep: one set per peer, or one set for all of them; fedavg: one set (the peers train one model)."""
    strategy: Strategy = "sweep"
    model: ModelIn = msgspec.field(default_factory=ModelIn)
    validation_split: float = 0.2
    seed: int = 0
    rounds: int = 1
    """fedavg: averaging rounds (each of ``hyperparameters.epochs`` local epochs); sweep: 1."""
    on_peer_failure: OnPeerFailure = "reassign"
    """fedavg: what a dead or stalled peer means: hand its shard to an idle peer, go on without it, or fail."""


class SessionPlan(msgspec.Struct, frozen=True, kw_only=True):
    strategy: Strategy
    num_peers: int
    model: ModelSpec
    hyperparameters: list[Hyperparameters]
    validation_split: float
    seed: int
    rounds: int
    on_peer_failure: OnPeerFailure


# ------------------------------------------------------------------ checks


def _between(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ClientException(f"{name} must be between {low} and {high}, not {value}")


def _widths(name: str, widths: list[int], *, allow_empty: bool) -> None:
    if not widths and not allow_empty:
        raise ClientException(f"{name} needs at least one width")
    if len(widths) > MAX_LAYERS:
        raise ClientException(f"{name} has {len(widths)} layers: at most {MAX_LAYERS}")
    if any(not 1 <= w <= MAX_WIDTH for w in widths):
        raise ClientException(f"{name} sizes must be between 1 and {MAX_WIDTH}, not {widths}")


def _model(model: ModelIn) -> ModelSpec:
    _widths("model.hidden", model.hidden, allow_empty=True)
    if model.kind == "mlp":
        if model.input_shape is not None or model.channels is not None:
            raise ClientException("model.input_shape and model.channels apply to a cnn only")
        return ModelSpec(kind="mlp", hidden=list(model.hidden))
    shape = model.input_shape
    if shape is None or len(shape) != 3:
        raise ClientException(f"a cnn needs model.input_shape [C, H, W], not {shape}")
    if any(not 1 <= d <= MAX_WIDTH for d in shape):
        raise ClientException(f"model.input_shape sizes must be between 1 and {MAX_WIDTH}, not {shape}")
    channels = list(DEFAULT_CHANNELS) if model.channels is None else model.channels
    _widths("model.channels", channels, allow_empty=False)
    return ModelSpec(kind="cnn", hidden=list(model.hidden), input_shape=list(shape), channels=list(channels))


def _hyperparameters(data: SessionIn, settings: Settings) -> list[Hyperparameters]:
    hps = data.hyperparameters
    if isinstance(hps, list):
        if data.strategy == "fedavg":
            raise ClientException(
                "fedavg takes one hyperparameters object (the peers train one model together), not a list"
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
        where = f"hyperparameters[{i}]" if isinstance(hps, list) else "hyperparameters"
        if hp.epochs < 1:
            raise ClientException(f"{where}.epochs must be at least 1, not {hp.epochs}")
        if hp.epochs > max_epochs:
            per = f" per round ({data.rounds} rounds)" if data.strategy == "fedavg" else ""
            raise ClientException(
                f"{where}.epochs must be at most {max_epochs}{per}: a peer trains at most {settings.max_epochs} epochs"
            )
        _between(f"{where}.batch_size", hp.batch_size, 1, MAX_BATCH_SIZE)
        if not (math.isfinite(hp.lr) and hp.lr > 0):
            raise ClientException(f"{where}.lr must be a positive finite number, not {hp.lr}")
    return [Hyperparameters(epochs=h.epochs, batch_size=h.batch_size, lr=h.lr) for h in sets]


def plan_session(data: SessionIn, settings: Settings) -> SessionPlan:
    """Check a session request on its own; raises ``ClientException`` (400) naming the first bad value."""
    _between("num_peers", data.num_peers, 1, settings.max_num_peers)
    if data.strategy == "fedavg":
        _between("rounds", data.rounds, 1, settings.max_rounds)
    elif data.rounds != 1:
        raise ClientException(f"rounds applies to fedavg only: a sweep has 1 round, not {data.rounds}")
    if not (math.isfinite(data.validation_split) and 0 < data.validation_split <= 0.9):
        raise ClientException(f"validation_split must be in (0, 0.9], not {data.validation_split}")
    _between("seed", data.seed, 0, MAX_SEED)
    model = _model(data.model)
    return SessionPlan(
        strategy=data.strategy,
        num_peers=data.num_peers,
        model=model,
        hyperparameters=_hyperparameters(data, settings),
        validation_split=data.validation_split,
        seed=data.seed,
        rounds=data.rounds,
        on_peer_failure=data.on_peer_failure,
    )


def model_parameters(model: ModelSpec, features: int, classes: int) -> int:
    """Trainable parameters of ``model`` on ``features`` inputs and ``classes`` outputs (as the peers build it:
    3x3 convolutions with padding 1, a 2x2 max-pool after each while the image is at least 2x2)."""
    total, width = 0, features
    if model.kind == "cnn":
        assert model.input_shape is not None
        c, h, w = model.input_shape
        for out in model.channels:
            total += 9 * c * out + out
            if h >= 2 and w >= 2:
                h, w = h // 2, w // 2
            c = out
        width = c * h * w
    for size in [*model.hidden, classes]:
        total += width * size + size
        width = size
    return total


def training_rows(rows: int, validation_split: float) -> int:
    """Rows left for training after the peers' validation split (see ``swarmtrain.peer.data``)."""
    n_val = round(rows * validation_split)
    if validation_split > 0 and rows >= 2:
        n_val = max(1, n_val)
    return rows - min(n_val, max(rows - 1, 0))


def check_against_dataset(plan: SessionPlan, *, rows: int, features: int, classes: int, settings: Settings) -> None:
    """What needs the dataset: a cnn's input shape, the model's size, fedavg's shards."""
    model = plan.model
    if model.kind == "cnn":
        assert model.input_shape is not None
        if math.prod(model.input_shape) != features:
            c, h, w = model.input_shape
            raise ClientException(
                f"model.input_shape {c}x{h}x{w} holds {c * h * w} values but the dataset has {features} feature columns"
            )
    params = model_parameters(model, features, classes)
    if params > settings.max_model_params:
        raise ClientException(
            f"the model would have {params:,} parameters on this dataset: at most {settings.max_model_params:,}"
        )
    if plan.strategy == "fedavg":
        train = training_rows(rows, plan.validation_split)
        if plan.num_peers > train:
            raise ClientException(
                f"{plan.num_peers} fedavg shards of {train} training rows would leave a shard empty: "
                f"ask for at most {train} peers"
            )
