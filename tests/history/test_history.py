"""Stored history keeps its meaning: a log written by an earlier main, decoded by today's code.

``main-<rev>.jsonl`` holds every message of the three streams of a stack run through sessions of
every kind (``capture.py`` wrote it, running the stack at that commit); ``.readmodels.json`` the
tables its projector built. Today's decoders must read every message, and today's projector must
build the same tables from the events alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from swarmtrain.common.events import Event, SessionRequested, Train, decode_command, decode_event, decode_report
from swarmtrain.common.fedopts import ROUND_OPTIONS, RoundOptions
from swarmtrain.common.models import ModelSpec
from swarmtrain.projector.projection import TABLES, apply_batch, ensure_schema

HERE = Path(__file__).resolve().parent
ADDED_COLUMNS: dict[str, list[Any]] = {
    "datasets": ["csv", "[]", "{}", 0, None, "classification", "[]"],
    "sessions": [None, None, "classification", None],
}
"""Columns a read model gained after the log was written (at the end of its table), with what an
event of that time projects into them: a dataset then was a CSV with no recorded shape or counts."""
LOGS = sorted(HERE.glob("main-*.jsonl"))


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


async def snapshot(dsn: str) -> dict[str, Any]:
    """Every read model's rows (JSON-safe, sorted) and the position the projector reached."""
    conn = await asyncpg.connect(dsn)
    try:
        out: dict[str, Any] = {}
        for table in TABLES:
            rows = [_plain(list(r)) for r in await conn.fetch(f"SELECT * FROM {table}")]
            out[table] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))
        out["position"] = await conn.fetchval("SELECT max(position) FROM projection_position")
        return out
    finally:
        await conn.close()


def _spec(stored: str) -> Any:
    """A read model's ``model`` (jsonb) as the spec it holds: since the spec is a tagged union an
    mlp is stored as ``{"kind": "mlp", "hidden": [...]}``, without the cnn's ``input_shape`` and
    ``channels`` that the one flat spec of earlier logs carried (and ignored) for every kind."""
    return msgspec.to_builtins(msgspec.json.decode(stored, type=ModelSpec))


def _messages(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def test_there_is_a_log() -> None:
    assert LOGS, "tests/history holds no log"


@pytest.mark.parametrize("log", LOGS, ids=lambda p: p.stem)
def test_every_stored_message_decodes(log: Path) -> None:
    decoders = {"EVENTS": decode_event, "COMMANDS": decode_command, "REPORTS": decode_report}
    kinds: dict[str, set[str]] = {stream: set() for stream in decoders}
    for m in _messages(log):
        data = json.dumps(m["data"]).encode()
        decoded = decoders[m["stream"]](data)
        assert type(decoded).__name__ == m["data"]["type"]
        kinds[m["stream"]].add(m["data"]["type"])
    # the run made every kind of fact that a stack makes on its own (not the ones no scenario reaches)
    assert {
        "UserRegistered",
        "DatasetUploaded",
        "PeerRegistered",
        "PeerLocked",
        "PeerReleased",
        "PeerWentOnline",
        "PeerWentOffline",
        "SessionRequested",
        "SessionStarted",
        "Heartbeat",
        "ModelUpdatePublished",
        "RoundClosed",
        "RoundAveraged",
        "UpdateRejected",
        "InitModelPrepared",
        "ShardReassigned",
        "PeerDone",
        "PeerFailed",
        "SessionCompleted",
        "ModelEvaluated",
        "SessionFailed",
        "SessionCancelled",
        "ReportRejected",
    } <= kinds["EVENTS"]
    assert {"Train", "Stop", "SessionFact"} <= kinds["COMMANDS"]


@pytest.mark.parametrize("log", LOGS, ids=lambda p: p.stem)
async def test_the_log_rebuilds_the_read_models_it_built(log: Path, database_url: str) -> None:
    expected = json.loads(log.with_suffix(".readmodels.json").read_text())
    events: list[tuple[int, Event]] = [
        (m["seq"], decode_event(msgspec.json.encode(m["data"])))
        for m in _messages(log)
        if m["stream"] == "EVENTS" and m["seq"] <= expected["position"]
    ]
    conn = await asyncpg.connect(database_url)
    try:
        await ensure_schema(conn)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        for i in range(0, len(events), 200):
            await apply_batch(pool, events[i : i + 200])
    finally:
        await pool.close()
    rebuilt = await snapshot(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        model_column = await conn.fetchval(
            "SELECT ordinal_position - 1 FROM information_schema.columns WHERE table_name = 'sessions' "
            "AND column_name = 'model'"
        )
    finally:
        await conn.close()
    for rows in (rebuilt["sessions"], expected["sessions"]):
        for row in rows:
            row[model_column] = _spec(row[model_column])
    for table in TABLES:
        then = [row + ADDED_COLUMNS.get(table, []) for row in expected.get(table, [])]
        assert rebuilt[table] == sorted(then, key=lambda r: json.dumps(r, sort_keys=True)), table
    assert rebuilt["position"] == expected["position"]


@pytest.mark.parametrize("log", LOGS, ids=lambda p: p.stem)
def test_the_flat_round_options_of_stored_requests_and_trains_are_read_whole(log: Path) -> None:
    """Events and commands stored before the round options were one value held them flat: the
    upcaster reads them into ``round_options``, value for value."""
    decoders = {"EVENTS": decode_event, "COMMANDS": decode_command}
    seen: set[str] = set()
    for m in _messages(log):
        data = m["data"]
        if data["type"] not in ("SessionRequested", "Train"):
            continue
        flat = {name: data[name] for name in ROUND_OPTIONS if name in data}
        decoded = decoders[m["stream"]](json.dumps(data).encode())
        assert isinstance(decoded, SessionRequested | Train)
        assert flat, "a log written before round_options holds them flat"
        assert decoded.round_options == msgspec.convert(flat, RoundOptions)
        if decoded.round_options != RoundOptions(outer=decoded.round_options.outer):
            seen.add(data["type"])  # a non-default option besides the resolved outer step
    assert seen == {"SessionRequested", "Train"}
