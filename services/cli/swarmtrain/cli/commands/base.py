"""What every user command shares: ``--api``, ``--json`` and a client signed in with the stored login."""

from __future__ import annotations

import argparse
from typing import TypeAlias

from swarmtrain.cli.client import ApiError, Client, load_login
from swarmtrain.cli.output import Handler

Group: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""The subcommands of ``swarmtrain`` or of one of its groups."""


def client(args: argparse.Namespace) -> Client:
    """A client of ``--api`` (else the stored gateway) with the stored token; an error before login."""
    login = load_login()
    if not login.token:
        raise ApiError(0, "not signed in: run `swarmtrain login` first")
    return Client.from_login(login, getattr(args, "api", None))


def api_flag(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--api", help="the gateway's URL (default: the one `swarmtrain login` stored)")
    return p


def command(p: argparse.ArgumentParser, func: Handler, *, json: bool = False) -> argparse.ArgumentParser:
    """``p`` runs ``func``, against ``--api``; with ``json``, ``--json`` prints the API's JSON."""
    api_flag(p)
    if json:
        p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=func)
    return p
