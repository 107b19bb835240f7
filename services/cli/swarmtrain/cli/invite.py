"""``swarmtrain invite`` and ``swarmtrain peer --join``: another machine joins a ``swarmtrain up --listen`` stack.

The shape of Ray's ``ray start --head`` / ``ray start --address``: the stack's machine runs
``swarmtrain invite``, which prints one line, ``swarmtrain peer --join <token>``, to run on the other
machine. The token is the base64url of a small JSON (:class:`JoinToken`): the NATS URL(s) of the
stack and one peer credential of its own (the peer's id, its nkey seed, its reply inbox). Each
invite claims a fresh credential (``natsconfig.invite_peers``), adds its public key to the server
configuration and has the running nats-server reload it, then checks that NATS accepts it before
printing anything. The token is a secret, like a password: whoever holds it can be that peer
(and nothing more: a peer may only report on its own subjects and read its own commands).

The joined peer needs nothing else: no shared folder, no S3 credential. Every blob it reads or
writes comes as an object-scoped, expiring URL in its commands, served by the stack's gateway.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from swarmtrain.cli import natsconfig
from swarmtrain.common.settings import Settings

LISTENING = "listen.json"
"""Written by ``swarmtrain up --listen`` into its data folder while it runs; removed when it stops."""
AUTH_DIR = "nats-auth"
"""A stack's NATS credentials (``swarmtrain nats-config``'s layout), inside its data folder."""
ACCEPT_TIMEOUT_S = 15.0
"""How long an invite waits for the reloaded server to accept the new credential."""


class Listening(msgspec.Struct, frozen=True, kw_only=True):
    """Where a ``swarmtrain up --listen`` stack can be reached (its data folder's ``listen.json``)."""

    nats: list[str]
    """The NATS URL(s) another machine connects to."""
    local_nats: str
    """The NATS URL on this machine (for the invite's own check)."""
    gateway: str
    """The gateway's URL from another machine (also the base of its signed blob URLs)."""
    nats_port: int


class JoinToken(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What ``swarmtrain peer --join`` needs: where NATS is and one peer credential."""

    v: int = 1
    nats: list[str]
    peer_id: str
    seed: str
    inbox: str


class InvalidToken(ValueError):
    pass


def encode_token(token: JoinToken) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(token)).decode().rstrip("=")


def decode_token(text: str) -> JoinToken:
    """The token ``swarmtrain invite`` printed, checked; ``InvalidToken`` says what is wrong."""
    text = text.strip()
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        token = msgspec.json.decode(raw, type=JoinToken)
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidToken(
            f"not a swarmtrain join token ({exc}); copy the whole line `swarmtrain invite` printed"
        ) from None
    if token.v != 1:
        raise InvalidToken(f"a join token of version {token.v}: this swarmtrain reads version 1; upgrade it")
    if not natsconfig.PEER_ID_RE.match(token.peer_id):
        raise InvalidToken(f"the token's peer id {token.peer_id[:40]!r} is malformed")
    if token.inbox != natsconfig.inbox_prefix(token.peer_id):
        raise InvalidToken("the token's reply inbox is not its peer's")
    if not token.nats or any(urlsplit(url).scheme not in ("nats", "tls") for url in token.nats):
        raise InvalidToken("the token's NATS URLs must be nats:// or tls://")
    try:
        import nkeys

        nkeys.from_seed(bytearray(token.seed.encode()))
    except Exception as exc:  # nkeys raises its own error types, and binascii's
        raise InvalidToken(f"the token's nkey seed is not valid: {exc}") from None
    if not token.seed.startswith("SU"):
        raise InvalidToken("the token's nkey seed is not a user seed")
    return token


def token_of(listening: Listening, ident: natsconfig.Identity) -> JoinToken:
    assert ident.peer_id is not None
    return JoinToken(nats=listening.nats, peer_id=ident.peer_id, seed=ident.seed, inbox=ident.inbox)


def joined_settings(token: JoinToken, settings: Settings) -> Settings:
    """A joined peer's settings: the token's NATS and identity, and a state folder of its own
    (``<state dir>/joined/<peer id>``), so two joined peers on one machine never share one."""
    return msgspec.structs.replace(
        settings,
        nats_url=",".join(token.nats),
        nats_nkey_seed=token.seed,
        nats_inbox_prefix=token.inbox,
        peer_id=token.peer_id,
        state_dir=str(Path(settings.state_dir) / "joined" / token.peer_id),
    )


# ------------------------------------------------------------------ NATS's answer to a credential


async def refusal(urls: list[str], seed: str | None, inbox: str) -> str | None:
    """NATS's refusal of this credential (``'Authorization Violation'``), or None when it is accepted
    or the server cannot be reached at all (a peer then waits for it, as it would anyway)."""
    import nats.errors
    from nats.aio.client import Client

    async def quiet(exc: Exception) -> None:
        pass

    nc = Client()
    try:
        await nc.connect(
            servers=urls,
            nkeys_seed_str=seed,
            inbox_prefix=inbox,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=5,
            error_cb=quiet,
        )
    except nats.errors.Error as exc:
        text = str(exc)
        return text if "authorization" in text.lower() or "authentication" in text.lower() else None
    except (OSError, TimeoutError):
        return None
    finally:
        await nc.close()  # also after a refusal: the socket is closed, not left to the collector
    return None


async def _wait_accepted(url: str, idents: list[natsconfig.Identity], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for ident in idents:
        while (why := await refusal([url], ident.seed, ident.inbox)) is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"NATS still refuses the new credential {ident.name} ({why}) after a reload")
            await asyncio.sleep(0.1)


# ------------------------------------------------------------------ swarmtrain invite


def _running_nats(data_dir: Path) -> int:
    pid_file = data_dir / "run" / "nats-server.pid"
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        raise RuntimeError(f"the stack in {data_dir} is not running; start it with `swarmtrain up --listen`") from None
    return pid


def invite(data_dir: Path, peers: int = 1) -> list[str]:
    """Claim ``peers`` fresh peer credentials of the running stack in ``data_dir`` and return one
    ``swarmtrain peer --join <token>`` line for each; refused for a stack not started with ``--listen``."""
    path = data_dir / LISTENING
    if not path.is_file():
        raise RuntimeError(
            f"no stack listening for other machines in {data_dir}: start it with "
            "`swarmtrain up --listen 0.0.0.0` (and pass the same --data-dir here)"
        )
    listening = msgspec.json.decode(path.read_bytes(), type=Listening)
    pid = _running_nats(data_dir)
    idents = natsconfig.invite_peers(data_dir / AUTH_DIR, peers, listening.nats_port)
    os.kill(pid, signal.SIGHUP)  # nats-server reloads its configuration: the new public keys
    asyncio.run(_wait_accepted(listening.local_nats, idents, ACCEPT_TIMEOUT_S))
    return [f"swarmtrain peer --join {encode_token(token_of(listening, ident))}" for ident in idents]


def main(data_dir: Path, peers: int) -> int:
    lines = invite(data_dir, peers)
    print(
        f"# run on the other machine ({'one line per peer, each ' if len(lines) > 1 else ''}a secret: "
        "it holds a peer credential)",
        file=sys.stderr,
        flush=True,
    )
    for line in lines:
        print(line, flush=True)
    return 0
