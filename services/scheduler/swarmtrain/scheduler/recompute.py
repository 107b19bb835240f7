"""A round's model recomputed from the log and the blobs: a fork's starting model without some
peers (``lineage.Recompute``), and the weights a session started from.

Blocking (torch): the shell runs :func:`prepare` in a worker thread, as it runs ``evaluation``. It
is the peers' own code (``swarmtrain.training``), so the rule is the one the parent's peers applied:
the updates its ``RoundClosed`` named, fetched from the store and checked against their sha256,
averaged by ``training.rounds.apply_round`` with the parent's rules and norm bound measured from the
round's start; no acceptable update left means the round's start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec

from swarmtrain.common import blob, blobkeys
from swarmtrain.common.events import RoundClosed, RoundUpdate, SessionRequested
from swarmtrain.scheduler.lineage import Model, Recompute
from swarmtrain.training import init, tensorfile
from swarmtrain.training.averaging import Tensors, UpdateUnavailable, state_bytes
from swarmtrain.training.evaluation import load_dataset
from swarmtrain.training.rounds import apply_round


def initial_weights(store: blob.BlobStore, request: SessionRequested) -> Tensors:
    """The seeded weights every peer of ``request`` starts from (``training.init.initial_weights``)."""
    return init.initial_weights(load_dataset(store, request), request)


def load_model(store: blob.BlobStore, model: Model, max_bytes: int | None = None) -> Tensors:
    """The tensors of a stored model or weights file, checked against its sha256."""
    return tensorfile.loads(store.get_bytes(store.key_of(model.uri), sha256=model.sha256, max_bytes=max_bytes))


def fetcher(store: blob.BlobStore, max_bytes: int | None = None) -> Callable[[RoundUpdate], bytes]:
    """An update's bytes from ``store`` (its sha256 is checked by the averaging)."""

    def fetch(update: RoundUpdate) -> bytes:
        try:
            key = store.key_of(update.uri)
        except ValueError:
            raise UpdateUnavailable("its uri is outside the store") from None
        return store.get_bytes(key, max_bytes=max_bytes)

    return fetch


def start_weights(store: blob.BlobStore, request: SessionRequested, start: Model | None) -> Tensors:
    """The weights a round started from: ``start``, or the session's seeded initial weights."""
    return initial_weights(store, request) if start is None else load_model(store, start)


def average_without(
    store: blob.BlobStore,
    request: SessionRequested,
    closed: RoundClosed,
    excluded: Sequence[str],
    start: Tensors,
    max_bytes: int | None = None,
) -> tuple[Tensors, list[str]]:
    """Round ``closed.round`` computed again without ``excluded``'s updates, by the rules the
    session's peers apply (``training.rounds.apply_round``: sha256, shapes, finiteness, the norm bound
    from ``start``, compression, the session's aggregator and outer step); ``start`` itself when no
    update is left. Returns the weights and the peers whose updates they hold.

    The outer optimizer starts from an empty state here: a fork is a new run, and the momentum the
    parent had gathered from the excluded peers' earlier rounds is exactly what it leaves behind."""
    kept = msgspec.structs.replace(closed, updates=[u for u in closed.updates if u.peer_id not in set(excluded)])
    rounds_uri = store.uri(blobkeys.rounds(closed.session_id))
    result = apply_round(
        kept, fetcher(store, max_bytes), start, start, {}, request.round_options, rounds_uri=rounds_uri
    )
    if result.aggregate is None:
        return start, []
    return result.model, list(result.selected)


def prepare(
    store: blob.BlobStore, recompute: Recompute, max_bytes: int | None = None
) -> tuple[blob.BlobRef, list[str]]:
    """Recompute a fork's starting model and store it under the new session's prefix: its
    reference and the peers whose updates it holds."""
    start = start_weights(store, recompute.parent, recompute.start)
    weights, included = average_without(store, recompute.parent, recompute.closed, recompute.excluded, start, max_bytes)
    ref = store.put_bytes(blobkeys.init_model(recompute.session_id), state_bytes(weights))
    return ref, included
