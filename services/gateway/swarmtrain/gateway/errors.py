"""Errors as RFC 9457 problem JSON (``type, title, status, detail``); never a stack trace.

Every 4xx/5xx the gateway sends goes through these handlers, whichever layer raised it (routing,
authentication, body parsing, a handler). An exception nobody expected is logged with its
traceback on the server and answered as a bare 500 problem, so no internal detail reaches a client.
``documented`` gives route handlers the matching OpenAPI ``responses``.
"""

from __future__ import annotations

import re
import sys
from http import HTTPStatus
from typing import Any

import asyncpg
import msgspec
import nats.errors
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.openapi.datastructures import ResponseSpec
from litestar.types import ExceptionHandlersMap

from swarmtrain.common.logging import get_logger
from swarmtrain.gateway.limits import body_too_large

PROBLEM_JSON = "application/problem+json"
log = get_logger("swarmtrain.gateway")


class Problem(msgspec.Struct, kw_only=True):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    """The HTTP status phrase."""
    status: int
    detail: str
    """What was wrong, for a person."""


class TooManyRequests(HTTPException):
    status_code = 429

    def __init__(self, detail: str, retry_after_s: float | None = None) -> None:
        headers = {"Retry-After": str(max(1, int(retry_after_s + 0.999)))} if retry_after_s is not None else None
        super().__init__(detail=detail, headers=headers)


class Conflict(HTTPException):
    status_code = 409


class Unavailable(HTTPException):
    status_code = 503

    def __init__(self, detail: str) -> None:
        super().__init__(detail=detail, headers={"Retry-After": "1"})


def problem(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> Response[Any]:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **extra,
    }
    return Response(content=body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


_DESCRIPTIONS = {
    400: "The request is malformed or breaks a rule; `detail` names the first problem.",
    401: "No valid access token (missing, expired, wrong issuer or audience, bad signature), or wrong credentials.",
    403: "The signed URL does not grant this request (bad signature, expired, another method or key).",
    404: "No such resource, or it belongs to someone else.",
    409: "The resource is in a state that forbids this.",
    413: "The request body is larger than the limit.",
    429: "Too many requests of this kind; `Retry-After` says when to try again, where known.",
    500: "An unexpected error; the server logged it.",
    503: "A backend (event store, read models, blob store) is unavailable; retry shortly.",
}
ALWAYS = (500, 503)


def documented(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI ``responses`` for the problem statuses a route answers (500 and 503 always)."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            description=_DESCRIPTIONS[status],
            media_type=PROBLEM_JSON,
            generate_examples=False,
        )
        for status in sorted({*statuses, *ALWAYS})
    }


_BOUND = re.compile(r"^Expected `\w+` (>=|<=|>|<) (\S+)$")
_LENGTH = re.compile(r"^Expected `(\w+)` of length (>=|<=) (\d+)$")
_AT = re.compile(r"^(?P<message>.*) - at `\$(?P<path>[^`]*)`$")
_WORDS = {">=": "at least", "<=": "at most", ">": "greater than", "<": "less than"}


def _number(text: str) -> str:
    value = float(text)
    return str(int(value)) if value.is_integer() and abs(value) < 2**63 else text


def validation_message(message: str, field: str | None) -> str:
    """A msgspec validation message as a sentence that names the field: ``Expected `int` >= 1`` at
    ``hyperparameters[0].epochs`` reads "hyperparameters[0].epochs must be at least 1"; a message
    that is not about a bound keeps msgspec's words, after the field's name."""
    if field and (bound := _BOUND.match(message)):
        op, value = bound.groups()
        if op in ("<=", "<") and float(value) >= sys.float_info.max:
            return f"{field} must be a finite number"
        return f"{field} must be {_WORDS[op]} {_number(value)}"
    if field and (length := _LENGTH.match(message)):
        kind, op, count = length.groups()
        unit = "character" if kind == "str" else "item"
        return f"{field} must have {_WORDS[op]} {count} {unit}{'' if count == '1' else 's'}"
    return f"{field}: {message}" if field else message


def describe(exc: msgspec.ValidationError, root: str = "") -> str:
    """``validation_message`` for an error msgspec raised itself, its path read from the message
    (``$[0].epochs`` under ``root`` "hyperparameters" names "hyperparameters[0].epochs")."""
    at = _AT.match(str(exc))
    if at is None:
        return validation_message(str(exc), root or None)
    path = at["path"].removeprefix(".") if not root else at["path"]
    return validation_message(at["message"], f"{root}{path}" or None)


def _validation_detail(exc: ValidationException) -> str:
    messages = [
        validation_message(str(e.get("message", "")), None if e.get("key") in (None, "data") else str(e["key"]))
        for e in exc.extra or []  # type: ignore[union-attr]
        if isinstance(e, dict) and e.get("message")
    ]
    return "; ".join(messages) if messages else exc.detail


def _on_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if body_too_large(request):  # the body was cut at the limit: what failed after is a symptom
        exc = RequestEntityTooLarge()
    if isinstance(exc, ValidationException):
        return problem(exc.status_code, _validation_detail(exc), exc.headers)
    if isinstance(exc, RequestEntityTooLarge):
        limit = request.route_handler.resolve_request_max_body_size() if "route_handler" in request.scope else None
        size = f"{limit // (1 << 20)} MiB" if limit and limit % (1 << 20) == 0 else f"{limit} bytes"
        return problem(exc.status_code, f"request body larger than the {size} limit", exc.headers)
    if exc.status_code >= 500:
        log.error("request failed", path=request.url.path, status=exc.status_code, error=exc.detail)
    return problem(exc.status_code, exc.detail, exc.headers)


def _on_unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if isinstance(exc, nats.errors.Error):
        what = "event store"
    elif isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | asyncpg.InternalClientError):
        what = "read-model database"
    else:
        what = "storage"
    log.warning("backend unavailable", path=request.url.path, backend=what, error=repr(exc))
    return problem(503, f"the {what} is unavailable; try again shortly", {"Retry-After": "1"})


def _on_too_deep(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """A body nested deeper than the decoder recurses (a ``layers`` model's residual blocks within
    residual blocks, thousands deep): a 400, not a crash."""
    return problem(400, "the request body nests too deep (a layers model's residual blocks nest at most 4 deep)")


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error", path=request.url.path, method=request.method)
    return problem(500, "internal server error")


def handlers() -> ExceptionHandlersMap:
    return {
        HTTPException: _on_http_exception,
        nats.errors.Error: _on_unavailable,
        asyncpg.UndefinedTableError: _on_unavailable,  # the projector has not created its schema yet
        asyncpg.PostgresConnectionError: _on_unavailable,
        asyncpg.CannotConnectNowError: _on_unavailable,
        asyncpg.InterfaceError: _on_unavailable,
        asyncpg.InternalClientError: _on_unavailable,  # a connection broken mid-operation by a restart
        OSError: _on_unavailable,
        RecursionError: _on_too_deep,
        Exception: _on_unexpected,
    }
