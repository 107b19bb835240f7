"""fedavg's averaging: pure functions, no network, no clock, the same bytes on every machine.

Every peer runs :func:`average_round` over exactly the updates a ``RoundClosed`` names, and so does
``swarmtrain session replay-round``: the result must be bit-identical wherever it is computed.
Hence the rules of :func:`weighted_average`: updates sorted by peer id, sums in float64 on the
CPU (elementwise IEEE arithmetic, no reductions whose order could vary), one division, one cast
back. Bytes come only from :func:`state_bytes`, whose file carries a fixed metadata map.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Mapping

import torch

from swarmtrain.common.blob import BlobNotFound
from swarmtrain.common.events import RoundClosed, RoundUpdate
from swarmtrain.training import tensorfile

WEIGHTS_FORMAT = "swarmtrain-weights/1"
MAX_REASON = 300

Tensors = dict[str, torch.Tensor]


class UpdateUnavailable(Exception):
    """Raised by a ``fetch`` for an update that cannot be had, for a reason that holds for everyone
    (missing object, not where updates live): the update is rejected rather than the round failed."""


def check_update(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``tensors`` cannot be averaged into a model shaped like ``reference``; None if they can.

    Names, shapes and dtypes must equal the reference state dict's; float tensors must be finite.
    """
    missing = sorted(set(reference) - set(tensors))
    extra = sorted(set(tensors) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if extra:
            parts.append(f"unexpected {_names(extra)}")
        return "tensor names differ from the model's: " + "; ".join(parts)
    for name in sorted(reference):
        ref, got = reference[name], tensors[name]
        if tuple(got.shape) != tuple(ref.shape):
            return f"tensor {name!r} has shape {list(got.shape)}, the model's is {list(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"tensor {name!r} has dtype {_dtype(got.dtype)}, the model's is {_dtype(ref.dtype)}"
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            return f"tensor {name!r} holds NaN or Inf"
    return None


def l2_distance(tensors: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of ``tensors - start`` over every float tensor, the same to the last bit on any
    machine: elementwise float64 differences and squares (IEEE, exactly rounded), summed with
    ``math.fsum`` (exactly rounded, so no reduction order can change it). Names and shapes must
    agree (see :func:`check_update`)."""
    squares = (
        ((tensors[name].detach().to("cpu", torch.float64) - start[name].detach().to("cpu", torch.float64)) ** 2)
        .reshape(-1)
        .tolist()
        for name in sorted(start)
        if start[name].is_floating_point()
    )
    return math.sqrt(math.fsum(itertools.chain.from_iterable(squares)))


def weighted_average(updates: list[tuple[str, Mapping[str, torch.Tensor], int]]) -> Tensors:
    """The ``num_samples``-weighted mean of ``(peer_id, tensors, num_samples)`` updates.

    Bit-identical for any order of ``updates`` and on any machine: the sum runs in peer-id order
    in float64 on the CPU, then is divided by the total and cast back to each tensor's dtype. A
    non-float tensor is taken from the first update (by peer id). The updates must share names,
    shapes and dtypes (see :func:`check_update`); peer ids must be distinct, weights positive.
    """
    if not updates:
        raise ValueError("nothing to average")
    ordered = sorted(updates, key=lambda u: u[0])
    ids = [peer_id for peer_id, _, _ in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError(f"more than one update from a peer: {ids}")
    if any(n < 1 for _, _, n in ordered):
        raise ValueError("every update needs num_samples >= 1")
    total = float(sum(n for _, _, n in ordered))
    first = ordered[0][1]
    out: Tensors = {}
    for name in sorted(first):
        ref = first[name]
        if not ref.is_floating_point():
            out[name] = ref.detach().to("cpu").clone()
            continue
        # In place, in two buffers: the same IEEE operations, in the same order, as
        # ``acc = acc + t.double() * n`` then ``acc / total``, without a new tensor per step.
        acc = torch.zeros(tuple(ref.shape), dtype=torch.float64)
        term = torch.empty(tuple(ref.shape), dtype=torch.float64)
        for _, tensors, n in ordered:
            term.copy_(tensors[name].detach())  # to float64: exact
            acc.add_(term.mul_(float(n)))
        out[name] = acc.div_(total).to(ref.dtype)
    return out


def average_round(
    closed: RoundClosed,
    fetch: Callable[[RoundUpdate], bytes],
    reference: Mapping[str, torch.Tensor],
    *,
    rounds_uri: str | None = None,
    start: Mapping[str, torch.Tensor] | None = None,
    max_norm: float | None = None,
) -> tuple[Tensors | None, list[tuple[str, str]]]:
    """Average the updates ``closed`` names: ``(average or None if none was acceptable, rejected)``.

    For each update, in the order named: ``fetch`` its bytes (raising :class:`UpdateUnavailable`,
    ``BlobNotFound`` or ``FileNotFoundError`` rejects it; anything else propagates), compare their
    sha256 with the promised one, parse them as safetensors (never pickle), and
    :func:`check_update` them against ``reference``. A second update from the same peer, or one
    with ``num_samples < 1``, is rejected too. With ``rounds_uri``, an update whose uri does not
    lie under ``<rounds_uri>/<round>/`` is rejected without being fetched. With ``max_norm`` and
    ``start`` (the weights the round started from), an update farther than ``max_norm`` from
    ``start`` (:func:`l2_distance`) is rejected. ``rejected`` lists ``(peer_id, reason)`` in the
    order named.
    """
    accepted: list[tuple[str, Mapping[str, torch.Tensor], int]] = []
    rejected: list[tuple[str, str]] = []
    seen: set[str] = set()
    for update in closed.updates:
        if update.peer_id in seen:
            outcome: Tensors | str = "a second update from the same peer in one round"
        else:
            outcome = _load_update(update, closed.round, fetch, reference, rounds_uri)
            if not isinstance(outcome, str) and max_norm is not None and start is not None:
                distance = l2_distance(outcome, start)
                if not distance <= max_norm:
                    outcome = f"update norm {distance:.6g} from the round's start exceeds the bound {max_norm:.6g}"
        seen.add(update.peer_id)
        if isinstance(outcome, str):
            rejected.append((update.peer_id, outcome[:MAX_REASON]))
        else:
            accepted.append((update.peer_id, outcome, update.num_samples))
    return (weighted_average(accepted) if accepted else None), rejected


def _load_update(
    update: RoundUpdate,
    round_: int,
    fetch: Callable[[RoundUpdate], bytes],
    reference: Mapping[str, torch.Tensor],
    rounds_uri: str | None,
) -> Tensors | str:
    """The update's tensors, or why it is rejected."""
    if update.num_samples < 1:
        return f"num_samples must be at least 1, got {update.num_samples}"
    if rounds_uri is not None and not update.uri.startswith(f"{rounds_uri.rstrip('/')}/{round_}/"):
        return "uri is outside the session's folder for this round"
    try:
        data = fetch(update)
    except (UpdateUnavailable, BlobNotFound, FileNotFoundError) as exc:
        return f"update not available: {exc}"
    if hashlib.sha256(data).hexdigest() != update.sha256.lower():
        return "sha256 mismatch"
    try:
        tensors = tensorfile.loads(data)
    except Exception as exc:  # untrusted bytes: whatever the parser says, the update is unusable
        return f"not a safetensors file: {type(exc).__name__}: {exc}"
    return check_update(tensors, reference) or tensors


def state_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Weights as a safetensors file with fixed metadata: equal tensors, equal bytes, on any peer."""
    return tensorfile.dumps(tensors, {"format": WEIGHTS_FORMAT})


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
