"""argon2id password hashing, off the event loop, with the same cost for known and unknown users."""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from swarmtrain.common.settings import Settings


class Passwords:
    def __init__(self, settings: Settings) -> None:
        self._hasher = PasswordHasher(time_cost=settings.argon2_time_cost, memory_cost=settings.argon2_memory_kib)
        self._dummy: str | None = None

    async def start(self) -> None:
        """Make the stand-in hash for unknown users now, so the first such sign-in is not slower."""
        self._dummy = await self.hash("not-a-real-password")

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """Check ``password``; with no hash (unknown user) do the same work against a stand-in and say no."""
        if password_hash is None:
            if self._dummy is None:
                await self.start()
            assert self._dummy is not None
            await asyncio.to_thread(self._verify, self._dummy, password)
            return False
        return await asyncio.to_thread(self._verify, password_hash, password)

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False
