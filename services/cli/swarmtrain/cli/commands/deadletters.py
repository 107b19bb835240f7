"""``swarmtrain deadletters ls|retry [SEQ]``: the events the projector could not apply.

An operator's command, beside ``projections rebuild``: it reads and writes the projector's
database (``SWARMTRAIN_DATABASE_URL``) through the projector's own code. ``retry`` applies each
stored raw event again (after a fix: a new build that can decode it, a constraint lifted); an
applied one leaves the table, the others keep their error, with one more attempt counted. Exit
status: 0 when nothing is left failing, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg
import msgspec

from swarmtrain.cli.commands.base import Group
from swarmtrain.cli.output import print_json
from swarmtrain.common.settings import Settings, get_settings
from swarmtrain.projector.deadletters import listing, retry
from swarmtrain.projector.service import connect_db

ERROR_WIDTH = 100


async def _ls(settings: Settings) -> list[dict[str, object]]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        if await conn.fetchval("SELECT to_regclass('dead_letters')") is None:
            return []
        return [msgspec.to_builtins(d) for d in await listing(conn)]
    finally:
        await conn.close()


async def _retry(settings: Settings, seq: int | None) -> list[tuple[int, str | None]]:
    pool = await connect_db(settings, attempts=3)
    try:
        return await retry(pool, seq)
    finally:
        await pool.close()


def _cmd_ls(args: argparse.Namespace) -> int:
    rows = asyncio.run(_ls(get_settings()))
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no dead letters")
        return 0
    print(f"{'SEQ':>8}  {'TYPE':<22} {'ATTEMPTS':>8}  {'FIRST SEEN':<25} ERROR")
    for r in rows:
        error = str(r["error"]).replace("\n", " ")
        if len(error) > ERROR_WIDTH:
            error = error[: ERROR_WIDTH - 1] + "\u2026"
        print(f"{r['seq']:>8}  {r['type'] or '?'!s:<22} {r['attempts']:>8}  {r['first_seen']!s:<25} {error}")
    return 0


def _cmd_retry(args: argparse.Namespace) -> int:
    try:
        results = asyncio.run(_retry(get_settings(), args.seq))
    except LookupError as exc:
        print(f"swarmtrain: error: {exc.args[0]}", file=sys.stderr)
        return 1
    if not results:
        print("no dead letters")
    failing = 0
    for seq, error in results:
        if error is None:
            print(f"{seq}: applied")
        else:
            failing += 1
            print(f"{seq}: still failing: {error}")
    return 1 if failing else 0


def register(sub: Group) -> None:
    """Add ``deadletters`` to the ``swarmtrain`` parser."""
    dl = sub.add_parser("deadletters", help="list and retry the events the projector could not apply")
    actions = dl.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="list the dead letters (sequence, type, attempts, error)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_cmd_ls)
    retry = actions.add_parser("retry", help="apply dead letters again (all, or the one at SEQ)")
    retry.add_argument("seq", type=int, nargs="?", metavar="SEQ", help="the stream sequence of one dead letter")
    retry.set_defaults(func=_cmd_retry)
