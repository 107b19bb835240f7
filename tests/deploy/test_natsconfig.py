"""`swarmtrain nats-config` and a peer taking its credential, without a server."""

from __future__ import annotations

import subprocess
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


def test_cluster_3_routes_three_nodes_and_keeps_fsync(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nats"
    assert main(["nats-config", "--out", str(out), "--peers", "1", "--cluster", "3"]) == 0
    assert "SWARMTRAIN_STREAM_REPLICAS=3" in capsys.readouterr().out
    config = (out / "nats-server.conf").read_text()
    block = config.split("cluster {", 1)[1].split("}", 1)[0]
    # each node's name and route port from its environment: nothing on the command line blocks a reload
    assert "server_name: $SWARMTRAIN_NATS_NODE" in config
    assert "name: swarmtrain" in block and "port: $SWARMTRAIN_NATS_CLUSTER_PORT" in block
    routes = [f"nats-route://{host}:{port}" for host, port in (("nats", 6222), ("nats-2", 6223), ("nats-3", 6224))]
    assert f"routes: [{', '.join(routes)}]" in block  # compose.yaml's `ha` profile names them so
    assert "sync_interval: always" in config
    generate(out, peers=1)  # without --cluster, one server again
    assert "cluster {" not in (out / "nats-server.conf").read_text()
    with pytest.raises(ValueError, match="--cluster"):
        generate(out, peers=1, cluster=1)


async def test_three_servers_run_the_generated_cluster_file_with_r3_streams(tmp_path: Path) -> None:
    """The file of `--cluster 3` as three real nats-servers on loopback (ports and routes from the
    command line, which wins over the file): the streams are created with three replicas."""
    import asyncio
    import signal

    import nats

    from swarmtrain.common import bus, servers

    from .conftest import ADMIN, with_admin

    written = generate(tmp_path / "nats", peers=1, cluster=3)
    config = with_admin(written.config)
    ports = [servers.free_port() for _ in range(3)]
    routes = tuple(f"nats://127.0.0.1:{servers.free_port()}" for _ in range(3))
    nodes = [servers.ClusterNode(f"nats-{i + 1}", int(routes[i].rsplit(":", 1)[1]), routes) for i in range(3)]
    procs = [
        await asyncio.to_thread(
            subprocess.Popen,
            servers.nats_command(port, tmp_path / node.name, config, node),
            stdout=subprocess.DEVNULL,
            env=_node_env(node.name, node.cluster_port),
        )
        for port, node in zip(ports, nodes, strict=True)
    ]
    try:
        for port, proc in zip(ports, procs, strict=True):
            await asyncio.to_thread(servers.wait_port, port, proc, "nats-server")
        nc = await nats.connect([f"nats://127.0.0.1:{p}" for p in ports], user=ADMIN[0], password=ADMIN[1])
        js = nc.jetstream()
        async with asyncio.timeout(60):  # the cluster elects its meta leader first
            while True:
                try:
                    await bus.ensure_streams(js, replicas=3)
                    break
                except nats.errors.Error:
                    await asyncio.sleep(0.5)
        info = await js.stream_info(bus.EVENTS_STREAM)
        assert info.config.num_replicas == 3 and info.cluster is not None
        assert len(info.cluster.replicas or []) == 2  # the leader and two followers
        await nc.drain()
    finally:
        for proc in procs:
            servers.stop(proc, signal.SIGTERM)


def _node_env(name: str, cluster_port: int) -> dict[str, str]:
    import os

    from swarmtrain.cli.natsconfig import CLUSTER_PORT_ENV, NODE_ENV

    return {**os.environ, NODE_ENV: name, CLUSTER_PORT_ENV: str(cluster_port)}


async def test_a_cluster_node_reloads_its_configuration_and_takes_a_new_peer(tmp_path: Path) -> None:
    """docs/many-machines.md: add a peer, reload NATS, the new credential is accepted at once. A node
    named on its command line (``--server_name``) refuses the reload; one named by its environment
    (the generated file's ``server_name: $SWARMTRAIN_NATS_NODE``, as compose.yaml runs it) takes it."""
    import asyncio
    import signal

    import nats
    import nats.errors

    from swarmtrain.common import servers

    out = tmp_path / "nats"
    generate(out, peers=1, cluster=3)
    port = servers.free_port()
    log = tmp_path / "nats.log"
    command = [servers.nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")]
    with log.open("wb") as sink:
        proc = await asyncio.to_thread(
            subprocess.Popen,
            [*command, "-c", str(out / "nats-server.conf")],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=_node_env("nats-1", servers.free_port()),
        )
    try:
        await asyncio.to_thread(servers.wait_port, port, proc, "nats-server")
        generate(out, peers=2, cluster=3)  # a second peer: its public key is in the file now
        env = read_env_file(out / "peers" / "peer-2.env")
        proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(20):
            while "Reloaded server configuration" not in log.read_text():
                assert "Failed to reload" not in log.read_text(), log.read_text()[-2000:]
                await asyncio.sleep(0.1)
        nc = await nats.connect(
            f"nats://127.0.0.1:{port}",
            nkeys_seed_str=env["SWARMTRAIN_NATS_NKEY_SEED"],
            inbox_prefix=env["SWARMTRAIN_NATS_INBOX_PREFIX"],
            allow_reconnect=False,
            connect_timeout=5,
        )
        await nc.close()
    finally:
        servers.stop(proc, signal.SIGTERM)


def test_an_unreadable_credential_names_its_owner_and_the_rule(tmp_path: Path) -> None:
    """What a peer says when it runs as another user than the one who ran nats-config (root, which
    these tests run as, reads any file, so the message is checked on its own)."""
    import os

    from swarmtrain.cli.natsconfig import _unreadable

    generate(tmp_path / "nats", peers=1)
    path = tmp_path / "nats" / "peers" / "peer-1.env"
    text = _unreadable(path)
    assert f"belongs to uid {os.stat(path).st_uid}" in text and "mode 600" in text
    assert "SWARMTRAIN_UID and SWARMTRAIN_GID in .env" in text and "Traceback" not in text
