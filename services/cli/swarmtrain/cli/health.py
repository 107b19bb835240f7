"""``swarmtrain health``: the image's one HEALTHCHECK, answering for whichever role its container runs.

The role is the command of the container's main process (PID 1: ``swarmtrain gateway``, ``projector``,
``scheduler``, ``peer``), and the check is what that role serves, at the port its own settings name
(so no port is written a second time for the check): the gateway its ``/healthz``; any other service
or peer its ``/metrics`` when ``SWARMTRAIN_METRICS_PORT`` is set, else that it is running at all.
``python -m swarmtrain.cli.health`` is the same check without the CLI's imports: what the image runs,
so a loaded machine answers within the healthcheck's timeout.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

from swarmtrain.common.settings import Settings, get_settings

ROLES = ("gateway", "projector", "scheduler", "peer")


def role_of(cmdline: bytes) -> str | None:
    """The swarmtrain command in a ``/proc/<pid>/cmdline`` (NUL-separated), or None."""
    words = [w.decode(errors="replace") for w in cmdline.split(b"\0") if w]
    for i, word in enumerate(words):
        if Path(word).name == "swarmtrain" or word == "swarmtrain.cli.main":
            rest = [w for w in words[i + 1 :] if not w.startswith("-")]
            return rest[0] if rest and rest[0] in ROLES else None
    return None


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def check(settings: Settings, pid: int = 1, timeout: float = 2.0) -> tuple[bool, str]:
    """(healthy, what was checked) for the swarmtrain process ``pid``."""
    try:
        role = role_of(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError as exc:
        return False, f"no process {pid}: {exc}"
    if role is None:
        return False, f"process {pid} runs no swarmtrain service or peer"
    if role == "gateway":
        url = f"http://{_local(settings.host)}:{settings.port}/healthz"
    elif settings.metrics_port > 0:
        url = f"http://{_local(settings.metrics_host)}:{settings.metrics_port}/metrics"
    else:
        return True, f"{role} running (no SWARMTRAIN_METRICS_PORT to ask)"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200, f"{role}: {url} answered {resp.status}"
    except OSError as exc:
        return False, f"{role}: {url}: {exc}"


def main(pid: int = 1) -> int:
    healthy, what = check(get_settings(), pid=pid)
    print(what, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
