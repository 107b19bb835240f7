"""``--gpus``: a faked GPU list, one process per GPU, started and stopped together, crashes restarted.

The supervised processes are a stand-in (``sh`` that reports its GPU and waits) so that the test
costs no CPU; one test checks that the real ``swarmtrain peer`` argv is built and parses.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from swarmtrain.cli import gpus
from swarmtrain.cli.main import parser

STAND_IN = """
echo "up $CUDA_VISIBLE_DEVICES $0"
if [ -n "$CRASH_ONCE" ] && [ "$0" = "$CRASH_ONCE" ] && [ ! -e "$MARKS/$0" ]; then touch "$MARKS/$0"; exit 3; fi
if [ -n "$CRASH_ALWAYS" ] && [ "$0" = "$CRASH_ALWAYS" ]; then exit 3; fi
exec sleep 600
"""


class Reports:
    """Lines the stand-ins write on a pipe (their stdout): a real signal that a child is up, not a sleep."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.buffer = b""

    def starter(self, extra_env: dict[str, str]) -> Callable[[gpus.PeerChild], subprocess.Popen[bytes]]:
        def start(child: gpus.PeerChild) -> subprocess.Popen[bytes]:
            env = {**child.env, **extra_env}
            return subprocess.Popen(["sh", "-c", STAND_IN, child.name], env=env, stdout=self.w)

        return start

    def read(self, n: int, timeout: float = 60.0) -> list[str]:
        lines: list[str] = []
        while len(lines) < n:
            if b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                lines.append(line.decode())
                continue
            ready, _, _ = select.select([self.r], [], [], timeout)
            assert ready, f"only {lines} after {timeout}s"
            self.buffer += os.read(self.r, 4096)
        return lines

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@pytest.fixture
def reports() -> Iterator[Reports]:
    r = Reports()
    yield r
    r.close()


FAKE3 = {gpus.FAKE_GPUS_ENV: "3", "PATH": os.environ.get("PATH", "")}


def children(spec: str = "all", env: dict[str, str] | None = None) -> list[gpus.PeerChild]:
    env = env or FAKE3
    visible = gpus.visible_gpus(env)
    return gpus.peer_children(gpus.parse_gpu_spec(spec, len(visible)), visible, name="box", env=env)


Supervise = Callable[..., tuple[gpus.Supervisor, threading.Event, threading.Thread, list[int]]]


@pytest.fixture
def supervise(reports: Reports) -> Iterator[Supervise]:
    """Run a Supervisor in a thread; whatever the test does, it is stopped and joined at the end."""
    running: list[tuple[threading.Event, threading.Thread]] = []

    def start(
        kids: list[gpus.PeerChild], restart_limit: int = 5, **extra_env: str
    ) -> tuple[gpus.Supervisor, threading.Event, threading.Thread, list[int]]:
        sup = gpus.Supervisor(
            kids, start=reports.starter(extra_env), restart_limit=restart_limit, poll_s=0.05, say=lambda _: None
        )
        stop, result = threading.Event(), []
        thread = threading.Thread(target=lambda: result.append(sup.run(stop)))
        thread.start()
        running.append((stop, thread))
        return sup, stop, thread, result

    yield start
    for stop, thread in running:
        stop.set()
        thread.join(60)


# ------------------------------------------------------------------ which GPUs


def test_the_gpu_spec() -> None:
    assert gpus.parse_gpu_spec("all", 4) == [0, 1, 2, 3]
    assert gpus.parse_gpu_spec("0,2", 4) == [0, 2]
    assert gpus.parse_gpu_spec(" 3 ", 4) == [3]
    for spec, count, why in (
        ("4", 4, "no GPU 4"),
        ("0,0", 4, "twice"),
        ("", 4, "all"),
        ("first", 4, "all"),
        ("-1", 4, "all"),
        ("all", 0, "no GPU found"),
    ):
        with pytest.raises(ValueError, match=why):
            gpus.parse_gpu_spec(spec, count)


def test_the_gpu_list() -> None:
    assert gpus.visible_gpus({gpus.FAKE_GPUS_ENV: "3"}) == ["0", "1", "2"]
    assert gpus.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert gpus.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-1a2b,-1,3"}) == ["GPU-1a2b"]
    listing = (
        "GPU 0: NVIDIA H100 (UUID: GPU-a)\n  MIG 1g.10gb Device 0: (UUID: MIG-x)\nGPU 1: NVIDIA H100 (UUID: GPU-b)\n"
    )
    assert gpus.visible_gpus({}, smi=lambda: listing) == ["0", "1"]
    with pytest.raises(ValueError, match=gpus.FAKE_GPUS_ENV):
        gpus.visible_gpus({gpus.FAKE_GPUS_ENV: "two"})


def test_the_real_peer_argv_is_built_right_and_parses() -> None:
    env = {**FAKE3, "CUDA_VISIBLE_DEVICES": "4,5,6"}
    del env[gpus.FAKE_GPUS_ENV]
    kids = gpus.peer_children([0, 2], gpus.visible_gpus(env), name="box", nats="nats://head:4222", env=env)
    assert [(c.name, c.env["CUDA_VISIBLE_DEVICES"]) for c in kids] == [("box-gpu0", "4"), ("box-gpu2", "6")]
    exe = [sys.executable, "-m", "swarmtrain.cli.main"]
    assert kids[1].argv == [*exe, "peer", "--device", "cuda", "--name", "box-gpu2", "--nats", "nats://head:4222"]
    args = parser().parse_args(kids[1].argv[len(exe) :])
    assert (args.command, args.device, args.name, args.nats) == ("peer", "cuda", "box-gpu2", "nats://head:4222")


def test_the_fake_gpu_list_is_not_handed_down(tmp_path: Path) -> None:
    kids = children()
    assert all(gpus.FAKE_GPUS_ENV not in c.env for c in kids)
    with pytest.raises(ValueError, match="folder"):
        gpus.peer_children([0, 1], ["0", "1"], credentials=str(tmp_path / "peer-1.env"), env={})
    folder = gpus.peer_children([0, 1], ["0", "1"], name="b", credentials=str(tmp_path), env={})
    assert all(c.argv[-2:] == ["--credentials", str(tmp_path)] for c in folder)


# ------------------------------------------------------------------ the supervisor


def test_one_process_per_gpu_started_and_stopped_together(reports: Reports, supervise: Supervise) -> None:
    kids = children()
    sup, stop, thread, result = supervise(kids)
    assert sorted(reports.read(3)) == ["up 0 box-gpu0", "up 1 box-gpu1", "up 2 box-gpu2"]
    assert sup.started.wait(30)  # set just after the last Popen returns
    procs = [c.proc for c in kids]
    assert all(p is not None and p.poll() is None for p in procs)
    stop.set()
    thread.join(60)
    assert not thread.is_alive() and result == [0]
    assert [p.returncode for p in procs if p is not None] == [-signal.SIGTERM] * 3


def test_a_crashed_peer_is_restarted(reports: Reports, supervise: Supervise, tmp_path: Path) -> None:
    kids = children("0,2")
    _, stop, thread, result = supervise(kids, CRASH_ONCE="box-gpu2", MARKS=str(tmp_path))
    assert sorted(reports.read(3)) == ["up 0 box-gpu0", "up 2 box-gpu2", "up 2 box-gpu2"]
    stop.set()
    thread.join(60)
    assert result == [0]
    assert [(c.name, c.restarts) for c in kids] == [("box-gpu0", 0), ("box-gpu2", 1)]
    assert all(c.proc is not None and c.proc.returncode == -signal.SIGTERM for c in kids)


def test_a_peer_that_keeps_dying_stops_them_all(supervise: Supervise) -> None:
    kids = children()
    _, stop, thread, result = supervise(kids, restart_limit=2, CRASH_ALWAYS="box-gpu1")
    thread.join(60)  # ends by itself: nobody sets stop
    assert not thread.is_alive() and result == [1]
    assert not stop.is_set()
    assert kids[1].restarts == 2
    assert [c.proc.returncode for c in kids if c.proc is not None] == [-signal.SIGTERM, 3, -signal.SIGTERM]


def test_sigterm_to_the_supervisor_stops_every_peer(reports: Reports) -> None:
    kids = children()
    sup = gpus.Supervisor(kids, start=reports.starter({}), poll_s=0.05, say=lambda _: None)

    def signal_when_up() -> None:
        reports.read(3)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=signal_when_up)
    sender.start()
    before = signal.getsignal(signal.SIGTERM)
    assert gpus.run_peers(kids, sup) == 0
    sender.join(60)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    assert all(c.proc is not None and c.proc.returncode == -signal.SIGTERM for c in kids)
