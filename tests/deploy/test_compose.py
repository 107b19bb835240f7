"""compose.yaml, deploy/ and the generated NATS configuration, checked without a Docker engine."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from swarmtrain.cli.natsconfig import read_env_file
from swarmtrain.common.settings import PREFIX, Settings

from .composefile import ROOT, interpolate, load, service, variables

SWARMTRAIN_SERVICES = ("gateway", "projector", "scheduler", "peer", "peer-gpu")
SECRETS = (
    "SWARMTRAIN_JWT_SECRET",
    "SWARMTRAIN_BLOB_SIGNING_SECRET",
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
)
STORE = ("SWARMTRAIN_BLOB_URL", "SWARMTRAIN_S3_ENDPOINT", "SWARMTRAIN_S3_ACCESS_KEY", "SWARMTRAIN_S3_SECRET_KEY")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load()


def test_every_service_is_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "nats",
        "nats-2",
        "nats-3",
        "minio",
        "minio-init",
        "postgres",
        "gateway",
        "projector",
        "scheduler",
        "peer",
        "peer-gpu",
        "nats-box",
    }
    assert set(compose["volumes"]) == {"nats-data", "nats-2-data", "nats-3-data", "minio-data", "pg-data"}
    for name in SWARMTRAIN_SERVICES:
        svc = compose["services"][name]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile" and svc["image"].startswith("swarmtrain:")
    assert compose["services"]["peer-gpu"]["profiles"] == ["gpu"]
    assert compose["services"]["nats-box"]["profiles"] == ["tools"]
    assert compose["services"]["nats-2"]["profiles"] == compose["services"]["nats-3"]["profiles"] == ["ha"]
    assert "container_name" not in compose["services"]["peer"]  # --scale needs replicas without a fixed name


def test_start_order_waits_on_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            condition = cond["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
            elif condition == "service_completed_successfully":
                assert "restart" not in services[dep], dep
            else:
                assert condition == "service_started"
    deps = {n: {d: c["condition"] for d, c in (s.get("depends_on") or {}).items()} for n, s in services.items()}
    assert deps["projector"] == {"nats": "service_healthy", "postgres": "service_healthy"}
    assert deps["gateway"]["nats"] == deps["gateway"]["postgres"] == "service_healthy"
    assert deps["gateway"]["minio-init"] == "service_completed_successfully"
    assert deps["scheduler"]["minio-init"] == "service_completed_successfully"
    assert deps["peer"]["gateway"] == "service_healthy"  # the streams exist: peers may not create them
    for name in ("minio", "postgres"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    # the gateway: the image's one check, which asks the role it runs at the port its settings name
    assert services["gateway"]["healthcheck"]["test"] == ["CMD", "python", "-m", "swarmtrain.cli.health"]
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r'^HEALTHCHECK .*CMD \["python", "-m", "swarmtrain.cli.health"\]$', dockerfile, re.M)
    for name in ("nats", "nats-2", "nats-3"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL" and "js-enabled-only" in test[1] and "$${MONITOR_PORT}" in test[1]


def test_every_nats_node_has_its_own_ports_written_once(compose: dict[str, Any]) -> None:
    """A port apiece (the `ha` profile runs on one host's network too), each written once: the
    monitoring port of the command is the one the healthcheck asks; each node's name and route
    port, which the generated cluster file reads from the environment, match its routes."""
    from swarmtrain.cli.natsconfig import CLUSTER_PORT_ENV, NODE_ENV, cluster_hosts, cluster_ports

    seen: set[str] = set()
    for i, (host, route_port) in enumerate(zip(cluster_hosts(3), cluster_ports(3), strict=True)):
        node = compose["services"][host]
        command, env = node["command"], node["environment"]
        assert "--server_name" not in command  # a flag would make NATS refuse every configuration reload
        assert env[NODE_ENV] == f"nats-{i + 1}" and env[CLUSTER_PORT_ENV] == str(route_port)
        assert env["MONITOR_PORT"] == command[command.index("-m") + 1]
        client = command[command.index("-p") + 1] if "-p" in command else "4222"
        ports = {client, env["MONITOR_PORT"], env[CLUSTER_PORT_ENV]}
        assert len(ports) == 3 and not ports & seen, (host, ports, seen)
        seen |= ports


def test_nats_runs_the_generated_configuration_durably(compose: dict[str, Any], tmp_path: Path) -> None:
    from swarmtrain.cli.natsconfig import generate

    nats = compose["services"]["nats"]
    command = nats["command"]
    assert "-js" in command and command[command.index("-sd") + 1] == "/data"
    config_in_container = command[command.index("-c") + 1]
    mounts = {interpolate(v, {}).split(":")[1]: v for v in nats["volumes"]}
    assert mounts[config_in_container].endswith("/nats-server.conf:" + config_in_container + ":ro")
    assert mounts["/data"] == "nats-data:/data"
    written = generate(tmp_path / "nats", peers=3)
    config = written.config.read_text()
    assert re.search(r"^jetstream \{[^}]*^\s*sync_interval: always$", config, re.M | re.S)
    for env_file in (tmp_path / "nats").rglob("*.env"):
        assert env_file.stat().st_mode & 0o077 == 0, env_file
        assert read_env_file(env_file)["SWARMTRAIN_NATS_NKEY_SEED"] not in config
        assert re.search(r"nkey: " + re.escape(_public(env_file)), config)


def _public(env_file: Path) -> str:
    import nkeys

    seed = read_env_file(env_file)["SWARMTRAIN_NATS_NKEY_SEED"]
    return str(nkeys.from_seed(bytearray(seed.encode())).public_key.decode())


def test_no_secret_has_a_default(compose: dict[str, Any], tmp_path: Path) -> None:
    from swarmtrain.cli.natsconfig import generate

    generate(tmp_path / "nats", peers=1)
    text = (ROOT / "compose.yaml").read_text()
    for name, op, _ in variables(text):
        if name in SECRETS:
            assert op == ":?", f"${{{name}}} must be required (:?), never defaulted"
    for line in (ROOT / "deploy" / "env.example").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            assert line.split("=", 1)[1] == "", line
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        env = {
            "MINIO_ROOT_USER": "u",
            "MINIO_ROOT_PASSWORD": "p",
            "SWARMTRAIN_JWT_SECRET": "s",
            "SWARMTRAIN_BLOB_SIGNING_SECRET": "b",
            "SWARMTRAIN_NATS_DIR": str(tmp_path / "nats"),
        }
        service("gateway", env).environment()
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert not re.search(r"(SECRET|PASSWORD|ACCESS_KEY|NKEY)", re.sub(r"^#.*$", "", dockerfile, flags=re.M))
    assert "USER 10001" in dockerfile and 'ENTRYPOINT ["swarmtrain"]' in dockerfile
    # the build context's filter at its root, where the classic builder reads it too (BuildKit's
    # Dockerfile.dockerignore would win over it, so there is none)
    assert not (ROOT / "deploy" / "Dockerfile.dockerignore").exists()
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*" and not any(p.startswith("!deploy") for p in ignore)  # no credentials in the image
    assert {"**/.env", "**/*.env"} <= set(ignore)
    admitted = {p.removeprefix("!").rstrip("/") for p in ignore if p.startswith("!")}
    copied = set(re.findall(r"^COPY (?!--from)(.+?) \S+$", dockerfile, re.M))
    assert {w for line in copied for w in line.split()} <= admitted  # the Dockerfile copies nothing it filters out


def test_environment_is_settings_and_least_privilege(compose: dict[str, Any]) -> None:
    fields = {PREFIX + f.upper() for f in Settings.__struct_fields__}
    for name in SWARMTRAIN_SERVICES:
        env = compose["services"][name]["environment"]
        for key in env:
            assert key in fields, f"{name}: {key} is not a setting"
        assert env["SWARMTRAIN_NATS_URL"] == "nats://nats:4222"
    # the blob store's keys and the URL-signing secret: the services that read, write or sign objects
    for name in ("gateway", "scheduler"):
        env = compose["services"][name]["environment"]
        assert env["SWARMTRAIN_BLOB_URL"].startswith("s3://")
        assert {*STORE, "SWARMTRAIN_BLOB_SIGNING_SECRET", "SWARMTRAIN_BLOB_PUBLIC_URL"} <= set(env)
    assert not set(STORE) & set(compose["services"]["projector"]["environment"])  # it reads no object
    for name in ("peer", "peer-gpu"):
        svc = compose["services"][name]
        env = svc["environment"]
        assert "SWARMTRAIN_DATABASE_URL" not in env  # peers never see the database
        # nor hold a storage credential: what they read and write comes as signed URLs in commands
        assert not [k for k in env if k in STORE or k.startswith("SWARMTRAIN_S3_") or "SECRET" in k], env
        assert "env_file" not in svc
        assert svc["command"][svc["command"].index("--credentials") + 1] == "/run/swarmtrain/peers"
        assert any(v.endswith("/peers:/run/swarmtrain/peers:ro") for v in svc["volumes"])
    for name in ("gateway", "projector", "scheduler"):
        assert compose["services"][name]["env_file"] == [f"${{SWARMTRAIN_NATS_DIR:-./deploy/nats}}/{name}.env"]
    assert "SWARMTRAIN_JWT_SECRET" in compose["services"]["gateway"]["environment"]
    gpu = compose["services"]["peer-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "--device" in gpu["command"] and gpu["command"][gpu["command"].index("--device") + 1] == "cuda"
    box = compose["services"]["nats-box"]
    assert box["environment"]["NATS_NKEY"] in {interpolate(v, {}).split(":")[1] for v in box["volumes"]}


def test_every_setting_and_compose_variable_is_documented(compose: dict[str, Any]) -> None:
    doc = (ROOT / "docs" / "many-machines.md").read_text()
    rows = set(re.findall(r"^\| `([A-Z0-9_]+)`", doc, re.M))
    # a setting is documented in this page's table or in the README's (which this page feeds)
    readme = set(re.findall(r"^\| `([A-Z0-9_]+)`", (ROOT / "README.md").read_text(), re.M))
    missing = {PREFIX + f.upper() for f in Settings.__struct_fields__} - rows - readme
    assert not missing, f"settings in no table (docs/many-machines.md, README.md): {sorted(missing)}"
    compose_vars = {name for name, _, _ in variables((ROOT / "compose.yaml").read_text())}
    assert not compose_vars - rows, f"compose variables missing from the table: {sorted(compose_vars - rows)}"
