"""``swarmtrain nats-config``: a NATS server configuration and one credential per service and peer.

Identities are NATS users authenticated by **nkeys** (Ed25519 challenge-response): the server
configuration holds public keys only, and a seed never crosses the network, so a peer joining over
an untrusted network without TLS leaks no reusable secret. Every identity is one env file::

    <out>/nats-server.conf       the server configuration (public keys only; not a secret)
    <out>/gateway.env            SWARMTRAIN_NATS_NKEY_SEED, SWARMTRAIN_NATS_INBOX_PREFIX (secret, 0600)
    <out>/scheduler.env, projector.env, tap.env, tap.nk (nats-box/natscli take a seed file)
    <out>/peers/peer-<n>.env     SWARMTRAIN_PEER_ID as well: a peer's id is fixed by its credential

Least privilege is expressed as subject permissions (see :func:`peer_permissions` and
:data:`SERVICE_PERMISSIONS`). Each identity also gets its own reply inbox (``_INBOX.<identity>``),
so no one can subscribe to the replies (JetStream acks, fetched messages) meant for another.

Running the command again keeps every existing identity, adds the missing ones (``--peers`` is
the total wanted) and rewrites the server configuration: reload it with ``nats-server --signal
reload`` (``docker compose kill -s HUP nats``).

A peer started with ``--credentials DIR`` claims the first ``peer-*.env`` in DIR that no other
process holds (an ``flock`` on the file), so ``docker compose up --scale peer=N`` gives each
replica its own identity as long as DIR holds at least N of them.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from swarmtrain.common import subjects
from swarmtrain.common.bus import COMMANDS_STREAM, EVENTS_STREAM, REPORTS_STREAM

ACCOUNT = "SWARM"
SERVICES = ("gateway", "scheduler", "projector", "tap")
PEER_NAME_RE = re.compile(r"^peer-[0-9]+$")
PEER_ID_RE = re.compile(r"^p[0-9a-f]{16}$")
SEED_KEY = "SWARMTRAIN_NATS_NKEY_SEED"
INBOX_KEY = "SWARMTRAIN_NATS_INBOX_PREFIX"
PEER_ID_KEY = "SWARMTRAIN_PEER_ID"

_E, _C, _R = EVENTS_STREAM, COMMANDS_STREAM, REPORTS_STREAM
SCHEDULER_REPORTS = "scheduler-reports"
"""The scheduler's durable pull consumer on REPORTS (shared by every scheduler)."""
PROJECTOR_DURABLE = "projector"

_STREAMS_ADMIN = [f"$JS.API.STREAM.{op}.{stream}" for op in ("INFO", "CREATE", "UPDATE") for stream in (_E, _C, _R)]
_EVENTS_READER = [
    "$JS.API.INFO",
    f"$JS.API.DIRECT.GET.{_E}",
    f"$JS.API.DIRECT.GET.{_E}.>",
    f"$JS.API.STREAM.MSG.GET.{_E}",
    f"$JS.API.CONSUMER.CREATE.{_E}",
    f"$JS.API.CONSUMER.CREATE.{_E}.>",
    f"$JS.API.CONSUMER.DURABLE.CREATE.{_E}.>",
    f"$JS.API.CONSUMER.INFO.{_E}.>",
    f"$JS.API.CONSUMER.DELETE.{_E}.>",
    f"$JS.API.CONSUMER.MSG.NEXT.{_E}.>",
    f"$JS.ACK.{_E}.>",
    f"$JS.FC.{_E}.>",
]


def _durable(stream: str, durable: str, filter_subject: str | None = None) -> list[str]:
    """The JetStream API calls behind one named pull consumer: create it (with ``filter_subject``
    in the API subject when given, so the server refuses any other filter in the body), look it up,
    delete it, fetch from it, ack what it delivered; nothing on any other consumer."""
    create = (
        [f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.{filter_subject}"]
        if filter_subject
        else [f"$JS.API.CONSUMER.CREATE.{stream}.{durable}", f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}"]
    )
    return [
        *create,
        f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
        f"$JS.API.CONSUMER.DELETE.{stream}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    ]


# Who may write what (README, "Trust model"). Facts (``*.events``) are written by services only;
# a subject permission cannot tell one event type from another, so the gateway's session events
# are its own requests and cancellations by its code, the scheduler's the rest.
SERVICE_PERMISSIONS: dict[str, tuple[list[str], list[str]]] = {
    # name: (may publish, may subscribe); the identity's own inbox is added to the latter
    "gateway": (
        # users, datasets, SessionRequested and SessionCancelled; reads EVENTS (read models'
        # freshness, a session's history and live events)
        [subjects.USER_EVENTS, subjects.DATASET_EVENTS, subjects.SESSION_EVENTS, *_STREAMS_ADMIN, *_EVENTS_READER],
        [subjects.SESSION_EVENTS, subjects.PEER_EVENTS, subjects.PEER_PRESENCE, subjects.DATASET_EVENTS],
    ),
    "scheduler": (
        # session and peer facts (locks, starts, rounds, ends, accepted reports, ReportRejected)
        # and commands; reads EVENTS, and REPORTS through its one durable
        [
            subjects.SESSION_EVENTS,
            subjects.PEER_EVENTS,
            subjects.PEER_COMMANDS,
            *_STREAMS_ADMIN,
            *_EVENTS_READER,
            *_durable(_R, SCHEDULER_REPORTS),
            f"$JS.API.STREAM.MSG.GET.{_C}",  # the last command a peer was sent (a re-send)
        ],
        # presence beats; and sessions' and peers' facts as a doorbell (an append wakes its loop;
        # what it reads is still its EVENTS consumer)
        [subjects.PEER_PRESENCE, *subjects.SCHEDULER_DOORBELL],
    ),
    "projector": ([*_STREAMS_ADMIN, *_EVENTS_READER], []),
    # a person's tap (nats-box, `swarmtrain tap`): reads live session events and publishes
    # nothing; user events are left out (they carry password hashes), peers' and datasets' too
    "tap": ([], [subjects.SESSION_EVENTS]),
}


def inbox_prefix(identity: str) -> str:
    return f"_INBOX.{identity}"


def peer_permissions(peer_id: str) -> tuple[list[str], list[str]]:
    """What peer ``peer_id`` may publish and subscribe to.

    A peer writes no fact: it publishes only its reports (``peer.<id>.reports``, into the REPORTS
    stream: a plain publish whose ack comes back to its own inbox) and its presence beats. It reads
    only its own commands, through its own durable ``peer-<id>`` on ``COMMANDS`` created with its
    filter in the API subject (the server refuses a body that names another filter, so it cannot
    be pointed at another peer's commands), looked up, fetched from and acked. The facts of the
    sessions it is assigned to come to it as ``SessionFact`` commands, so it needs no consumer on
    EVENTS at all. The stream-info calls let ``bus.ensure_streams`` pass once a service has created
    the streams. No stream deletes or purges, no other consumer, no other inbox, no core subscribe.
    """
    durable = f"peer-{peer_id}"
    command = subjects.peer_command(peer_id)
    publish = [
        subjects.peer_reports(peer_id),
        subjects.peer_presence(peer_id),
        *(f"$JS.API.STREAM.INFO.{stream}" for stream in (_E, _C, _R)),
        f"$JS.API.CONSUMER.CREATE.{_C}.{durable}.{command}",
        f"$JS.API.CONSUMER.INFO.{_C}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{_C}.{durable}",
        f"$JS.ACK.{_C}.{durable}.>",
    ]
    return publish, []


# ------------------------------------------------------------------ identities


@dataclass(frozen=True)
class Identity:
    name: str
    seed: str
    peer_id: str | None = None

    @property
    def public_key(self) -> str:
        import nkeys

        return str(nkeys.from_seed(bytearray(self.seed.encode())).public_key.decode())

    @property
    def inbox(self) -> str:
        return inbox_prefix(self.peer_id or self.name)

    def permissions(self) -> tuple[list[str], list[str]]:
        publish, subscribe = peer_permissions(self.peer_id) if self.peer_id else SERVICE_PERMISSIONS[self.name]
        return publish, [*subscribe, f"{self.inbox}.>"]

    def env(self) -> dict[str, str]:
        out = {SEED_KEY: self.seed, INBOX_KEY: self.inbox}
        if self.peer_id:
            out[PEER_ID_KEY] = self.peer_id
        return out


def new_seed() -> str:
    import nkeys

    return str(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments and blank lines skipped), as docker's ``--env-file`` reads them."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def _load(path: Path, name: str) -> Identity | None:
    if not path.is_file():
        return None
    env = read_env_file(path)
    if SEED_KEY not in env:
        raise ValueError(f"{path}: no {SEED_KEY}")
    return Identity(name=name, seed=env[SEED_KEY], peer_id=env.get(PEER_ID_KEY))


# ------------------------------------------------------------------ the server configuration


def _quote(subject: str) -> str:
    return '"' + subject.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _subjects(subjects: list[str]) -> str:
    return "[" + ", ".join(_quote(s) for s in subjects) + "]"


CLUSTER_NAME = "swarmtrain"
CLUSTER_PORT = 6222


NODE_ENV = "SWARMTRAIN_NATS_NODE"
CLUSTER_PORT_ENV = "SWARMTRAIN_NATS_CLUSTER_PORT"


def cluster_hosts(nodes: int) -> list[str]:
    """The nodes' host names: compose.yaml's services ``nats``, ``nats-2``, ``nats-3``, ..."""
    return ["nats", *(f"nats-{i}" for i in range(2, nodes + 1))]


def cluster_ports(nodes: int) -> list[int]:
    """Each node's route port, one apiece (6222, 6223, ...): the nodes may share one host's network."""
    return [CLUSTER_PORT + i for i in range(nodes)]


def cluster_block(hosts: list[str]) -> str:
    """A JetStream cluster of ``hosts`` (every node gets the same file; a route to itself is ignored).

    Each node reads its own name and route port from its environment (``SWARMTRAIN_NATS_NODE``,
    ``SWARMTRAIN_NATS_CLUSTER_PORT``; compose.yaml's ``ha`` profile sets them), so nothing on the
    command line stands in the way of a configuration reload (``nats-server --signal reload``, after
    a peer is added), which refuses a server name given as a flag. Node i routes on
    ``CLUSTER_PORT + i``: a port apiece, so the three can share one host's network. With three nodes,
    streams are kept on three (SWARMTRAIN_STREAM_REPLICAS=3) and stay writable while two are up:
    the loss of any one node loses nothing acknowledged.
    """
    routes = ", ".join(
        f"nats-route://{host}:{port}" for host, port in zip(hosts, cluster_ports(len(hosts)), strict=True)
    )
    return (
        f"server_name: ${NODE_ENV}\n"
        f"cluster {{\n  name: {CLUSTER_NAME}\n  host: 0.0.0.0\n  port: ${CLUSTER_PORT_ENV}\n  routes: [{routes}]\n}}\n"
    )


def server_config(identities: list[Identity], sync: str, port: int, cluster: int = 0) -> str:
    users = []
    for ident in identities:
        publish, subscribe = ident.permissions()
        pub = f"allow: {_subjects(publish)}" if publish else 'deny: [">"]'
        sub = f"allow: {_subjects(subscribe)}" if subscribe else 'deny: [">"]'
        label = f"peer {ident.name} ({ident.peer_id})" if ident.peer_id else ident.name
        users.append(
            f"      # {label}\n"
            f"      {{ nkey: {ident.public_key}, permissions: {{\n"
            f"          publish: {{ {pub} }}\n"
            f"          subscribe: {{ {sub} }}\n"
            f"      }} }}"
        )
    return (
        "# Generated by `swarmtrain nats-config`: public keys only, no secrets. Re-run it to add peers.\n"
        f"port: {port}\n"
        "max_payload: 8MB\n"
        "# the store folder comes from the command line (-sd), as `swarmtrain up` and compose.yaml pass it\n"
        "jetstream {\n"
        "  # fsync every write before it is acknowledged: JetStream's default (a lazy fsync every 2\n"
        "  # minutes) can lose acknowledged writes when the machine loses power (Jepsen, NATS 2.12.1, 2025).\n"
        f"  sync_interval: {sync}\n"
        "}\n" + (cluster_block(cluster_hosts(cluster)) if cluster > 1 else "") + "accounts {\n"
        f"  {ACCOUNT} {{\n"
        "    jetstream: enabled\n"
        "    users: [\n" + "\n".join(users) + "\n    ]\n"
        "  }\n"
        "}\n"
    )


@dataclass(frozen=True)
class Written:
    config: Path
    created: list[Path]
    kept: list[Path]


def generate(out: Path, peers: int, sync: str = "always", port: int = 4222, cluster: int = 0) -> Written:
    """Write (or complete) the configuration and credentials in ``out``; existing identities are kept.

    ``cluster`` > 1 adds a cluster block for that many nodes (see :func:`cluster_block`)."""
    if cluster == 1 or cluster < 0:
        raise ValueError("--cluster takes the number of nodes: 3 (or more), or 0 for one server")
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    created: list[Path] = []
    kept: list[Path] = []
    identities: list[Identity] = []
    wanted = [(name, out / f"{name}.env", False) for name in SERVICES]
    existing_peers = sorted(
        (p for p in (out / "peers").glob("peer-*.env") if PEER_NAME_RE.match(p.stem)),
        key=lambda p: int(p.stem.split("-")[1]),
    )
    names = [p.stem for p in existing_peers]
    n = 1
    while len(names) < peers:
        if f"peer-{n}" not in names:
            names.append(f"peer-{n}")
        n += 1
    wanted += [(name, out / "peers" / f"{name}.env", True) for name in names]
    for name, path, is_peer in wanted:
        ident = _load(path, name)
        if ident is None:
            ident = Identity(name=name, seed=new_seed(), peer_id="p" + secrets.token_hex(8) if is_peer else None)
            kind = f"peer {name} (id {ident.peer_id})" if is_peer else f"the {name}"
            body = "".join(f"{k}={v}\n" for k, v in ident.env().items())
            _write_secret(path, f"# NATS credentials of {kind}. A secret: keep it like a password.\n{body}")
            created.append(path)
        else:
            kept.append(path)
        if is_peer and (ident.peer_id is None or not PEER_ID_RE.match(ident.peer_id)):
            raise ValueError(f"{path}: {PEER_ID_KEY} missing or malformed")
        identities.append(ident)
    tap = next(i for i in identities if i.name == "tap")
    _write_secret(out / "tap.nk", tap.seed + "\n")  # natscli (nats-box) reads a seed file: NATS_NKEY
    config = out / "nats-server.conf"
    config.write_text(server_config(identities, sync, port, cluster))
    config.chmod(0o644)
    (out / ".gitignore").write_text("# generated credentials: never commit them\n*\n")
    return Written(config=config, created=created, kept=kept)


# ------------------------------------------------------------------ the credentials of a `swarmtrain up` stack

INVITED = "invited"
"""A stack's ledger of the peer credentials handed out by ``swarmtrain invite``, one name a line:
never given to a local peer nor to another invite."""


@dataclass(frozen=True)
class StackCredentials:
    config: Path
    """The server configuration (public keys only)."""
    services: dict[str, dict[str, str]]
    """Each service's environment (its nkey seed and inbox), by name."""
    peers: list[Path]
    """One credential file per local peer, none of them handed out by an invite."""


def _peer_files(out: Path) -> list[Path]:
    found = (p for p in (out / "peers").glob("peer-*.env") if PEER_NAME_RE.match(p.stem))
    return sorted(found, key=lambda p: int(p.stem.split("-")[1]))


def _invited(out: Path) -> set[str]:
    path = out / INVITED
    return set(path.read_text().split()) if path.is_file() else set()


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One writer of ``out`` at a time (the stack starting, invites)."""
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def stack_credentials(out: Path, local_peers: int, port: int) -> StackCredentials:
    """Write (or complete) the credentials of a ``swarmtrain up`` stack in ``out``: one per service
    and ``local_peers`` peer credentials that no invite has handed out (created when missing); the
    ones already there are kept, so a restarted stack keeps its identities."""
    with _locked(out):
        invited = _invited(out)
        wanted = len(_peer_files(out))
        while True:  # a name freed by a deleted (revoked) invite comes back as invited: ask again
            generate(out, wanted, port=port)
            have = _peer_files(out)
            local = [p for p in have if p.stem not in invited][:local_peers]
            if len(local) == local_peers:
                break
            wanted = len(have) + local_peers - len(local)
        services = {name: read_env_file(out / f"{name}.env") for name in SERVICES}
        return StackCredentials(config=out / "nats-server.conf", services=services, peers=local)


def invite_peers(out: Path, count: int, port: int) -> list[Identity]:
    """``count`` fresh peer credentials for other machines, added to the server configuration in
    ``out`` (the running server must reload it) and written to the stack's ledger, so neither a
    local peer nor a later invite is ever given one of them."""
    if count < 1:
        raise ValueError("--peers must be 1 or more")
    with _locked(out):
        if not (out / "nats-server.conf").is_file():
            raise ValueError(f"{out}: no stack credentials here")
        have = _peer_files(out)
        written = generate(out, len(have) + count, port=port)
        fresh = [p for p in written.created if p.parent == out / "peers"]
        identities = [ident for p in fresh if (ident := _load(p, p.stem)) is not None]
        with (out / INVITED).open("a") as ledger:
            ledger.write("".join(f"{ident.name}\n" for ident in identities))
            ledger.flush()
            os.fsync(ledger.fileno())
        return identities


# ------------------------------------------------------------------ a peer taking its credential


def _unreadable(path: Path) -> str:
    """Why this process cannot read a credential file, and the rule that fixes it."""
    st = path.stat()
    return (
        f"cannot read {path} as uid {os.getuid()} (gid {os.getgid()}): it belongs to uid {st.st_uid} "
        f"(gid {st.st_gid}), mode {stat.S_IMODE(st.st_mode):o}. A peer runs as the user who ran "
        "`swarmtrain nats-config`: with compose, set SWARMTRAIN_UID and SWARMTRAIN_GID in .env to that "
        f"user's `id -u` and `id -g` ({st.st_uid} and {st.st_gid} here)"
    )


@contextmanager
def claim(path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """Hold a peer credential for as long as the peer runs: ``(name, env)``.

    ``path`` is one ``peer-<n>.env`` file, or a folder of them: then the first one that no other
    process holds is taken (an exclusive ``flock`` on the file, released when the process ends).
    """
    candidates = sorted(path.glob("peer-*.env"), key=lambda p: (len(p.stem), p.stem)) if path.is_dir() else [path]
    if not candidates:
        raise SystemExit(f"no peer credentials (peer-*.env) in {path}")
    for candidate in candidates:
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except PermissionError:
            raise SystemExit(_unreadable(candidate)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            env = read_env_file(candidate)
            if PEER_ID_KEY not in env or SEED_KEY not in env:
                raise SystemExit(f"{candidate}: not a peer credential ({PEER_ID_KEY}, {SEED_KEY})")
            yield candidate.stem, env
            return
        finally:
            os.close(fd)
    raise SystemExit(f"every peer credential in {path} is in use: generate more with swarmtrain nats-config --peers")


def main(out: Path, peers: int, sync: str, port: int, cluster: int = 0) -> int:
    written = generate(out, peers, sync=sync, port=port, cluster=cluster)
    print(f"wrote {written.config} (public keys only)")
    for path in written.created:
        print(f"wrote {path} (secret)")
    for path in written.kept:
        print(f"kept  {path}")
    print(
        f"\nnats-server -js -sd DATA_DIR -c {written.config}    # or: SWARMTRAIN_NATS_DIR={out} docker compose up\n"
        f"swarmtrain peer --nats nats://{socket.gethostname()}:{port} --credentials {out / 'peers'}/peer-1.env"
    )
    if cluster > 1:
        print(
            f"\na cluster of {cluster} nodes ({', '.join(cluster_hosts(cluster))}), each with its name and route port"
            f" in its environment ({NODE_ENV}, {CLUSTER_PORT_ENV}; compose.yaml sets them);"
            " keep every stream on three of them:\n"
            f"SWARMTRAIN_STREAM_REPLICAS=3 SWARMTRAIN_NATS_DIR={out} docker compose --profile ha up"
        )
    return 0
