"""Property tests for the wire contract in ``swarmtrain.common.events``.

Strategies are derived from each Struct's msgspec type info, so a field added later is generated
(and round-tripped) without touching this file; a field of a kind not handled below fails loudly.
"""

from __future__ import annotations

import functools
import json
import math
import string
import sys
import typing
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmtrain.common import bus, events
from swarmtrain.common.fedopts import RoundOptions
from swarmtrain.common.specs import PeerSpecs, Requirements
from tests.factories import session_requested

EVENT_TYPES: tuple[type[Any], ...] = typing.get_args(events.Event)
COMMAND_TYPES: tuple[type[Any], ...] = typing.get_args(events.Command)
ALL_TYPES = EVENT_TYPES + COMMAND_TYPES
TAGS = {cls.__name__ for cls in ALL_TYPES}

# ARCHITECTURE.md, "Events": the subject each type lives on, as (template, id field).
SESSION = ("session.{}.events", "session_id")
PEER = ("peer.{}.events", "peer_id")
EXPECTED_SUBJECT: dict[type[Any], tuple[str, str]] = {
    events.UserRegistered: ("user.{}.events", "user_id"),
    events.DatasetUploaded: ("dataset.{}.events", "dataset_id"),
    events.PeerRegistered: PEER,
    events.PeerWentOnline: PEER,
    events.PeerWentOffline: PEER,
    events.PeerLocked: PEER,
    events.PeerReleased: PEER,
    **{cls: SESSION for cls in typing.get_args(events.SessionEvent)},
    events.Train: ("peer.{}.command", "peer_id"),
    events.ReportRejected: PEER,
    events.Stop: ("peer.{}.command", "peer_id"),
    events.SessionFact: ("peer.{}.command", "peer_id"),
}

# Per-type properties run once per message type: fewer examples each keeps the file quick. No
# deadline: on a loaded machine a slow example is not a failure (no timing as pass/fail).
PER_TYPE = settings(max_examples=50, deadline=None)
ANY = settings(deadline=None)

# Ids end up as subject tokens: no dots, spaces or wildcards.
ids = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=32)
floats = st.floats(allow_nan=False, allow_infinity=False)  # JSON has neither
utc_datetimes = st.datetimes(timezones=st.just(UTC))


def _bounds(t: mi.IntType | mi.FloatType, low: float, high: float) -> tuple[float, float]:
    """The range a constrained number may take (``gt``/``lt`` of an int made inclusive)."""
    if t.ge is not None:
        low = t.ge
    elif t.gt is not None:
        low = t.gt + 1 if isinstance(t, mi.IntType) else t.gt
    if t.le is not None:
        high = t.le
    elif t.lt is not None:
        high = t.lt - 1 if isinstance(t, mi.IntType) else t.lt
    return low, high


def strategy(t: mi.Type, name: str = "") -> st.SearchStrategy[Any]:
    """A strategy for any valid value of msgspec type ``t`` (its constraints honoured); ``name`` is
    the field it fills."""
    match t:
        case mi.StrType():
            if t.pattern == events.SUBJECT_TOKEN or (t.pattern is None and name.endswith("_id")):
                return ids
            if t.pattern not in (None, events.NO_NUL):  # the specs' label names and values, versions
                return st.from_regex(t.pattern, fullmatch=True).filter(
                    lambda v: (t.min_length or 0) <= len(v) <= (t.max_length or len(v))
                )
            alphabet = st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00" if t.pattern else "")
            return st.text(alphabet, min_size=t.min_length or 0, max_size=min(t.max_length or 20, 20))
        case mi.IntType():
            low, high = _bounds(t, -(2**63), 2**63 - 1)
            return st.integers(min_value=int(low), max_value=int(high))
        case mi.FloatType():
            low, high = _bounds(t, -math.inf, math.inf)
            return st.floats(
                min_value=None if math.isinf(low) else low,
                max_value=None if math.isinf(high) else high,
                exclude_min=t.gt is not None,
                exclude_max=t.lt is not None,
                allow_nan=False,
                allow_infinity=False,  # JSON has neither
            )
        case mi.BoolType():
            return st.booleans()
        case mi.NoneType():
            return st.none()
        case mi.DateTimeType():
            return utc_datetimes
        case mi.LiteralType():
            return st.sampled_from(t.values)
        case mi.ListType():
            low = t.min_length or 0
            return st.lists(strategy(t.item_type, name), min_size=low, max_size=max(low, min(t.max_length or 3, 3)))
        case mi.DictType():
            low = t.min_length or 0
            return st.dictionaries(
                strategy(t.key_type, "key_id"), strategy(t.value_type), min_size=low, max_size=max(low, 3)
            )
        case mi.UnionType():
            return st.one_of(*(strategy(member, name) for member in t.types))
        case mi.Metadata():  # a described type (``specs.Bytes``): its own rules
            return strategy(t.type, name)
        case mi.StructType():
            if t.cls in _BUILDING:  # a recursive type (a layers model's residual block): one level
                return st.nothing()
            _BUILDING.add(t.cls)
            try:
                fields = {f.name: strategy(f.type, f.name) for f in t.fields}
            finally:
                _BUILDING.discard(t.cls)
            return st.builds(_valid, st.just(t.cls), st.fixed_dictionaries(fields))
    raise NotImplementedError(f"no strategy for {t!r} (field {name!r}): extend tests/common/test_events.py")


_BUILDING: set[type[Any]] = set()
"""The Structs whose strategy is being built: a type met again inside itself is not recursed into."""


def _valid(cls: type[Any], fields: dict[str, Any]) -> Any:
    """``cls(**fields)``, with the one field that joins others made consistent where its
    ``__post_init__`` refuses them: a ``PeerSpecs`` whose ``device_index`` names no GPU, a
    ``device: cpu`` ``Requirements`` with a GPU memory minimum."""
    try:
        return cls(**fields)
    except ValueError:
        if cls is PeerSpecs:
            return cls(**{**fields, "device_index": len(fields["gpus"]) - 1 if fields["gpus"] else None})
        if cls is Requirements:
            return cls(**{**fields, "min_gpu_memory_bytes": 0})
        raise


@functools.cache
def messages_of(cls: type[Any]) -> st.SearchStrategy[Any]:
    """Built once per type: a fresh strategy per example would be validated again each time."""
    return strategy(mi.type_info(cls))


def required_fields(cls: type[Any]) -> list[str]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return [f.encode_name for f in info.fields if f.required]


def wire(message: Any) -> dict[str, Any]:
    decoded = json.loads(events.encode(message))
    assert isinstance(decoded, dict)
    return decoded


# ------------------------------------------------------------------ round trips


def test_the_subject_table_covers_every_type() -> None:
    assert set(EXPECTED_SUBJECT) == set(ALL_TYPES)


@pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda c: c.__name__)
@PER_TYPE
@given(data=st.data())
def test_every_event_round_trips(cls: type[Any], data: st.DataObject) -> None:
    event = data.draw(messages_of(cls))

    decoded = events.decode_event(events.encode(event))

    assert type(decoded) is cls
    assert decoded == event


@pytest.mark.parametrize("cls", COMMAND_TYPES, ids=lambda c: c.__name__)
@ANY
@given(data=st.data())
def test_every_command_round_trips(cls: type[Any], data: st.DataObject) -> None:
    command = data.draw(messages_of(cls))

    decoded = events.decode_command(events.encode(command))

    assert type(decoded) is cls
    assert decoded == command


@ANY
@given(presence=messages_of(events.Presence))
def test_presence_round_trips(presence: events.Presence) -> None:
    assert events.decode_presence(events.encode(presence)) == presence


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
@PER_TYPE
@given(data=st.data())
def test_the_wire_json_carries_type_event_id_and_a_utc_timestamp(cls: type[Any], data: st.DataObject) -> None:
    message = data.draw(messages_of(cls))

    body = wire(message)

    assert body["type"] == cls.__name__
    assert body["event_id"] == message.event_id
    occurred_at = datetime.fromisoformat(body["occurred_at"])
    assert occurred_at.utcoffset() == timedelta(0)
    assert occurred_at == message.occurred_at


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
@PER_TYPE
@given(data=st.data())
def test_defaults_give_a_fresh_id_and_the_current_utc_time(cls: type[Any], data: st.DataObject) -> None:
    fields = msgspec.structs.asdict(data.draw(messages_of(cls)))
    del fields["event_id"], fields["occurred_at"]
    before = datetime.now(UTC)

    first, second = cls(**fields), cls(**fields)

    assert first.event_id != second.event_id
    assert all(c in string.hexdigits for c in first.event_id)
    assert before <= first.occurred_at <= datetime.now(UTC)
    assert wire(first)["occurred_at"].endswith(("Z", "+00:00"))


def _matches(subject: str, pattern: str) -> bool:
    tokens, wanted = subject.split("."), pattern.split(".")
    return len(tokens) == len(wanted) and all(w in ("*", t) for t, w in zip(tokens, wanted, strict=True))


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
@PER_TYPE
@given(data=st.data())
def test_each_message_lives_on_its_subject(cls: type[Any], data: st.DataObject) -> None:
    message = data.draw(messages_of(cls))
    template, id_field = EXPECTED_SUBJECT[cls]

    assert message.subject == template.format(getattr(message, id_field))
    stream_subjects = bus.EVENT_SUBJECTS if cls in EVENT_TYPES else bus.COMMAND_SUBJECTS
    other_subjects = bus.COMMAND_SUBJECTS if cls in EVENT_TYPES else bus.EVENT_SUBJECTS
    assert sum(_matches(message.subject, p) for p in stream_subjects) == 1
    assert not any(_matches(message.subject, p) for p in other_subjects)


# ------------------------------------------------------------------ malformed input

DECODERS = [events.decode_event, events.decode_command]
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)

json_values = st.recursive(
    st.none() | st.booleans() | floats | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize("decode", DECODERS, ids=lambda d: d.__name__)
@ANY
@given(data=st.binary())
def test_garbage_bytes_are_a_decode_error(decode: Any, data: bytes) -> None:
    with pytest.raises(DECODE_ERRORS):
        decode(data)


@pytest.mark.parametrize("decode", DECODERS, ids=lambda d: d.__name__)
@ANY
@given(value=json_values, tag=st.text().filter(lambda t: t not in TAGS))
def test_arbitrary_json_is_a_decode_error(decode: Any, value: Any, tag: str) -> None:
    with pytest.raises(DECODE_ERRORS):
        decode(json.dumps(value).encode())
    if isinstance(value, dict):
        with pytest.raises(DECODE_ERRORS):
            decode(json.dumps({**value, "type": tag}).encode())


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
@PER_TYPE
@given(data=st.data(), tag=st.text().filter(lambda t: t not in TAGS))
def test_an_unknown_type_is_a_validation_error(cls: type[Any], data: st.DataObject, tag: str) -> None:
    body = wire(data.draw(messages_of(cls)))
    body["type"] = tag

    for decode in DECODERS:
        with pytest.raises(msgspec.ValidationError):
            decode(json.dumps(body).encode())


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
@PER_TYPE
@given(data=st.data())
def test_a_missing_or_mistyped_field_is_a_validation_error(cls: type[Any], data: st.DataObject) -> None:
    body = wire(data.draw(messages_of(cls)))
    decode = events.decode_event if cls in EVENT_TYPES else events.decode_command
    field = data.draw(st.sampled_from(["type", *required_fields(cls)]))

    with pytest.raises(msgspec.ValidationError):
        decode(json.dumps({k: v for k, v in body.items() if k != field}).encode())
    with pytest.raises(msgspec.ValidationError):
        decode(json.dumps({**body, field: True}).encode())


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
@PER_TYPE
@given(data=st.data())
def test_an_event_is_not_a_command_nor_the_reverse(cls: type[Any], data: st.DataObject) -> None:
    wrong = events.decode_command if cls in EVENT_TYPES else events.decode_event

    with pytest.raises(msgspec.ValidationError):
        wrong(events.encode(data.draw(messages_of(cls))))


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_the_tag_is_the_class_name(cls: type[Any]) -> None:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    assert (info.tag_field, info.tag) == ("type", cls.__name__)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("hyperparameters", 0, "epochs"), 0, "Expected `int` >= 1"),
        (("hyperparameters", 0, "batch_size"), 1 << 17, "Expected `int` <= 65536"),
        (("hyperparameters", 0, "lr"), 0.0, "Expected `float` > 0"),
        (("model", "hidden"), [1] * 33, "length <= 32"),
        (("model", "input_shape"), [1, 8], "length >= 3"),
        (("model", "channels"), [], "length >= 1"),
        (("validation_split",), 0.0, "Expected `float` > 0"),
        (("seed",), -1, "Expected `int` >= 0"),
        (("num_peers",), 0, "Expected `int` >= 1"),
        (("label_column",), "", "length >= 1"),
    ],
)
def test_the_contract_refuses_values_out_of_its_bounds(path: tuple[str | int, ...], value: Any, message: str) -> None:
    body = wire(session_requested())
    if path[:2] in (("model", "input_shape"), ("model", "channels")):  # a cnn's fields
        body["model"] = {"kind": "cnn", "hidden": [], "input_shape": [1, 8, 8], "channels": [4]}
    events.decode_event(json.dumps(body).encode())
    target: Any = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(msgspec.ValidationError, match=message):
        events.decode_event(json.dumps(body).encode())


def test_non_finite_learning_rates_are_refused() -> None:
    for lr in (math.nan, math.inf):
        with pytest.raises(msgspec.ValidationError, match="lr"):
            msgspec.convert({"epochs": 1, "batch_size": 1, "lr": lr}, events.Hyperparameters)


# ------------------------------------------------------------------ value bounds (issue 10, item 5)
#
# Every value a message carries is bounded where it is decoded, for every producer: integers
# within the PostgreSQL column that stores them, strings without NUL and of bounded length, floats
# finite (or explicitly absent). A value out of bounds is a decode error, never a stored poison.

INF = "__infinity__"
"""Stands for JSON's ``1e999`` (which decodes as an infinity) until the body is serialised."""


def _violations(t: mi.Type, nullable: bool = False) -> st.SearchStrategy[Any] | None:
    """Values JSON can carry that a field of type ``t`` (``| None`` if ``nullable``) must refuse;
    None for an unbounded type."""
    match t:
        case mi.IntType() if t.ge is not None or t.le is not None:
            low, high = _bounds(t, -(2**80), 2**80)
            return st.one_of(st.integers(max_value=int(low) - 1), st.integers(min_value=int(high) + 1))
        case mi.FloatType():
            return st.sampled_from([INF, "-" + INF, *([] if nullable else [None])])
        case mi.StrType() if t.pattern or t.max_length:
            bad: list[st.SearchStrategy[str]] = []
            if t.pattern:
                bad.append(st.builds(lambda a, b: f"{a}\x00{b}", st.text(max_size=5), st.text(max_size=5)))
            if t.max_length:
                bad.append(st.just("x" * (t.max_length + 1)))
            return st.one_of(*bad)
        case mi.UnionType():
            nullable = any(isinstance(m, mi.NoneType) for m in t.types)
            members = [_violations(m, nullable) for m in t.types if not isinstance(m, mi.NoneType)]
            found = [m for m in members if m is not None]
            return st.one_of(*found) if found else None
        case mi.DateTimeType() if t.tz:
            return st.just("2024-01-01T00:00:00")  # no zone
    return None


def _serialise(body: dict[str, Any]) -> bytes:
    return json.dumps(body).replace(f'"{INF}"', "1e999").replace(f'"-{INF}"', "-1e999").encode()


@functools.cache
def _bounded_fields(cls: type[Any]) -> list[tuple[str, st.SearchStrategy[Any]]]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    found = [(f.encode_name, _violations(f.type)) for f in info.fields]
    return [(name, bad) for name, bad in found if bad is not None]


def test_every_number_and_string_field_of_every_message_is_bounded() -> None:
    """No field may escape the rules: each int, float and str (top level) carries a bound."""
    for cls in (
        *ALL_TYPES,
        events.Presence,
        events.RoundUpdate,
        events.Hyperparameters,
        events.MlpSpec,
        events.CnnSpec,
    ):
        info = mi.type_info(cls)
        assert isinstance(info, mi.StructType)
        for f in info.fields:
            t = f.type
            plain = [m for m in t.types if not isinstance(m, mi.NoneType)] if isinstance(t, mi.UnionType) else [t]
            for member in plain:
                if isinstance(member, mi.IntType | mi.FloatType | mi.StrType | mi.DateTimeType):
                    assert _violations(member) is not None, f"{cls.__name__}.{f.name} is unbounded"
                if isinstance(member, mi.ListType | mi.DictType):
                    assert member.max_length is not None, f"{cls.__name__}.{f.name} has no length bound"


@pytest.mark.parametrize("cls", (*ALL_TYPES, events.Presence), ids=lambda c: c.__name__)
@PER_TYPE
@given(data=st.data())
def test_a_value_out_of_its_bounds_fails_decode(cls: type[Any], data: st.DataObject) -> None:
    decode = (
        events.decode_presence
        if cls is events.Presence
        else events.decode_event
        if cls in EVENT_TYPES
        else events.decode_command
    )
    body = wire(data.draw(messages_of(cls)))
    name, bad = data.draw(st.sampled_from(_bounded_fields(cls)))
    value = data.draw(bad)

    with pytest.raises(msgspec.ValidationError):
        decode(_serialise({**body, name: value}))


@pytest.mark.parametrize(
    ("message", "field", "value"),
    [
        (lambda: _beat(), "epoch", 2**31),  # integer column
        (lambda: _beat(), "epochs", -1),
        (lambda: _beat(), "loss", None),  # NaN is written as null
        (lambda: _beat(), "loss", INF),
        (lambda: _beat(), "val_loss", "-" + INF),
        (lambda: _beat(), "peer_id", "p.1"),  # would be two subject tokens
        (lambda: events.PeerRegistered(peer_id="p", name="n", device="cpu"), "name", "evil\x00name"),
        (lambda: events.PeerRegistered(peer_id="p", name="n", device="cpu"), "device", "d" * 257),
        (lambda: _done(), "model_uri", "file:///m\x00"),
        (lambda: _dataset(), "rows", 2**31),
        (lambda: _dataset(), "size_bytes", 2**63),
        (lambda: session_requested(), "rounds", events.MAX_ROUNDS + 1),
        (lambda: events.PeerFailed(session_id="s", peer_id="p", reason="r"), "reason", "r" * (events.MAX_TEXT + 1)),
    ],
)
def test_known_poisons_fail_decode(message: Any, field: str, value: Any) -> None:
    body = wire(message())
    events.decode_event(_serialise(body))
    with pytest.raises(msgspec.ValidationError, match=field):
        events.decode_event(_serialise({**body, field: value}))


def test_values_at_their_bounds_round_trip() -> None:
    edge = [
        msgspec.structs.replace(
            _beat(), epoch=events.INT32_MAX, epochs=0, loss=sys.float_info.max, accuracy=-sys.float_info.max
        ),
        msgspec.structs.replace(_dataset(), rows=events.INT32_MAX, size_bytes=events.INT64_MAX, name="n" * 256),
        events.PeerFailed(session_id="s", peer_id="p", reason="é" * events.MAX_TEXT),
        session_requested(rounds=events.MAX_ROUNDS, hyperparameters=events.Hyperparameters(
            epochs=events.MAX_EPOCHS, batch_size=1, lr=sys.float_info.max
        )),
    ]  # fmt: skip
    for event in edge:
        assert events.decode_event(events.encode(event)) == event
    assert events.MAX_EPOCHS * events.MAX_ROUNDS <= events.INT32_MAX  # a run's epochs fit its column


def test_bounded_text_makes_any_reason_a_valid_one() -> None:
    reason = events.bounded_text("boom\x00" + "x" * 20_000)
    event = events.PeerFailed(session_id="s", peer_id="p", reason=reason)
    assert events.decode_event(events.encode(event)) == event
    assert "\x00" not in reason and len(reason) == events.MAX_TEXT


def _beat() -> events.Heartbeat:
    return events.Heartbeat(
        session_id="s", peer_id="p", epoch=1, epochs=2, loss=0.5, accuracy=0.5, val_loss=0.4, samples_per_s=1.0
    )


def _done() -> events.PeerDone:
    return events.PeerDone(
        session_id="s", peer_id="p", model_uri="file:///m", model_sha256="0", epochs=1, loss=0.1, accuracy=0.9,
        train_seconds=1.0,
    )  # fmt: skip


def _dataset() -> events.DatasetUploaded:
    return events.DatasetUploaded(
        dataset_id="d", owner_id="u", name="n", uri="file:///d", sha256="0", size_bytes=1, rows=1, features=1,
        classes=2, label_column="label",
    )  # fmt: skip


def test_round_options_read_as_one_line_with_only_what_differs_from_todays_defaults() -> None:
    from swarmtrain.common.fedopts import (
        AggregatorSpec,
        CompressionSpec,
        OuterSpec,
        RoundOptions,
        ShardingSpec,
        describe,
    )

    assert describe(RoundOptions()) == "mean"
    every = RoundOptions(
        aggregator=AggregatorSpec(name="multi_krum", f=1, m=3),
        outer=OuterSpec(name="adam"),
        compression=CompressionSpec(name="bf16"),
        sharding=ShardingSpec(name="label_skew", alpha=0.1),
        keep_local_optimizer=True,
        max_update_norm=50.0,
    )
    assert describe(every) == (
        "multi_krum(f=1, m=3) · adam(lr=0.03, beta1=0.9, beta2=0.99, eps=0.001) · bf16 · "
        "label_skew(alpha=0.1) · keep_local_optimizer · max_update_norm=50"
    )
    trimmed = RoundOptions(aggregator=AggregatorSpec(name="trimmed_mean", beta=0.2))
    assert describe(trimmed) == "trimmed_mean(beta=0.2)"


FLAT_OPTIONS: dict[str, Any] = {
    "aggregator": {"name": "krum", "f": 1, "beta": 0.25, "m": None},
    "outer": {"name": "nesterov", "lr": 0.7, "beta1": 0.9, "beta2": 0.99, "eps": 0.001},
    "compression": {"name": "int8"},
    "sharding": {"name": "label_skew", "alpha": 0.3},
    "keep_local_optimizer": True,
    "max_update_norm": 50.0,
}
"""The round options as events stored before ``round_options`` held them: flat."""


def test_the_upcaster_reads_flat_round_options_of_a_stored_request_train_and_fact() -> None:
    want = msgspec.convert(FLAT_OPTIONS, RoundOptions)
    request = wire(session_requested("s", 2))
    del request["round_options"]
    old_request = request | FLAT_OPTIONS
    decoded = events.decode_event(json.dumps(old_request).encode())
    assert isinstance(decoded, events.SessionRequested) and decoded.round_options == want
    assert "aggregator" not in wire(decoded) and wire(decoded)["round_options"]["max_update_norm"] == 50.0
    assert events.upcast(json.loads(json.dumps(old_request)))["round_options"] == FLAT_OPTIONS

    train = wire(events.Train(**{**_train_fields(), "round_options": RoundOptions()}))
    del train["round_options"]
    command = events.decode_command(json.dumps(train | FLAT_OPTIONS).encode())
    assert isinstance(command, events.Train) and command.round_options == want
    fact = {"type": "SessionFact", "peer_id": "p", "session_id": "s", "fact": old_request}
    forwarded = events.decode_command(json.dumps(fact).encode())
    assert isinstance(forwarded, events.SessionFact) and isinstance(forwarded.fact, events.SessionRequested)
    assert forwarded.fact.round_options == want

    # today's shape decodes as it is; a flat field beside round_options never overrides it
    assert events.decode_event(events.encode(decoded)) == decoded
    both = wire(decoded) | {"keep_local_optimizer": False}
    assert events.decode_event(json.dumps(both).encode()).round_options.keep_local_optimizer is True  # type: ignore[union-attr]
    # an old shape with a bad value is still refused, naming the value
    with pytest.raises(msgspec.ValidationError, match="max_update_norm"):
        events.decode_event(json.dumps(old_request | {"max_update_norm": -1}).encode())


def _train_fields() -> dict[str, Any]:
    return {
        "peer_id": "p",
        "session_id": "s",
        "dataset_uri": "file:///d.csv",
        "dataset_sha256": "0",
        "label_column": "label",
        "model": events.MlpSpec(),
        "hyperparameters": events.Hyperparameters(epochs=1, batch_size=8, lr=0.01),
        "validation_split": 0.2,
        "seed": 0,
        "output_uri": "file:///m.safetensors",
    }


def test_a_stored_model_spec_decodes_as_its_kinds_struct_with_or_without_a_kind() -> None:
    base = wire(session_requested("s", 1))
    for stored, want in [
        ({"kind": "mlp", "hidden": [32], "input_shape": None, "channels": [16, 32]}, events.MlpSpec(hidden=[32])),
        ({"hidden": [8]}, events.MlpSpec(hidden=[8])),  # no kind: the default, mlp
        (
            {"kind": "cnn", "hidden": [], "input_shape": [1, 2, 2], "channels": [4]},
            events.CnnSpec(hidden=[], input_shape=[1, 2, 2], channels=[4]),
        ),
    ]:
        decoded = events.decode_event(json.dumps(base | {"model": stored}).encode())
        assert isinstance(decoded, events.SessionRequested) and decoded.model == want
        train = wire(events.Train(**_train_fields())) | {"model": stored}
        command = events.decode_command(json.dumps(train).encode())
        assert isinstance(command, events.Train) and command.model == want
    with pytest.raises(msgspec.ValidationError, match="kind"):
        events.decode_event(json.dumps(base | {"model": {"kind": "unet"}}).encode())
