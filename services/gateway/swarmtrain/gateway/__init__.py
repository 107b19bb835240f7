"""The gateway: REST in front of the event store (appends) and the read models (reads)."""

from swarmtrain.gateway.app import create_app, run

__all__ = ["create_app", "run"]
