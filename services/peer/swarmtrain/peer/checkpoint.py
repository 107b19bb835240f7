"""A sweep run's training state as one safetensors file, and back (``Hyperparameters.checkpoint_every``).

What a resumed run needs to go on exactly as if it never stopped: the model's tensors (weights and
buffers: the standardization, batch norm's statistics), the optimizer's state tensors (Adam's
moments and step count, SGD's momentum), the schedule's position (optimizer steps taken: the rate
of step k is a pure function of k, ``training/optim.py``), fp16's gradient scaler, the data order's
generator (``run_epoch`` draws each epoch's permutation from it) and torch's own generators
(dropout). On a CPU a run resumed from epoch k ends with bit-for-bit the weights of one that never
stopped (``tests/peer/test_checkpoint.py``).

The file is safetensors (tensors and a string map, read without pickle) with one JSON entry
(``checkpoint``: format, epoch, epochs, steps, the scaler's numbers). The bytes come back through
the blob store, so :func:`restore` trusts nothing in them: every tensor's name, dtype and shape must
be the fresh model's and optimizer's, the epoch inside the run, the step count the one that epoch
ends at; anything else is a :class:`CheckpointError` (the run fails with the reason).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import torch
from torch import nn

from swarmtrain.training import tensorfile
from swarmtrain.training.optim import Steps

FORMAT = "swarmtrain-checkpoint/1"
METADATA_KEY = "checkpoint"
OPTIMIZER_STATE = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"})
"""The optimizer state tensors a checkpoint may hold (AdamW's, SGD's)."""
MAX_SCALER_VALUE = 2.0**128


class CheckpointError(Exception):
    """A checkpoint that does not fit this run: the message says why (the ``PeerFailed`` reason)."""


_Number = Annotated[float, msgspec.Meta(ge=0, le=MAX_SCALER_VALUE)]


class Meta(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    format: str
    epoch: Annotated[int, msgspec.Meta(ge=1)]
    """The last epoch the state is after."""
    epochs: Annotated[int, msgspec.Meta(ge=1)]
    step: Annotated[int, msgspec.Meta(ge=0)]
    """Optimizer steps taken (the schedule's position)."""
    scaler: dict[str, _Number] | None = None
    """fp16's ``GradScaler.state_dict()``; None without one."""


def _rng_tensors(shuffle: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    out = {"rng.shuffle": shuffle.get_state(), "rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def dumps(
    model: nn.Module, steps: Steps, shuffle: torch.Generator, epoch: int, device: torch.device | None = None
) -> bytes:
    """The run's state after ``epoch`` (``steps``: its optimizer and schedule; ``shuffle``: its data
    order's generator), as safetensors bytes."""
    device = device or torch.device("cpu")
    tensors = {f"model.{name}": t for name, t in model.state_dict().items()}
    for index, entries in steps.optimizer.state_dict()["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value
    tensors.update(_rng_tensors(shuffle, device))
    scaler = None if steps.scaler is None else {k: float(v) for k, v in steps.scaler.state_dict().items()}
    meta = Meta(format=FORMAT, epoch=epoch, epochs=steps.hp.epochs, step=steps.step, scaler=scaler)
    return tensorfile.dumps(tensors, {METADATA_KEY: msgspec.json.encode(meta).decode()})


def restore(
    data: bytes,
    model: nn.Module,
    steps: Steps,
    shuffle: torch.Generator,
    steps_per_epoch: int,
    device: torch.device | None = None,
) -> int:
    """Load the state in ``data`` into ``model``, ``steps`` and ``shuffle`` (and torch's generators);
    returns the epoch it is after, so training goes on at the next one. Raises ``CheckpointError``."""
    device = device or torch.device("cpu")
    try:
        tensors = dict(tensorfile.loads(data))
        raw = (tensorfile.read_metadata(data) or {}).get(METADATA_KEY)
        if raw is None:
            raise CheckpointError("not a checkpoint: no checkpoint metadata")
        meta = msgspec.json.decode(raw, type=Meta)
    except CheckpointError:
        raise
    except Exception as exc:  # untrusted bytes
        raise CheckpointError(f"not a checkpoint: {type(exc).__name__}") from None
    if meta.format != FORMAT:
        raise CheckpointError(f"unknown checkpoint format {meta.format[:40]!r}")
    if meta.epochs != steps.hp.epochs or not 1 <= meta.epoch < meta.epochs:
        raise CheckpointError(f"epoch {meta.epoch} of {meta.epochs}: this run trains {steps.hp.epochs} epochs")
    if meta.step != meta.epoch * steps_per_epoch:
        raise CheckpointError(f"{meta.step} optimizer steps: epoch {meta.epoch} ends at {meta.epoch * steps_per_epoch}")
    if (meta.scaler is None) != (steps.scaler is None):
        raise CheckpointError("the checkpoint's precision is not this run's")

    fresh = model.state_dict()
    weights = {name[len("model.") :]: t for name, t in tensors.items() if name.startswith("model.")}
    if set(weights) != set(fresh):
        raise CheckpointError("the checkpoint's model tensors are not this model's")
    for name, tensor in weights.items():
        if tensor.shape != fresh[name].shape or tensor.dtype != fresh[name].dtype:
            raise CheckpointError(f"model tensor {name!r}: {list(tensor.shape)} {tensor.dtype} does not fit")

    params = list(model.parameters())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if not name.startswith("optim."):
            continue
        _, index_text, entry = [*name.split(".", 2), "", ""][:3]
        if not index_text.isdigit() or int(index_text) >= len(params) or entry not in OPTIMIZER_STATE:
            raise CheckpointError(f"optimizer tensor {name[:80]!r} is not one of this run's")
        index = int(index_text)
        expected = torch.Size([]) if entry == "step" else params[index].shape
        if tensor.shape != expected or not tensor.dtype.is_floating_point:
            raise CheckpointError(f"optimizer tensor {name!r}: {list(tensor.shape)} does not fit")
        state.setdefault(index, {})[entry] = tensor

    rngs = {name: t for name, t in tensors.items() if name.startswith("rng.")}
    ours = _rng_tensors(shuffle, device)
    for name in ("rng.shuffle", "rng.torch"):
        if name not in rngs or rngs[name].dtype != torch.uint8 or rngs[name].shape != ours[name].shape:
            raise CheckpointError(f"the checkpoint's generator {name!r} is missing or does not fit")
    known = len(weights) + sum(len(v) for v in state.values()) + len(rngs)
    if known != len(tensors) or set(rngs) - {"rng.shuffle", "rng.torch", "rng.cuda"}:
        raise CheckpointError("the checkpoint holds tensors that are not this run's")

    model.load_state_dict(weights, strict=True)
    optimizer_state = steps.optimizer.state_dict()
    optimizer_state["state"] = state
    steps.optimizer.load_state_dict(optimizer_state)
    steps.step = meta.step
    if steps.scaler is not None and meta.scaler is not None:
        steps.scaler.load_state_dict(dict(meta.scaler))
    shuffle.set_state(rngs["rng.shuffle"])
    torch.set_rng_state(rngs["rng.torch"])
    cuda = rngs.get("rng.cuda")
    if device.type == "cuda" and cuda is not None and cuda.shape == ours["rng.cuda"].shape:
        torch.cuda.set_rng_state(cuda, device)  # a checkpoint of another device kind: its dropout differs
    return meta.epoch
