"""compose.yaml read as docker compose reads it (the parts the tests need): anchors and merge keys
(PyYAML), ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` interpolation, env files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from swarmtrain.cli.natsconfig import read_env_file

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def load() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def variables(value: str) -> list[tuple[str, str | None, str]]:
    """``(name, operator, argument)`` of every ``${...}`` in ``value`` (``$$`` is a literal ``$``)."""
    return [(m[1], m[2], m[3] or "") for m in _VAR.finditer(value.replace("$$", ""))]


def interpolate(value: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name, op, arg = m[1], m[2], m[3] or ""
        current = env.get(name)
        if op in (":-", "-"):
            return current if current else arg
        if op in (":?", "?") and not current:
            raise KeyError(f"{name}: {arg}")
        return current or ""

    return _VAR.sub(sub, value).replace("$$", "$")


class Service:
    def __init__(self, name: str, spec: dict[str, Any], env: dict[str, str]) -> None:
        self.name, self.spec, self.vars = name, spec, env

    @property
    def command(self) -> list[str]:
        return [interpolate(str(c), self.vars) for c in self.spec.get("command", [])]

    def environment(self) -> dict[str, str]:
        """env_file entries first, then ``environment`` over them, as compose does."""
        out: dict[str, str] = {}
        for path in self.spec.get("env_file", []):
            out.update(read_env_file(ROOT / interpolate(path, self.vars)))
        for key, value in (self.spec.get("environment") or {}).items():
            out[key] = interpolate(str(value), self.vars)
        return out

    def mounts(self) -> dict[str, Path]:
        """Container path -> host path of each bind mount."""
        out: dict[str, Path] = {}
        for volume in self.spec.get("volumes", []):
            parts = interpolate(volume, self.vars).split(":")
            if parts[0].startswith((".", "/")):
                out[parts[1]] = (ROOT / parts[0]).resolve()
        return out


def service(name: str, env: dict[str, str]) -> Service:
    return Service(name, load()["services"][name], env)
