"""`swarmtrain sessions start`: a flag for every body field of POST /sessions, on top of `--file`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import msgspec
import pytest

from swarmtrain.cli import clientcmds
from swarmtrain.cli.client import ApiError
from swarmtrain.gateway.sessions.schemas import SessionIn


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    clientcmds.register(parser.add_subparsers())
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
    body = clientcmds.session_body(args)
    assert body["seed"] == 3 and body["num_peers"] == 5  # the file's fields stay unless a flag says otherwise
    assert body["aggregator"] == {"name": "krum", "f": 1} and body["outer"] == {"name": "momentum"}
    assert body["init_from"] == {"session_id": "parent1", "round": 2}
    assert body["requirements"] == {"device": "cuda"} and body["precision"] == "bf16"
    decoded = msgspec.json.decode(json.dumps(body), type=SessionIn)  # the gateway's own input type
    assert decoded.keep_local_optimizer is True and decoded.queue_timeout_s == 30


def test_a_bad_json_option_is_a_one_line_error() -> None:
    with pytest.raises(ApiError, match="--aggregator: not JSON"):
        clientcmds.session_body(parse("--dataset", "d", "--peers", "1", "--aggregator", "{nope"))
    with pytest.raises(ApiError, match="--requirements takes a JSON object"):
        clientcmds.session_body(parse("--dataset", "d", "--peers", "1", "--requirements", "cuda"))
