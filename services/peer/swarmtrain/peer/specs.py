"""This machine's ``PeerSpecs``: cores, memory, GPUs, torch and CUDA versions, OS, owner labels.

``collect`` reads what this process may use (CPU affinity, a cgroup memory limit, the GPUs that
``CUDA_VISIBLE_DEVICES`` leaves visible). The GPU list comes from ``probe_gpus``; tests pass their
own (``gpus=``) so that no GPU is needed to test a GPU peer's specs.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable
from pathlib import Path

import msgspec

from swarmtrain.common.specs import GpuSpec, Labels, PeerSpecs

GpuProbe = Callable[[], list[GpuSpec]]


def collect(
    *,
    device: str = "cpu",
    labels: dict[str, str] | None = None,
    gpus: GpuProbe | None = None,
    proc: Path = Path("/proc"),
    cgroup: Path = Path("/sys/fs/cgroup"),
) -> PeerSpecs:
    """The specs of this process's machine, training on ``device`` (``cpu``, ``cuda`` or ``cuda:N``).

    Raises ``ValueError`` for a CUDA device that the GPU list does not have, or for bad labels.
    """
    found = (gpus or probe_gpus)()
    index: int | None = None
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if index >= len(found):
            raise ValueError(f"the peer trains on {device} but {len(found)} GPU(s) are visible")
    torch_version, cuda_version = torch_versions()
    specs = PeerSpecs(
        cpu_cores=cpu_cores(),
        memory_bytes=memory_bytes(proc, cgroup),
        gpus=found,
        torch_version=torch_version,
        cuda_version=cuda_version,
        os=os_text(),
        labels=dict(labels or {}),
        device_index=index,
    )
    # the Struct's constructor does not check Meta bounds; a round trip through the decoder does
    return msgspec.json.decode(msgspec.json.encode(specs), type=PeerSpecs)


def cpu_cores() -> int:
    """Cores this process may run on: its affinity where the OS has one, else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def memory_bytes(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Total memory (``/proc/meminfo``, else ``sysconf``), capped by a cgroup v2 or v1 limit."""
    total = _meminfo_total(proc / "meminfo")
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 0
    for limit_file in (cgroup / "memory.max", cgroup / "memory" / "memory.limit_in_bytes"):
        try:
            text = limit_file.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
        break
    return total


def _meminfo_total(path: Path) -> int | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024  # meminfo counts kB (KiB)
    return None


def probe_gpus() -> list[GpuSpec]:
    """The GPUs torch sees (``CUDA_VISIBLE_DEVICES`` applied); none when CUDA is not available."""
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        found.append(
            GpuSpec(
                name=str(props.name)[:200] or f"cuda:{i}",
                memory_bytes=int(props.total_memory),
                compute_capability=f"{props.major}.{props.minor}",
            )
        )
    return found


def torch_versions() -> tuple[str, str | None]:
    """(torch's version, the CUDA version it was built with or ``None``)."""
    import torch

    cuda = torch.version.cuda
    return str(torch.__version__), (str(cuda) if cuda else None)


def os_text() -> str:
    """e.g. ``Linux 6.8.0-45-generic x86_64``."""
    return f"{platform.system()} {platform.release()} {platform.machine()}".strip()[:200]


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """``["region=eu", "tier=gold"]`` -> ``{"region": "eu", "tier": "gold"}``, checked against the contract.

    Raises ``ValueError`` naming the bad item: no ``=``, a name or value out of bounds, a name twice.
    """
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"--label {item!r}: write it as name=value")
        if key in labels:
            raise ValueError(f"--label {key!r} given twice")
        labels[key] = value
    try:
        return msgspec.convert(labels, Labels)
    except msgspec.ValidationError as exc:
        raise ValueError(f"--label: {exc}") from None
