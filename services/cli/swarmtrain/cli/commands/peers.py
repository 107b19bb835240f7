"""``swarmtrain peers ls``: the swarm's peers, as the read models show them."""

from __future__ import annotations

import argparse

from swarmtrain.cli.commands.base import Group, client, command
from swarmtrain.cli.output import listing, one_line_errors, short


def register(sub: Group) -> None:
    peers = sub.add_parser("peers", help="the swarm's peers").add_subparsers(dest="action", required=True)
    command(peers.add_parser("ls", help="list peers"), _ls, json=True)


@one_line_errors()
def _ls(args: argparse.Namespace) -> int:
    with client(args) as api:
        peers = api.peers()
    return listing(
        args,
        peers,
        ["NAME", "DEVICE", "STATUS", "LAST SEEN", "SESSION"],
        lambda p: [p["name"], p["device"], p["status"], p["last_seen"], short(p["session_id"])],
    )
