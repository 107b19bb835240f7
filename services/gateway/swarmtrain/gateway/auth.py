"""Accounts and access tokens: sign-up appends ``UserRegistered``; sign-in issues a JWT.

Email uniqueness is enforced by the event store, not by a check-then-write: the user id is derived
from the normalized email and the append expects the user's subject to be empty.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import timedelta
from typing import Any

import msgspec
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from litestar import Controller, Request, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.exceptions import ClientException, HTTPException, NotAuthorizedException
from litestar.params import JSONBody
from litestar.security.jwt import JWTAuth, Token

from swarmtrain.common import bus
from swarmtrain.common.events import UserRegistered
from swarmtrain.common.settings import Settings
from swarmtrain.gateway.state import Gateway

USER_NAMESPACE = uuid.UUID("5f0c8a1e-2d7b-4c36-9a51-7e3b2f4d9c10")
PUBLIC_PATHS = ["^/auth/signup$", "^/auth/signin$", "^/healthz$", "^/schema"]
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")


# ------------------------------------------------------------------ bodies


class SignUp(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    email: str
    password: str
    username: str | None = None


class SignIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    email: str
    password: str


class UserOut(msgspec.Struct, kw_only=True):
    user_id: str
    email: str
    username: str


class TokenOut(msgspec.Struct, kw_only=True):
    access_token: str
    token_type: str = "bearer"
    expires_in: int


class User(msgspec.Struct, frozen=True, kw_only=True):
    """The authenticated caller, as ``request.user``."""

    user_id: str
    email: str
    username: str


# ------------------------------------------------------------------ helpers


def normalize_email(email: str) -> str:
    return email.strip().lower()


def user_id_for(email: str) -> str:
    """Deterministic, so two sign-ups with one email compete for the same event subject."""
    return uuid.uuid5(USER_NAMESPACE, normalize_email(email)).hex


class Passwords:
    """argon2id hashing, off the event loop."""

    def __init__(self) -> None:
        self._hasher = PasswordHasher()
        self._dummy: str | None = None

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """Check ``password``; with no hash (unknown user) spend the same time and say no."""
        if password_hash is None:
            if self._dummy is None:
                self._dummy = await self.hash("not-a-real-password")
            await asyncio.to_thread(self._verify, self._dummy, password)
            return False
        return await asyncio.to_thread(self._verify, password_hash, password)

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False


passwords = Passwords()


def _validate_signup(data: SignUp) -> tuple[str, str]:
    email = normalize_email(data.email)
    if len(email) > 254 or not _EMAIL.match(email):
        raise ClientException(f"not an email address: {data.email.strip()[:100]!r}")
    if len(data.password) < MIN_PASSWORD:
        raise ClientException(f"password too short: at least {MIN_PASSWORD} characters")
    if len(data.password) > MAX_PASSWORD:
        raise ClientException(f"password too long: at most {MAX_PASSWORD} characters")
    username = (data.username or email.split("@", 1)[0]).strip()
    if not username or len(username) > 64:
        raise ClientException("username must be 1 to 64 characters")
    return email, username


# ------------------------------------------------------------------ JWT


async def retrieve_user(token: Token, connection: ASGIConnection[Any, Any, Any, Any]) -> User | None:
    gateway: Gateway = connection.app.state.gateway
    row = await gateway.pool.fetchrow("SELECT user_id, email, username FROM users WHERE user_id = $1", token.sub)
    return None if row is None else User(user_id=row["user_id"], email=row["email"], username=row["username"])


def make_jwt_auth(settings: Settings) -> JWTAuth[User, Token]:
    if not settings.jwt_secret:
        raise ValueError(
            "SWARMTRAIN_JWT_SECRET is not set: the gateway needs a secret to sign access tokens "
            "(for example: export SWARMTRAIN_JWT_SECRET=$(openssl rand -hex 32))"
        )
    return JWTAuth[User, Token](
        token_secret=settings.jwt_secret,
        retrieve_user_handler=retrieve_user,
        default_token_expiration=timedelta(seconds=settings.token_ttl_s),
        exclude=PUBLIC_PATHS,
    )


# ------------------------------------------------------------------ routes


class AuthController(Controller):
    path = "/auth"
    tags = ["auth"]

    @post("/signup", status_code=201, summary="Create an account")
    async def signup(self, data: JSONBody[SignUp], gw: NamedDependency[Gateway]) -> UserOut:
        email, username = _validate_signup(data)
        user_id = user_id_for(email)
        event = UserRegistered(
            user_id=user_id, email=email, username=username, password_hash=await passwords.hash(data.password)
        )
        try:
            await gw.append(event, expected_last_subject_seq=0)
        except bus.WrongLastSequence:
            raise HTTPException(status_code=409, detail=f"an account with email {email!r} exists") from None
        return UserOut(user_id=user_id, email=email, username=username)

    @post("/signin", status_code=200, summary="Exchange email and password for an access token")
    async def signin(
        self, request: Request[Any, Any, Any], data: JSONBody[SignIn], gw: NamedDependency[Gateway]
    ) -> TokenOut:
        row = await gw.pool.fetchrow(
            "SELECT user_id, password_hash FROM users WHERE email = $1", normalize_email(data.email)
        )
        ok = await passwords.verify(None if row is None else row["password_hash"], data.password)
        if row is None or not ok:
            raise NotAuthorizedException("wrong email or password")
        ttl = gw.settings.token_ttl_s
        jwt_auth: JWTAuth[User, Token] = request.app.state.jwt_auth
        token = jwt_auth.create_token(identifier=row["user_id"], token_expiration=timedelta(seconds=ttl))
        return TokenOut(access_token=token, expires_in=ttl)
