"""Property tests for the wire contract in ``swarmtrain.common.events``.

Strategies are derived from each Struct's msgspec type info, so a field added later is generated
(and round-tripped) without touching this file; a field of a kind not handled below fails loudly.
"""

from __future__ import annotations

import json
import math
import string
import typing
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmtrain.common import bus, events
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
    events.Stop: ("peer.{}.command", "peer_id"),
}

# Per-type properties run once per message type: fewer examples each keeps the file quick.
PER_TYPE = settings(max_examples=50)

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
            if name.endswith("_id"):
                return ids
            return st.text(min_size=t.min_length or 0, max_size=min(t.max_length or 20, 20))
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
            return st.dictionaries(strategy(t.key_type, "key_id"), strategy(t.value_type), max_size=3)
        case mi.UnionType():
            return st.one_of(*(strategy(member, name) for member in t.types))
        case mi.StructType():
            return st.builds(t.cls, **{f.name: strategy(f.type, f.name) for f in t.fields})
    raise NotImplementedError(f"no strategy for {t!r} (field {name!r}): extend tests/common/test_events.py")


def messages_of(cls: type[Any]) -> st.SearchStrategy[Any]:
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
@given(data=st.data())
def test_every_command_round_trips(cls: type[Any], data: st.DataObject) -> None:
    command = data.draw(messages_of(cls))

    decoded = events.decode_command(events.encode(command))

    assert type(decoded) is cls
    assert decoded == command


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
@given(data=st.binary())
def test_garbage_bytes_are_a_decode_error(decode: Any, data: bytes) -> None:
    with pytest.raises(DECODE_ERRORS):
        decode(data)


@pytest.mark.parametrize("decode", DECODERS, ids=lambda d: d.__name__)
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
