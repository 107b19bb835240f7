"""`swarmtrain sessions start`: a flag for every body field of POST /sessions, on top of `--file`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

import msgspec
import pytest

from swarmtrain.cli import commands
from swarmtrain.cli.client import ApiError
from swarmtrain.cli.commands import sessions
from swarmtrain.cli.main import parser
from swarmtrain.common.events import ModelKind
from swarmtrain.gateway.sessions.schemas import ModelIn, SessionIn


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    return parser.parse_args(["sessions", "start", *argv])


def test_every_option_has_a_flag_and_the_body_is_one_the_api_takes(tmp_path: Path) -> None:
    base = tmp_path / "body.json"
    base.write_text(json.dumps({"dataset_id": "d1", "num_peers": 5, "seed": 3}))
    args = parse(
        *("--file", str(base), "--strategy", "fedavg", "--rounds", "4", "--epochs", "2"),
        *("--aggregator", '{"name": "krum", "f": 1}', "--outer", "momentum", "--compression", "int8"),
        *("--sharding", '{"name": "label_skew", "alpha": 0.5}', "--keep-local-optimizer"),
        *("--max-update-norm", "50", "--init-from", "parent1:2", "--requirements", '{"device": "cuda"}'),
        *("--queue-timeout-s", "30", "--priority", "2", "--precision", "bf16"),
    )
    body = sessions.session_body(args)
    assert body["seed"] == 3 and body["num_peers"] == 5  # the file's fields stay unless a flag says otherwise
    assert body["aggregator"] == {"name": "krum", "f": 1} and body["outer"] == {"name": "momentum"}
    assert body["init_from"] == {"session_id": "parent1", "round": 2}
    assert body["requirements"] == {"device": "cuda"} and body["precision"] == "bf16"
    decoded = msgspec.json.decode(json.dumps(body), type=SessionIn)  # the gateway's own input type
    assert decoded.keep_local_optimizer is True and decoded.queue_timeout_s == 30


def test_a_bad_json_option_is_a_one_line_error() -> None:
    with pytest.raises(ApiError, match="--aggregator: not JSON"):
        sessions.session_body(parse("--dataset", "d", "--peers", "1", "--aggregator", "{nope"))
    with pytest.raises(ApiError, match="--requirements takes a JSON object"):
        sessions.session_body(parse("--dataset", "d", "--peers", "1", "--requirements", "cuda"))


def test_every_field_of_the_request_has_its_flag() -> None:
    """A field added to POST /sessions without a ``sessions start`` flag fails here."""
    fields = {f.field for f in sessions.START_FLAGS if f.field is not None} | {"hyperparameters"}
    # ``round_options`` is the nested spelling of the round options, each of which has its flag.
    wanted = {f for f in SessionIn.__struct_fields__ if f not in ("model", "round_options")} | {
        f"model.{f}" for f in ModelIn.__struct_fields__
    }
    assert fields == wanted


def test_the_model_kinds_offered_are_the_contracts() -> None:
    (model,) = [f for f in sessions.START_FLAGS if f.flag == "--model"]
    assert model.choices == get_args(ModelKind)


@pytest.mark.parametrize("group", ["sessions", "session"])
def test_one_sessions_group_under_both_spellings(group: str) -> None:
    p = parser()
    replay = p.parse_args([group, "replay-round", "s1", "2"])
    backtest = p.parse_args([group, "backtest", "s1", "--aggregator", "median"])
    start = p.parse_args([group, "start", "--dataset", "d", "--peers", "1"])
    assert (replay.session_id, replay.round) == ("s1", 2) and backtest.aggregator == "median"
    assert {replay.func.__name__, backtest.func.__name__} == {"_replay_round", "_backtest"}
    assert sessions.session_body(start)["num_peers"] == 1


def test_every_hyperparameter_has_its_flag_and_a_file_keeps_its_other_fields(tmp_path: Path) -> None:
    """A field added to ``Hyperparameters`` without a flag fails here; flags go over ``--file``'s set."""
    from swarmtrain.common.events import Hyperparameters

    own = {"epochs", "batch_size", "lr"}  # read by ``_hyperparameters``'s own rule
    assert {f.field for f in sessions.TRAINING_FLAGS} | own == set(Hyperparameters.__struct_fields__)
    base = tmp_path / "body.json"
    base.write_text(
        json.dumps(
            {
                "dataset_id": "d",
                "num_peers": 2,
                "hyperparameters": {"epochs": 3, "batch_size": 32, "lr": 0.01, "warmup_steps": 5},
            }
        )
    )
    args = parse(
        *("--file", str(base), "--lr", "0.1,0.2", "--optimizer", "sgd", "--momentum", "0.5"),
        *("--weight-decay", "0.01", "--grad-clip-norm", "1.5", "--lr-schedule", "cosine", "--grad-accumulation", "2"),
    )
    sets = sessions.session_body(args)["hyperparameters"]
    assert [s["lr"] for s in sets] == [0.1, 0.2]
    decoded = [msgspec.convert(s, Hyperparameters) for s in sets]
    assert {(h.optimizer, h.momentum, h.weight_decay, h.grad_clip_norm, h.lr_schedule) for h in decoded} == {
        ("sgd", 0.5, 0.01, 1.5, "cosine")
    }
    assert {(h.epochs, h.batch_size, h.warmup_steps, h.grad_accumulation) for h in decoded} == {(3, 32, 5, 2)}
    only = sessions.session_body(parse("--dataset", "d", "--peers", "1", "--warmup-steps", "7"))
    assert only["hyperparameters"] == {"epochs": 10, "batch_size": 64, "lr": 0.003, "warmup_steps": 7}
