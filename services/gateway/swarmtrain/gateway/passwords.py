"""argon2id password hashing, off the event loop, with the same cost for known and unknown users.

The hash travels in ``UserRegistered`` on ``user.<id>.events``, so it is *sealed* before it goes
there: encrypted with AES-256-GCM under a key derived (HKDF-SHA256) from the gateway's JWT secret,
the user id bound as associated data. The projector copies the sealed text into PostgreSQL as it
is; only the gateway, which holds the secret, can open it to verify a sign-in. Anyone else who can
read the log (an operator's tap, a scheduler) sees ciphertext. A hash stored before sealing existed
(plain ``$argon2id$...``) still verifies.
"""

from __future__ import annotations

import asyncio
import base64
import os

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from swarmtrain.common.settings import Settings

SEALED = "sealed:v1:"
_NONCE = 12


def seal_key(secret: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"swarmtrain/password-hash-seal/v1")
    return hkdf.derive(secret.encode())


class Passwords:
    def __init__(self, settings: Settings) -> None:
        self._hasher = PasswordHasher(time_cost=settings.argon2_time_cost, memory_cost=settings.argon2_memory_kib)
        self._aead = AESGCM(seal_key(settings.jwt_secret or ""))
        self._dummy: str | None = None

    async def start(self) -> None:
        """Make the stand-in hash for unknown users now, so the first such sign-in is not slower."""
        self._dummy = await asyncio.to_thread(self._hasher.hash, "not-a-real-password")

    async def hash(self, password: str, user_id: str) -> str:
        """The argon2id hash of ``password``, sealed for ``user_id``'s event."""
        return self.seal(await asyncio.to_thread(self._hasher.hash, password), user_id)

    def seal(self, password_hash: str, user_id: str) -> str:
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, password_hash.encode(), user_id.encode())
        return SEALED + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, stored: str, user_id: str) -> str | None:
        """The argon2 hash inside ``stored`` (sealed or, from before sealing, plain); None if it
        does not open under this gateway's key or for this user."""
        if not stored.startswith(SEALED):
            return stored
        try:
            raw = base64.urlsafe_b64decode(stored[len(SEALED) :])
            return self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], user_id.encode()).decode()
        except (ValueError, InvalidTag):
            return None

    async def verify(self, stored: str | None, password: str, user_id: str | None = None) -> bool:
        """Check ``password``; with no hash (unknown user) do the same work against a stand-in and say no."""
        password_hash = None if stored is None or user_id is None else self.open(stored, user_id)
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
