"""Every trainable format through fedavg on real peers that read only their shards (issue 21
items 3 and 6): a Parquet table, an ``.npz`` and an image archive, each a session whose rounds
``replay-round`` recomputes bit for bit, walking from the initial weights (an outer step and
compression make every round depend on its start, so the replay rebuilds ``Standardize`` by the
streamed rule the peers fitted)."""

from __future__ import annotations

import asyncio

import pytest

from swarmtrain.common import shapes
from swarmtrain.common.events import RoundClosed, SessionRequested

from .conftest import ROOT, Api
from .test_fedavg import SMALL, Swarm, fedavg, history, of, replayed, start, swarm
from .test_fedavg import stack as stack  # the module's own stack, with no peers of its own

pytestmark = pytest.mark.e2e
__all__ = ["stack", "swarm"]

EXAMPLES = {"parquet": ("iris.parquet", "species"), "npz": ("digits.npz", "y"), "images": ("digits-images.zip", "")}


@pytest.mark.parametrize("fmt", sorted(EXAMPLES))
async def test_a_fedavg_session_on_each_format_replays_bit_for_bit(
    stack: object, api: Api, swarm: Swarm, fmt: str
) -> None:
    await swarm.start(f"{fmt}-a", f"{fmt}-b", f"{fmt}-c")
    name, label = EXAMPLES[fmt]
    data = (ROOT / "examples" / name).read_bytes()
    form = {"label_column": label} if label else {}
    resp = await api.client.post("/datasets", files={"file": (name, data)}, data=form)
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["format"] == fmt
    body = fedavg(ds["dataset_id"], 3, rounds=2, local=SMALL, outer={"name": "momentum"}, compression={"name": "int8"})
    sid = await start(api, body)
    done = await api.wait_ended(sid)
    assert done["status"] == "completed", done
    events = await history(stack, sid)  # type: ignore[arg-type]
    [requested] = of(events, SessionRequested)
    assert requested.data_read == "shard" and requested.data.format == fmt
    # the updates round 1 averaged, each its shard's rows (on a loaded machine a peer that misses its
    # beats is left out of a round, so not every shard need be in it)
    [first] = [c for c in of(events, RoundClosed) if c.round == 1]
    train_rows = ds["rows"] - shapes.validation_rows(ds["rows"], 0.2)
    sizes = {b - a for a, b in (shapes.shard_bounds(train_rows, 3, k) for k in range(3))}
    assert first.updates and {u.num_samples for u in first.updates} <= sizes
    for r in (1, 2):
        result = await asyncio.to_thread(replayed, stack, sid, r)  # type: ignore[arg-type]
        assert result.matches, (fmt, r, result)
        assert not result.earlier_mismatches
