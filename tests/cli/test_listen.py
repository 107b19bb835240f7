"""Join from another machine: ``swarmtrain up --listen`` + ``swarmtrain invite`` + ``swarmtrain peer --join``.

Real processes on loopback only (``--listen 127.0.0.1``; 0.0.0.0 is for users). The joined peer runs
from the very line ``invite`` printed, in a folder of its own, with no storage location, no database
and no secret in its environment: every blob it reads and writes comes through the gateway's signed
URLs, whose secret the stack made itself. NATS refuses any other credential, and no credential.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from swarmtrain.cli import invite, natsconfig
from swarmtrain.cli.launcher import PEER_WITHHELD, Launcher
from swarmtrain.cli.stack import Stack
from swarmtrain.common import servers
from tests.e2e.conftest import Api, cli
from tests.factories import session_body
from tests.support import wait_for

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits.csv"
SWARMTRAIN = [sys.executable, "-m", "swarmtrain.cli.main"]


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any swarmtrain setting, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SWARMTRAIN_")}, **extra}


class Listening:
    """``swarmtrain up --listen 127.0.0.1`` run as ``swarmtrain`` (this checkout's, or an installed wheel's)."""

    def __init__(self, root: Path, database_url: str, swarmtrain: list[str] = SWARMTRAIN) -> None:
        self.swarmtrain = swarmtrain
        self.port, self.nats_port = servers.free_port(), servers.free_port()
        self.data = root / "stack"
        # no signing secret, no public URL: the stack must make its own
        env = _clean_env(SWARMTRAIN_DATABASE_URL=database_url, SWARMTRAIN_LOG_LEVEL="debug")
        self.launcher = Launcher(root, env=env)
        self.up_log = self.launcher.log("up")
        argv = [
            "--peers",
            "0",
            "--port",
            str(self.port),
            "--nats-port",
            str(self.nats_port),
            "--data-dir",
            str(self.data),
        ]
        self.up = self.launcher.command("up", [*swarmtrain, "up", "--listen", "127.0.0.1", *argv], new_session=True)
        self.up.start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        self.announcement = ""

    def logs(self) -> str:
        parts = [self.up_log.read_text(errors="replace")[-2000:]]
        parts += [f"--- {p.name}\n" + p.read_text(errors="replace")[-2000:] for p in (self.data / "logs").glob("*.log")]
        return "\n".join(parts)

    async def wait_up(self) -> str:
        def announced() -> str | None:
            assert self.up.alive(), f"swarmtrain up exited:\n{self.logs()}"
            text = self.up_log.read_text(errors="replace")
            return text if "Ctrl-C stops everything" in text else None

        return await wait_for(announced, "swarmtrain up --listen", timeout=120, interval=0.2)

    def stop(self) -> list[str]:
        return self.up.stop_group()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, postgres_port: int) -> AsyncIterator[Listening]:
    name = f"listen{uuid.uuid4().hex[:8]}"
    servers.create_database(postgres_port, name)
    st = Listening(tmp_path_factory.mktemp("listen"), servers.postgres_url(postgres_port, name))
    try:
        st.announcement = await st.wait_up()
        yield st
    finally:
        left = st.stop()
        assert not left, f"swarmtrain up left processes behind: {left}"


async def _invite(stack: Listening, *extra: str) -> list[str]:
    """``swarmtrain invite`` run as the same ``swarmtrain`` as the stack."""
    proc = await asyncio.create_subprocess_exec(
        *stack.swarmtrain,
        "invite",
        "--data-dir",
        str(stack.data),
        *extra,
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"{err.decode()}\n{stack.logs()}"
    return out.decode().splitlines()


def _join_argv(line: str, name: str, swarmtrain: list[str] = SWARMTRAIN) -> list[str]:
    """The printed line, run as ``swarmtrain`` (this Python's, or an installed wheel's)."""
    words = shlex.split(line)
    assert words[:3] == ["swarmtrain", "peer", "--join"] and len(words) == 4, line
    return [*swarmtrain, *words[1:], "--name", name]


def _start(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with (cwd / "peer.log").open("wb") as log:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


# ------------------------------------------------------------------ no processes


def test_a_join_token_round_trips_and_a_damaged_one_is_refused() -> None:
    seed = natsconfig.new_seed()
    token = invite.JoinToken(
        nats=["nats://127.0.0.1:4222"], peer_id="p0123456789abcdef", seed=seed, inbox="_INBOX.p0123456789abcdef"
    )
    text = invite.encode_token(token)
    assert invite.decode_token(text) == token
    assert invite.decode_token(f"  {text}\n") == token  # as pasted
    with pytest.raises(invite.InvalidToken, match="not a swarmtrain join token"):
        invite.decode_token(text[:-6])
    other_inbox = invite.encode_token(invite.JoinToken(**{**_fields(token), "inbox": "_INBOX.gateway"}))
    with pytest.raises(invite.InvalidToken, match="inbox"):
        invite.decode_token(other_inbox)
    http = invite.encode_token(invite.JoinToken(**{**_fields(token), "nats": ["http://127.0.0.1:4222"]}))
    with pytest.raises(invite.InvalidToken, match="nats://"):
        invite.decode_token(http)
    extra = base64.urlsafe_b64encode(json.dumps({**_fields(token), "admin": True}).encode()).decode()
    with pytest.raises(invite.InvalidToken):
        invite.decode_token(extra)


def _fields(token: invite.JoinToken) -> dict[str, object]:
    return {name: getattr(token, name) for name in token.__struct_fields__}


def test_invites_never_hand_out_a_local_peers_credential(tmp_path: Path) -> None:
    out = tmp_path / "auth"
    first = natsconfig.stack_credentials(out, 2, 4222)
    handed = natsconfig.invite_peers(out, 2, 4222)
    again = natsconfig.invite_peers(out, 1, 4222)
    ids = [i.peer_id for i in [*handed, *again]]
    local = [natsconfig.read_env_file(p)[natsconfig.PEER_ID_KEY] for p in first.peers]
    assert len(set(ids)) == 3 and not set(ids) & set(local)
    # a restart with more local peers takes none of the invited ones, and keeps its own
    restarted = natsconfig.stack_credentials(out, 3, 4222)
    restarted_ids = [natsconfig.read_env_file(p)[natsconfig.PEER_ID_KEY] for p in restarted.peers]
    assert restarted_ids[:2] == local and restarted_ids[2] not in ids
    config = restarted.config.read_text()
    assert all(f"({peer_id})" in config for peer_id in [*ids, *restarted_ids])
    # revoked: its file deleted; the restarted stack no longer lists it and never reuses its name locally
    revoked = handed[0]
    (out / "peers" / f"{revoked.name}.env").unlink()
    later = natsconfig.stack_credentials(out, 4, 4222)
    assert revoked.name not in {p.stem for p in later.peers} and len(later.peers) == 4
    assert f"({revoked.peer_id})" not in later.config.read_text()


def test_every_stack_signs_blob_urls_and_its_peers_hold_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith("SWARMTRAIN_")]:
        monkeypatch.delenv(key)
    st = Stack(peers=1, port=8123, nats_port=4333, data_dir=tmp_path)
    st._plan({"SWARMTRAIN_NATS_URL": "nats://127.0.0.1:4333", "SWARMTRAIN_DATABASE_URL": "postgresql://x/y"})
    secret = st.envs["scheduler"]["SWARMTRAIN_BLOB_SIGNING_SECRET"]
    assert len(secret) >= 32 and st.envs["gateway"]["SWARMTRAIN_BLOB_SIGNING_SECRET"] == secret
    assert st.envs["scheduler"]["SWARMTRAIN_BLOB_PUBLIC_URL"] == "http://127.0.0.1:8123"
    assert (tmp_path / "blob-signing-secret").stat().st_mode & 0o077 == 0
    assert not set(PEER_WITHHELD) & set(st.envs["peer-1"])
    assert st.envs["gateway"]["SWARMTRAIN_HOST"] == "127.0.0.1"


async def test_invite_is_refused_for_a_stack_not_listening(tmp_path: Path) -> None:
    code, out, err = await cli("invite", "--data-dir", str(tmp_path), env=_clean_env())
    assert code == 1 and not out
    assert "swarmtrain up --listen" in err and "Traceback" not in err


# ------------------------------------------------------------------ a real stack


async def test_a_peer_joined_from_the_printed_line_trains_a_sweep_with_no_shared_folder(
    stack: Listening, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    await join_and_train(stack, procs, tmp_path)


async def join_and_train(
    stack: Listening, procs: list[subprocess.Popen[bytes]], tmp_path: Path, swarmtrain: list[str] = SWARMTRAIN
) -> None:
    """Invite one peer, run the printed line as ``swarmtrain`` in a folder of its own, train a sweep on it."""
    assert "/ui/" in stack.announcement and "/metrics" in stack.announcement
    assert "NATS authentication on" in stack.announcement
    [line] = await _invite(stack)
    token = invite.decode_token(shlex.split(line)[3])
    assert token.nats == [stack.nats_url]

    elsewhere = tmp_path / "other-machine"
    elsewhere.mkdir()
    peer_env = _clean_env(
        HOME=str(elsewhere),
        SWARMTRAIN_STATE_DIR=str(elsewhere / "state"),
        SWARMTRAIN_BLOB_URL=(elsewhere / "no-store").as_uri(),  # a store it must never use
        SWARMTRAIN_TORCH_THREADS="1",
    )
    procs.append(_start(_join_argv(line, "elsewhere", swarmtrain), elsewhere, peer_env))

    api = Api(stack.url)
    try:
        await api.signup()
        [peer] = await api.wait_idle_peers(1)
        assert peer["peer_id"] == token.peer_id and peer["name"] == "elsewhere"
        ds = await api.upload(DIGITS)
        hps = [{"epochs": 2, "batch_size": 64, "lr": 0.01}]
        model = {"kind": "mlp", "hidden": [16]}
        body = session_body(ds["dataset_id"], 1, hps, strategy="sweep", model=model, validation_split=0.2, seed=7)
        resp = await api.client.post("/sessions", json=body)
        assert resp.status_code == 201, resp.text
        sid = resp.json()["session_id"]
        done = await api.wait_ended(sid, timeout=120)
    finally:
        await api.client.aclose()
    assert done["status"] == "completed", f"{done}\n{(elsewhere / 'peer.log').read_text()[-3000:]}"
    [result] = done["peers"]
    assert result["peer_id"] == token.peer_id and result["status"] == "done" and result["epoch"] == 2
    # its model reached the stack's store through a signed PUT; nothing of the store is on its side
    assert (stack.data / "blobs" / "sessions" / sid / "models" / f"{token.peer_id}.safetensors").is_file()
    assert not (elsewhere / "no-store").exists()
    assert list((elsewhere / "state" / "joined" / token.peer_id).iterdir())


async def test_nats_refuses_a_forged_or_absent_credential(
    stack: Listening, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    first, second = await _invite(stack, "--peers", "2")
    issued = {invite.decode_token(shlex.split(line)[3]).peer_id for line in (first, second)}
    assert len(issued) == 2  # each line its own credential

    forged = invite.JoinToken(
        nats=[stack.nats_url], peer_id="p" + "ab" * 8, seed=natsconfig.new_seed(), inbox="_INBOX.p" + "ab" * 8
    )
    code, _, err = await cli(
        *_join_argv(f"swarmtrain peer --join {invite.encode_token(forged)}", "forger")[len(SWARMTRAIN) :],
        env=_clean_env(SWARMTRAIN_STATE_DIR=str(tmp_path / "forger")),
    )
    assert code == 1
    assert "refuses this invite's credential" in err and "Authorization Violation" in err

    # no credential at all
    assert await invite.refusal([stack.nats_url], None, "_INBOX") == "nats: 'Authorization Violation'"
