"""`swarmtrain nats-config` and a peer taking its credential, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmtrain.cli.main import main
from swarmtrain.cli.natsconfig import claim, generate, read_env_file
from swarmtrain.common.settings import from_env


def test_the_command_writes_and_then_keeps_credentials(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nats"
    assert main(["nats-config", "--out", str(out), "--peers", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'nats-server.conf'}" in printed and f"wrote {out / 'peers' / 'peer-2.env'}" in printed
    first = {p: p.read_text() for p in out.rglob("*.env")}
    assert main(["nats-config", "--out", str(out), "--peers", "3"]) == 0  # grows; keeps what exists
    printed = capsys.readouterr().out
    assert f"kept  {out / 'peers' / 'peer-1.env'}" in printed and "peer-3.env (secret)" in printed
    assert all(path.read_text() == text for path, text in first.items())
    ids = [read_env_file(p)["SWARMTRAIN_PEER_ID"] for p in sorted((out / "peers").glob("*.env"))]
    assert len(set(ids)) == 3
    config = (out / "nats-server.conf").read_text()
    assert all(f"peer.{i}.presence" in config for i in ids)
    assert (out / ".gitignore").read_text().strip().endswith("*")
    assert (out / "tap.nk").read_text().strip() == read_env_file(out / "tap.env")["SWARMTRAIN_NATS_NKEY_SEED"]


def test_peers_claim_distinct_credentials_from_a_folder(tmp_path: Path) -> None:
    generate(tmp_path, peers=2)
    folder = tmp_path / "peers"
    with claim(folder) as (first, env1), claim(folder) as (second, env2):
        assert (first, second) == ("peer-1", "peer-2")
        assert env1["SWARMTRAIN_PEER_ID"] != env2["SWARMTRAIN_PEER_ID"]
        with pytest.raises(SystemExit, match="in use"), claim(folder):
            pass
    with claim(folder) as (again, _):  # released when its holder ends
        assert again == "peer-1"
    with claim(folder / "peer-2.env") as (name, env):
        settings = from_env(env)
        assert name == "peer-2" and settings.peer_id == env["SWARMTRAIN_PEER_ID"]
        assert settings.nats_inbox_prefix == f"_INBOX.{settings.peer_id}" and settings.nats_nkey_seed


def test_every_setting_can_come_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("from-a-file\n")
    env = {
        "SWARMTRAIN_JWT_SECRET_FILE": str(tmp_path / "secret"),
        "SWARMTRAIN_S3_SECRET_KEY_FILE": str(tmp_path / "secret"),
        "SWARMTRAIN_S3_ACCESS_KEY": "direct",
        "SWARMTRAIN_S3_ACCESS_KEY_FILE": str(tmp_path / "missing"),
    }
    settings = from_env(env)
    assert settings.jwt_secret == settings.s3_secret_key == "from-a-file"
    assert settings.s3_access_key == "direct"  # the variable wins over its file
    with pytest.raises(SystemExit, match="SWARMTRAIN_JWT_SECRET_FILE"):
        from_env({"SWARMTRAIN_JWT_SECRET_FILE": str(tmp_path / "missing")})
