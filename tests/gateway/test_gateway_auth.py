"""Sign-up, sign-in and the token requirement, against real NATS, PostgreSQL and the projector."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jwt.warnings import InsecureKeyLengthWarning
from litestar import Litestar
from nats.js import JetStreamContext

from swarmtrain.common import bus, subjects
from swarmtrain.common.events import UserRegistered, decode_event
from swarmtrain.common.settings import Settings
from swarmtrain.gateway import create_app
from swarmtrain.gateway.auth import user_id_for
from swarmtrain.gateway.passwords import SEALED, Passwords
from swarmtrain.gateway.state import Gateway
from tests.gateway.helpers import Client, Headers, blocking, running, serving

PASSWORD = "correct horse battery"


async def test_signup_returns_the_user(client: Client) -> None:
    r = await client.post(
        "/auth/signup", json={"email": "  Carol@Example.COM ", "password": PASSWORD, "username": "carol"}
    )
    assert r.status_code == 201, r.text
    assert r.json() == {
        "user_id": user_id_for("carol@example.com"),
        "email": "carol@example.com",
        "username": "carol",
    }


async def test_signup_defaults_the_username_to_the_email_local_part(client: Client) -> None:
    r = await client.post("/auth/signup", json={"email": "dave@example.com", "password": PASSWORD})
    assert r.status_code == 201
    assert r.json()["username"] == "dave"


async def test_duplicate_email_is_409_even_with_other_case(client: Client) -> None:
    r = await client.post("/auth/signup", json={"email": "erin@example.com", "password": PASSWORD})
    assert r.status_code == 201
    r = await client.post("/auth/signup", json={"email": "ERIN@example.com ", "password": "another password"})
    assert r.status_code == 409
    body = r.json()
    assert body["status"] == 409 and "exists" in body["detail"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"email": "not-an-email", "password": PASSWORD}, "not an email"),
        ({"email": "x@example.com", "password": "short"}, "password too short"),
        ({"email": "x@example.com", "password": PASSWORD, "role": "admin"}, "unknown field"),
        ({"email": "x@example.com"}, "password"),
    ],
)
async def test_signup_rejects_bad_input(client: Client, body: dict[str, str], needle: str) -> None:
    r = await client.post("/auth/signup", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["detail"]
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_signin_issues_a_bearer_token(client: Client, settings: object) -> None:
    await client.post("/auth/signup", json={"email": "frank@example.com", "password": PASSWORD})
    r = await client.post("/auth/signin", json={"email": "Frank@example.com", "password": PASSWORD})
    assert r.status_code == 200
    body = r.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 3600
    assert body["access_token"].count(".") == 2


async def test_wrong_password_and_unknown_user_are_401(client: Client) -> None:
    await client.post("/auth/signup", json={"email": "gina@example.com", "password": PASSWORD})
    wrong = await client.post("/auth/signin", json={"email": "gina@example.com", "password": "wrong password"})
    unknown = await client.post("/auth/signin", json={"email": "nobody@example.com", "password": PASSWORD})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json()["detail"] == unknown.json()["detail"]


@pytest.mark.parametrize("path", ["/peers", "/sessions", "/sessions/abc", "/sessions/abc/model"])
async def test_token_required(client: Client, path: str) -> None:
    assert (await client.get(path)).status_code == 401
    bad = {"Authorization": "Bearer not.a.token"}
    assert (await client.get(path, headers=bad)).status_code == 401


async def test_a_valid_token_opens_the_api(client: Client, alice: Headers) -> None:
    assert (await client.get("/sessions", headers=alice)).status_code == 200


# ------------------------------------------------------------------ tokens (RFC 8725)

SECRET = "test-secret-0123456789abcdef0123456789"  # tests/conftest.py's


def token(claims: dict[str, Any], key: Any = SECRET, alg: str = "HS256") -> str:
    with warnings.catch_warnings():  # HS384/HS512 with the HS256-sized test secret
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(claims, key, algorithm=alg)


def good_claims(user_id: str, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user_id,
        "iss": "swarmtrain",
        "aud": "swarmtrain-api",
        "iat": now - 10,
        "exp": now + 600,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not MISSING}


MISSING = object()


async def test_issued_tokens_carry_every_required_claim(client: Client, alice: Headers) -> None:
    payload = jwt.decode(alice["Authorization"].split()[1], options={"verify_signature": False})
    assert set(payload) >= {"exp", "iat", "iss", "aud", "sub"}
    assert (payload["iss"], payload["aud"], payload["sub"]) == (
        "swarmtrain",
        "swarmtrain-api",
        user_id_for("alice@example.com"),
    )
    assert jwt.get_unverified_header(alice["Authorization"].split()[1])["alg"] == "HS256"


async def test_tokens_that_must_not_pass(client: Client, alice: Headers) -> None:
    uid = user_id_for("alice@example.com")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    header, body, _ = token(good_claims(uid)).split(".")
    cases: dict[str, str] = {
        "alg none": token(good_claims(uid), None, "none"),
        "alg none, signature kept": ".".join(
            [
                token(good_claims(uid), None, "none").split(".")[0],
                body,
                token(good_claims(uid)).split(".")[2],
            ]
        ),
        "RS256": token(good_claims(uid), rsa_key, "RS256"),
        "HS512 with the right secret": token(good_claims(uid), SECRET, "HS512"),
        "bad signature": f"{header}.{body}.{'A' * 43}",
        "another secret": token(good_claims(uid), "another-secret-0123456789abcdef0123"),
        "wrong issuer": token(good_claims(uid, iss="evil")),
        "wrong audience": token(good_claims(uid, aud="other-api")),
        "audience list": token(good_claims(uid, aud=["swarmtrain-api", "other"])),
        "expired": token(good_claims(uid, exp=int(time.time()) - 5)),
        "issued in the future": token(good_claims(uid, iat=int(time.time()) + 3600)),
        "not yet valid": token(good_claims(uid, nbf=int(time.time()) + 3600)),
        "unknown user": token(good_claims("f" * 32)),
        "sub not a string": token(good_claims(uid, sub=12345)),
        **{f"no {claim}": token(good_claims(uid, **{claim: MISSING})) for claim in ("exp", "iat", "iss", "aud", "sub")},
        "garbage": "not.a.token",
        "empty": "",
    }
    assert (
        await client.get("/auth/me", headers={"Authorization": f"Bearer {token(good_claims(uid))}"})
    ).status_code == 200
    wrong = {}
    for name, value in cases.items():
        r = await client.get("/auth/me", headers={"Authorization": f"Bearer {value}"})
        if r.status_code != 401 or not r.headers["content-type"].startswith("application/problem+json"):
            wrong[name] = (r.status_code, r.text)
    assert wrong == {}


async def test_hypothesis_claims_only_the_right_combination_passes(client: Client, alice: Headers) -> None:
    """Random issuers, audiences, expiry and issue times, subjects, algorithms and keys: a token
    passes exactly when every one of them is right."""
    uid = user_id_for("alice@example.com")
    loop = asyncio.get_running_loop()
    accepted = 0
    text = st.text(min_size=1, max_size=12)

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        iss=st.sampled_from(["swarmtrain"] * 3 + [MISSING]) | text,
        aud=st.sampled_from(["swarmtrain-api"] * 3 + [MISSING, ["swarmtrain-api"]]) | text,
        exp=st.sampled_from([600] * 3 + [MISSING]) | st.integers(-(10**6), -5) | st.integers(5, 10**6),
        iat=st.sampled_from([-10] * 3 + [MISSING]) | st.integers(-(10**6), -5) | st.integers(60, 10**6),
        sub=st.sampled_from([uid] * 3 + [MISSING, "f" * 32]) | text,
        alg=st.sampled_from(["HS256"] * 3 + ["HS384", "HS512", "none"]),
        right_key=st.sampled_from([True, True, False]),
    )
    @example(iss="swarmtrain", aud="swarmtrain-api", exp=600, iat=-10, sub=uid, alg="HS256", right_key=True)
    def check(iss: Any, aud: Any, exp: Any, iat: Any, sub: Any, alg: str, right_key: bool) -> None:
        nonlocal accepted
        now = int(time.time())
        claims = {"iss": iss, "aud": aud, "sub": sub, "exp": exp, "iat": iat}
        claims = {k: v for k, v in claims.items() if v is not MISSING}
        for k in ("exp", "iat"):
            if k in claims:
                claims[k] += now
        key = None if alg == "none" else (SECRET if right_key else "a-different-secret-0123456789abcdef")
        headers = {"Authorization": f"Bearer {token(claims, key, alg)}"}
        status = blocking(loop, client.get("/auth/me", headers=headers)).status_code
        right = (
            iss == "swarmtrain"
            and aud == "swarmtrain-api"
            and isinstance(exp, int) and exp > 0
            and isinstance(iat, int) and iat <= 0
            and sub == uid
            and alg == "HS256"
            and right_key
        )  # fmt: skip
        assert status == (200 if right else 401), claims
        accepted += right

    await asyncio.to_thread(check)
    assert accepted >= 1


def test_the_secret_must_be_long_enough(settings: Settings) -> None:
    with pytest.raises(ValueError, match="SWARMTRAIN_JWT_SECRET is too short: at least 32"):
        create_app(msgspec.structs.replace(settings, jwt_secret="short"))


async def test_me(client: Client, alice: Headers) -> None:
    r = await client.get("/auth/me", headers=alice)
    assert r.status_code == 200
    assert r.json() == {"user_id": user_id_for("alice@example.com"), "email": "alice@example.com", "username": "alice"}
    assert (await client.get("/auth/me")).status_code == 401


# ------------------------------------------------------------------ sign-in: alike, and throttled


async def test_unknown_email_and_wrong_password_cost_the_same(settings: Settings, projector: None) -> None:
    """Both paths run argon2id verify exactly once, with production cost, and take about as long."""
    production = msgspec.structs.replace(
        settings,
        argon2_time_cost=3,
        argon2_memory_kib=65536,
        signin_max_failures=100,
        signin_max_failures_per_address=100,
    )
    app = create_app(production)
    async with serving(app) as client:
        await client.post("/auth/signup", json={"email": "gina@example.com", "password": PASSWORD})
        gw: Gateway = app.state.gateway
        calls: list[str] = []
        real_verify = gw.passwords._verify

        def counting_verify(password_hash: str, password: str) -> bool:
            calls.append(password_hash)
            return real_verify(password_hash, password)

        gw.passwords._verify = counting_verify  # type: ignore[method-assign]
        times: dict[str, list[float]] = {"unknown": [], "wrong": []}
        bodies = {
            "unknown": {"email": "nobody@example.com", "password": PASSWORD},
            "wrong": {"email": "gina@example.com", "password": "wrong password"},
        }
        answers = set()
        for _ in range(4):
            for kind, body in bodies.items():
                calls.clear()
                started = time.perf_counter()
                r = await client.post("/auth/signin", json=body)
                times[kind].append(time.perf_counter() - started)
                assert len(calls) == 1, kind  # one argon2id verification, whoever asks
                answers.add((r.status_code, r.text))
        assert len(answers) == 1  # byte for byte the same answer
        ratio = statistics.median(times["unknown"]) / statistics.median(times["wrong"])
        assert 0.5 < ratio < 2.0, (ratio, times)


async def test_the_log_holds_no_readable_password_hash(
    client: Client, js: JetStreamContext, settings: Settings
) -> None:
    """``UserRegistered`` carries the hash sealed with the gateway's key: readers of the log see
    ciphertext, the gateway signs in, and a sealed hash moved to another user does not open."""
    r = await client.post("/auth/signup", json={"email": "hana@example.com", "password": PASSWORD})
    assert r.status_code == 201
    user_id = r.json()["user_id"]
    stored = await js.get_last_msg(bus.EVENTS_STREAM, subjects.user_events(user_id))
    event = decode_event(stored.data or b"")
    assert isinstance(event, UserRegistered)
    assert event.password_hash.startswith(SEALED) and "argon2" not in event.password_hash
    assert (
        await client.post("/auth/signin", json={"email": "hana@example.com", "password": PASSWORD})
    ).status_code == 200

    passwords = Passwords(settings)
    opened = passwords.open(event.password_hash, user_id)
    assert opened is not None and opened.startswith("$argon2id$")
    assert passwords.open(event.password_hash, "someone-else") is None  # bound to its user
    other = Passwords(msgspec.structs.replace(settings, jwt_secret="x" * 40))
    assert other.open(event.password_hash, user_id) is None  # only this gateway's key opens it


@pytest.fixture
async def strict(settings: Settings, projector: None) -> AsyncIterator[Litestar]:
    app = create_app(
        msgspec.structs.replace(settings, signin_max_failures=3, signin_max_failures_per_address=5, signin_window_s=60)
    )
    async with running(app):
        yield app


def client_at(app: Litestar, address: str) -> Client:
    transport = httpx.ASGITransport(app=cast(Any, app), client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway.test")


async def test_failed_signins_for_one_email_are_throttled(strict: Litestar) -> None:
    async with client_at(strict, "10.0.0.1") as one, client_at(strict, "10.0.0.2") as other:
        await one.post("/auth/signup", json={"email": "hank@example.com", "password": PASSWORD})
        for n, email in enumerate(("hank@example.com", "ghost@example.com")):  # known or not, alike
            wrong = {"email": email, "password": "not the password"}
            async with client_at(strict, f"10.0.1.{n}") as first:
                assert [(await first.post("/auth/signin", json=wrong)).status_code for _ in range(3)] == [401] * 3
            r = await other.post("/auth/signin", json=wrong)  # from another address: the email is what counts
            assert r.status_code == 429
            assert r.headers["content-type"].startswith("application/problem+json")
            assert 1 <= int(r.headers["retry-after"]) <= 60
            assert "too many failed sign-ins" in r.json()["detail"]
        # the right password does not get through a throttled email either
        r = await one.post("/auth/signin", json={"email": "hank@example.com", "password": PASSWORD})
        assert r.status_code == 429
        # other emails are not affected
        await one.post("/auth/signup", json={"email": "ivy@example.com", "password": PASSWORD})
        r = await other.post("/auth/signin", json={"email": "ivy@example.com", "password": PASSWORD})
        assert r.status_code == 200


async def test_failed_signins_from_one_address_are_throttled(strict: Litestar) -> None:
    async with client_at(strict, "10.0.0.3") as attacker, client_at(strict, "10.0.0.4") as bystander:
        await bystander.post("/auth/signup", json={"email": "jo@example.com", "password": PASSWORD})
        statuses = [
            (await attacker.post("/auth/signin", json={"email": f"u{i}@example.com", "password": "guess"})).status_code
            for i in range(6)
        ]
        assert statuses == [401] * 5 + [429]
        r = await attacker.post("/auth/signin", json={"email": "jo@example.com", "password": PASSWORD})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert (
            await bystander.post("/auth/signin", json={"email": "jo@example.com", "password": PASSWORD})
        ).status_code == 200


async def test_a_successful_signin_clears_the_emails_failures(strict: Litestar) -> None:
    async with client_at(strict, "10.0.0.5") as c:
        await c.post("/auth/signup", json={"email": "kim@example.com", "password": PASSWORD})
        wrong = {"email": "kim@example.com", "password": "nope nope"}
        for _ in range(2):
            assert (await c.post("/auth/signin", json=wrong)).status_code == 401
        assert (
            await c.post("/auth/signin", json={"email": "kim@example.com", "password": PASSWORD})
        ).status_code == 200
        assert [(await c.post("/auth/signin", json=wrong)).status_code for _ in range(3)] == [401, 401, 401]


async def test_signin_with_unstorable_text_is_a_plain_401(client: Client) -> None:
    for email in ("nul\x00@example.com", "\ud800@example.com"):
        r = await client.post(
            "/auth/signin",
            content=json.dumps({"email": email, "password": PASSWORD}),
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code in (400, 401), r.text
    r = await client.post("/auth/signup", json={"email": "nul\x00@example.com", "password": PASSWORD})
    assert r.status_code == 400
    r = await client.post("/auth/signup", json={"email": "ok@example.com", "password": PASSWORD, "username": "a\x00b"})
    assert r.status_code == 400
