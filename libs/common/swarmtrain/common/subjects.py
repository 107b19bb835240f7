"""Every NATS subject of the contract, built in one place.

Stored facts live on ``<thing>.<id>.events`` in the EVENTS stream and are written only by the
services; commands on ``peer.<id>.command`` in the COMMANDS stream; what a peer has to say (its
registration, heartbeats, updates, done, failed) it reports on ``peer.<id>.reports`` in the REPORTS
stream, which only that peer may publish to and a service checks before appending the fact;
presence beats on ``peer.<id>.presence`` are plain NATS messages, never stored.
"""

from __future__ import annotations

SESSION_EVENTS = "session.*.events"
PEER_EVENTS = "peer.*.events"
USER_EVENTS = "user.*.events"
DATASET_EVENTS = "dataset.*.events"
PEER_COMMANDS = "peer.*.command"
PEER_PRESENCE = "peer.*.presence"
PEER_REPORTS = "peer.*.reports"

EVENT_SUBJECTS = [SESSION_EVENTS, PEER_EVENTS, USER_EVENTS, DATASET_EVENTS]
COMMAND_SUBJECTS = [PEER_COMMANDS]
REPORT_SUBJECTS = [PEER_REPORTS]
SCHEDULER_DOORBELL = [SESSION_EVENTS, PEER_EVENTS]
"""The event subjects whose appends wake the scheduler at once (a core subscription; users' and
datasets' facts ask nothing of it, and a tick reads them anyway)."""


def session_events(session_id: str) -> str:
    return f"session.{session_id}.events"


def peer_events(peer_id: str) -> str:
    return f"peer.{peer_id}.events"


def user_events(user_id: str) -> str:
    return f"user.{user_id}.events"


def dataset_events(dataset_id: str) -> str:
    return f"dataset.{dataset_id}.events"


def peer_command(peer_id: str) -> str:
    return f"peer.{peer_id}.command"


def peer_presence(peer_id: str) -> str:
    return f"peer.{peer_id}.presence"


def peer_reports(peer_id: str) -> str:
    return f"peer.{peer_id}.reports"
