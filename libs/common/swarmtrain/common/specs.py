"""What a peer has and what a session needs: the contract for placement (issue 14).

``PeerSpecs`` travels in ``PeerRegistered`` (a peer says what it has when it registers and when that
changes); ``Requirements`` and the queue fields travel in ``SessionRequested``. Both are added to
those events as optional fields with defaults, so every stored event still decodes.

Every value has bounds (``msgspec.Meta``): a peer is somebody else's machine, and a report it makes
is checked before a service acts on it. Decoding a value out of bounds raises
``msgspec.ValidationError`` naming the field.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

# ------------------------------------------------------------------ bounded scalars

MAX_BYTES: Final = 1 << 50
"""1 PiB: more memory than any one machine reports."""

Bytes = Annotated[int, msgspec.Meta(ge=0, le=MAX_BYTES, description="a size in bytes")]
LabelKey = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$",
        description="a label's name: a letter or digit, then up to 62 of letters, digits, '.', '_', '/', '-'",
    ),
]
LabelValue = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9._:/@+-]{0,128}$",
        description="a label's value: up to 128 of letters, digits and . _ : / @ + -",
    ),
]
Labels = Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=32, description="at most 32 labels")]
ShortText = Annotated[str, msgspec.Meta(max_length=200, pattern=r"^[^\x00]*$")]
"""No NUL: a PostgreSQL ``jsonb`` string cannot hold one."""
Version = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9.+_-]{1,64}$")]
ComputeCapability = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,2}\.[0-9]{1,2}$", examples=["8.0", "9.0"])]
Device = Literal["cpu", "cuda", "any"]
Priority = Annotated[int, msgspec.Meta(ge=-100, le=100, description="higher runs first; default 0")]
QueueTimeout = Annotated[float, msgspec.Meta(gt=0, le=7 * 86400, description="seconds, at most a week")]


# ------------------------------------------------------------------ what a peer has


class GpuSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
    """e.g. ``NVIDIA H100 80GB HBM3``."""
    memory_bytes: Bytes
    compute_capability: ComputeCapability
    """``major.minor``, e.g. ``9.0``."""


class PeerSpecs(msgspec.Struct, frozen=True, kw_only=True):
    cpu_cores: Annotated[int, msgspec.Meta(ge=1, le=65536)]
    """Cores this peer's process may run on (its CPU affinity), not the machine's total."""
    memory_bytes: Bytes
    """Memory this peer may use: the machine's, or its cgroup's limit when lower."""
    gpus: Annotated[list[GpuSpec], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=list)
    """The GPUs this peer's process can see (``CUDA_VISIBLE_DEVICES`` applied)."""
    torch_version: Version
    cuda_version: Version | None = None
    """The CUDA version torch was built with; ``None`` for a CPU-only torch."""
    os: ShortText
    labels: Labels = msgspec.field(default_factory=dict)
    """Owner-given, ``--label region=eu``."""
    device_index: Annotated[int, msgspec.Meta(ge=0, le=63)] | None = None
    """Index into ``gpus`` of the GPU this peer trains on; ``None``: it trains on the CPU."""

    def __post_init__(self) -> None:
        if self.device_index is not None and self.device_index >= len(self.gpus):
            raise ValueError(f"device_index {self.device_index} names no GPU (the peer lists {len(self.gpus)})")

    @property
    def training_gpu(self) -> GpuSpec | None:
        """The GPU this peer trains on, or ``None`` for a CPU peer."""
        return None if self.device_index is None else self.gpus[self.device_index]


# ------------------------------------------------------------------ what a session needs


class Requirements(msgspec.Struct, frozen=True, kw_only=True):
    device: Device = "any"
    """``cuda``: only peers that train on a GPU; ``cpu``: only peers that train on the CPU."""
    min_gpu_memory_bytes: Bytes = 0
    """Memory of the GPU a peer trains on; anything above 0 implies a GPU peer."""
    min_memory_bytes: Bytes = 0
    """The peer's (host) memory."""
    labels: Labels = msgspec.field(default_factory=dict)
    """Every one must be among the peer's labels with the same value."""

    def __post_init__(self) -> None:
        if self.device == "cpu" and self.min_gpu_memory_bytes > 0:
            raise ValueError("device 'cpu' with min_gpu_memory_bytes > 0 can match no peer")

    @property
    def asks_nothing(self) -> bool:
        return self.device == "any" and not (self.min_gpu_memory_bytes or self.min_memory_bytes or self.labels)


class QueuePolicy(msgspec.Struct, frozen=True, kw_only=True):
    """What a session does when too few matching peers are idle.

    In ``SessionRequested`` these are three flat fields (``queue``, ``queue_timeout_s``,
    ``priority``), as a client writes them; this Struct groups them for the placement rules.
    """

    queue: bool = False
    """Wait ``queued`` until enough matching peers are idle; ``False`` (and no timeout): refused at once."""
    queue_timeout_s: QueueTimeout | None = None
    """Give up after this long in the queue; setting it implies ``queue``."""
    priority: Priority = 0

    @property
    def queues(self) -> bool:
        return self.queue or self.queue_timeout_s is not None


def meets(specs: PeerSpecs | None, requirements: Requirements) -> bool:
    """Whether a peer with ``specs`` meets ``requirements`` (capacity aside): the one rule the
    scheduler places by and the gateway counts matching idle peers by. A peer without specs (older
    than them) meets only requirements that ask nothing."""
    if specs is None:
        return requirements.asks_nothing
    gpu = specs.training_gpu
    if requirements.device == "cuda" and gpu is None:
        return False
    if requirements.device == "cpu" and gpu is not None:
        return False
    if requirements.min_gpu_memory_bytes > 0 and (gpu is None or gpu.memory_bytes < requirements.min_gpu_memory_bytes):
        return False
    if specs.memory_bytes < requirements.min_memory_bytes:
        return False
    return all(specs.labels.get(k) == v for k, v in requirements.labels.items())


def labels_text(labels: dict[str, str]) -> str:
    """``region=eu, tier=gold`` (sorted), for reasons and logs."""
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


def gib(n: int) -> str:
    """A byte count for a person: ``1.5 GiB``, ``300 MiB``."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / (1 << 20):.0f} MiB"
