"""Accounts and access tokens: sign-up appends ``UserRegistered``; sign-in issues a JWT.

Email uniqueness is enforced by the event store, not by a check-then-write: the user id is derived
from the normalized email and the append expects the user's subject to be empty.

Tokens (RFC 8725): HS256 only, fixed here and never taken from the token's header; ``exp``, ``iat``,
``iss``, ``aud`` and ``sub`` are required, ``iss`` and ``aud`` must be this gateway's (a single
audience, not a list), ``iat`` may not lie in the future. Anything else is 401.

Sign-in answers an unknown email and a wrong password with the same 401 after the same argon2id
work, and failed attempts are throttled per email and per client address (see ``throttle``). The
client address is the ASGI peer (uvicorn takes it from ``X-Forwarded-For`` only for proxies listed
in ``FORWARDED_ALLOW_IPS``).
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.exceptions import ClientException, HTTPException, NotAuthorizedException
from litestar.params import JSONBody
from litestar.security.jwt import JWTAuth, Token

from swarmtrain.common import bus
from swarmtrain.common.events import UserRegistered
from swarmtrain.common.settings import Settings
from swarmtrain.gateway.errors import TooManyRequests, documented
from swarmtrain.gateway.inputs import storable
from swarmtrain.gateway.state import Gateway

USER_NAMESPACE = uuid.UUID("5f0c8a1e-2d7b-4c36-9a51-7e3b2f4d9c10")
PUBLIC_PATHS = ["^/auth/signup$", "^/auth/signin$", "^/healthz$", "^/readyz$", "^/schema"]
ALGORITHM = "HS256"
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub")
MIN_SECRET_CHARS = 32
MAX_EMAIL = 254
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
JSON_BODY_LIMIT = 64 * 1024
BEARER: list[dict[str, list[str]]] = [{"BearerToken": []}]
"""The OpenAPI security requirement of every route that needs a token."""
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


def _validate_signup(data: SignUp) -> tuple[str, str]:
    email = normalize_email(data.email)
    if len(email) > MAX_EMAIL or not _EMAIL.match(email) or not storable(email):
        raise ClientException(f"not an email address: {data.email.strip()[:100]!a}")
    if len(data.password) < MIN_PASSWORD:
        raise ClientException(f"password too short: at least {MIN_PASSWORD} characters")
    if len(data.password) > MAX_PASSWORD:
        raise ClientException(f"password too long: at most {MAX_PASSWORD} characters")
    if not storable(data.password):
        raise ClientException("password may not hold control characters")
    username = (data.username or email.split("@", 1)[0]).strip()
    if not username or len(username) > 64 or not storable(username):
        raise ClientException("username must be 1 to 64 printable characters")
    return email, username


def client_address(request: Request[Any, Any, Any]) -> str:
    return request.client.host if request.client else "unknown"


# ------------------------------------------------------------------ JWT


async def retrieve_user(token: Token, connection: ASGIConnection[Any, Any, Any, Any]) -> User | None:
    if not storable(token.sub):
        return None
    gateway: Gateway = connection.app.state.gateway
    row = await gateway.pool.fetchrow("SELECT user_id, email, username FROM users WHERE user_id = $1", token.sub)
    return None if row is None else User(user_id=row["user_id"], email=row["email"], username=row["username"])


def make_jwt_auth(settings: Settings) -> JWTAuth[User, Token]:
    """The token checks; a missing or short secret is a startup error, never a default."""
    if not settings.jwt_secret:
        raise ValueError(
            "SWARMTRAIN_JWT_SECRET is not set: the gateway needs a secret to sign access tokens "
            "(for example: export SWARMTRAIN_JWT_SECRET=$(openssl rand -hex 32))"
        )
    if len(settings.jwt_secret) < MIN_SECRET_CHARS:
        raise ValueError(
            f"SWARMTRAIN_JWT_SECRET is too short: at least {MIN_SECRET_CHARS} characters "
            "(for example: export SWARMTRAIN_JWT_SECRET=$(openssl rand -hex 32))"
        )
    return JWTAuth[User, Token](
        token_secret=settings.jwt_secret,
        retrieve_user_handler=retrieve_user,
        algorithm=ALGORITHM,
        default_token_expiration=timedelta(seconds=settings.token_ttl_s),
        accepted_issuers=[settings.jwt_issuer],
        accepted_audiences=[settings.jwt_audience],
        strict_audience=True,
        require_claims=list(REQUIRED_CLAIMS),
        exclude=PUBLIC_PATHS,
        description="An access token from POST /auth/signin, as `Authorization: Bearer <token>`.",
    )


# ------------------------------------------------------------------ routes


class AuthController(Controller):
    path = "/auth"
    tags = ["auth"]

    @post(
        "/signup",
        status_code=201,
        summary="Create an account",
        request_max_body_size=JSON_BODY_LIMIT,
        responses=documented(400, 409, 413),
    )
    async def signup(self, data: JSONBody[SignUp], gw: NamedDependency[Gateway]) -> UserOut:
        email, username = _validate_signup(data)
        user_id = user_id_for(email)
        event = UserRegistered(
            user_id=user_id,
            email=email,
            username=username,
            password_hash=await gw.passwords.hash(data.password, user_id),
        )
        try:
            await gw.append(event, expected_last_subject_seq=0)
        except bus.WrongLastSequence:
            raise HTTPException(status_code=409, detail=f"an account with email {email!r} exists") from None
        return UserOut(user_id=user_id, email=email, username=username)

    @post(
        "/signin",
        status_code=200,
        summary="Exchange email and password for an access token",
        description="Unknown email and wrong password get the same 401. Repeated failures for one email or "
        "from one address are throttled: 429 with Retry-After.",
        request_max_body_size=JSON_BODY_LIMIT,
        responses=documented(400, 401, 413, 429),
    )
    async def signin(
        self, request: Request[Any, Any, Any], data: JSONBody[SignIn], gw: NamedDependency[Gateway]
    ) -> TokenOut:
        email, address = normalize_email(data.email), client_address(request)
        key = email[:MAX_EMAIL]  # no address is longer; a bound on what the throttle keeps per key
        wait = gw.throttle.retry_after(key, address)
        if wait is not None:
            raise TooManyRequests(f"too many failed sign-ins; try again in {int(wait + 0.999)} s", wait)
        row = (
            await gw.pool.fetchrow("SELECT user_id, password_hash FROM users WHERE email = $1", email)
            if storable(email)
            else None
        )
        stored, user = (None, None) if row is None else (row["password_hash"], row["user_id"])
        ok = await gw.passwords.verify(stored, data.password, user)
        if row is None or not ok:
            gw.throttle.failed(key, address)
            raise NotAuthorizedException("wrong email or password")
        gw.throttle.succeeded(key)
        ttl = gw.settings.token_ttl_s
        jwt_auth: JWTAuth[User, Token] = request.app.state.jwt_auth
        token = jwt_auth.create_token(
            identifier=row["user_id"],
            token_expiration=timedelta(seconds=ttl),
            token_issuer=gw.settings.jwt_issuer,
            token_audience=gw.settings.jwt_audience,
        )
        return TokenOut(access_token=token, expires_in=ttl)

    @get("/me", summary="Who the token belongs to", security=BEARER, responses=documented(401))
    async def me(self, request: Request[User, Token, Any]) -> UserOut:
        user = request.user
        return UserOut(user_id=user.user_id, email=user.email, username=user.username)
