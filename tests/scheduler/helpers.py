"""The scheduler tests' one way to build a state from events: ``state.fold``, as the service does."""

from __future__ import annotations

from swarmtrain.common.events import Event
from swarmtrain.scheduler.state import State, fold


def replay(*items: State | Event | tuple[Event, float], state: State | None = None, observed_at: float = 0.0) -> State:
    """``state`` (or a leading ``State`` item, or an empty one) with the events appended after its
    position, in order, each observed at ``observed_at`` or at the time paired with it."""
    if items and isinstance(items[0], State):
        state, items = items[0], items[1:]
    state = state or State()
    folded: list[tuple[int, Event, float]] = []
    for seq, item in enumerate(items, start=state.position + 1):
        assert not isinstance(item, State), "a state goes first"
        event, at = item if isinstance(item, tuple) else (item, observed_at)
        folded.append((seq, event, at))
    return fold(state, folded)
