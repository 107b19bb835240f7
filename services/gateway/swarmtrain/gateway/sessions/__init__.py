"""Training sessions, by job: ``routes`` (the controller), ``schemas`` (what the routes take and
give), ``planning`` (checking a request) with ``strategies`` (what each strategy allows),
``queries`` (read-model SQL), ``commands`` (appends: request, cancel) and ``live`` (the SSE stream)."""

from swarmtrain.gateway.sessions.routes import SessionController

__all__ = ["SessionController"]
