"""Sign-up, sign-in and the token requirement, against real NATS, PostgreSQL and the projector."""

from __future__ import annotations

import pytest

from swarmtrain.gateway.auth import user_id_for
from tests.gateway.helpers import Client, Headers

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
