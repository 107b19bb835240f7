"""PostgreSQL pools as the services use them."""

from __future__ import annotations

from typing import Any

import asyncpg


class PooledConnection(asyncpg.Connection):  # type: ignore[misc]
    """A pool's connection released without asyncpg's reset query (``pg_advisory_unlock_all(); CLOSE
    ALL; UNLISTEN *; RESET ALL``): one round trip more on every release, so on every query through
    the pool. Our pools' connections keep no session state (no session advisory locks, cursors,
    LISTEN or SET: those that need them use connections of their own), and an open transaction is
    still rolled back on release."""

    def get_reset_query(self) -> str:
        return ""


async def create_pool(dsn: str, **options: Any) -> asyncpg.Pool:
    """``asyncpg.create_pool`` of ``PooledConnection``s."""
    pool: asyncpg.Pool = await asyncpg.create_pool(dsn, connection_class=PooledConnection, **options)
    return pool
