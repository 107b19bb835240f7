"""``sessions watch``'s rendering, as plain function calls: a live table redrawn in place on a
terminal, one line per event off one, and the request body built from flags and a file."""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path
from typing import Any

from swarmtrain.cli import commands, output, sessionview
from swarmtrain.cli.client import Client
from swarmtrain.cli.commands import sessions

SID = "a" * 32


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _beat(peer: str, epoch: int) -> dict[str, Any]:
    return {
        "type": "Heartbeat",
        "session_id": SID,
        "peer_id": peer,
        "epoch": epoch,
        "epochs": 4,
        "loss": 1.0 / epoch,
        "accuracy": 0.5,
        "val_accuracy": None if epoch == 1 else 0.8,
        "samples_per_s": 1000.0,
    }


def _events() -> list[dict[str, Any]]:
    return [
        {"type": "SessionStarted", "session_id": SID, "assignments": {"p1" * 8: {}, "p2" * 8: {}}},
        _beat("p1" * 8, 1),
        _beat("p2" * 8, 1),
        _beat("p1" * 8, 2),
        {"type": "RoundClosed", "session_id": SID, "round": 1, "updates": [{}, {}], "left_out": []},
        {"type": "PeerFailed", "session_id": SID, "peer_id": "p2" * 8, "reason": "diverged (NaN loss)"},
    ]


def test_off_a_terminal_each_event_is_one_plain_line() -> None:
    out = io.StringIO()
    watcher = sessionview.Watcher(Client("http://127.0.0.1:1"), SID, out=out)
    try:
        for event in _events():
            watcher.on_event(event)
    finally:
        watcher.client.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == len(_events()) and "\x1b" not in out.getvalue()
    assert lines[1].startswith("p1p1p1p1  epoch   1/4  loss 1.0000") and "val_acc -" in lines[1]
    assert lines[4] == "RoundClosed round 1: 2 updates"
    assert lines[5] == "PeerFailed p2p2p2p2: diverged (NaN loss)"


def test_on_a_terminal_the_table_is_redrawn_in_place() -> None:
    out = Terminal()
    watcher = sessionview.Watcher(Client("http://127.0.0.1:1"), SID, out=out)
    try:
        for event in _events():
            watcher.on_event(event)
        watcher.draw(force=True)
    finally:
        watcher.client.close()
    text = out.getvalue()
    assert not re.match(r"\x1b\[\d+F", text) and re.search(r"\x1b\[\d+F", text)  # later frames move up over the last
    last = re.split(r"\x1b\[\d+F", text)[-1]  # the final frame: a title, two peers, the last event
    assert last.count("\n") == 4
    assert "round 1 closed" in last
    assert "p1p1p1p1 [##########..........] epoch   2/4" in last
    assert "last: PeerFailed p2p2p2p2: diverged (NaN loss)" in last


def _args(**given: Any) -> argparse.Namespace:
    """``sessions start``'s arguments as its real parser gives them with no flag, then ``given``."""
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    return argparse.Namespace(**{**vars(parser.parse_args(["sessions", "start"])), **given})


def test_body_from_flags_and_from_a_file(tmp_path: Path) -> None:
    body = sessions.session_body(_args(dataset="d" * 32, peers=2, lr="0.1,0.01", epochs=3, hidden="32"))
    assert body == {
        "dataset_id": "d" * 32,
        "num_peers": 2,
        "model": {"hidden": [32]},
        "hyperparameters": [{"epochs": 3, "batch_size": 64, "lr": 0.1}, {"epochs": 3, "batch_size": 64, "lr": 0.01}],
    }
    path = tmp_path / "body.json"
    hps = {"epochs": 2, "batch_size": 16, "lr": 0.003}
    path.write_text(json.dumps({"dataset_id": "x", "num_peers": 3, "strategy": "fedavg", "hyperparameters": hps}))
    body = sessions.session_body(_args(file=str(path), rounds=4, epochs=5))
    assert body["strategy"] == "fedavg" and body["rounds"] == 4 and body["num_peers"] == 3
    assert body["hyperparameters"] == {"epochs": 5, "batch_size": 16, "lr": 0.003}
    untouched = sessions.session_body(_args(file=str(path)))
    assert untouched["hyperparameters"] == hps


def test_a_sessions_lineage_is_one_line_and_none_without_a_parent() -> None:
    assert sessionview.lineage_line({"parent_session_id": None}) == ""
    fork = {"parent_session_id": "p" * 32, "parent_round": 3, "excluded_peers": ["pabcdef0123456789"]}
    line = sessionview.lineage_line(fork)
    assert line.startswith(f"started from session {'p' * 32} at round 3, without ")
    final = sessionview.lineage_line({"parent_session_id": "q", "parent_round": None, "excluded_peers": []})
    assert final == "started from session q (its final model)"


def test_a_fedavg_result_shows_its_round_options_and_each_rounds_rule_and_bytes() -> None:
    peers = ["p1" * 8, "p2" * 8]
    figures = {"included": peers, "left_out": [], "rejected": [], "loss": 0.5, "val_accuracy": 0.9}
    session = {
        "session_id": SID,
        "status": "completed",
        "reason": None,
        "val_accuracy": 0.9,
        "parent_session_id": None,
        "round_options_summary": "krum(f=1) · int8",
        "round_figures": [
            {"round": 1, **figures, "aggregator": "krum", "update_bytes": 18490},
            {"round": 2, **figures},  # as a read model built before the rule was recorded shows it
        ],
        "peers": [],
        "best_peer_id": None,
        "strategy": "fedavg",
        "rounds": 2,
    }
    out = io.StringIO()
    sessionview.print_result(session, out)
    text = out.getvalue()
    assert "round options: krum(f=1) · int8\n" in text
    header, _rule, first, second = text.split("rounds:\n")[1].splitlines()[:4]
    assert header.split()[-2:] == ["RULE", "BYTES"]
    assert first.split()[-2:] == ["krum", "18,490"] and second.split()[-2:] == [output.NONE] * 2
