"""``swarmtrain peer --gpus all|0,2``: one peer process per GPU, supervised, stopped together.

Each child is a plain ``swarmtrain peer --device cuda`` that sees only its own GPU
(``CUDA_VISIBLE_DEVICES``), named ``<name>-gpu<i>`` so that it keeps its own peer id. A child that
dies is restarted, at most ``restart_limit`` times; one that keeps dying stops them all, as does
SIGINT or SIGTERM (each child gets SIGTERM, then SIGKILL after ``stop_timeout_s``).

The GPUs are those ``CUDA_VISIBLE_DEVICES`` lists when it is set, else those ``nvidia-smi -L``
lists, else ``torch.cuda.device_count()``. Tests set ``SWARMTRAIN_FAKE_GPUS=N`` to have N without a
GPU: each child is then a real ``swarmtrain peer --device cpu`` (a faked GPU cannot be trained on),
with its own name, id and ``CUDA_VISIBLE_DEVICES``; or they start a stand-in command through ``start=``.

``swarmtrain peer --gpus all|0,2`` calls :func:`main`; ``python -m swarmtrain.cli.gpus`` does too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

FAKE_GPUS_ENV = "SWARMTRAIN_FAKE_GPUS"
RESTART_LIMIT = 5


# ------------------------------------------------------------------ which GPUs


def visible_gpus(env: Mapping[str, str] | None = None, smi: Callable[[], str | None] | None = None) -> list[str]:
    """The ids to give children as ``CUDA_VISIBLE_DEVICES``, in order: index i of ``--gpus`` is entry i."""
    env = os.environ if env is None else env
    if (fake := env.get(FAKE_GPUS_ENV)) is not None:
        if not fake.strip().isdigit():
            raise ValueError(f"{FAKE_GPUS_ENV} must be a whole number, got {fake!r}")
        return [str(i) for i in range(int(fake))]
    if (visible := env.get("CUDA_VISIBLE_DEVICES")) is not None:
        ids: list[str] = []
        for entry in (e.strip() for e in visible.split(",")):
            if not entry or entry.startswith("-"):
                break  # CUDA ignores everything from the first invalid entry on
            ids.append(entry)
        return ids
    listing = (smi or nvidia_smi_list)()
    if listing is not None:
        return [str(i) for i, _ in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]
    return [str(i) for i in range(_torch_device_count())]


def nvidia_smi_list() -> str | None:
    """``nvidia-smi -L``'s output, or ``None`` when it is not installed or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _torch_device_count() -> int:
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def parse_gpu_spec(spec: str, count: int) -> list[int]:
    """``all`` -> every index below ``count``; ``0,2`` -> [0, 2]. Raises ``ValueError`` saying what is wrong."""
    spec = spec.strip()
    if count < 1:
        raise ValueError("--gpus: no GPU found (nvidia-smi and torch see none)")
    if spec == "all":
        return list(range(count))
    indices: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"--gpus {spec!r}: write 'all' or GPU indexes such as 0,2")
        index = int(part)
        if index >= count:
            raise ValueError(f"--gpus: no GPU {index} (found {count}: 0..{count - 1})")
        if index in indices:
            raise ValueError(f"--gpus: GPU {index} named twice")
        indices.append(index)
    return indices


# ------------------------------------------------------------------ the children


@dataclass
class PeerChild:
    index: int
    """The GPU's index in ``--gpus`` terms."""
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0


def peer_children(
    indices: Sequence[int],
    visible: Sequence[str],
    *,
    name: str | None = None,
    nats: str | None = None,
    credentials: str | None = None,
    labels: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    python: str = sys.executable,
    device: str = "cuda",
) -> list[PeerChild]:
    """One ``swarmtrain peer --device cuda`` per GPU index, each seeing only its GPU (``device``:
    ``cpu`` for faked GPUs)."""
    base = name or socket.gethostname()
    if credentials and len(indices) > 1 and not Path(credentials).is_dir():
        raise ValueError("--credentials: one file holds one peer; give a folder of them for several GPUs")
    env = dict(os.environ if env is None else env)
    env.pop(FAKE_GPUS_ENV, None)
    children = []
    for i in indices:
        child_name = f"{base}-gpu{i}"
        argv = [python, "-m", "swarmtrain.cli.main", "peer", "--device", device, "--name", child_name]
        if nats:
            argv += ["--nats", nats]
        if credentials:
            argv += ["--credentials", credentials]
        for label in labels:
            argv += ["--label", label]
        children.append(PeerChild(i, child_name, argv, {**env, "CUDA_VISIBLE_DEVICES": visible[i]}))
    return children


def popen(child: PeerChild) -> subprocess.Popen[bytes]:
    return subprocess.Popen(child.argv, env=child.env)


@dataclass
class Supervisor:
    children: list[PeerChild]
    start: Callable[[PeerChild], subprocess.Popen[bytes]] = popen
    restart_limit: int = RESTART_LIMIT
    poll_s: float = 0.5
    stop_timeout_s: float = 20.0
    say: Callable[[str], None] = field(default=lambda text: print(f"swarmtrain: {text}", file=sys.stderr, flush=True))
    started: threading.Event = field(default_factory=threading.Event)
    """Set once every child has been started the first time."""

    def run(self, stop: threading.Event) -> int:
        """Start every child, restart the ones that die, stop them all when ``stop`` is set.

        0 after ``stop``; 1 when a child died more than ``restart_limit`` times (the others are
        stopped too).
        """
        try:
            for child in self.children:
                child.proc = self.start(child)
            self.started.set()
            self.say(f"{len(self.children)} peers started: {', '.join(c.name for c in self.children)}")
            while not stop.wait(self.poll_s):
                for child in self.children:
                    assert child.proc is not None
                    code = child.proc.poll()
                    if code is None:
                        continue
                    if child.restarts >= self.restart_limit:
                        self.say(f"{child.name} keeps dying (exit {code}); stopping every peer")
                        return 1
                    child.restarts += 1
                    self.say(f"{child.name} exited with {code}; restarting ({child.restarts}/{self.restart_limit})")
                    child.proc = self.start(child)
            return 0
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        live = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for proc in live:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_peers(children: list[PeerChild], supervisor: Supervisor | None = None) -> int:
    """Supervise ``children`` in the foreground until SIGINT or SIGTERM (main thread only)."""
    supervisor = supervisor or Supervisor(children)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return supervisor.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="swarmtrain peer --gpus", description="one peer process per GPU")
    p.add_argument("--gpus", required=True, help="'all' or GPU indexes such as 0,2")
    p.add_argument("--nats", help="NATS URL (default: SWARMTRAIN_NATS_URL)")
    p.add_argument("--name", help="base name; each peer is <name>-gpu<i> (default: hostname)")
    p.add_argument("--credentials", help="a folder of peer credentials (one is taken per GPU)")
    p.add_argument("--label", action="append", default=[], help="name=value, for every peer (repeatable)")
    args = p.parse_args(argv)
    return supervise(args.gpus, name=args.name, nats=args.nats, credentials=args.credentials, labels=args.label)


def supervise(
    gpus: str,
    *,
    name: str | None = None,
    nats: str | None = None,
    credentials: str | None = None,
    labels: Sequence[str] = (),
) -> int:
    """``swarmtrain peer --gpus``: one supervised peer per GPU, in the foreground until SIGINT/SIGTERM."""
    try:
        visible = visible_gpus()
        indices = parse_gpu_spec(gpus, len(visible))
        device = "cpu" if FAKE_GPUS_ENV in os.environ else "cuda"  # a faked GPU cannot be trained on
        children = peer_children(
            indices, visible, name=name, nats=nats, credentials=credentials, labels=labels, device=device
        )
    except ValueError as exc:
        print(f"swarmtrain: error: {exc}", file=sys.stderr)
        return 1
    return run_peers(children)


if __name__ == "__main__":
    sys.exit(main())
